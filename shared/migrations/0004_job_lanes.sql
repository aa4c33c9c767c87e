-- Each job runs in a lane (a server, or a module or registrar with no server): a slow or
-- failing server fills only its own lane, never the others'.
ALTER TABLE jobs ADD COLUMN lane text NOT NULL DEFAULT '';
CREATE INDEX jobs_lane_due_idx ON jobs (lane, next_attempt_at) WHERE status IN ('pending', 'running');
