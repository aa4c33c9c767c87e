"""An order's row lock never waits for a row being inserted for the order elsewhere.

Every writer of an order locks it `FOR NO KEY UPDATE` (docs/contract.md, section 4, rule 8).
A `FOR UPDATE` also conflicts with the `FOR KEY SHARE` lock a foreign-key check takes when
a row referencing the order is inserted (a mail, a history line, a job): at a steady flow
the notify consumer's batch, inserting several orders' mails, and the payment consumer's
batch, locking several orders, each waited for the other and PostgreSQL broke the deadlock
only after its `deadlock_timeout` (1 s), a payment->Active p99 of about a second
(docs/performance.md, "Order locks and the mails' foreign keys").

Each test holds a mail inserted for the order, not committed (the notify consumer's own
statement, `record_mails`), while a worker locks the order: before, the worker waited until
that transaction ended; now it goes on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from test_payment_statements import _payment, _screened, _screened_events
from test_webhook_fanout import Statements

from conftest import eventually, order_body
from services.fraud.sweeper import QueuedOrderSweeper
from services.notify.worker import _Mail, record_mails
from services.placement.worker import worker as placement_worker
from services.provisioning.jobs import JobRunner
from services.provisioning.providers import Providers
from services.provisioning.reconcile import lock_order_state
from services.review.worker import worker as review_worker
from shared.runtime.testing import InMemoryFlow
from shared.settings import Settings

# Far longer than any of these takes unblocked; far shorter than the suite's patience.
WAIT_SECONDS = 5.0


@asynccontextmanager
async def mail_being_inserted(flow: InMemoryFlow, order_id: int, key: str) -> AsyncIterator[None]:
    """A mail for the order inserted in a transaction left open, as the notify consumer's
    batch holds it until its commit: the foreign-key check's lock on the order is held."""
    conn: asyncpg.Connection = await asyncpg.connect(flow.settings.database_url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await record_mails(conn, [_Mail(f"lock-test:{key}", "order_confirmation",
                                        "client@example.com", order_id, f"<{key}@test>")])
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await conn.close()


async def test_a_payment_does_not_wait_for_a_mail_being_inserted_for_its_order(
    flow: InMemoryFlow,
) -> None:
    [order] = await _screened(flow, ["lock-pay"])
    payment = _payment(flow, order)
    async with mail_being_inserted(flow, order["id"], "pay"):
        # Before: waited for the mail's transaction (FOR UPDATE against FOR KEY SHARE).
        await asyncio.wait_for(flow.deliver([payment], to="provisioning"), WAIT_SECONDS)
    assert payment.outcome == "acked"
    assert await flow.pool.fetchval(
        "SELECT status FROM invoices WHERE id = $1", order["invoice_id"]) == "Paid"


async def test_a_setups_outcome_does_not_wait_for_a_mail_being_inserted_for_its_order(
    flow: InMemoryFlow,
) -> None:
    [order] = await _screened(flow, ["lock-job"])
    await flow.deliver([_payment(flow, order)], to="provisioning")
    s = flow.settings
    runner = JobRunner(Providers(s.providers), s.jobs, None)
    [job] = await runner.queue.claim(flow.pool, 10)
    await runner.read_ahead(flow.pool, [job])
    try:
        async with mail_being_inserted(flow, order["id"], "job"):
            await asyncio.wait_for(runner.execute(flow.pool, job), WAIT_SECONDS)
    finally:
        await runner.queue.close()
    assert await flow.pool.fetchval(
        "SELECT status FROM jobs WHERE id = $1", job["id"]) == "done"
    assert await flow.pool.fetchval(
        "SELECT status FROM services WHERE order_id = $1", order["id"]) == "Active"


async def test_the_reconcile_lock_does_not_wait_for_a_mail_being_inserted(
    flow: InMemoryFlow,
) -> None:
    [order] = await _screened(flow, ["lock-rec"])
    async with mail_being_inserted(flow, order["id"], "rec"), flow.pool.acquire() as conn:
        async with conn.transaction():
            state = await asyncio.wait_for(lock_order_state(conn, order["id"]), WAIT_SECONDS)
    assert state is not None and state.status == "Pending"


async def test_two_order_locks_still_exclude_each_other(flow: InMemoryFlow) -> None:
    """The weaker lock still serialises the order's writers (rule 8)."""
    [order] = await _screened(flow, ["lock-two"])
    async with flow.pool.acquire() as first, first.transaction():
        await lock_order_state(first, order["id"])
        async with flow.pool.acquire() as second, second.transaction():
            await second.execute("SET LOCAL lock_timeout = '200ms'")
            try:
                await lock_order_state(second, order["id"])
            except asyncpg.LockNotAvailableError:
                pass
            else:
                raise AssertionError("a second writer took the order's lock while it was held")


async def test_a_batch_of_payments_locks_its_orders_in_id_order(flow: InMemoryFlow) -> None:
    """Paid newest first, a batch locked the newest order, then waited for the oldest while
    another writer (locking in id order, as fraud's batches and the job outcome writer do)
    held it and waited for the newest: a deadlock, broken after 1 s. The batch now locks
    both first, oldest first, so it holds nothing the other wants while it waits."""
    older, newer = await _screened(flow, ["lock-ord-0", "lock-ord-1"])
    batch = [_payment(flow, newer), _payment(flow, older)]
    await _batch_waits_holding_nothing(flow, batch, "provisioning", hold=_order_lock(older["id"]),
                                       then=_order_lock(newer["id"]))
    assert [m.outcome for m in batch] == ["acked", "acked"]
    paid = await flow.pool.fetch("SELECT status FROM invoices WHERE id = ANY($1::bigint[])",
                                 [older["invoice_id"], newer["invoice_id"]])
    assert [r["status"] for r in paid] == ["Paid", "Paid"]


async def test_a_batch_locks_the_order_a_waiting_payment_pays_with_its_own(
    flow: InMemoryFlow,
) -> None:
    """Two storefronts use a ref; a payment naming it and the older order's invoice came
    before that invoice, and waits. The newer order's screening, in a batch, applies it
    (`apply_waiting` finds it by the ref): the batch locked the newer order (and the other
    one of the batch), then, applying the payment, the older one, out of id order: against
    a writer holding the older order and wanting the newer, a deadlock, broken after 1 s.
    The batch's lock now takes the older order too, first, so it holds nothing the other
    wants while it waits."""
    events = await _screened_events(flow, ["lock-wp-0", "lock-wp-1", "lock-wp-2"])
    older, newer, third = sorted(events, key=lambda e: e.body["order_id"])
    older_id, ref = older.body["order_id"], newer.body["order_ref"]
    await flow.pool.execute(
        "UPDATE orders SET storefront = 'another-shop', order_ref = $2 WHERE id = $1",
        older_id, ref)
    invoice = await flow.pool.fetchrow(
        "SELECT id, total FROM invoices WHERE order_id = $1", older_id)
    await flow.pool.execute(
        "INSERT INTO payments (gateway, transaction_id, amount, raw_amount, currency, order_ref,"
        " requested_invoice_id, publisher, status, reason, waiting_for, trusted, message_id)"
        " VALUES ('stripe', 'ch_wp', $1, $2, 'USD', $3, $4::bigint, $5, 'unapplied',"
        " 'unknown invoice ' || $4::text, 'order', true, 'pay-wp')",
        invoice["total"], str(invoice["total"]), ref, invoice["id"], flow.user)
    batch = [flow.as_delivery(newer), flow.as_delivery(third)]
    await _batch_waits_holding_nothing(flow, batch, "provisioning", hold=_order_lock(older_id),
                                       then=_order_lock(newer.body["order_id"]))
    assert [m.outcome for m in batch] == ["acked", "acked"]
    assert await flow.pool.fetchval(
        "SELECT invoice_id FROM payments WHERE transaction_id = 'ch_wp'"
        " AND status = 'applied'") == invoice["id"]
    assert await flow.pool.fetchval(
        "SELECT status FROM invoices WHERE id = $1", invoice["id"]) == "Paid"


async def test_a_batch_of_review_commands_locks_its_orders_in_id_order(
    flow: InMemoryFlow,
) -> None:
    """Two operators' commands in one batch of the review worker, the newer order's first:
    each locked its order as it came, so the batch held the newer order while it waited for
    the older one, held by a writer locking in id order that then wanted the newer one (a
    deadlock, broken after 1 s). The batch now locks both first, oldest first."""
    older, newer = await _screened(flow, ["lock-rev-0", "lock-rev-1"])
    flow.add(review_worker(flow.settings))
    batch = [flow.message("review.command", {"order_id": o["id"], "action": "note",
                                             "note": f"note {n}"},
                          reply_to="amq.gen-operator", correlation_id=f"rev-{n}")
             for n, o in enumerate([newer, older])]
    statements = Statements()
    await statements.watch(flow.pool)
    await _batch_waits_holding_nothing(flow, batch, "review", hold=_order_lock(older["id"]),
                                       then=_order_lock(newer["id"]))
    assert [m.outcome for m in batch] == ["acked", "acked"]
    notes = await flow.pool.fetch("SELECT order_id, note FROM order_notes ORDER BY id")
    assert [(r["order_id"], r["note"]) for r in notes] == [
        (newer["id"], "note 0"), (older["id"], "note 1")]
    # One statement locked and read both orders for their commands (before: one a command).
    assert statements.count("FROM orders o JOIN clients c") == 1


async def test_a_placement_batch_locks_its_limited_codes_in_their_order(
    flow: InMemoryFlow,
) -> None:
    """Two orders in one batch with two limited codes, B's first: each order locked its code
    as it came, so the batch held B while it waited for A, held by a writer that then wanted
    B (a deadlock, broken after 1 s). The batch now locks both first, A first."""
    await flow.pool.execute("INSERT INTO promotions (code, kind, value, max_uses) VALUES"
                            " ('LOCK-A', 'fixed', 1.00, 5), ('LOCK-B', 'fixed', 1.00, 5)")
    flow.add(placement_worker(flow.settings))
    batch = [flow.message("order.place", order_body(
        f"promo-lock-{n}", promo_code=code, ip_address=f"203.0.113.{80 + n}"))
        for n, code in enumerate(["lock-b", "lock-a"])]
    await _batch_waits_holding_nothing(flow, batch, None, hold=_code_lock("LOCK-A"),
                                       then=_code_lock("LOCK-B"))
    assert [m.outcome for m in batch] == ["acked", "acked"]
    placed = await flow.pool.fetch(
        "SELECT order_ref, promo_code FROM orders WHERE order_ref LIKE 'promo-lock-%'"
        " ORDER BY order_ref")
    assert [(r["order_ref"], r["promo_code"]) for r in placed] == [
        ("promo-lock-0", "LOCK-B"), ("promo-lock-1", "LOCK-A")]


async def test_a_lone_order_locks_its_limited_code_before_writing_its_client(
    flow: InMemoryFlow,
) -> None:
    """An order alone wrote its new client, then waited for its code: held by a batch that
    had locked it first and then wrote the same new client (a customer's order sent twice), each
    waited for the other. Now the code is locked first: waiting for it, the order has
    written nothing, and the client's row is free for the other."""
    await flow.pool.execute("INSERT INTO promotions (code, kind, value, max_uses)"
                            " VALUES ('LOCK-C', 'fixed', 1.00, 5)")
    flow.add(placement_worker(flow.settings))
    body = order_body("promo-lone", promo_code="lock-c", ip_address="203.0.113.90")
    [message] = [flow.message("order.place", body)]

    async def write_the_client(conn: asyncpg.Connection) -> object:
        return await conn.execute(
            "INSERT INTO clients (email, first_name, last_name, country, storefront)"
            " VALUES ($1, 'Other', 'Writer', 'GB', $2) ON CONFLICT DO NOTHING",
            body["client"]["email"], message.user_id or "")

    # The other's client is rolled back: the order writes its own.
    await _batch_waits_holding_nothing(flow, [message], None, hold=_code_lock("LOCK-C"),
                                       then=write_the_client)
    assert message.outcome == "acked"
    assert await flow.pool.fetchval(
        "SELECT promo_code FROM orders WHERE order_ref = 'promo-lone'") == "LOCK-C"


Take = Callable[[asyncpg.Connection], Awaitable[object]]


async def _batch_waits_holding_nothing(flow: InMemoryFlow, batch: list[Any], to: str | None,
                                       *, hold: Take, then: Take) -> None:
    """Another transaction takes `hold`; the batch, delivered meanwhile, waits for it; the
    other then takes `then`, with a lock_timeout shorter than deadlock_timeout (1 s), which
    would otherwise break the cycle by rolling the batch back: if the batch took `then`
    before waiting (out of order), it fails with LockNotAvailableError. The other's
    transaction is rolled back; the batch then finishes."""
    async with flow.pool.acquire() as other:
        held = other.transaction()
        await held.start()
        try:
            await hold(other)
            handling = asyncio.create_task(
                flow.deliver(batch, to=to) if to else flow.deliver(batch))
            await eventually(lambda: _waiting_for_a_lock(flow), timeout=WAIT_SECONDS)
            await other.execute("SET LOCAL lock_timeout = '500ms'")
            await then(other)
        finally:
            await held.rollback()
    await asyncio.wait_for(handling, WAIT_SECONDS)


def _order_lock(order_id: int) -> Take:
    async def take(conn: asyncpg.Connection) -> object:
        assert await lock_order_state(conn, order_id) is not None
        return None
    return take


def _code_lock(code: str) -> Take:
    return lambda conn: conn.execute(
        "SELECT 1 FROM promotions WHERE code = $1 FOR NO KEY UPDATE", code)


async def _waiting_for_a_lock(flow: InMemoryFlow) -> bool:
    return bool(await flow.pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock'"))


async def test_the_sweeper_redrives_a_stuck_order_while_a_mail_is_inserted_for_it(
    flow: InMemoryFlow,
) -> None:
    """Its `FOR UPDATE SKIP LOCKED` skipped an order whose mail was being inserted (the
    foreign-key check's lock), and held the mails back while it re-drove the others."""
    s = flow.settings
    flow.add(placement_worker(s))  # no fraud worker: the order stays queued
    await flow.send("order.place", order_body("lock-sweep"))
    await flow.run()
    order_id = await flow.pool.fetchval(
        "UPDATE orders SET screening_driven_at = now() - interval '2 minutes'"
        " WHERE order_ref = 'lock-sweep' AND screening = 'queued' RETURNING id")
    assert order_id is not None
    sweeper = QueuedOrderSweeper(
        Settings(screening_stuck_seconds=60, screening_max_redrives=2).screening_sweep)
    async with mail_being_inserted(flow, order_id, "sweep"):
        assert await asyncio.wait_for(sweeper.sweep(flow.pool), WAIT_SECONDS) == 1
