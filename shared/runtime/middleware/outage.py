"""Outage hold: a transient error that outlived its retries while the database does not answer
(a restart, a failover) is no fault of the message. The delivery waits for the database and
runs again; a worker stopping meanwhile requeues it. Never dead-lettered for an outage."""

from __future__ import annotations

from collections.abc import Callable

from shared.errors import Rejected
from shared.health import DatabaseWatch
from shared.runtime.chain import Middleware, Next
from shared.runtime.work import Batch, Outcome, Transport


class OutageHold(Middleware):
    def __init__(self, service: str, database: DatabaseWatch, transport: Transport,
                 in_flight: Callable[[], int]) -> None:
        self.service = service
        self.database = database
        self.transport = transport
        self.in_flight = in_flight

    async def __call__(self, batch: Batch, call_next: Next) -> None:
        while True:
            if not await self.database.through():  # stopping while the database is away
                await self.transport.requeue(batch.messages)
                for item in batch.items:
                    item.settled, item.outcome = True, Outcome.REQUEUED
                return
            try:
                await call_next(batch)
            except Rejected:
                raise
            except Exception as exc:
                if (await self.database.outlasted(self.service, exc, self.in_flight())
                        or self.database.down):
                    for item in batch.items:
                        item.retries += 1
                    continue  # back: the same delivery again; or stopping: requeued above
                raise
            return
