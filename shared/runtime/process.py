"""The Runtime: one process's shared resources (pool, connection, exchanges) and its workers'
life: start (waiting for servers still coming up), consume through each worker's pipeline,
supervise background tasks, stop cleanly (no new messages, in-flight work finished, close)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path

import asyncpg
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import REGISTRY, CollectorRegistry

from shared import broker, db, metrics_server
from shared.health import DatabaseWatch, heartbeat
from shared.housekeeping import Housekeeper
from shared.metrics import RELAY_GAUGES, DatabaseGauges, ProcessState
from shared.metrics_server import MetricsServer
from shared.outbox import OutboxRelay
from shared.parties import Publishers, amqp_user
from shared.runtime.activity import PIPELINE
from shared.runtime.batching import Busy, InFlight, batcher
from shared.runtime.chain import Middleware
from shared.runtime.pipeline import Pipeline
from shared.runtime.routes import WorkerSpec
from shared.runtime.transport import AmqpTransport
from shared.settings import Settings
from shared.topology import Names, declare_topology

log = logging.getLogger("ordermill.runtime")


class Runtime:
    """Shared resources for the workers of one process, handed to them, never global.

    `middleware` runs first in every worker's work chain (tracing, a test's fault). Metrics are
    the process's: with METRICS_PORT set it serves /metrics and every pipeline counts its
    deliveries (the metrics middleware, outermost: see shared/runtime/pipeline.py).

    It takes the whole Settings, as the worker factories do: it is the process that owns the
    pool, the connection and the background tasks, and hands each of them its part (the
    pipelines `settings.pipeline`, the relay `settings.relay`, the housekeeper
    `settings.housekeeping`, the publisher check `settings.publishers`)."""

    def __init__(self, settings: Settings, *, middleware: Sequence[Middleware] = ()) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.middleware = tuple(middleware)
        self.pool: asyncpg.Pool | None = None
        self.connection: AbstractRobustConnection | None = None
        self.exchange: AbstractExchange | None = None
        self.dead_letter_exchange: AbstractExchange | None = None
        self.direct_exchange: AbstractExchange | None = None
        self.transport: AmqpTransport | None = None
        self._stop = asyncio.Event()
        self._inflight = InFlight()
        # The messages of workers that do not give way (all but webhooks): what a sender
        # that gives way waits for (activity.give_way).
        self._pipeline = InFlight(parent=self._inflight)
        self._batchers: list[asyncio.Task[None]] = []
        self.database = DatabaseWatch(settings.database_url, self._stop,
                                      statement_cache_size=settings.statement_cache_size)
        self.publishers = Publishers.from_settings(settings.publishers)
        self.user = amqp_user(settings.amqp_url)  # the user_id this process publishes with
        # With a user per service (SERVICE_USERS), a worker may declare only its own queues;
        # `ordermill migrate`, run by the broker's administrator, declares them all.
        self._own_queues: list[str] | None = None
        self.metrics_server: MetricsServer | None = None

    def _relayed_sources(self, workers: Sequence[WorkerSpec]) -> list[str] | None:
        """With a RabbitMQ user per service (SERVICE_USERS set), a relay publishes only the
        events of the services it runs: its user may send no others. With one user for all
        (the all-in-one process, development), any relay publishes any event."""
        if not self.settings.service_users or not workers:
            return None
        return [spec.service for spec in workers]

    def check_publishers(self, workers: Sequence[WorkerSpec]) -> None:
        """Closed by default: raises UnknownPublishers (one line) for a route nobody may send."""
        if self.publishers.trust_any:
            log.warning("TRUST_ANY_PUBLISHER is set: any RabbitMQ user may send any message;"
                        " for development only")
        for spec in workers:
            self.publishers.require(
                spec.service, [(key, r.publishers) for key, r in spec.routes.items()])

    async def start(self) -> None:
        s = self.settings
        log.info("starting", extra={"namespace": s.namespace})
        if s.migrate_on_start:
            await db.ensure_database(s.direct_url, attempts=s.startup_attempts,
                                     statement_cache_size=s.statement_cache_size)
        self.pool = await db.create_pool(
            s.database_url, max_size=s.db_pool_max, attempts=s.startup_attempts, writable=True,
            statement_cache_size=s.statement_cache_size,
        )
        # Migrations applied only when missing and allowed: a DML-only role starts on a
        # current schema, and refuses in one line on one that is not.
        try:
            # A failover or restart cutting the pool's connections meanwhile is waited out as
            # the pool's first connection was (one process of several may still be starting
            # when it comes: it must not end the whole run).
            async for attempt in db.retrying(s.startup_attempts):
                with attempt:
                    await db.ensure_schema(self.pool, migrate_on_start=s.migrate_on_start)
        except db.SchemaNotReady:
            await self.pool.close()
            self.pool = None
            raise
        self.connection = await broker.connect(s.amqp_url, attempts=s.startup_attempts)
        # A broker restarting meanwhile is waited for too (see AmqpTransport.consume).
        async for attempt in broker.retrying(s.startup_attempts, also=RuntimeError):
            with attempt:
                publisher = await broker.open_publisher(self.connection)
                await declare_topology(self.connection, self.names,
                                       delivery_limit=s.queue_delivery_limit,
                                       services=self._own_queues, replicas=s.queue_replicas)
                self.exchange = await publisher.get_exchange(self.names.exchange)
                self.dead_letter_exchange = await publisher.get_exchange(
                    self.names.dead_letter_exchange)
        self.direct_exchange = publisher.default_exchange
        self.transport = AmqpTransport(self.connection, self.dead_letter_exchange,
                                       startup_attempts=s.startup_attempts)

    def stop(self) -> None:
        self._stop.set()

    def pipeline(self, spec: WorkerSpec) -> Pipeline:
        assert self.pool and self.transport
        return Pipeline(spec, settings=self.settings.pipeline, names=self.names, pool=self.pool,
                        transport=self.transport, database=self.database,
                        publishers=self.publishers, user=self.user,
                        in_flight=lambda: self._inflight.count, extra=self.middleware,
                        metrics=self.settings.metrics_port is not None)

    async def prepare(self, workers: Sequence[WorkerSpec]) -> bool:
        """Start and close again: what a supervisor does once before it starts its worker
        processes (shared/runtime/supervisor.py), so that a server that never answers or a
        schema this role may not migrate is said once, in one line, and the processes do not
        race to migrate. False when stopped meanwhile."""
        self.check_publishers(workers)
        if self.settings.service_users and workers:
            self._own_queues = [spec.service for spec in workers]
        if not await self._started_unless_stopped():
            return False
        await self.close()
        return True

    async def serve(
        self,
        workers: Sequence[WorkerSpec],
        *,
        relay: bool = True,
        ready: asyncio.Event | None = None,
    ) -> None:
        """Consume until stop() (or SIGTERM via the CLI), then drain in-flight work and close."""
        self.check_publishers(workers)
        for spec in workers:
            for said in spec.on_start:
                said()
        if self.settings.service_users and workers:
            self._own_queues = [spec.service for spec in workers]
        if self.pool is None and not await self._started_unless_stopped():
            return
        assert self.connection and self.pool and self.exchange
        try:
            await self._serve_metrics(workers, relay=relay)
        except BaseException:
            await self.close()
            raise
        tasks: list[asyncio.Task[None]] = []
        if relay:
            outbox = OutboxRelay(
                self.pool, self.exchange, self.settings.listen_url, self.settings.relay,
                direct=self.direct_exchange, user_id=self.user, sources=self._relayed_sources(workers),
            )
            tasks.append(self._supervised("outbox-relay", partial(outbox.run, self._stop)))
            keeper = Housekeeper(self.settings.housekeeping)
            tasks.append(self._supervised("housekeeping", partial(keeper.run, self.pool, self._stop)))
        # Background work that gives way to the pipeline (activity.give_way) sees this
        # process's in-flight count: its tasks are created in this context.
        PIPELINE.set(self._pipeline)
        tasks += [
            self._supervised(f"{spec.service}-background", partial(job, self.pool, self._stop))
            for spec in workers for job in spec.background
        ]
        for spec in workers:
            await self._consume(spec)
        log.info("workers running", extra={"workers": [w.service for w in workers]})
        if self.settings.heartbeat_file:  # alive once consuming, not before
            tasks.append(asyncio.create_task(heartbeat(
                Path(self.settings.heartbeat_file), self.settings.heartbeat_seconds, self._stop,
                self.connection, self.database), name="heartbeat"))
        if ready is not None:
            ready.set()
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(workers, tasks)

    async def _serve_metrics(self, workers: Sequence[WorkerSpec], *, relay: bool) -> None:
        """/metrics on METRICS_HOST:METRICS_PORT: the default registry (message, relay, job
        metrics, process and Python collectors) and this process's own: its servers' state
        and the counts of the tables its workers and relay work on."""
        part = self.settings.metrics
        if part.port is None:
            return
        assert self.pool is not None
        gauges = [*(RELAY_GAUGES if relay else ()), *(g for spec in workers for g in spec.gauges)]
        database = DatabaseGauges(self.pool, gauges, ttl=part.cache_seconds)
        own = CollectorRegistry()
        own.register(database)
        own.register(ProcessState(
            database_outage=lambda: self.database.down,
            broker_connected=lambda: bool(self.connection and self.connection.connected.is_set())))
        self.metrics_server = await metrics_server.serve(
            [REGISTRY, own], part.host, part.port, refresh=[database.refresh])

    async def _consume(self, spec: WorkerSpec) -> None:
        """The worker's pipeline, its batchers, and its consumer feeding them."""
        assert self.transport
        pipeline = self.pipeline(spec)
        waiting: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        in_flight = InFlight(parent=self._inflight if spec.gives_way else self._pipeline)
        # The worker's batches in hand and its messages' pace: its batchers group-commit
        # while it is busy or its messages flow.
        busy = Busy()
        busy_linger = self.settings.worker_linger_ms / 1000
        flow_gap = self.settings.worker_flow_gap_ms / 1000
        loop = asyncio.get_running_loop()

        async def on_message(message: AbstractIncomingMessage) -> None:
            in_flight.enter()
            busy.arrived(loop.time(), flow_gap)
            waiting.put_nowait(message)

        await self.transport.consume(self.names.queue(spec.service),
                                     spec.prefetch or self.settings.worker_prefetch, on_message)
        for n in range(spec.concurrency or self.settings.worker_concurrency):
            self._batchers.append(asyncio.create_task(batcher(
                spec.service, waiting, limit=spec.batch or self.settings.worker_batch,
                linger=spec.linger, handle=pipeline.handle, requeue=self.transport.requeue,
                in_flight=in_flight, busy=busy, busy_linger=busy_linger, flow_gap=flow_gap),
                name=f"{spec.service}-batcher-{n}"))

    async def _started_unless_stopped(self) -> bool:
        """Start, waiting (bounded) for servers still coming up; a stop meanwhile (SIGTERM from
        an orchestrator whose grace period is shorter than the wait) ends it at once."""
        starting = asyncio.create_task(self.start())
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if starting.done():
            starting.result()  # raise a start-up failure
            return True
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        await self.close()
        log.info("stopped before it had started")
        return False

    def _supervised(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        return supervised(name, run, self._stop)

    async def _shutdown(self, workers: Sequence[WorkerSpec], tasks: list[asyncio.Task[None]]) -> None:
        log.info("stopping: no new messages, finishing in-flight work",
                 extra={"in_flight": self._inflight.count})
        if self.transport is not None:
            await self.transport.cancel()
        try:
            await asyncio.wait_for(self._inflight.idle.wait(), timeout=30)
        except TimeoutError:
            log.error("in-flight work did not finish in 30 s; it will be redelivered")
        for task in self._batchers:
            task.cancel()
        self._batchers.clear()
        self._stop.set()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        for spec in workers:
            for hook in spec.on_stop:
                await hook()
        await self.close()
        log.info("stopped")

    async def close(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.stop()
            self.metrics_server = None
        if self.connection is not None:
            await self.connection.close()
            self.connection = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


def supervised(name: str, run: Callable[[], Awaitable[None]],
               stop: asyncio.Event) -> asyncio.Task[None]:
    """A background task (the relay, a sweeper, the job runner, the mail sender) that ends
    with an error is logged and started again: one that stayed dead would leave events
    unpublished and jobs undone while the worker went on consuming and looking healthy."""

    async def supervise() -> None:
        delay = 1.0
        while not stop.is_set():
            try:
                await run()
                return
            except Exception:
                log.exception("background task failed; starting it again",
                              extra={"task": name, "in_seconds": delay})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 30.0)

    return asyncio.create_task(supervise(), name=name)
