-- Issue 13, the console's list of flagged orders with a status ("Fraud and flagged" at 1M
-- orders): 0030's orders_flagged_created_idx (created_at, id) holds the flagged orders in the
-- list's order but not their status, so its count (up to 1,001) fetched each order from the
-- heap to read it: 953 pages, one per order (a Fraud order in 97), on a first visit not in
-- shared buffers. With the status in the index (INCLUDE: carried, not searched) the count and
-- the page's keys are read on the index alone: 7 buffers.
--
-- Writes: none more than before. The index holds only flagged orders (screening errored or
-- failed, about one in a hundred); an order gets its entry when the fraud service sets that
-- screening, and again on each later update that is not HOT (a status change never is: status
-- is indexed), as 0030's did. Each entry is a few bytes longer: 424 kB at 1M orders.
--
-- Locks: CREATE INDEX (in the migration's transaction) takes a SHARE lock on orders until this
-- migration commits: reads go on, writes wait; it reads the whole table (about a second at 1M
-- on 2 cores) to enter the few flagged rows. To keep writes going on a big table, build it
-- beforehand outside a transaction with the same definition:
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_flagged_status_idx ON orders (created_at, id)
--       INCLUDE (status) WHERE deleted_at IS NULL AND screening IN ('error', 'failed');
--   DROP INDEX CONCURRENTLY IF EXISTS orders_flagged_created_idx;
-- then `ordermill migrate` finds them so (IF NOT EXISTS, IF EXISTS); it refuses an INVALID
-- one left by a failed concurrent build (below): drop it and build it again.
--
-- Both locks are waited for at most a few seconds (then run `ordermill migrate` again): the
-- build's SHARE lock queues behind any open write on orders, and every placement and
-- screening would queue behind it; DROP INDEX's ACCESS EXCLUSIVE lock (reads wait too, for
-- the drop only) queues behind any long read.
SET LOCAL lock_timeout = '5s';

-- A concurrent build that failed leaves an INVALID index under the name: IF NOT EXISTS would
-- take it, and the drop below would then leave the flagged list no valid index at all.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE c.relname = 'orders_flagged_status_idx' AND NOT i.indisvalid) THEN
        RAISE EXCEPTION USING
            MESSAGE = 'orders_flagged_status_idx is INVALID (a failed CREATE INDEX CONCURRENTLY)',
            HINT = 'DROP INDEX CONCURRENTLY orders_flagged_status_idx; then run ordermill migrate again';
    END IF;
END $$;

CREATE INDEX IF NOT EXISTS orders_flagged_status_idx ON orders (created_at, id)
    INCLUDE (status) WHERE deleted_at IS NULL AND screening IN ('error', 'failed');

DROP INDEX IF EXISTS orders_flagged_created_idx;
