"""The handler: `(message, uow)` for each delivery the inbox let through, last in the chain."""

from __future__ import annotations

from shared.runtime.chain import Middleware, Next
from shared.runtime.work import Batch
from shared.uow import UnitOfWork


class CallHandler(Middleware):
    async def __call__(self, batch: Batch, call_next: Next) -> None:
        assert batch.conn is not None
        for item in batch.todo:
            assert item.route and item.context
            uow = UnitOfWork(batch.conn, item.context, prepared=item.prepared,
                             loaded=item.loaded)
            await item.route.handler(item.payload, uow)
            batch.uows.append(uow)
        await call_next(batch)
