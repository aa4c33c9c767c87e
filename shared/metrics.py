"""Every Prometheus metric a worker process exports, defined once, here.

A component adds a metric with one line in this module and one call where it happens:

    WEBHOOK_DELIVERIES = Counter("ordermill_webhook_deliveries_total", "...", ["outcome"])
    metrics.WEBHOOK_DELIVERIES.labels(outcome="delivered").inc()

and a count the database holds (rows by state) with a `StateGauge`, listed in its
WorkerSpec's `gauges`: read at scrape time, at most once per METRICS_CACHE_SECONDS, only in
the processes that run that worker.

Naming follows Prometheus (https://prometheus.io/docs/practices/naming/): the `ordermill_`
prefix, base units (`_seconds`), counters ending in `_total`, and labels with a small, bounded
set of values only: a queue, a route the worker declares, a reason from a closed enum
(shared.errors.RejectKind), a state, a job kind, a module or lane from the catalog. Never
an order, a client, a message id or any text from outside.

Counters and histograms live in prometheus_client's default registry (with its process and
Python collectors); they cost a few hundred nanoseconds each when no endpoint is served
(METRICS_PORT unset), and the pipeline's message metrics are not even installed then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import asyncpg
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("ordermill.metrics")

# Seconds, from a millisecond handler to a slow batch under load or a slow server.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
# A remote call (a cPanel server, a registry, an SMTP relay): up to minutes.
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# -- messages: counted by the pipeline's metrics middleware (shared/runtime/middleware/metrics.py)

MESSAGE_LABELS = ("queue", "route")
MESSAGES_CONSUMED = Counter(
    "ordermill_messages_consumed_total",
    "Deliveries taken from the queue by the pipeline (redeliveries count again).",
    MESSAGE_LABELS)
MESSAGES_ACKED = Counter(
    "ordermill_messages_acked_total",
    "Deliveries acknowledged once their effects were committed (or found already handled).",
    MESSAGE_LABELS)
MESSAGES_REJECTED = Counter(
    "ordermill_messages_rejected_total",
    "Deliveries dead-lettered, by the kind of reason (shared.errors.RejectKind).",
    (*MESSAGE_LABELS, "reason"))
MESSAGES_REQUEUED = Counter(
    "ordermill_messages_requeued_total",
    "Deliveries handed back to the broker unsettled (stopping, a failure outside any handler).",
    MESSAGE_LABELS)
MESSAGES_RETRIED = Counter(
    "ordermill_messages_retried_total",
    "Runs of a delivery again in process: a transient database error retried, or the"
    " database back after an outage.",
    MESSAGE_LABELS)
HANDLER_DURATION = Histogram(
    "ordermill_handler_duration_seconds",
    "From the pipeline taking a delivery to settling it (parse, prepare, transaction, handler,"
    " commit, ack); deliveries handled as one batch each observe the batch's time.",
    MESSAGE_LABELS, buckets=LATENCY_BUCKETS)
# A routing key no route of the worker declares is counted under this one (bounded labels).
OTHER_ROUTE = "other"

# -- the outbox relay (shared/outbox.py)

RELAY_PUBLISH = Histogram(
    "ordermill_relay_publish_seconds",
    "One event's publish by the outbox relay, until the broker confirmed it.",
    buckets=LATENCY_BUCKETS)
OUTBOX_DELAY = Histogram(
    "ordermill_outbox_delay_seconds",
    "From an event's commit to the outbox to its confirmed publish by the relay.",
    buckets=LATENCY_BUCKETS)
RELAY_EVENTS = Counter(
    "ordermill_relay_events_total",
    "Events the relay handled: sent (confirmed), unroutable (no queue bound), failed (retried).",
    ["outcome"])

# -- the leased queue (shared/leased_queue.py) and what runs on it

LEASED_OUTCOMES = Counter(
    "ordermill_leased_outcomes_total",
    "Outcomes written to rows of a leased queue, by table and the status written: done, sent,"
    " cancelled, pending (a retry scheduled with backoff), parked (for an operator).",
    ["table", "status"])
LEASED_WORK = Histogram(
    "ordermill_leased_work_seconds",
    "One claimed row's work under a leased-queue Runner (a provisioning job), by table.",
    ["table"], buckets=CALL_BUCKETS)
JOB_DURATION = Histogram(
    "ordermill_job_duration_seconds",
    "One attempt of a provisioning job, by kind (create, terminate, register, transfer) and"
    " module or registrar.",
    ["kind", "module"], buckets=CALL_BUCKETS)


# -- outbound webhooks (services/webhooks/sender.py)

WEBHOOK_ATTEMPTS = Counter(
    "ordermill_webhook_attempts_total",
    "Webhook POSTs attempted, by outcome: delivered (2xx), failed (retried or parked), gone"
    " (410: the endpoint disabled), refused (an address the SSRF rules refuse).",
    ["outcome"])
WEBHOOK_ATTEMPT_SECONDS = Histogram(
    "ordermill_webhook_attempt_seconds",
    "One webhook attempt: connection, request and the answer's first bytes.",
    buckets=CALL_BUCKETS)


# -- counts the database holds, read at scrape time

@dataclass(frozen=True)
class StateGauge:
    """A gauge read from the database when scraped: one sample per row of `sql`, its first
    columns the `labels` (in order), its last the value. Keep the query cheap (an index, a
    partial one) and its labels bounded (states, kinds, lanes)."""

    name: str
    documentation: str
    sql: str
    labels: tuple[str, ...] = ()


OUTBOX_BACKLOG = StateGauge(
    "ordermill_outbox_backlog", "Events committed to the outbox and not yet published.",
    "SELECT count(*) FROM outbox WHERE published_at IS NULL")
OUTBOX_OLDEST = StateGauge(
    "ordermill_outbox_oldest_age_seconds",
    "Age of the oldest event not yet published (0 when none waits).",
    "SELECT coalesce(extract(epoch FROM now() - (SELECT created_at FROM outbox"
    " WHERE published_at IS NULL ORDER BY id LIMIT 1)), 0)")
# Open jobs only (the partial index jobs_open_key covers them); done and cancelled ones are
# counted as they happen (ordermill_leased_outcomes_total). The lane is the module and,
# when it has one, the server id ("cpanel:3"), or the registrar.
JOBS_BY_STATE = StateGauge(
    "ordermill_jobs", "Provisioning jobs waiting, running or parked, by state, kind, module and lane.",
    "SELECT status, kind, split_part(lane, ':', 1), lane, count(*) FROM jobs"
    " WHERE status IN ('pending', 'running', 'parked') GROUP BY 1, 2, 3, 4",
    ("state", "kind", "module", "lane"))
EMAILS_BY_STATE = StateGauge(
    "ordermill_emails", "Customer emails not yet sent, by state (pending, sending, parked).",
    "SELECT s, count(e.id) FROM unnest(ARRAY['pending', 'sending', 'parked']) AS s"
    " LEFT JOIN emails e ON e.status = s GROUP BY s",
    ("state",))
WEBHOOK_DELIVERIES_BY_STATE = StateGauge(
    "ordermill_webhook_deliveries",
    "Webhook deliveries not yet delivered, by state (pending, sending, parked).",
    "SELECT s, count(d.id) FROM unnest(ARRAY['pending', 'sending', 'parked']) AS s"
    " LEFT JOIN webhook_deliveries d ON d.status = s GROUP BY s",
    ("state",))
ALERT_DELIVERIES_BY_STATE = StateGauge(
    "ordermill_alert_deliveries",
    "Staff alerts' Slack messages not yet delivered, by state (pending, sending, parked): a"
    " parked one is an alert nobody received.",
    "SELECT s, count(d.id) FROM unnest(ARRAY['pending', 'sending', 'parked']) AS s"
    " LEFT JOIN alert_deliveries d ON d.status = s GROUP BY s",
    ("state",))
# Every process running an outbox relay reports these (the relay's backlog).
RELAY_GAUGES: tuple[StateGauge, ...] = (OUTBOX_BACKLOG, OUTBOX_OLDEST)


class DatabaseGauges(Collector):
    """The StateGauges of one process, queried together before a scrape is answered, and
    again only once `ttl` seconds have passed (several scrapers, a dashboard's refresh)."""

    def __init__(self, pool: asyncpg.Pool, gauges: Iterable[StateGauge], *, ttl: float,
                 timeout: float = 5.0) -> None:
        self.pool = pool
        self.gauges = tuple(dict.fromkeys(gauges))  # each once, in order
        self.ttl = ttl
        self.timeout = timeout
        self.queries = 0  # how often the database was asked (the cache's test reads it)
        self._samples: dict[str, list[tuple[tuple[str, ...], float]]] = {}
        self._at = -float("inf")
        self._lock = asyncio.Lock()
        self._failing = False

    @property
    def ok(self) -> bool:
        """Whether the last round of queries answered."""
        return self.queries > 0 and not self._failing

    async def refresh(self) -> None:
        async with self._lock:  # scrapes at once share one round of queries
            if time.monotonic() - self._at < self.ttl:
                return
            self._at = time.monotonic()
            self.queries += 1
            try:
                async with self.pool.acquire(timeout=self.timeout) as conn:
                    samples = {g.name: _samples(g, await conn.fetch(g.sql, timeout=self.timeout))
                               for g in self.gauges}
            except Exception as exc:  # no stale values: the gauges are left out until it answers
                self._samples = {}
                if not self._failing:
                    log.warning("metrics: database gauges not read", extra={
                        "error": f"{type(exc).__name__}: {exc}"})
                self._failing = True
                return
            self._samples, self._failing = samples, False

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(g.name, g.documentation, labels=g.labels) for g in self.gauges]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for g in self.gauges:
            if g.name not in self._samples:
                continue
            family = GaugeMetricFamily(g.name, g.documentation, labels=g.labels)
            for labels, value in self._samples[g.name]:
                family.add_metric(labels, value)
            yield family


