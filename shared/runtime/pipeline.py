"""The pipeline: every delivery of a worker goes through the same middleware, broker or not.

Each middleware is a small class with one job (shared/runtime/middleware/). A middleware is
called with the batch and the rest of the chain: what it does before `call_next` runs on
the way in, in the declared order; what it does after, or in an `except`, runs on the way
out, in reverse (dramatiq's before/after hooks, as one coroutine):

    metrics (with METRICS_PORT) >                                       (the deliveries taken)
      dead letter > property checks > routing > publisher check > parse  (intake, one by one)
      dead letter > outage hold > transient retry > prepare > [wanted]
          > transaction > inbox dedupe > outbox flush > load > handler     (work)

so a handler's failure meets, on its way out, the outbox (not flushed), the transaction
(rolled back), the transient retry (again), the outage hold (wait for the database) and
the dead letter (with its reason). Under load, several deliveries share one transaction
(from the transaction inward); if that batch fails, each goes through the chain alone, so
one bad message never takes the others with it. A route's load step reads, once for the
batch's messages, what each handler would read on its own (`route(load=...)`).

The metrics middleware wraps all of it (the deliveries a batcher took, as one batch): it
counts what intake refused as well as what the work chain handled, and reads how each was
settled from the delivery itself (`Work.outcome`, `rejected_as`, `retries`), so no other
middleware and no handler knows of metrics. `extra` middleware (Runtime's `middleware=`)
runs first in the work chain, per delivery or batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from shared.health import DatabaseWatch
from shared.parties import Publishers
from shared.runtime import middleware as m
from shared.runtime.chain import Chain, Middleware, Next
from shared.runtime.routes import WorkerSpec
from shared.runtime.work import Batch, Outcome, Transport, Work
from shared.settings_parts import PipelineSettings
from shared.topology import Names

log = logging.getLogger("ordermill.runtime")

class Pipeline:
    """One worker's chains, built from its spec and the process's shared resources."""

    def __init__(self, spec: WorkerSpec, *, settings: PipelineSettings, names: Names, pool: asyncpg.Pool,
                 transport: Transport, database: DatabaseWatch, publishers: Publishers,
                 user: str | None, in_flight: Callable[[], int] = lambda: 0,
                 extra: Sequence[Middleware] = (), metrics: bool = False) -> None:
        self.spec = spec
        self.transport = transport
        self.database = database
        dead_letter = m.DeadLetter(spec, names=names, pool=pool, transport=transport,
                                   user=user, attempts=settings.transient_attempts)
        retry = m.TransientRetry(settings.transient_attempts)
        # Intake: what is checked before the message is worth a transaction. The publisher is
        # checked before the body is read: a message nobody may send is not even parsed.
        self.intake = Chain([dead_letter.bad_input_only(), m.PropertyChecks(), m.Routing(),
                             m.PublisherCheck(publishers),
                             m.Parse(settings.max_message_bytes)])
        dedupe = m.InboxDedupe() if spec.inbox else m.OncePerBatch()
        # A worker that acts only on what something asked for reads that first (once a batch):
        # a batch nothing asked for has no transaction at all.
        wanted = [m.Wanted(pool, spec.wanted)] if spec.wanted is not None else []
        core = [*wanted, m.Transaction(pool), dedupe, m.OutboxFlush(), m.Load(), m.CallHandler()]
        self.core = Chain(core)  # a batch under load, all or nothing
        hold = m.OutageHold(spec.service, database, transport, in_flight)
        self.preparing = Chain([*extra, dead_letter, hold, retry, m.Prepare(pool)])
        self.single = Chain([*extra, dead_letter, hold, retry, m.Prepare(pool), *core])
        observe = [m.MessageMetrics(names.queue(spec.service), spec.routes)] if metrics else []
        self.delivery = Chain([*observe, _Settle(self)])

    def handle(self, messages: Sequence[AbstractIncomingMessage]) -> Awaitable[None]:
        """Settle every message: acked once its effects are committed, dead-lettered with the
        reason, or requeued (stopping while the database is away)."""
        return self.delivery(Batch([Work.of(message, self.spec) for message in messages]))

    async def settle(self, delivered: list[Work]) -> None:
        items = []
        for item in delivered:
            await self.intake(Batch([item]))
            if not item.settled:
                items.append(item)
        if not items:
            return
        if not await self.database.through():  # stopping while the database is away
            await self.transport.requeue([item.message for item in items])
            for item in items:
                item.outcome = Outcome.REQUEUED
            return
        if len(items) > 1 and await self._as_one(items):
            return
        for item in items:
            await self.single(Batch([item]))
            if not item.settled:
                await self.transport.ack(item.message)
                item.outcome = Outcome.ACKED

    async def _as_one(self, items: list[Work]) -> bool:
        """Prepare each (concurrently), then one transaction for all: True if it committed."""
        preparing = [item for item in items if item.route and item.route.prepare]
        results = await asyncio.gather(*(self.preparing(Batch([item])) for item in preparing),
                                       return_exceptions=True) if preparing else []
        for item, result in zip(preparing, results, strict=True):
            if isinstance(result, BaseException):  # not even dead-lettered: try again later
                log.error("message left for redelivery", extra={
                    "service": self.spec.service, "message_id": item.message_id,
                    "error": f"{type(result).__name__}: {result}"})
                await self.transport.requeue([item.message])
                item.settled, item.outcome = True, Outcome.REQUEUED
        items[:] = [item for item in items if not item.settled]
        if len(items) < 2:
            return False
        try:
            await self.core(Batch(items))
        except Exception as exc:
            log.info("batch rolled back; handling its messages one by one",
                     extra={"service": self.spec.service, "size": len(items),
                            "error": f"{type(exc).__name__}: {exc}"})
            return False
        # One multiple ack where the batch's delivery tags allow it (shared/runtime/acks.py),
        # the others together, not one after another: an ack waits for its frame to be
        # written, and a batch acked one by one paid a few turns of a busy event loop each.
        await self.transport.ack_all([item.message for item in items])
        for item in items:
            item.outcome = Outcome.ACKED
        return True


class _Settle(Middleware):
    """The end of the delivery chain: the pipeline's own work (intake, then work one by one
    or as a batch)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def __call__(self, batch: Batch, call_next: Next) -> Awaitable[None]:
        return self.pipeline.settle(batch.items)
