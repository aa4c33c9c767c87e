-- Issue 15, target 2: the mail sender's claim reads the due mails, not the sent ones before them.
--
-- The claim (shared/leased_queue.py) takes the due mails in id order, LIMIT a pass's batch,
-- FOR UPDATE SKIP LOCKED. 0006's emails_due_idx holds the unsent mails by next_attempt_at,
-- not in id order: for a LIMIT the planner walked the primary key instead, and every sent
-- mail kept for EMAIL_RETENTION_DAYS lies before the due ones there. During a backlog (when a
-- pass's cost matters) each claim stepped over the whole retained history: 20,000 sent mails,
-- 4-5 ms on an idle machine, 15-21 ms a pass in bench/sustained.py's steady phase, and
-- growing with the history (tests/test_mail_throughput.py). In id order, the claim reads its
-- batch's rows and stops.
--
-- It replaces emails_due_idx: the same entries (mails pending or being sent: a few at a
-- steady flow, the backlog otherwise), which also serve the exporter's count of them. No
-- write gets an index entry more than before.
--
-- Locks: CREATE INDEX (in the migration's transaction) takes a SHARE lock on emails until
-- this migration commits: the notify worker's inserts and the sender's updates wait; it reads
-- the whole table (the retained sent mails) to enter the few unsent ones. To keep writes
-- going on a big table, build it beforehand outside a transaction with the same definition:
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS emails_due_id_idx ON emails (id)
--       WHERE status IN ('pending', 'sending');
--   DROP INDEX CONCURRENTLY IF EXISTS emails_due_idx;
-- then `ordermill migrate` finds them so; it refuses an INVALID one left by a failed
-- concurrent build (below): drop it and build it again.
SET LOCAL lock_timeout = '5s';

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE c.relname = 'emails_due_id_idx' AND NOT i.indisvalid) THEN
        RAISE EXCEPTION USING
            MESSAGE = 'emails_due_id_idx is INVALID (a failed CREATE INDEX CONCURRENTLY)',
            HINT = 'DROP INDEX CONCURRENTLY emails_due_id_idx; then run ordermill migrate again';
    END IF;
END $$;

CREATE INDEX IF NOT EXISTS emails_due_id_idx ON emails (id) WHERE status IN ('pending', 'sending');
DROP INDEX IF EXISTS emails_due_idx;
