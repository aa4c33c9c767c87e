-- The message that made a job needed (a payment, order.screened, order.accepted, order.retry):
-- the correlation_id of the events the job emits, so service.created traces back to it.
ALTER TABLE jobs ADD COLUMN caused_by text;
