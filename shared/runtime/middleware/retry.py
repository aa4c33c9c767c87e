"""Transient retry: a deadlock or a dropped connection is tried again in process, bounded
(tenacity, exponential wait), each attempt in a fresh transaction. What persists goes on out
(to the outage hold, then the dead letter)."""

from __future__ import annotations

import asyncio

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from shared import db
from shared.runtime.chain import Middleware, Next
from shared.runtime.work import Batch


def transient_retrying(attempts: int) -> AsyncRetrying:
    return AsyncRetrying(
        stop=stop_after_attempt(max(1, attempts)),
        wait=wait_exponential(multiplier=0.1, max=3),
        retry=retry_if_exception_type(db.TRANSIENT_DB_ERRORS),
        reraise=True,
    )


class TransientRetry(Middleware):
    def __init__(self, attempts: int) -> None:
        self.attempts = attempts

    async def __call__(self, batch: Batch, call_next: Next) -> None:
        try:
            return await call_next(batch)
        except db.TRANSIENT_DB_ERRORS:
            # The retry machinery is built only when needed: the first try is the hot path.
            if self.attempts <= 1:
                raise
            await asyncio.sleep(0.1)
        async for attempt in transient_retrying(self.attempts - 1):
            with attempt:
                for item in batch.items:
                    item.retries += 1
                return await call_next(batch)
