-- Issue 15, bounded tables: housekeeping (shared/housekeeping.py) deletes what is past its
-- retention window in small batches; each table's finished rows are found by the time they
-- finished, through these indexes, not by reading the whole window.
CREATE INDEX outbox_published_idx ON outbox (published_at) WHERE published_at IS NOT NULL;
CREATE INDEX inbox_processed_idx ON inbox (processed_at);
CREATE INDEX jobs_finished_idx ON jobs (updated_at) WHERE status IN ('done', 'cancelled');
CREATE INDEX emails_sent_idx ON emails (sent_at) WHERE status = 'sent';
