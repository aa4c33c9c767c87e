"""Work heard where it is written (shared/wakeup.py, migration 0043): a commit that wrote
events, mails or deliveries for a loop of its own process wakes that loop in memory, and its
trigger does not NOTIFY (every process's listener, and every relay, would wake for rows one
of them takes). Any other writer still notifies."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
import pytest
from test_payment_statements import _payment, _screened

from conftest import eventually
from services.notify.worker import _Mail, record_mails
from services.provisioning.reconcile import JOBS_CHANNEL
from services.webhooks.outbound import Outbound, enqueue
from shared.outbox import CHANNEL as OUTBOX
from shared.runtime.testing import InMemoryFlow
from shared.settings import Settings
from shared.uow import MessageContext, UnitOfWork, flush_events, write_event
from shared.wakeup import Wakeup, _here

Notifies = Callable[[str], Awaitable[int]]


@pytest.fixture
async def notifies(db_settings: Settings) -> AsyncIterator[Notifies]:
    """How many NOTIFYs a channel has had so far. Notifications arrive in commit order, so
    once a mark sent after the writes is heard, every NOTIFY of theirs has been."""
    heard: list[tuple[str, str]] = []
    listener = await asyncpg.connect(db_settings.database_url)
    marker = await asyncpg.connect(db_settings.database_url)
    for channel in (OUTBOX, "ordermill_emails", "ordermill_webhooks", JOBS_CHANNEL):
        await listener.add_listener(channel, lambda _c, _p, ch, payload: heard.append((ch, payload)))

    async def count(channel: str) -> int:
        mark = f"mark-{len(heard)}"
        await marker.execute("SELECT pg_notify($1, $2)", channel, mark)
        await eventually(lambda: asyncio.sleep(0, (channel, mark) in heard), timeout=5)
        return sum(1 for ch, payload in heard if ch == channel and payload == "")

    try:
        yield count
    finally:
        await listener.close()
        await marker.close()


@asynccontextmanager
async def _loop_here(database_url: str | None, channel: str) -> AsyncIterator[Wakeup]:
    """A loop of this process waiting on `channel` (None: no LISTEN of its own, so only the
    in-memory wake-up can set it), closed at the end."""
    loop = Wakeup(database_url, channel)
    await loop.ensure()
    try:
        yield loop
    finally:
        await loop.close()


def _uow(conn: asyncpg.Connection, n: int) -> UnitOfWork:
    uow = UnitOfWork(conn, MessageContext(consumer="placement", message_id=f"m-{n}",
                                          routing_key="order.place",
                                          received_at=datetime.now(UTC)))
    uow.emit("order.test", {"n": n})
    return uow


async def _emit(pool: asyncpg.Pool, n: int, *, fail: bool = False) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await flush_events(conn, [_uow(conn, n)])
        if fail:
            raise RuntimeError("rolled back")


async def test_a_units_events_wake_the_relay_here_and_notify_nobody(
        pool: asyncpg.Pool, db_settings: Settings, notifies: Notifies) -> None:
    async with _loop_here(None, OUTBOX) as relay:
        await _emit(pool, 1)
        assert relay.event.is_set()  # at once, in memory: no round trip through the server
        assert await notifies(OUTBOX) == 0
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 1

        relay.event.clear()
        with pytest.raises(RuntimeError):
            await _emit(pool, 2, fail=True)
        assert not relay.event.is_set()  # nothing committed: nothing to wake for

        # A savepoint's commit is not the transaction's: the wake waits for the end.
        async with pool.acquire() as conn, conn.transaction():
            async with conn.transaction():
                await flush_events(conn, [_uow(conn, 3)])
            assert not relay.event.is_set()
        assert relay.event.is_set()
        assert await notifies(OUTBOX) == 0


async def test_with_no_loop_here_or_no_transaction_the_trigger_notifies(
        pool: asyncpg.Pool, db_settings: Settings, notifies: Notifies) -> None:
    await _emit(pool, 1)  # no relay in this process: every other process's must hear it
    assert await notifies(OUTBOX) == 1

    async with _loop_here(None, OUTBOX) as relay:
        async with pool.acquire() as conn:  # a statement on its own: nothing follows its commit
            await flush_events(conn, [_uow(conn, 2)])
        assert await notifies(OUTBOX) == 2
        assert not relay.event.is_set()
    await _emit(pool, 3)  # closed: no longer here
    assert await notifies(OUTBOX) == 3


async def test_a_wake_here_lasts_only_its_transaction(
        pool: asyncpg.Pool, db_settings: Settings, notifies: Notifies) -> None:
    """The trigger's skip is the transaction's setting: the next transaction on the same
    connection, written for nobody here, notifies again."""
    async with _loop_here(db_settings.database_url, OUTBOX):
        async with pool.acquire() as conn:
            async with conn.transaction():
                await flush_events(conn, [_uow(conn, 1)])
            await conn.execute(
                "INSERT INTO outbox (message_id, routing_key, body) VALUES ($1, 'x', '{}')",
                uuid.uuid4())
        assert await notifies(OUTBOX) == 1


async def test_mails_and_deliveries_wake_their_senders_here(
        pool: asyncpg.Pool, db_settings: Settings, notifies: Notifies) -> None:
    client_id = await pool.fetchval(
        "INSERT INTO clients (email) VALUES ('a@example.com') RETURNING id")
    order_id = await pool.fetchval(
        "INSERT INTO orders (order_ref, order_number, client_id, currency, send_confirmation,"
        " generate_invoice, total) VALUES ('w-1', 1, $1, 'USD', true, true, 10) RETURNING id",
        client_id)
    await pool.execute(
        "INSERT INTO webhook_endpoints (url, events, secret)"
        " VALUES ('https://hooks.example/in', '{order.placed}', 'plain:whsec_x')")
    async with (_loop_here(None, "ordermill_emails") as mails,
                _loop_here(None, "ordermill_webhooks") as hooks):
        async with pool.acquire() as conn, conn.transaction():
            await record_mails(conn, [_Mail("k-1", "order_confirmation", "a@example.com", order_id,
                                            "<k-1@example.com>")])
            assert await enqueue(conn, [Outbound("order.placed", {"order_ref": "w-1"}, "e-1")]) == 1
        assert mails.event.is_set() and hooks.event.is_set()
        assert await notifies("ordermill_emails") == 0
        assert await notifies("ordermill_webhooks") == 0
    async with pool.acquire() as conn, conn.transaction():
        await record_mails(conn, [_Mail("k-2", "order_confirmation", "a@example.com", order_id,
                                        "<k-2@example.com>")])
    assert await notifies("ordermill_emails") == 1


async def test_a_payments_setup_wakes_the_job_runner_here(
        flow: InMemoryFlow, db_settings: Settings, notifies: Notifies) -> None:
    """The setup a payment queues wakes the job runner of the provisioning consumer's own
    process; with no runner here (a layout that runs it elsewhere) it notifies."""
    first, second = await _screened(flow, ["wake-j1", "wake-j2"])
    async with _loop_here(None, JOBS_CHANNEL) as runner:
        await flow.deliver([_payment(flow, first)], to="provisioning")
        assert runner.event.is_set()
        assert await notifies(JOBS_CHANNEL) == 0
    await flow.deliver([_payment(flow, second)], to="provisioning")
    assert await notifies(JOBS_CHANNEL) == 1
    assert await flow.pool.fetchval("SELECT count(*) FROM jobs WHERE kind = 'create'") == 2


async def test_the_flag_is_one_statements(
        pool: asyncpg.Pool, notifies: Notifies) -> None:
    """A unit of work's events are heard here; an event written after them in the same
    transaction for another service (whose relay may be elsewhere) still notifies."""
    async with _loop_here(None, OUTBOX) as relay:
        async with pool.acquire() as conn, conn.transaction():
            await flush_events(conn, [_uow(conn, 1)])
            await write_event(conn, "order.x", {"n": 2}, message_id=uuid.uuid4(),
                              correlation_id=None, source="fraud")
        assert relay.event.is_set()
        assert await notifies(OUTBOX) == 1


async def test_a_refused_transaction_call_keeps_what_the_transaction_wrote_for(
        pool: asyncpg.Pool, notifies: Notifies) -> None:
    """A transaction object that ended nothing (never started; a commit asyncpg refuses
    inside `async with`) does not make the real commit forget its wake-ups."""
    async with _loop_here(None, OUTBOX) as relay:
        async with pool.acquire() as conn:
            tx = conn.transaction()
            async with tx:
                await flush_events(conn, [_uow(conn, 1)])
                with pytest.raises(asyncpg.InterfaceError):
                    await conn.transaction().rollback()
                with pytest.raises(asyncpg.InterfaceError):
                    await tx.commit()
            assert relay.event.is_set()
        assert await notifies(OUTBOX) == 0


async def test_a_loop_not_taking_work_or_of_another_database_leaves_it_notified(
        pool: asyncpg.Pool, notifies: Notifies) -> None:
    """A relay backing off from its broker, a job runner with every slot taken, a loop
    stopping, or one working on another database: this process's commits notify the others."""
    resting = Wakeup(None, OUTBOX, accepting=lambda: False)
    elsewhere = Wakeup("postgresql://postgres@127.0.0.1/another_database", OUTBOX)
    await resting.ensure()
    elsewhere._said_none = True
    _here().setdefault(OUTBOX, set()).add(elsewhere)  # registered as `ensure` would, unheard
    try:
        await _emit(pool, 1)
        assert await notifies(OUTBOX) == 1
        assert not elsewhere.event.is_set()
        resting.leave_here()
        async with pool.acquire() as conn, conn.transaction():
            await flush_events(conn, [_uow(conn, 2)])
        assert await notifies(OUTBOX) == 2
    finally:
        await resting.close()
        _here()[OUTBOX].discard(elsewhere)
