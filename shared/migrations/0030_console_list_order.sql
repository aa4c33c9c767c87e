-- Issue 13, the console's pending/orders list at a million orders: it is read oldest first by
-- (created_at, id), so every filter is a range of an index in the list's own order and a page
-- reads its 51 rows from where the range starts (console/queries.py order_list). In id order a
-- date filter walked every order of the status from the first one (created_at follows id, so
-- the planner's guess that matching rows are spread evenly was wrong): 200-300 ms at 1M.
--
-- Locks: a plain CREATE INDEX (migrations run in a transaction, where CONCURRENTLY cannot)
-- takes a SHARE lock on orders until this migration commits: reads go on, writes to orders
-- (placement, screening, review) wait. At a million orders that is about 7 s on 2 cores
-- (bench/console_pages.py's database: the three builds 2.2, 2.2 and 0.4 s, the ANALYZE below 2 s),
-- the messages waiting meanwhile in their queues. To keep writes going on a big
-- table, build them beforehand outside a transaction with the same definitions as
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_status_created_idx ON orders ...;
-- then `ordermill migrate` skips them (IF NOT EXISTS). Check first that none was left
-- INVALID by a failed concurrent build (psql \d orders); drop such an index and build it again.

-- The list per status (and the review queue: Pending, screening finished), with or without
-- dates. It supersedes 0001's orders_status_idx (status, created_at), a prefix of it: the
-- re-screen command's query (cli/fraud.py) reads this one instead.
CREATE INDEX IF NOT EXISTS orders_status_created_idx ON orders (status, created_at, id)
    WHERE deleted_at IS NULL;

-- The list by screening result (0017's orders_screening_id_idx stays: the dashboard's flagged
-- orders are read in id order).
CREATE INDEX IF NOT EXISTS orders_screening_created_idx ON orders (screening, created_at, id)
    WHERE deleted_at IS NULL;

-- "Flagged" (screening errored, or failed: over the threshold): two screening values, which
-- one btree range cannot give in the list's order on PostgreSQL 15; a few rows among all.
CREATE INDEX IF NOT EXISTS orders_flagged_created_idx ON orders (created_at, id)
    WHERE deleted_at IS NULL AND screening IN ('error', 'failed');

-- Status and screening go together (every Fraud order failed its screening; Pending ones are
-- the only ones queued): without statistics on the pair the planner multiplies their shares,
-- expects a hundred "Fraud and flagged" orders where there are ten thousand, and sorts and
-- joins them all before the page's LIMIT (0.9 s at 1M). Filled by ANALYZE: here on a database
-- that already holds orders, rather than whenever autovacuum next analyzes orders (after a
-- tenth of it has changed). Neither blocks reads or writes (SHARE UPDATE EXCLUSIVE); ANALYZE
-- takes about 2 s at 1M. Never on a new or small database: statistics taken of an empty table
-- stay until the next analyze, and on a server without autovacuum the fraud screening's
-- queries were then planned for an empty orders table for good (placement + fraud did half
-- the orders/s in bench/pipeline.py: 126 against 235).
CREATE STATISTICS IF NOT EXISTS orders_status_screening_stats (mcv, dependencies)
    ON status, screening FROM orders;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM orders OFFSET 9999 LIMIT 1) THEN
        ANALYZE orders;
    END IF;
END
$$;

-- Without a status or a screening the list reads 0017's orders_created_id_idx (created_at, id);
-- a client's orders, 0001's orders_client_idx (client_id, created_at); a product, 0017's
-- services_product_order_idx: each order probed on it as the list's index walks (a product many
-- orders have), or the product's services read on it and their orders fetched by id (one few
-- have), as console/queries.py chooses.

-- Last: DROP INDEX takes an ACCESS EXCLUSIVE lock on orders, held (inside the migration's
-- transaction) until it commits, and blocking reads too: after the builds and the ANALYZE
-- above, so that it is held only for the commit.
DROP INDEX IF EXISTS orders_status_idx;
