-- Replies to operators' commands go through the outbox too (sent only once the command's
-- effects are committed), straight to the asker's queue by the default exchange.
ALTER TABLE outbox ADD COLUMN direct boolean NOT NULL DEFAULT false;
