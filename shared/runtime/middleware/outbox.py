"""Outbox flush: the writes the handlers deferred (`uow.defer`: a call per writer for the
whole batch), then the events and replies they emitted, written in one statement in their
transaction, after every handler of the batch returned (shared/uow.py)."""

from __future__ import annotations

from shared.runtime.chain import Middleware, Next
from shared.runtime.work import Batch
from shared.uow import flush_events


class OutboxFlush(Middleware):
    async def __call__(self, batch: Batch, call_next: Next) -> None:
        await call_next(batch)
        assert batch.conn is not None
        await flush_events(batch.conn, batch.uows)
