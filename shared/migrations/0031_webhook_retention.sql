-- Issue 15, bounded tables: webhook deliveries fill with every event an endpoint subscribes
-- to; housekeeping (shared/housekeeping.py) deletes the delivered and cancelled ones past
-- WEBHOOK_RETENTION_DAYS (their attempts go with them), found by the time they finished.
CREATE INDEX webhook_deliveries_finished_idx ON webhook_deliveries (updated_at)
    WHERE status IN ('delivered', 'cancelled');
