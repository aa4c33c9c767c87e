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
-- then `ordermill migrate` finds them so (IF NOT EXISTS, IF EXISTS). Check first that none was
-- left INVALID by a failed concurrent build (psql \d orders); drop such an index and build it
-- again.
CREATE INDEX IF NOT EXISTS orders_flagged_status_idx ON orders (created_at, id)
    INCLUDE (status) WHERE deleted_at IS NULL AND screening IN ('error', 'failed');

-- DROP INDEX takes an ACCESS EXCLUSIVE lock on orders until the commit (reads wait too, for
-- the drop only); give up after a few seconds behind a long read (run `ordermill migrate`
-- again).
SET LOCAL lock_timeout = '5s';
DROP INDEX IF EXISTS orders_flagged_created_idx;