def _samples(gauge: StateGauge, rows: list[asyncpg.Record]) -> list[tuple[tuple[str, ...], float]]:
    n = len(gauge.labels)
    return [(tuple("" if v is None else str(v) for v in tuple(r)[:n]), float(r[n] or 0))
            for r in rows]


class ProcessState(Collector):
    """What a worker process knows of its servers, read when scraped: whether it holds
    messages through a database outage, whether its broker connection is up."""

    def __init__(self, database_outage: Callable[[], bool],
                 broker_connected: Callable[[], bool]) -> None:
        self.database_outage = database_outage
        self.broker_connected = broker_connected

    def describe(self) -> Sequence[GaugeMetricFamily]:
        return self._families(describe=True)

    def collect(self) -> Sequence[GaugeMetricFamily]:
        return self._families()

    def _families(self, describe: bool = False) -> list[GaugeMetricFamily]:
        outage = GaugeMetricFamily(
            "ordermill_database_outage",
            "1 while the worker holds its messages waiting for the database to answer again.")
        connected = GaugeMetricFamily(
            "ordermill_broker_connected",
            "1 while the worker's RabbitMQ connection is open (0 while it reconnects).")
        if not describe:
            with contextlib.suppress(Exception):
                outage.add_metric([], float(bool(self.database_outage())))
            with contextlib.suppress(Exception):
                connected.add_metric([], float(bool(self.broker_connected())))
        return [outage, connected]
