"""A payment's transaction, counted statement by statement on a real database: the order is
locked and read once a payment (the reconcile step after it uses what the payment read under
that lock), and a batch's history rows are one statement. A payment waits for every
statement of its batch before the commit that lets its setup be claimed (docs/performance.md,
"payment->Active in three processes")."""

from __future__ import annotations

from decimal import Decimal

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


async def _waiting_payment(flow: InMemoryFlow, order_id: int, ref: str, transaction_id: str,
                           message_id: str) -> None:
    """A payment of the order's total by ref that came before its order: kept waiting for the
    order's event, as the provisioning consumer records one."""
    total = await flow.pool.fetchval("SELECT total FROM invoices WHERE order_id = $1", order_id)
    await flow.pool.execute(
        "INSERT INTO payments (gateway, transaction_id, amount, raw_amount, currency, order_ref,"
        " publisher, status, reason, waiting_for, trusted, message_id) VALUES ('stripe',"
        " $4, $1, $2, 'USD', $5, $3, 'unapplied', 'order not placed yet: ' || $5,"
        " 'order', true, $6)",
        total, str(total), flow.user, transaction_id, ref, message_id)


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
    # read once for the batch (batch.py), the payment by ref's too: it finds its order among
    # them by the ref the batch locked by (main: 2, that payment found its order by ref,
    # locked it again and read its invoice; before: 4, each payment's own lock; before: 6).
    assert _order_locks(statements) == 1
    # BEGIN, inbox, lock, read, 3 x 2, items, jobs, history, outbox, COMMIT (main: 18)
    assert len(statements.seen) == 15, statements.seen
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


async def test_a_payment_by_a_ref_two_storefronts_use_pays_neither_in_a_batch(
    flow: InMemoryFlow,
) -> None:
    """The batch locked both orders by the ref; the payment by it is kept unapplied, for an
    operator, as a payment alone is (test_storefronts.py), and the other is applied."""
    first, second, other = await _screened(flow, ["pstr-0", "pstr-1", "pstr-2"])
    await flow.pool.execute(
        "UPDATE orders SET storefront = 'another-shop', order_ref = $2 WHERE id = $1",
        second["id"], first["order_ref"])
    batch = [_payment(flow, first, by_ref=True), _payment(flow, other)]
    await flow.deliver(batch, to="provisioning")

    assert [m.outcome for m in batch] == ["acked"] * 2
    kept = await flow.pool.fetchrow(
        "SELECT status, reason, invoice_id FROM payments WHERE transaction_id = $1",
        f"ch_{first['order_ref']}")
    assert (kept["status"], kept["invoice_id"]) == ("unapplied", None)
    assert "more than one storefront" in kept["reason"]
    paid = await flow.pool.fetch(
        "SELECT order_id FROM invoices WHERE status = 'Paid' ORDER BY order_id")
    assert [r["order_id"] for r in paid] == [other["id"]]


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
    await _waiting_payment(flow, order_id, "pste-1", "ch_early", "pay-early")
    delivery = flow.as_delivery(early)
    await flow.deliver([delivery], to="provisioning")
    assert delivery.outcome == "acked"
    assert await flow.pool.fetchval(
        "SELECT status FROM payments WHERE transaction_id = 'ch_early'") == "applied"
    assert await flow.pool.fetchval(
        "SELECT status FROM invoices WHERE order_id = $1", order_id) == "Paid"
    jobs = await flow.pool.fetch("SELECT kind, status FROM jobs WHERE order_id = $1", order_id)
    assert [(j["kind"], j["status"]) for j in jobs] == [("create", "pending")]


async def _invoices(flow: InMemoryFlow, refs: list[str]) -> list[dict]:
    rows = await flow.pool.fetch(
        "SELECT o.id, o.order_ref, i.id AS invoice_id, i.total FROM orders o"
        " JOIN invoices i ON i.order_id = o.id WHERE o.order_ref = ANY($1::text[])"
        " ORDER BY o.id", refs)
    return [dict(r) for r in rows]


