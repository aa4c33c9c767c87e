-- A backlog of orders waiting for review is one staff alert, not one per order
-- (services/alerts/sweeper.py): each order of the backlog gets an alert row of its own, so
-- it never alerts again, that names the summary alert that told the staff about it and sends
-- nothing itself. No foreign key: housekeeping deletes alerts by age, as any alert.
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS summary_id bigint;
