"""A payment message that reached RabbitMQ always ends as a payment row (issue 11, point 4):
even one the broker dead-lettered itself (expired in the queue) or the worker refused."""

from __future__ import annotations

from decimal import Decimal

from conftest import TEST_USER, Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.dead_payments import DeadPayments
from services.provisioning.worker import worker as provisioning_worker


def keeper(h: Harness) -> DeadPayments:
    return DeadPayments(h.settings.model_copy(
        update={"dead_payment_sweep_seconds": 3600}).dead_payments)


async def test_payments_in_the_dead_letter_queue_are_kept_unapplied(harness: Harness) -> None:
    h = harness
    s = h.settings
    # No provisioning worker yet: a payment whose expiration runs out waits in vain, and the
    # broker dead-letters it (x-death: expired) without any worker having seen it.
    expired = await h.publish("payment.received", {
        "invoice_id": 1, "amount": "5.95", "currency": "USD", "gateway": "stripe",
        "transaction_id": "expired-1"}, expiration=0.05)

    async def dead_there() -> bool:
        channel = await h.connection.channel()
        queue = await channel.declare_queue(h.names.dead_queue("provisioning"), passive=True)
        count = queue.declaration_result.message_count
        await channel.close()
        return bool(count)
    await eventually(dead_there, timeout=30)

    await h.start([placement_worker(s), fraud_worker(s), provisioning_worker(s)],
                  dead_payment_sweep_seconds=3600)
    # Refused by the worker as not a payment at all (no amount): dead-lettered with a reason.
    refused = await h.publish("payment.received", {"currency": "USD", "gateway": "stripe",
                                                   "transaction_id": "refused-1"})
    # A dead letter of another kind stays where operators look for it.
    other = await h.publish("order.retry", {"order_id": 1, "order_ref": "x", "operator": "a"},
                            user_id=None)

    async def three_dead() -> bool:
        channel = await h.connection.channel()
        queue = await channel.declare_queue(h.names.dead_queue("provisioning"), passive=True)
        count = queue.declaration_result.message_count
        await channel.close()
        return count == 3
    await eventually(three_dead)
    listener = await h.listen("payment.unapplied")

    sweeper = keeper(h)
    try:
        assert await sweeper.sweep(h.pool) == 2
        # Only the other dead letter is left; a second sweep stores nothing twice.
        left = await h.dead_letters("provisioning")
        assert [m.message_id for m in left] == [other]
        assert await sweeper.sweep(h.pool) == 0
    finally:
        await sweeper.close()
    rows = {r["message_id"]: r for r in await h.pool.fetch("SELECT * FROM payments")}
    assert set(rows) == {expired, refused}
    assert rows[expired]["reason"].startswith("not handled: expired in the queue")
    assert (rows[expired]["amount"], rows[expired]["transaction_id"]) == (Decimal("5.95"),
                                                                          "expired-1")
    assert rows[expired]["publisher"] == TEST_USER
    assert rows[refused]["reason"] == (
        "not handled: refused by the worker: schema: amount: Field required")
    assert rows[refused]["raw_amount"] == ""
    assert all(r["status"] == "unapplied" and not r["trusted"] for r in rows.values())
    await listener.wait_for("payment.unapplied", lambda e: e["payment_id"] == rows[expired]["id"])

    # The gateway sends the expired payment again: applied as any payment (the kept row did
    # not take its transaction id).
    await h.publish("order.place", order_body("dead-pay-1"))
    order = await h.screened("dead-pay-1")
    invoice = await h.pool.fetchrow("SELECT * FROM invoices WHERE order_id = $1", order["id"])
    await h.publish("payment.received", {
        "invoice_id": invoice["id"], "amount": str(invoice["total"]), "currency": "USD",
        "gateway": "stripe", "transaction_id": "expired-1"})

    async def paid() -> bool:
        return await h.pool.fetchval(
            "SELECT status FROM invoices WHERE id = $1", invoice["id"]) == "Paid"
    await eventually(paid)
