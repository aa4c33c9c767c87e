"""Promotion codes: a limited code is never used more than max_uses times, even by orders
placed at the same moment; orders with an unlimited code never wait for each other."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

from cli.catalog import catalog_view
from conftest import Harness, eventually, order_body
from services.placement.handlers import place_order
from services.placement.worker import worker as placement_worker
from shared.contracts import PlaceOrder
from shared.uow import MessageContext, UnitOfWork


async def test_a_limited_code_is_used_at_most_max_uses_times_by_concurrent_orders(
    harness: Harness,
) -> None:
    await harness.pool.execute(
        "INSERT INTO promotions (code, kind, value, max_uses) VALUES ('TWICE', 'fixed', 1.00, 2)")
    store = await harness.listen("order.placed", "order.rejected")
    # One message per transaction, four at once: the orders race for the code.
    await harness.start([placement_worker(harness.settings)], worker_batch=1, worker_concurrency=4)
    refs = [f"twice-{n}" for n in range(5)]
    await asyncio.gather(*(harness.publish("order.place", order_body(
        ref, promo_code="twice", ip_address=f"203.0.113.{60 + n}")) for n, ref in enumerate(refs)))

    async def all_answered() -> bool:
        return len(store.bodies("order.placed")) + len(store.bodies("order.rejected")) == 5
    await eventually(all_answered)
    rejected = store.bodies("order.rejected")
    assert len(store.bodies("order.placed")) == 2 and len(rejected) == 3
    assert all("'TWICE' has been used up" in body["reason"] for body in rejected)
    discounts = await harness.pool.fetch(
        "SELECT i.discount FROM invoices i JOIN orders o ON o.id = i.order_id"
        " WHERE o.promo_code = 'TWICE'")
    assert [row["discount"] for row in discounts] == [Decimal("1.00")] * 2
    async with harness.pool.acquire() as conn:
        view = await catalog_view(conn)
    assert {p["code"]: p["uses"] for p in view["promotions"]}["TWICE"] == 2


async def test_orders_with_an_unlimited_code_do_not_wait_for_each_other(harness: Harness) -> None:
    await harness.start([placement_worker(harness.settings)])
    async with harness.pool.acquire() as conn:
        held = conn.transaction()
        await held.start()
        try:
            # An order with the code, placed and not yet committed (a slow batch, say) ...
            context = MessageContext(consumer="placement", message_id="held-1",
                                     routing_key="order.place", received_at=datetime.now(UTC))
            await place_order(PlaceOrder.model_validate(order_body("held-1", promo_code="welcome10")),
                              UnitOfWork(conn, context))
            # ... does not hold back the next one with the same code.
            await harness.publish("order.place", order_body(
                "free-1", promo_code="welcome10", ip_address="203.0.113.70"))

            async def placed():
                return await harness.order("free-1")
            order = await eventually(placed, timeout=10)
            assert order["promo_code"] == "WELCOME10"
        finally:
            await held.rollback()
    assert await harness.order("held-1") is None
