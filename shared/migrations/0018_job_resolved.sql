-- A parked job an operator resolved by hand (review action `resolve`, the console's module
-- queue "Mark resolved"): kept with its last error, out of every queue and list of parked.
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('pending', 'running', 'done', 'parked', 'cancelled', 'resolved'));
