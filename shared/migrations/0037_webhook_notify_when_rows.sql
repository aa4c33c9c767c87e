-- Issue 15, sustained load: the webhook worker's INSERT ... SELECT into webhook_deliveries
-- (services/webhooks/outbound.py) runs for every event it hears, and inserts nothing when no
-- endpoint subscribes to the event: the usual case. Its statement-level trigger notified
-- all the same, so every event cost a NOTIFY, which woke the process's LISTEN connection (a
-- transaction of the server's to read the queue) and the webhook sender (a pass that looked
-- for due deliveries and found none). An insert now notifies only when it inserted a row (its
-- transition table says so); a change of next_attempt_at (a retry rescheduled, a delivery
-- sent again by an operator) notifies as before. The sender's timer is unchanged.
--
-- Locks: DROP TRIGGER and CREATE TRIGGER take a brief exclusive lock on webhook_deliveries
-- (in the migration's transaction): deliveries wait for the migration to commit.
DROP TRIGGER IF EXISTS webhook_deliveries_notify ON webhook_deliveries;

CREATE OR REPLACE FUNCTION webhook_deliveries_notify_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM added) THEN
        PERFORM pg_notify('ordermill_webhooks', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER webhook_deliveries_notify_added AFTER INSERT ON webhook_deliveries
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_deliveries_notify_added();

-- Transition tables allow one event per trigger, and no column list: updates keep their own.
CREATE TRIGGER webhook_deliveries_notify AFTER UPDATE OF next_attempt_at ON webhook_deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_deliveries_notify();