async def test_a_batch_of_screenings_and_payments_costs_two_statements_a_payment(
    flow: InMemoryFlow,
) -> None:
    """As bench/sustained.py's steady phase fills a batch: each order's order.screened, then
    its payment (the storefront pays once it sees the order screened). The batch's orders are
    locked, then read once (services/provisioning/batch.py); a payment is its own insert and
    its application; the reconcile steps run together at the end of the batch."""
    refs = [f"pstx-{n}" for n in range(3)]
    screened = await _screened_events(flow, refs)
    orders = await _invoices(flow, refs)
    batch = []
    for event, order in zip(screened, orders, strict=True):
        batch += [flow.as_delivery(event), _payment(flow, order)]
    statements = Statements()
    await statements.watch(flow.pool)
    await flow.deliver(batch, to="provisioning")

    assert [m.outcome for m in batch] == ["acked"] * 6
    # BEGIN, inbox, lock, read, 3 x (payment, invoice and payment), items, jobs, history,
    # outbox, COMMIT (main: 30; 2 a screening, 6 a payment)
    assert len(statements.seen) == 15, statements.seen
    assert statements.count("INSERT INTO payments") == 3
    assert statements.count("UPDATE invoices") == 3
    assert statements.count("WITH reinstated") == 1  # main: 6
    assert statements.count("INSERT INTO jobs") == 1  # main: 3
    assert _order_locks(statements) == 1  # main: 4
    ids = [o["id"] for o in orders]
    jobs = await flow.pool.fetch(
        "SELECT j.order_id, j.kind, j.status, j.caused_by, s.username FROM jobs j"
        " JOIN services s ON s.id = j.service_id WHERE j.order_id = ANY($1::bigint[])"
        " ORDER BY j.id", ids)
    # One setup an order, caused by its payment (the screening did not want it: not paid).
    assert [(j["order_id"], j["kind"], j["status"]) for j in jobs] == [
        (i, "create", "pending") for i in ids]
    assert [j["caused_by"] for j in jobs] == [m.message_id for m in batch[1::2]]
    assert all(j["username"] for j in jobs)
    invoices = await flow.pool.fetch(
        "SELECT status, amount_paid, total FROM invoices WHERE order_id = ANY($1::bigint[])"
        " ORDER BY order_id", ids)
    assert [(r["status"], r["amount_paid"]) for r in invoices] == [
        ("Paid", o["total"]) for o in orders]
    assert await flow.pool.fetchval(
        "SELECT count(*) FROM payments WHERE status = 'applied' AND credit = 0") == 3
    assert await flow.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'invoice.paid'") == 3


async def test_a_batch_of_payments_alone_costs_two_statements_a_payment(
    flow: InMemoryFlow,
) -> None:
    orders = await _screened(flow, ["psty-0", "psty-1", "psty-2", "psty-3"])
    statements = Statements()
    await statements.watch(flow.pool)
    batch = [_payment(flow, o) for o in orders]
    await flow.deliver(batch, to="provisioning")

    assert [m.outcome for m in batch] == ["acked"] * 4
    # BEGIN, inbox, lock, read, 4 x 2, items, jobs, history, outbox, COMMIT (main: 30)
    assert len(statements.seen) == 17, statements.seen
    jobs = await flow.pool.fetch(
        "SELECT order_id, caused_by FROM jobs WHERE kind = 'create' ORDER BY id")
    assert [(j["order_id"], j["caused_by"]) for j in jobs] == [
        (o["id"], m.message_id) for o, m in zip(orders, batch, strict=True)]


