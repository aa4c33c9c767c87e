"""Wanted: for a worker that acts on an event only when something asked for it
(`WorkerSpec.wanted`: the webhooks worker, the alerts worker), one read for the batch, before
its transaction, of which messages need their handler now; the rest of the chain (the
transaction, the inbox, the handlers) runs for those alone, and not at all when none does.
The others are acked with the batch, unhandled: they have nothing to write.

Read afresh on every attempt (a transient retry, a batch falling back to one by one), after
every message of the batch was received: a subscription or a rule committed before an event
was published is always seen, so the first event after it is never missed (nothing is
cached that an added endpoint or a loaded rule would have to wait out)."""

from __future__ import annotations

import asyncpg

from shared.runtime.chain import Middleware, Next
from shared.runtime.routes import Wanted as WantedStep
from shared.runtime.work import Batch


class Wanted(Middleware):
    def __init__(self, pool: asyncpg.Pool, wanted: WantedStep) -> None:
        self.pool = pool
        self.wanted = wanted

    async def __call__(self, batch: Batch, call_next: Next) -> None:
        async with self.pool.acquire() as conn:
            flags = await self.wanted([(item.key, item.payload) for item in batch.items], conn)
        items = [item for item, flag in zip(batch.items, flags, strict=True) if flag]
        if not items:
            return  # nothing asked for any of them: no transaction
        if len(items) < len(batch.items):
            batch = Batch(items)
        await call_next(batch)

    def __repr__(self) -> str:
        return f"Wanted({getattr(self.wanted, '__qualname__', self.wanted)!r})"
