"""Prepare: a route's step outside the transaction (a remote fraud score), with no row lock or
connection held, once per delivery: a retried transaction or a batch falling back to one by
one reuses its result, and a delivery already handled (in the inbox) is not prepared again.
Its result reaches the handler as `uow.prepared`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable

import asyncpg

from shared import db
from shared.errors import Rejected
from shared.runtime.chain import Middleware, Next
from shared.runtime.work import Batch, StepFailed, Work

log = logging.getLogger("ordermill.runtime")


class Prepare(Middleware):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def __call__(self, batch: Batch, call_next: Next) -> Awaitable[None]:
        todo = [item for item in batch.items
                if item.route and item.route.prepare and not item.has_prepared]
        # Most routes prepare nothing: the rest of the chain is awaited by the caller then.
        return self._prepared(todo, batch, call_next) if todo else call_next(batch)

    async def _prepared(self, todo: list[Work], batch: Batch, call_next: Next) -> None:
        for item in todo:
            await self.prepare(item)
        await call_next(batch)

    async def prepare(self, item: Work) -> None:
        assert item.route and item.route.prepare and item.context
        if await self._handled(item):
            item.has_prepared = True  # the inbox dedupes it: nothing to prepare for
            return
        try:
            item.prepared = await item.route.prepare(item.payload, self.pool)
        except (Rejected, *db.TRANSIENT_DB_ERRORS):
            raise
        except Exception as exc:
            log.exception("prepare failed", extra={"service": item.spec.service,
                                                   "message_id": item.message_id})
            raise StepFailed(f"prepare failed: {type(exc).__name__}: {exc}") from exc
        item.has_prepared = True

    async def _handled(self, item: Work) -> bool:
        try:
            return await self.pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM inbox WHERE consumer = $1 AND message_id = $2)",
                item.spec.service, item.message_id)
        except db.TRANSIENT_DB_ERRORS:
            return False  # only saves work: the transaction's inbox row still dedupes
