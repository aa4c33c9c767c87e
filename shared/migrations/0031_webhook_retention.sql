-- Issue 15, bounded tables: webhook deliveries fill with every event an endpoint subscribes
-- to; housekeeping (shared/housekeeping.py) deletes the delivered and cancelled ones past
-- WEBHOOK_RETENTION_DAYS (their attempts go with them), found by the time they finished.
--
-- Locks: a plain CREATE INDEX (in the migration's transaction) holds a SHARE lock on
-- webhook_deliveries until it commits: new deliveries wait for the build. On a big table build
-- it beforehand, outside a transaction, with the same definition:
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS webhook_deliveries_finished_idx ON ...;
-- then `ordermill migrate` skips it (check first that it is not left INVALID: psql \d).
CREATE INDEX IF NOT EXISTS webhook_deliveries_finished_idx ON webhook_deliveries (updated_at)
    WHERE status IN ('delivered', 'cancelled');
