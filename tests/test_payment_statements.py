"""A payment's transaction, counted statement by statement on a real database: the order is
locked and read once a payment (the reconcile step after it uses what the payment read under
that lock), and a batch's history rows are one statement. A payment waits for every
statement of its batch before the commit that lets its setup be claimed (docs/performance.md,
"payment->Active in three processes")."""

from __future__ import annotations

from test_webhook_fanout import Statements

from conftest import order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.worker import worker as provisioning_worker
from shared.runtime.testing import InMemoryFlow


def _starter(ref: str, n: int) -> dict:
    items = [{"type": "product", "product": "starter", "billing_cycle": "monthly",
              "domain": f"{ref}.example"}]
    return order_body(ref, items=items, ip_address=f"203.0.113.{60 + n}")


async def _screened(flow: InMemoryFlow, refs: list[str]) -> list[dict]:
    s = flow.settings
    flow.add(placement_worker(s), fraud_worker(s), provisioning_worker(s))
    for n, ref in enumerate(refs):
        await flow.send("order.place", _starter(ref, n))
    await flow.run()
    rows = await flow.pool.fetch(
        "SELECT o.id, o.order_ref, i.id AS invoice_id, i.total FROM orders o"
        " JOIN invoices i ON i.order_id = o.id WHERE o.order_ref = ANY($1::text[])"
        " ORDER BY o.id", refs)
    return [dict(r) for r in rows]


def _payment(flow: InMemoryFlow, order: dict, *, by_ref: bool = False):
    body = {"amount": str(order["total"]), "currency": "USD", "gateway": "stripe",
            "transaction_id": f"ch_{order['order_ref']}"}
    body |= {"order_ref": order["order_ref"]} if by_ref else {"invoice_id": order["invoice_id"]}
    return flow.message("payment.received", body)


def _order_locks(statements: Statements) -> int:
    return sum(("FOR UPDATE" in q or "FOR NO KEY UPDATE" in q) and "orders o" in q
               for q in statements.seen)


async def test_a_payment_locks_and_reads_its_order_once(flow: InMemoryFlow) -> None:
    [order] = await _screened(flow, ["pstm-1"])
    statements = Statements()
    await statements.watch(flow.pool)
    payment = _payment(flow, order)
    await flow.deliver([payment], to="provisioning")

    assert payment.outcome == "acked"
    assert _order_locks(statements) == 1  # main: 2 (the payment's, then the reconcile step's)
    # BEGIN, inbox, payment, order, invoice, invoice and payment, history, items, jobs,
    # outbox, COMMIT (main: 12)
    assert len(statements.seen) == 11, statements.seen
    jobs = await flow.pool.fetch("SELECT kind, status FROM jobs WHERE order_id = $1", order["id"])
    assert [(j["kind"], j["status"]) for j in jobs] == [("create", "pending")]
    assert await flow.pool.fetchval(
        "SELECT status FROM invoices WHERE id = $1", order["invoice_id"]) == "Paid"


async def test_a_batch_of_payments_writes_its_history_in_one_statement(
    flow: InMemoryFlow,
) -> None:
    orders = await _screened(flow, ["pstb-0", "pstb-1", "pstb-2"])
    statements = Statements()
    await statements.watch(flow.pool)
    # One by order ref (its order found by ref, then locked), two by invoice id.
    batch = [_payment(flow, orders[0], by_ref=True), _payment(flow, orders[1]),
             _payment(flow, orders[2])]
    await flow.deliver(batch, to="provisioning")

    assert [m.outcome for m in batch] == ["acked"] * 3
    assert statements.count("BEGIN") == 1
    assert statements.count("INSERT INTO order_history") == 1  # main: 3
    # The batch's orders locked together in id order (services/provisioning/locks.py), then
    # each payment's own lock, already held (stop 25: 3; before: 6).
    assert _order_locks(statements) == 4
    ids = [o["id"] for o in orders]
    history = await flow.pool.fetch(
        "SELECT order_id, actor, detail FROM order_history WHERE action = 'payment'"
        " AND order_id = ANY($1::bigint[]) ORDER BY id", ids)
    assert [h["order_id"] for h in history] == ids  # in the batch's order
    assert [h["detail"]["transaction_id"] for h in history] == [
        f"ch_{o['order_ref']}" for o in orders]
    assert {h["actor"] for h in history} == {flow.user}
    jobs = await flow.pool.fetch(
        "SELECT order_id, kind, status FROM jobs WHERE order_id = ANY($1::bigint[])"
        " ORDER BY order_id", ids)
    assert [(j["order_id"], j["kind"], j["status"]) for j in jobs] == [
        (i, "create", "pending") for i in ids]
    assert await flow.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'invoice.paid'") == 3


async def _screened_events(flow: InMemoryFlow, refs: list[str]) -> list:
    """Orders placed and screened without the provisioning worker; their order.screened
    events, for it (added now)."""
    s = flow.settings
    flow.add(placement_worker(s), fraud_worker(s))
    for n, ref in enumerate(refs):
        await flow.send("order.place", _starter(ref, n))
    events = await flow.run()
    flow.add(provisioning_worker(s))
    return [e for e in events if e.routing_key == "order.screened"]


async def test_an_order_event_locks_its_order_and_finds_its_waiting_payments_at_once(
    flow: InMemoryFlow,
) -> None:
    """order.screened with no payment waiting (the usual case): the order locked, read and
    its waiting payments listed in one statement, and the reconcile step reads nothing
    again; one that finds a payment waiting applies it and sets the order up."""
    [alone, early] = await _screened_events(flow, ["pste-0", "pste-1"])
    statements = Statements()
    await statements.watch(flow.pool)
    delivery = flow.as_delivery(alone)
    await flow.deliver([delivery], to="provisioning")

    assert delivery.outcome == "acked"
    assert _order_locks(statements) == 1
    assert statements.count("FROM payments") == 1  # main: a statement of its own (JOIN payments)
    # BEGIN, inbox, order and waiting payments, items, COMMIT (main: 6)
    assert len(statements.seen) == 5, statements.seen
    assert await flow.pool.fetchval("SELECT count(*) FROM jobs") == 0  # not paid

    # A payment by ref that came before the screening (kept waiting for its order's event).
    order_id = early.body["order_id"]
    total = await flow.pool.fetchval("SELECT total FROM invoices WHERE order_id = $1", order_id)
    await flow.pool.execute(
        "INSERT INTO payments (gateway, transaction_id, amount, raw_amount, currency, order_ref,"
        " publisher, status, reason, waiting_for, trusted, message_id) VALUES ('stripe',"
        " 'ch_early', $1, $2, 'USD', 'pste-1', $3, 'unapplied', 'order not placed yet: pste-1',"
        " 'order', true, 'pay-early')",
        total, str(total), flow.user)
    delivery = flow.as_delivery(early)
    await flow.deliver([delivery], to="provisioning")
    assert delivery.outcome == "acked"
    assert await flow.pool.fetchval(
        "SELECT status FROM payments WHERE transaction_id = 'ch_early'") == "applied"
    assert await flow.pool.fetchval(
        "SELECT status FROM invoices WHERE order_id = $1", order_id) == "Paid"
    jobs = await flow.pool.fetch("SELECT kind, status FROM jobs WHERE order_id = $1", order_id)
    assert [(j["kind"], j["status"]) for j in jobs] == [("create", "pending")]
