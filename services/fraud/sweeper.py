"""Rule 9: an order left `queued` (its order.placed lost or stuck) is re-driven, then flagged."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from shared import db
from shared.contracts import FraudRedrive, ItemRef
from shared.settings_parts import ScreeningSweepSettings
from shared.uow import event_id, write_event

log = logging.getLogger("ordermill.fraud.sweeper")


class QueuedOrderSweeper:
    def __init__(self, sweep: ScreeningSweepSettings) -> None:
        self.stuck_seconds = sweep.stuck_seconds
        self.max_redrives = sweep.max_redrives
        self.every_seconds = max(5.0, sweep.stuck_seconds / 4)

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sweep(pool)
            except db.TRANSIENT_DB_ERRORS as exc:
                log.warning("sweep failed; will retry", extra={"error": str(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.every_seconds)

    async def sweep(self, pool: asyncpg.Pool) -> int:
        """Re-publish order.placed for orders queued too long. Several sweepers may run at once."""
        async with pool.acquire() as conn, conn.transaction():
            stuck = await conn.fetch(
                "SELECT id, order_ref, screening_redrives, placed_message_id FROM orders"
                # 'queued' as a literal: it is the partial index's predicate (orders_queued_idx),
                # which a parameter would not match in a generic plan.
                " WHERE screening = 'queued' AND status = 'Pending' AND deleted_at IS NULL"
                " AND screening_driven_at < now() - make_interval(secs => $1)"
                " AND screening_redrives < $2"
                " ORDER BY screening_driven_at LIMIT 100 FOR NO KEY UPDATE SKIP LOCKED",
                float(self.stuck_seconds), self.max_redrives,
            )
            for row in stuck:
                redrive = row["screening_redrives"] + 1
                await conn.execute(
                    "UPDATE orders SET screening_redrives = $2, screening_driven_at = now()"
                    " WHERE id = $1", row["id"], redrive,
                )
                event = await redrive_event(conn, row["id"])
                # To the fraud queue only (storefronts bound to order.placed are not told
                # twice); a new id, so a worker that dead-lettered the first one takes it; the
                # correlation of the first: the order.place message that placed the order.
                await write_event(conn, event,
                                  message_id=event_id("sweeper", row["id"], redrive),
                                  correlation_id=row["placed_message_id"], source="fraud")
                log.warning("order stuck in screening: re-driven", extra={
                    "order_id": row["id"], "order_ref": row["order_ref"], "redrive": redrive})
        return len(stuck)


async def redrive_event(conn: asyncpg.Connection, order_id: int) -> FraudRedrive:
    """The `order.placed` body again, read from the database, for `fraud.redrive`."""
    row = await conn.fetchrow(
        "SELECT o.id, o.order_number, o.order_ref, o.client_id, o.total, o.currency,"
        " (SELECT id FROM invoices WHERE order_id = o.id) AS invoice_id,"
        " ARRAY(SELECT id FROM services WHERE order_id = o.id ORDER BY id) AS service_ids,"
        " ARRAY(SELECT id FROM domains WHERE order_id = o.id ORDER BY id) AS domain_ids"
        " FROM orders o WHERE o.id = $1",
        order_id,
    )
    items = [ItemRef(type="product", id=i) for i in row["service_ids"]]
    items += [ItemRef(type="domain", id=i) for i in row["domain_ids"]]
    return FraudRedrive(
        order_id=row["id"], order_number=row["order_number"], order_ref=row["order_ref"],
        client_id=row["client_id"], invoice_id=row["invoice_id"], total=row["total"],
        currency=row["currency"], items=items,
    )
