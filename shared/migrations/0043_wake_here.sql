-- Issue 15, sustained load: work heard in the process that wrote it (shared/wakeup.py).
--
-- Every commit that inserted an event, a job, a mail or a webhook delivery notified its
-- channel, and PostgreSQL signals every listening backend of the database at such a commit:
-- each of `ordermill run`'s worker processes read the notification queue in a transaction
-- of the server's (2.8 an order at the steady rate), and every process's relay woke for
-- events only one of them would take (0.68 passes an order that found nothing). Notifying
-- commits also queue behind one lock for the whole cluster, held to the end of the commit.
--
-- A statement that writes such rows may now say, with `ordermill_heard_here(channel)`, that
-- a loop of its own process wakes on the channel after the commit (the process does that
-- itself, in memory); its statement-level trigger then does not notify. The flag is that
-- statement's: set transaction-local (set_config's is_local, so a savepoint's rollback undoes
-- it), it is taken by the statement's own trigger, and every later statement must say so
-- again: any other writer (the CLI, the console, a sweeper writing another service's events,
-- a process with no such loop, an older worker during a rolling upgrade) still notifies. A
-- NULL channel sets nothing: the caller passes NULL where no loop of its process hears it.
CREATE OR REPLACE FUNCTION ordermill_heard_here(channel text) RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT channel IS NULL OR set_config('ordermill.heard_' || channel, 'on', true) = 'on'
$$;

-- Whether this statement said its rows are heard in its process; the flag is taken.
CREATE OR REPLACE FUNCTION ordermill_heard_taken(channel text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF coalesce(current_setting('ordermill.heard_' || channel, true), '') = 'on' THEN
        PERFORM set_config('ordermill.heard_' || channel, '', true);
        RETURN true;
    END IF;
    RETURN false;
END $$;

CREATE OR REPLACE FUNCTION ordermill_wake(channel text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF NOT ordermill_heard_taken(channel) THEN
        PERFORM pg_notify(channel, '');
    END IF;
END $$;

CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ordermill_wake('ordermill_outbox');
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ordermill_wake('ordermill_jobs');
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION emails_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ordermill_wake('ordermill_emails');
    RETURN NULL;
END $$;

-- An insert that added no delivery notifies nobody (0037), and takes its flag all the same.
CREATE OR REPLACE FUNCTION webhook_deliveries_notify_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT ordermill_heard_taken('ordermill_webhooks') AND EXISTS (SELECT FROM added) THEN
        PERFORM pg_notify('ordermill_webhooks', '');
    END IF;
    RETURN NULL;
END $$;
