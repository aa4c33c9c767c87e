"""`ordermill exporter`: one process that exports what no single worker knows, for Prometheus.

- every queue's depth and consumers, read as `ordermill queues` reads them (passive
  declares, cli/broker_ops.py: no management plugin), and the dead letters waiting;
- the domain gauges an operator acts on: orders awaiting review and the age of the oldest,
  screenings flagged (could not complete, the order held), parked setups, unapplied payments.

Each is read when Prometheus scrapes, at most once per METRICS_CACHE_SECONDS. It needs only
to read (a read-only database role and a RabbitMQ user allowed passive declares will do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from aio_pika.abc import AbstractRobustConnection
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from shared import broker, db
from shared.metrics import DatabaseGauges, StateGauge
from shared.metrics_server import MetricsServer
from shared.queue_depths import queue_depths
from shared.topology import Names

log = logging.getLogger("ordermill.exporter")

DEFAULT_PORT = 9108

# Orders awaiting review: Pending, screening finished (as `ordermill pending` lists them).
_AWAITING = ("FROM orders WHERE status = 'Pending' AND deleted_at IS NULL"
             " AND screening <> 'queued'")
DOMAIN_GAUGES: tuple[StateGauge, ...] = (
    StateGauge("ordermill_orders_awaiting_review",
               "Orders Pending with their screening finished, waiting for an operator.",
               f"SELECT count(*) {_AWAITING}"),
    StateGauge("ordermill_orders_awaiting_review_oldest_age_seconds",
               "Age of the oldest order awaiting review (0 when none waits).",
               f"SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0) {_AWAITING}"),
    StateGauge("ordermill_screenings_flagged",
               "Orders held Pending because their screening could not complete (flagged).",
               "SELECT count(*) FROM orders WHERE status = 'Pending' AND deleted_at IS NULL"
               " AND screening = 'error'"),
    StateGauge("ordermill_setups_parked",
               "Provisioning jobs parked for an operator (the module queue).",
               "SELECT count(*) FROM jobs WHERE status = 'parked'"),
    StateGauge("ordermill_payments_unapplied",
               "Payments kept unapplied (unknown invoice, mismatch, not from a gateway, ...).",
               "SELECT count(*) FROM payments WHERE status = 'unapplied'"),
)


class ListenError(Exception):
    """The address cannot be listened on (in use, not this host's): one line for the CLI."""


class QueueGauges(Collector):
    """Depth and consumers of every work and dead-letter queue, by passive declares."""

    def __init__(self, connection: AbstractRobustConnection, names: Names, *, ttl: float) -> None:
        self.connection = connection
        self.names = names
        self.ttl = ttl
        self.ok = False
        self._rows: list[dict[str, object]] = []
        self._at = -float("inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._at < self.ttl:
                return
            self._at = time.monotonic()
            try:
                self._rows = await asyncio.wait_for(queue_depths(self.connection, self.names), 10)
                self.ok = True
            except Exception as exc:  # the broker away: no stale depths, and the source shows down
                if self.ok or not self._rows:
                    log.warning("exporter: queues not read", extra={
                        "error": f"{type(exc).__name__}: {exc}"})
                self._rows, self.ok = [], False

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return self._families()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return self._families(self._rows)

    def _families(self, rows: Iterable[dict[str, object]] = ()) -> list[GaugeMetricFamily]:
        messages = GaugeMetricFamily("ordermill_queue_messages",
                                     "Messages ready in the queue (work and dead-letter queues).",
                                     labels=["queue"])
        consumers = GaugeMetricFamily("ordermill_queue_consumers",
                                      "Consumers attached to the queue.", labels=["queue"])
        dead = GaugeMetricFamily("ordermill_dead_letters",
                                 "Dead letters waiting for an operator, by dead-letter queue.",
                                 labels=["queue"])
        for row in rows:
            if row.get("missing"):
                continue
            queue = str(row["queue"])
            messages.add_metric([queue], float(row["messages"]))  # type: ignore[arg-type]
            consumers.add_metric([queue], float(row["consumers"]))  # type: ignore[arg-type]
            if queue.endswith(".dead"):
                dead.add_metric([queue], float(row["messages"]))  # type: ignore[arg-type]
        return [messages, consumers, dead]


class SourcesUp(Collector):
    """Whether the exporter could read each of its sources at the last scrape."""

    def __init__(self, database: DatabaseGauges, queues: QueueGauges) -> None:
        self.database, self.queues = database, queues

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = self._family()
        family.add_metric(["database"], float(self.database.ok))
        family.add_metric(["broker"], float(self.queues.ok))
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("ordermill_exporter_source_up",
                                 "1 if the exporter read the source at the last scrape.",
                                 labels=["source"])


def exporter_registry(database: DatabaseGauges, queues: QueueGauges) -> CollectorRegistry:
    """The exporter's own registry: its gauges only (no worker metrics, no process metrics of
    a process that does no work worth watching)."""
    registry = CollectorRegistry()
    for collector in (database, queues, SourcesUp(database, queues)):
        registry.register(collector)
    return registry


async def serve(*, database_url: str, amqp_url: str, namespace: str, host: str, port: int,
                cache_seconds: float, startup_attempts: int, stop: asyncio.Event,
                ready: asyncio.Future[int] | None = None,
                statement_cache_size: int = 100) -> None:
    """Serve /metrics until `stop` is set; `ready` gets the port once it listens."""
    pool = await db.create_pool(database_url, max_size=2, attempts=startup_attempts,
                                statement_cache_size=statement_cache_size)  # 0: PgBouncer
    connection: AbstractRobustConnection | None = None
    server: MetricsServer | None = None
    try:
        connection = await broker.connect(amqp_url, attempts=startup_attempts)
        database = DatabaseGauges(pool, DOMAIN_GAUGES, ttl=cache_seconds)
        queues = QueueGauges(connection, Names(namespace), ttl=cache_seconds)
        server = MetricsServer([exporter_registry(database, queues)],
                               refresh=[database.refresh, queues.refresh])
        try:
            bound = await server.start(host, port)
        except OSError as exc:
            raise ListenError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        log.info("exporter running", extra={"host": host, "port": bound})
        if ready is not None:
            ready.set_result(bound)
        await stop.wait()
    finally:
        if server is not None:
            await server.stop()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
        await pool.close()
