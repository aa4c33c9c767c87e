"""Transaction: one connection and one transaction for the batch; everything inward (the
inbox row, the handlers' writes, the outbox rows) commits together or not at all."""

from __future__ import annotations

import asyncpg

from shared.runtime.chain import Middleware, Next
from shared.runtime.work import Batch


class Transaction(Middleware):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def __call__(self, batch: Batch, call_next: Next) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            batch.conn, batch.todo, batch.uows = conn, [], []
            try:
                await call_next(batch)
            finally:
                batch.conn = None
