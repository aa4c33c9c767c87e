"""Rule 9: an order left `queued` (its order.placed lost or stuck) is re-driven, then flagged."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from shared import db
from shared.orders import order_placed_event
from shared.uow import event_id, write_event

log = logging.getLogger("ordermill.fraud.sweeper")


class QueuedOrderSweeper:
    def __init__(self, *, stuck_seconds: int, max_redrives: int, every_seconds: float) -> None:
        self.stuck_seconds = stuck_seconds
        self.max_redrives = max_redrives
        self.every_seconds = every_seconds

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
                "SELECT id, order_ref, screening_redrives FROM orders"
                " WHERE screening = 'queued' AND status = 'Pending' AND deleted_at IS NULL"
                " AND screening_driven_at < now() - make_interval(secs => $1)"
                " AND screening_redrives < $2"
                " ORDER BY screening_driven_at LIMIT 100 FOR UPDATE SKIP LOCKED",
                float(self.stuck_seconds), self.max_redrives,
            )
            for row in stuck:
                redrive = row["screening_redrives"] + 1
                await conn.execute(
                    "UPDATE orders SET screening_redrives = $2, screening_driven_at = now()"
                    " WHERE id = $1", row["id"], redrive,
                )
                event = await order_placed_event(conn, row["id"])
                await write_event(conn, "order.placed", event,
                                  message_id=event_id("sweeper", row["id"], redrive),
                                  correlation_id=None)
                log.warning("order stuck in screening: re-driven", extra={
                    "order_id": row["id"], "order_ref": row["order_ref"], "redrive": redrive})
        return len(stuck)
