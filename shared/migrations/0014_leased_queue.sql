-- One leased queue (shared/leased_queue.py) for jobs and emails: a claim writes a fresh token
-- into leased_by, and only its holder may renew, finish, fail or release the row.
ALTER TABLE emails ADD COLUMN leased_by text;
