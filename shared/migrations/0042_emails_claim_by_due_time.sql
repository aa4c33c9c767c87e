-- Issue 15, target 2: the mail sender's claim reads only the mails that are due.
--
-- 0041's emails_due_id_idx (id) WHERE status IN ('pending', 'sending') kept the claim off the
-- sent history, but the claim, in id order, still read every unsent mail waiting out a backoff
-- (after an SMTP outage: 50,000 of them, on every pass; tests/test_mail_throughput.py). The
-- claim now takes mails in the order they became due (`next_attempt_at, id`) and says
-- `next_attempt_at <= now()` first (shared/leased_queue.py): on this index its range ends at
-- now(), and it stops at its LIMIT. Same entries as 0041's; no write gets one more.
--
-- Locks: as 0041 (a SHARE lock on emails until this migration commits, while the few unsent
-- mails are entered). On a big table, build it beforehand outside a transaction:
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS emails_due_at_idx ON emails (next_attempt_at, id)
--       WHERE status IN ('pending', 'sending');
--   DROP INDEX CONCURRENTLY IF EXISTS emails_due_id_idx;
-- then `ordermill migrate` finds them so; it refuses an INVALID one left by a failed
-- concurrent build: drop it and build it again.
SET LOCAL lock_timeout = '5s';

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE c.relname = 'emails_due_at_idx' AND NOT i.indisvalid) THEN
        RAISE EXCEPTION USING
            MESSAGE = 'emails_due_at_idx is INVALID (a failed CREATE INDEX CONCURRENTLY)',
            HINT = 'DROP INDEX CONCURRENTLY emails_due_at_idx; then run ordermill migrate again';
    END IF;
END $$;

CREATE INDEX IF NOT EXISTS emails_due_at_idx ON emails (next_attempt_at, id)
    WHERE status IN ('pending', 'sending');
DROP INDEX IF EXISTS emails_due_id_idx;