async def test_two_payments_of_one_invoice_in_a_batch_add_up(flow: InMemoryFlow) -> None:
    """The second payment of an invoice in the batch reads the invoice the first one paid
    (the batch's read of it is dropped once a payment is applied): two parts make it
    Paid, and a payment in full on top of that is client credit, never counted twice."""
    [order, other] = await _screened(flow, ["pstz-0", "pstz-1"])
    first = (order["total"] / 2).quantize(Decimal("0.01"))
    rest = order["total"] - first
    assert first > 0 and rest > 0
    body = {"currency": "USD", "gateway": "stripe", "invoice_id": order["invoice_id"]}
    batch = [
        flow.message("payment.received", body | {"amount": str(first), "transaction_id": "h1"}),
        _payment(flow, other),
        flow.message("payment.received", body | {"amount": str(rest), "transaction_id": "h2"}),
        flow.message("payment.received", body | {"amount": str(order["total"]),
                                                 "transaction_id": "h3"}),
    ]
    await flow.deliver(batch, to="provisioning")

    assert [m.outcome for m in batch] == ["acked"] * 4
    invoice = await flow.pool.fetchrow(
        "SELECT status, amount_paid FROM invoices WHERE id = $1", order["invoice_id"])
    assert (invoice["status"], invoice["amount_paid"]) == ("Paid", 2 * order["total"])
    payments = await flow.pool.fetch(
        "SELECT transaction_id, status, credit FROM payments WHERE invoice_id = $1"
        " ORDER BY id", order["invoice_id"])
    assert [(p["transaction_id"], p["status"], p["credit"]) for p in payments] == [
        ("h1", "applied", 0), ("h2", "applied", 0), ("h3", "applied", order["total"])]
    assert await flow.pool.fetchval(
        "SELECT credit FROM clients c JOIN invoices i ON i.client_id = c.id WHERE i.id = $1",
        order["invoice_id"]) == order["total"]
    # Paid by the second part: its setup caused by that payment, once.
    jobs = await flow.pool.fetch(
        "SELECT order_id, caused_by FROM jobs WHERE kind = 'create' ORDER BY id")
    assert [(j["order_id"], j["caused_by"]) for j in jobs] == [
        (other["id"], batch[1].message_id), (order["id"], batch[2].message_id)]
    paid = [e for e in await flow.drain() if e.routing_key == "invoice.paid"]
    assert sorted(e.body["invoice_id"] for e in paid) == sorted(
        [order["invoice_id"], other["invoice_id"]])


async def test_a_screening_in_a_batch_applies_the_payment_waiting_for_its_order(
    flow: InMemoryFlow,
) -> None:
    """A payment by ref that came before its order, and a payment refused in the same batch
    before the screening (left waiting: the batch's reads are dropped, the screening reads
    its order again): the waiting one is applied and the order set up; the other order's
    screening, in the same batch, queues nothing (not paid)."""
    [early, plain] = await _screened_events(flow, ["pstw-0", "pstw-1"])
    order_id = early.body["order_id"]
    await _waiting_payment(flow, order_id, "pstw-0", "ch_w", "pay-w")
    refused = flow.message("payment.received", {
        "amount": "1.00", "currency": "EUR", "gateway": "stripe", "transaction_id": "ch_eur",
        "order_ref": "pstw-1"})
    batch = [refused, flow.as_delivery(early), flow.as_delivery(plain)]
    await flow.deliver(batch, to="provisioning")

    assert [m.outcome for m in batch] == ["acked"] * 3
    rows = await flow.pool.fetch(
        "SELECT transaction_id, status, reason FROM payments ORDER BY id")
    assert [(r["transaction_id"], r["status"]) for r in rows] == [
        ("ch_w", "applied"), ("ch_eur", "unapplied")]
    assert "currency EUR" in rows[1]["reason"]
    assert await flow.pool.fetchval(
        "SELECT status FROM invoices WHERE order_id = $1", order_id) == "Paid"
    jobs = await flow.pool.fetch("SELECT order_id, kind, caused_by FROM jobs ORDER BY id")
    assert [(j["order_id"], j["kind"], j["caused_by"]) for j in jobs] == [
        (order_id, "create", batch[1].message_id)]
