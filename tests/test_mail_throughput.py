"""The mail sender at a steady flow (issue 15, target 2): its claim reads the mails that are
due, not the history of sent ones before them, and a server that takes fewer connections
than SMTP_CONNECTIONS gets every mail over the ones it took, no attempt spent. Staff mails
(their own context, no order) stand for any mail: the database alone, no broker."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from test_notify import Inbox, free_port

from services.notify.mail import STAFF_TEMPLATE
from services.notify.sender import EMAILS, MailSender
from shared import db
from shared.leased_queue import LeasedQueue
from shared.settings import Settings

CONTEXT = {"subject": "Queue backlog", "description": "", "facts": {"queue": "notify"},
           "link": None, "rule": "backlog"}


@pytest.fixture
async def pool(db_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    made = await db.create_pool(db_settings.database_url, max_size=4, attempts=3)
    try:
        yield made
    finally:
        await made.close()


async def queue_mails(pool: asyncpg.Pool, count: int, *, status: str = "pending",
                      first: int = 1) -> None:
    await pool.execute(
        "INSERT INTO emails (dedupe_key, template, recipient, order_id, message_id, context,"
        " status, sent_at)"
        " SELECT 'k' || g, $1, 'staff' || g || '@host.example', NULL, '<' || g || '@host.example>',"
        "  $2::jsonb, $3, CASE WHEN $3 = 'sent' THEN now() END"
        " FROM generate_series($4::int, $4::int + $5::int - 1) g",
        STAFF_TEMPLATE, CONTEXT, status, first, count)


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


async def test_a_claim_reads_the_due_mails_not_the_sent_history_before_them(
    pool: asyncpg.Pool,
) -> None:
    """20,000 sent mails (kept for EMAIL_RETENTION_DAYS) and 2,000 due ones after them, as
    during a backlog: claiming 64 reads about 64 rows. On the primary key in id order it
    stepped over every sent mail first (4-5 ms on an idle machine at 20,000, and growing
    with the retained history), on every pass."""
    await queue_mails(pool, 20_000, status="sent")
    await queue_mails(pool, 2_000, first=20_001)
    await pool.execute("ANALYZE emails")
    queue = LeasedQueue(EMAILS)
    async with pool.acquire() as conn:
        read, plan = await _rows_a_claim_reads(conn, queue, 64)
        assert read <= 3 * 64, plan
        claimed = await queue.claim(conn, 64)
    assert sorted(r["id"] for r in claimed) == list(range(20_001, 20_065))  # the oldest due


async def test_a_claim_does_not_read_the_mails_waiting_out_a_backoff(pool: asyncpg.Pool) -> None:
    """After an SMTP outage 50,000 mails wait for their next attempt; a claim reads the few
    that are due, not every one waiting (0041's index in id order read them all, every pass),
    and takes them in the order they became due."""
    await queue_mails(pool, 50_000)
    await pool.execute("UPDATE emails SET next_attempt_at = now() + interval '1 hour',"
                       " attempts = 1")
    await queue_mails(pool, 50, first=50_001)
    await pool.execute("UPDATE emails SET next_attempt_at = now() - interval '1 minute'"
                       " WHERE id > 50025")  # due earlier than the others: first out
    await pool.execute("ANALYZE emails")
    queue = LeasedQueue(EMAILS)
    async with pool.acquire() as conn:
        read, plan = await _rows_a_claim_reads(conn, queue, 64)
        assert read <= 3 * 64, plan
        claimed = await queue.claim(conn, 30)
    # The 25 due a minute ago, then the oldest 5 of those due now (none of the 50,000).
    assert sorted(r["id"] for r in claimed) == (list(range(50_001, 50_006))
                                               + list(range(50_026, 50_051)))


async def _rows_a_claim_reads(conn: asyncpg.Connection, queue: LeasedQueue,
                              n: int) -> tuple[int, dict[str, Any]]:
    """The rows of emails the claim's plan read (returned or filtered out), claiming n, in a
    transaction rolled back."""
    tx = conn.transaction()
    await tx.start()
    try:
        explained = await conn.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queue._claim.format(""),
            queue.runner_id, queue.lease, n)
    finally:
        await tx.rollback()
    plan = (json.loads(explained) if isinstance(explained, str) else explained)[0]["Plan"]
    read = sum(node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
               for node in _nodes(plan) if node.get("Relation Name") == "emails"
               and node["Node Type"] in ("Index Scan", "Index Only Scan", "Seq Scan",
                                         "Bitmap Heap Scan"))
    return read, plan


class LimitedSMTP(SMTP):
    """Greets at most `limit` connections at once; one more is told 421 and closed, as Exim
    does past smtp_accept_max_per_host."""

    def __init__(self, server: LimitedServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server = server

    async def _handle_client(self) -> None:
        if self.server.open >= self.server.limit:
            self.server.refused += 1
            await self.push("421 4.7.0 too many connections from your host")
            assert self.transport is not None
            self.transport.close()
            return
        self.server.open += 1
        self.server.sessions += 1
        try:
            await super()._handle_client()
        finally:
            self.server.open -= 1


class LimitedServer(Controller):
    """Counts the sessions it took and the connections it refused (its own check at start,
    a connection of its own, is one of them)."""

    def __init__(self, inbox: Inbox, port: int, limit: int) -> None:
        super().__init__(inbox, hostname="127.0.0.1", port=port)
        self.limit, self.open, self.refused, self.sessions = limit, 0, 0, 0

    def factory(self) -> SMTP:
        return LimitedSMTP(self, self.handler, **self.SMTP_kwargs)


@contextmanager
def limited(inbox: Inbox, limit: int) -> Iterator[tuple[LimitedServer, int]]:
    port = free_port()
    server = LimitedServer(inbox, port, limit)
    server.start()
    try:
        yield server, port
    finally:
        server.stop()


async def test_a_server_taking_fewer_connections_gets_every_mail_over_those_none_is_an_outage(
    pool: asyncpg.Pool, db_settings: Settings,
) -> None:
    inbox = Inbox()
    with limited(inbox, limit=2) as (server, port):
        s = db_settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port,
                                           "smtp_connections": 4, "job_max_attempts": 3})
        sender = MailSender(s.mail, None)
        await queue_mails(pool, 8)
        refused, sessions = server.refused, server.sessions  # the controller's own check
        assert await sender.send_due(pool) == 8
        assert len(inbox.messages) == 8
        assert (server.sessions - sessions, server.refused - refused) == (2, 2)
        rows = await pool.fetch("SELECT status, attempts, last_error FROM emails")
        assert {(r["status"], r["attempts"], r["last_error"]) for r in rows} == {("sent", 1, None)}
        # The next passes ask for no more than the server took: no connection refused again.
        await queue_mails(pool, 8, first=9)
        assert await sender.send_due(pool) == 8
        await sender.close()
        assert len(inbox.messages) == 16
        assert (server.sessions - sessions, server.refused - refused) == (2, 2)

        # A server that takes none is away, not limiting: each mail's attempt counts, and
        # it is retried with backoff, as before.
        server.limit = 0
        await sender.close()
        await queue_mails(pool, 4, first=17)
        refused = server.refused
        assert await sender.send_due(pool) == 4
        assert server.refused - refused == 2  # as many as the server took before
        rows = await pool.fetch("SELECT status, attempts, last_error FROM emails WHERE id > 16")
        assert all(r["status"] == "pending" and r["attempts"] == 1 and "421" in r["last_error"]
                   for r in rows) and len(rows) == 4
