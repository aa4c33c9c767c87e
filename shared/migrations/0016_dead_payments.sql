-- A payment taken from the dead-letter queue (expired in the queue, delivery limit, refused
-- as not a payment at all) is kept unapplied with the body it came with, for an operator.
ALTER TABLE payments ADD COLUMN dead_letter text;
