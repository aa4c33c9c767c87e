"""The outbox relay: publishes committed events with confirms, woken by NOTIFY, sweeping on a timer.

Several relays may run at once (one per worker process): rows are claimed with
FOR UPDATE SKIP LOCKED, so in the normal case none is published twice. A relay
that dies after publishing and before marking leaves the rows to be published
again with the same message_id, which consumers dedupe.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
from aio_pika.abc import AbstractExchange
from aio_pika.exceptions import PublishError

from shared import broker, db, metrics
from shared.settings_parts import RelaySettings
from shared.wakeup import Wakeup

log = logging.getLogger("ordermill.outbox")

CHANNEL = "ordermill_outbox"

# A pass's rows, oldest first, locked (SKIP LOCKED: another relay's pass takes others) and
# marked published in the same statement; `waited` is how long each sat in the outbox.
_CLAIM = (
    "WITH claimed AS (SELECT id FROM outbox WHERE published_at IS NULL"
    " AND ($2::text[] IS NULL OR source IS NULL OR source = ANY($2::text[]))"
    " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)"
    " UPDATE outbox o SET published_at = now() FROM claimed WHERE o.id = claimed.id"
    " RETURNING o.id, o.message_id, o.routing_key, o.body, o.correlation_id, o.direct,"
    " extract(epoch FROM clock_timestamp() - o.created_at)::float8 AS waited")


class OutboxRelay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        exchange: AbstractExchange,
        database_url: str | None,  # for its LISTEN (Settings.listen_url); None: timer only
        settings: RelaySettings,
        *,
        direct: AbstractExchange | None = None,
        user_id: str | None = None,
        sources: list[str] | None = None,
    ) -> None:
        self.pool = pool
        self.exchange = exchange
        self.direct = direct  # the default exchange, for replies straight to a queue
        self.database_url = database_url
        # Events go out with the relay's RabbitMQ user as their validated user_id, and, with a
        # user per service, only its own services' events (rows of no source: anyone's).
        self.user_id = user_id
        self.sources = sources
        self.batch = settings.batch
        self.sweep_seconds = settings.sweep_seconds
        self.linger_seconds = settings.linger_seconds
        self.busy_linger_seconds = settings.busy_linger_seconds
        self._more = False  # the last pass was full: more are waiting
        self.published = 0
        self.last_failed = 0
        self.concurrency = settings.concurrency
        self._failures = 0
        # Backing off (the broker away), it lets this process's commits notify the other
        # relays, which may reach another node.
        self._wakeup = Wakeup(database_url, CHANNEL, accepting=lambda: self._failures == 0)
        self._wake = self._wakeup.event

    async def run(self, stop: asyncio.Event) -> None:
        """Start a pass whenever events are committed (or the sweep timer fires), with up to
        `concurrency` passes in flight: the broker's confirms take a while (quorum queues
        write to disk), and passes that waited for each other would make events queue up."""
        stopping = asyncio.create_task(stop.wait())
        slots = asyncio.Semaphore(self.concurrency)
        passes: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                await self._wakeup.ensure()
                self._wake.clear()
                await slots.acquire()
                task = asyncio.create_task(self._pass(slots))
                passes.add(task)
                task.add_done_callback(passes.discard)
                if self._failures:
                    # Broker or database away: back off instead of spinning on the same rows.
                    delay = min(5.0, 0.2 * 2 ** min(self._failures, 5))
                    await asyncio.wait({stopping}, timeout=delay)
                    continue
                await self._next_wake(stopping, passes)
        finally:
            stopping.cancel()
            self._wakeup.leave_here()  # what commits now is for another relay: notified
            if passes:
                await asyncio.wait(passes, timeout=10)
            await self._wakeup.close()

    async def _next_wake(self, stopping: asyncio.Task[bool],
                         passes: set[asyncio.Task[None]]) -> None:
        """Until the next pass is due: a wake-up (then its linger), the sweep timer or a stop.
        A pass in flight that read the rows a wake-up was for (it clears the wake-up just
        before it reads) answers it: then wait again rather than start a pass for nothing."""
        while True:
            waking = asyncio.create_task(self._wake.wait())
            await asyncio.wait({waking, stopping}, timeout=self.sweep_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
            waking.cancel()
            if not self._wake.is_set() or stopping.done():
                return  # the sweep's turn, or a stop
            await self._linger(passes)
            if self._wake.is_set() or self._more:
                return

    async def _linger(self, passes: set[asyncio.Task[None]]) -> None:
        """Let the commits of the next few milliseconds join the next pass: one transaction
        and one confirm round for many events instead of one each. `linger_seconds` always;
        while a pass is still waiting for its confirms (a steady stream), until one ends, up
        to `busy_linger_seconds`: the events committed meanwhile then go together in the pass
        after it instead of a pass each (at a steady rate the relay ran one pass for every few
        events: docs/performance.md, "Where PostgreSQL's CPU goes"). Not when the last pass
        was full: a backlog goes out at once, as many passes at a time as `concurrency`
        allows."""
        if self._more:
            return
        if passes and self.busy_linger_seconds > self.linger_seconds:
            await asyncio.wait(set(passes), timeout=self.busy_linger_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        elif self.linger_seconds:
            await asyncio.sleep(self.linger_seconds)

    async def _pass(self, slots: asyncio.Semaphore) -> None:
        try:
            handled = await self.drain_once()
            self._failures = 0 if self.last_failed == 0 else self._failures + 1
            self._more = handled >= self.batch
            if self._more:
                self._wake.set()  # more waiting: another pass at once
        except (*db.TRANSIENT_DB_ERRORS, *broker.TRANSIENT_BROKER_ERRORS) as exc:
            log.warning("outbox relay pass failed; will retry", extra={"error": str(exc)})
            self._failures += 1
        finally:
            slots.release()

    async def drain_once(self) -> int:
        """Publish one batch of unpublished rows. Returns how many it published or marked;
        `last_failed` counts those left for a later pass."""
        started = time.perf_counter()
        async with self.pool.acquire() as conn, conn.transaction():
            # Whatever was committed before this read is in it (or in a pass that holds its
            # rows): a wake-up heard while this pass waited for a slot or a connection asks
            # for nothing more, and left set it started a pass that found nothing (0.5 an
            # order at a steady rate: docs/performance.md, "Work heard where it is written").
            self._wake.clear()
            # Claimed and marked in one statement: the rows stay locked and the mark
            # uncommitted until the broker has confirmed them, and a pass that ends early (its
            # connection or process lost) rolls both back. What the broker did not take is
            # unmarked again below: rare, where the separate mark was a statement every pass.
            rows = sorted(await conn.fetch(_CLAIM, self.batch, self.sources),
                          key=lambda row: row["id"])
            if not rows:
                self.last_failed = 0
                return 0
            # Publish the whole batch at once: the broker confirms them as a pipeline.
            results = await asyncio.gather(
                *(self._publish(row) for row in rows), return_exceptions=True
            )
            sent, unroutable, failed = [], [], []
            for row, result in zip(rows, results, strict=True):
                if result is None:
                    sent.append(row["id"])
                elif isinstance(result, PublishError):
                    unroutable.append(row["id"])
                else:
                    failed.append((row, result))
            if unroutable:
                # No queue is bound to this key (no subscriber yet): recorded, not retried.
                await conn.execute("UPDATE outbox SET unroutable = true WHERE id = ANY($1)",
                                   unroutable)
                log.info("events with no subscriber", extra={"count": len(unroutable)})
            if failed:  # left for a later pass
                await conn.execute("UPDATE outbox SET published_at = NULL WHERE id = ANY($1)",
                                   [row["id"] for row, _ in failed])
            for row, error in failed[:3]:
                log.warning("event publish failed; will retry", extra={
                    "routing_key": row["routing_key"], "message_id": str(row["message_id"]),
                    "error": repr(error),
                })
        self.published += len(sent)
        self.last_failed = len(failed)
        for outcome, count in (("sent", len(sent)), ("unroutable", len(unroutable)),
                               ("failed", len(failed))):
            if count:
                metrics.RELAY_EVENTS.labels(outcome).inc(count)
        log.debug("relay pass", extra={"rows": len(rows), "sent": len(sent),
                                       "unroutable": len(unroutable), "failed": len(failed),
                                       "ms": round((time.perf_counter() - started) * 1000, 1)})
        return len(sent) + len(unroutable)

    async def _publish(self, row: asyncpg.Record) -> None:
        body = row["body"]
        message = broker.json_message(
            body, routing_key=row["routing_key"], message_id=str(row["message_id"]),
            correlation_id=row["correlation_id"], user_id=self.user_id,
        )
        exchange = self.direct if row["direct"] and self.direct is not None else self.exchange
        started = time.perf_counter()
        await broker.publish_queued(exchange, row["routing_key"], message)
        took = time.perf_counter() - started
        metrics.RELAY_PUBLISH.observe(took)
        metrics.OUTBOX_DELAY.observe(max(0.0, row["waited"] or 0.0) + took)

