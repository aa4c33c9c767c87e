-- A hash of each handled message's body: a message id seen before with another body is a
-- publisher reusing ids, refused with a reason, not a redelivery skipped without a trace.
-- Rows from before have none and are not compared.
ALTER TABLE inbox ADD COLUMN body_hash bytea;
