"""Ordermill pipeline benchmark: throughput, latency and memory of `ordermill run`, against a yardstick.

One run, in its own database (om_bench_<hex>) and broker namespace (bench.<hex>), both removed at
the end:

1. Ordermill end to end: `ordermill run` (all workers and the outbox relay in one process:
   WORKER_PROCESSES=1 unless the environment sets it, so that the cost per operation stays
   comparable with the yardstick's and earlier runs'; bench/sustained.py measures the
   default layout) is started as a subprocess; orders are published as fast as the publisher can
   (confirms pipelined in batches) and a storefront-style exclusive queue bound to
   order.screened / order.fraud / order.rejected tells when each one is done.
2. Latency at a steady rate (default 100 orders/s for 20 s), publish -> screened.
3. The yardstick: a bare two-stage aio-pika + asyncpg pipeline (this file, `--serve-bare`, also a
   subprocess) with the same prefetch, pool size and message bodies; its throughput is measured
   the same way, and Ordermill's is reported as a ratio of it.
4. Memory: the worker's RSS after each phase, so after 1,000 and after --memory-orders orders.
5. With --webhooks N: N webhook endpoints on a local receiver (`--serve-receiver`, a subprocess
   answering 204) subscribed to every event; the throughput burst is run --webhook-rounds
   times with them and as many without, alternately (A B B A ...), in the same run, and the
   ratio of the means reported, with how long the deliveries took to drain after each burst.

Run: .venv/bin/python bench/pipeline.py [--orders N] [--rate R] [--seconds S] [--skip-memory] ...
The report is printed and written as JSON to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import psutil
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from aiosmtpd.controller import Controller

# Run as a script (as every bench is), this folder comes first on sys.path: the repository's
# root goes before it, so that no bench file can stand for one of its packages (the other
# benches import this file first; tests/test_bench_layout.py keeps the names apart too).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import autovacuum
from cli.catalog import load_catalog, read_catalog
from cli.demo import make_order
from cli.main import loop_factory
from services.registry import WORKERS
from shared import broker, db
from shared.parties import amqp_user
from shared.settings import Settings
from shared.topology import Names, declare_topology, delete_topology

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CATALOG = ROOT / "catalog.example.toml"
ORDERMILL = Path(sys.executable).parent / "ordermill"
THIS_SCRIPT = Path(__file__).resolve()
PUBLISH_BATCH = 200
OUTCOME_KEYS = ("order.screened", "order.fraud", "order.rejected")
STATS_FLUSH_SECONDS = 1.5  # PostgreSQL backends report their counters at exit, within about 1 s
IDLE_STATS_SECONDS = 11.0  # an idle connection's counters reach pg_stat_database within 10 s
STALL_SECONDS = 30.0  # a phase gives up when no order completes for this long
START_SECONDS = 60.0  # for a worker subprocess to attach its consumers
BARE_WARMUP = 200
VACUUM_PHASES = "VACUUM (ANALYZE) between the warm-up and each timed phase"  # --vacuum's, said

Order = tuple[str, dict[str, Any]]  # order_ref, body of order.place

# -- names and the bench database ------------------------------------------------------------


@dataclass(frozen=True)
class BareNames:
    """The yardstick's exchange and two quorum queues, inside the bench namespace."""

    namespace: str

    @property
    def exchange(self) -> str:
        return f"{self.namespace}.bare"

    @property
    def stage1(self) -> str:
        return f"{self.namespace}.bare.stage1"

    @property
    def stage2(self) -> str:
        return f"{self.namespace}.bare.stage2"


@dataclass(frozen=True)
class Bench:
    run_id: str
    settings: Settings  # the bench's own: database URL and namespace point at the bench's

    @classmethod
    def create(cls) -> Bench:
        run_id = uuid.uuid4().hex[:8]
        base = Settings()
        url = urlunsplit(urlsplit(base.database_url)._replace(path=f"/om_bench_{run_id}"))
        return cls(run_id, base.model_copy(update={
            "database_url": url, "ordermill_namespace": f"bench.{run_id}",
            "smtp_host": "127.0.0.1", "smtp_port": _free_port()}))

    @property
    def names(self) -> Names:
        return Names(self.settings.namespace)

    @property
    def bare(self) -> BareNames:
        return BareNames(self.settings.namespace)

    def env(self) -> dict[str, str]:
        """The environment of both worker subprocesses."""
        return {
            "WORKER_PROCESSES": "1",  # this bench's default (the docstring); sustained.py's: auto
            **os.environ,
            # Webhooks (--webhooks) go to the bench's receiver on 127.0.0.1.
            "WEBHOOK_ALLOW_NETWORKS": "127.0.0.1/32",
            "DATABASE_URL": self.settings.database_url,
            "AMQP_URL": self.settings.amqp_url,
            # The bench's one RabbitMQ user is every party (closed by default).
            **dict.fromkeys(("STOREFRONT_USERS", "PAYMENT_PUBLISHERS", "OPERATOR_USERS"),
                            amqp_user(self.settings.amqp_url) or ""),
            "ORDERMILL_NAMESPACE": self.settings.namespace,
            "LOG_LEVEL": "WARNING",
            # The bench's orders come fast: the velocity rule must not mark them Fraud.
            "FRAUD_VELOCITY_MAX_ORDERS": "1000000",
            # The customer mails go to the bench's SMTP sink, as they would to a relay.
            "SMTP_HOST": self.settings.smtp_host, "SMTP_PORT": str(self.settings.smtp_port),
            "SMTP_SECURITY": "none",
        }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MailSink:
    """An SMTP server (aiosmtpd, in its own thread) that accepts and counts every mail: the
    workers send mail as in production, instead of failing to connect and retrying."""

    def __init__(self, port: int) -> None:
        self.received = 0
        self._controller = Controller(self, hostname="127.0.0.1", port=port)

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.received += 1
        return "250 OK"

    def __enter__(self) -> MailSink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()


def answers(port: int, proc: subprocess.Popen[bytes], seconds: float = 20) -> bool:
    """Whether a server process the bench started answers on its port within `seconds`
    (False at once if it ended)."""
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.1)
    return False


class MailSinkProcess:
    """MailSink's SMTP server in a process of its own (`--serve-mail`), as a relay is: in a
    thread of the bench, every SMTP reply waited for the bench's own event loop to let go of
    the GIL, so on a busy bench the sink, not the sender, set the pace (bench/sustained.py:
    docs/performance.md, "Customer mail at the steady rate"). It counts what it accepts and
    says how many when stopped (`received`)."""

    def __init__(self, port: int, log_path: Path | None = None) -> None:
        self.port = port
        self.received = 0
        self._log_path = log_path or RESULTS / "mail-sink.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MailSinkProcess:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, str(THIS_SCRIPT), "--serve-mail", str(self.port)],
                stdout=subprocess.PIPE, stderr=log)
        if not answers(self.port, self._proc):
            self.__exit__()
            raise RuntimeError(f"the mail sink did not start; see {self._log_path}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()  # SIGTERM: it prints its count and ends
        out, _ = self._proc.communicate(timeout=10)
        with contextlib.suppress(ValueError, IndexError):
            self.received = int(out.split()[-1])
        self._proc = None


async def serve_mail(port: int) -> None:
    """--serve-mail: MailSink's server in this process until SIGTERM, then the number of
    mails it accepted on stdout."""
    from aiosmtpd.smtp import SMTP

    sink = MailSink(port)  # its handler only: its thread is never started
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(sink, hostname="bench-mail-sink", enable_SMTPUTF8=True),
        host="127.0.0.1", port=port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    print(sink.received, flush=True)


BARE_TABLE = """
CREATE TABLE IF NOT EXISTS bare_orders (
    order_ref   text PRIMARY KEY,
    body        jsonb NOT NULL,
    status      text NOT NULL DEFAULT 'placed',
    created_at  timestamptz NOT NULL DEFAULT now(),
    screened_at timestamptz
)"""


async def create_database(s: Settings) -> None:
    """What `ordermill migrate` and `ordermill catalog load` do, plus the yardstick's table."""
    await db.ensure_database(s.database_url, attempts=3)
    pool = await db.create_pool(s.database_url, max_size=2, attempts=3)
    try:
        await db.migrate(pool)
        async with pool.acquire() as conn:
            await load_catalog(conn, read_catalog(CATALOG))
            await conn.execute(BARE_TABLE)
    finally:
        await pool.close()


async def drop_database(s: Settings) -> None:
    name = urlsplit(s.database_url).path.lstrip("/")
    admin = urlunsplit(urlsplit(s.database_url)._replace(path="/postgres"))
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _fetch_counts(s: Settings, query: str) -> dict[str, int]:
    conn = await asyncpg.connect(s.database_url)
    try:
        return dict(await conn.fetchrow(query))
    finally:
        await conn.close()


async def database_counters(s: Settings) -> dict[str, int]:
    """The bench database's activity counters (transactions include the pool's reset queries)."""
    return await _fetch_counts(
        s, "SELECT xact_commit AS transactions, tup_inserted AS rows_inserted,"
           " tup_updated AS rows_updated, blks_hit + blks_read AS buffer_accesses,"
           " tup_fetched AS rows_fetched,"
           " (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'orders') AS orders_updates,"
           " (SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'orders') AS orders_hot_updates"
           " FROM pg_stat_database WHERE datname = current_database()")


async def outbox_counters(s: Settings) -> dict[str, int]:
    """Ordermill's events: a relay pass marks its batch with one now(), so passes are distinct times."""
    return await _fetch_counts(
        s, "SELECT count(*) AS outbox_events, count(*) FILTER (WHERE unroutable) AS unroutable_events,"
           " count(DISTINCT published_at) AS relay_passes FROM outbox")


async def declare_bare_topology(channel: AbstractChannel, bare: BareNames) -> None:
    exchange = await channel.declare_exchange(bare.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    for queue_name, key in ((bare.stage1, "order.place"), (bare.stage2, "order.placed")):
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, routing_key=key)


async def delete_bare_topology(channel: AbstractChannel, bare: BareNames) -> None:
    for queue_name in (bare.stage1, bare.stage2):
        await channel.queue_delete(queue_name)  # quorum queues refuse if_unused=True
    await channel.exchange_delete(bare.exchange)


# -- the yardstick: a bare two-stage pipeline (runs in its own process) --------------------------


def bare_message(body: bytes) -> aio_pika.Message:
    """Properties like Ordermill's events: JSON, persistent, a message id and a timestamp."""
    return aio_pika.Message(
        body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(uuid.uuid4()), timestamp=datetime.now(UTC),
    )


async def serve_bare(s: Settings) -> None:
    """Stage 1: insert, commit, publish (confirmed), ack. Stage 2: update, commit, publish, ack."""
    bare = BareNames(s.namespace)
    pool = await asyncpg.create_pool(s.database_url, min_size=1, max_size=s.db_pool_max)
    connection = await aio_pika.connect_robust(s.amqp_url)
    publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await publisher.get_exchange(bare.exchange)

    async def place(message: AbstractIncomingMessage) -> None:
        ref = json.loads(message.body)["order_ref"]
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO bare_orders (order_ref, body) VALUES ($1, $2::jsonb)"
                " ON CONFLICT DO NOTHING", ref, message.body.decode())
        await exchange.publish(bare_message(message.body), "order.placed", mandatory=True)
        await message.ack()

    async def screen(message: AbstractIncomingMessage) -> None:
        ref = json.loads(message.body)["order_ref"]
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE bare_orders SET status = 'screened', screened_at = now() WHERE order_ref = $1",
                ref)
        event = json.dumps({"order_ref": ref, "screening": "passed"}).encode()
        await exchange.publish(bare_message(event), "order.screened", mandatory=True)
        await message.ack()

    for queue_name, handler in ((bare.stage1, place), (bare.stage2, screen)):
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=s.worker_prefetch)
        queue = await channel.get_queue(queue_name, ensure=True)
        await queue.consume(handler)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await connection.close()
    await pool.close()


# -- measuring: the storefront's listener and publisher -------------------------------------------


@dataclass
class Awaiting:
    """Refs being waited for, and a wait that gives up only when progress stalls."""

    _waiting: set[str] = field(default_factory=set, init=False)
    _complete: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def _expect(self, refs: set[str]) -> None:
        self._waiting = refs
        self._complete = asyncio.Event()
        if not self._waiting:
            self._complete.set()

    def _arrived(self, ref: str) -> None:
        self._waiting.discard(ref)
        if not self._waiting:
            self._complete.set()

    async def wait(self, stall_seconds: float = STALL_SECONDS) -> bool:
        """Wait for every expected ref; False when none arrived for `stall_seconds`."""
        while True:
            left = len(self._waiting)
            try:
                await asyncio.wait_for(self._complete.wait(), timeout=stall_seconds)
                return True
            except TimeoutError:
                if len(self._waiting) == left:
                    return False


@dataclass
class Tracker(Awaiting):
    """Publish and outcome times by order_ref, from a storefront-style exclusive queue."""

    sent: dict[str, float] = field(default_factory=dict)
    done: dict[str, float] = field(default_factory=dict)
    outcome: dict[str, str] = field(default_factory=dict)

    async def listen(self, connection: AbstractRobustConnection, exchange_name: str) -> None:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in OUTCOME_KEYS:
            await queue.bind(exchange_name, routing_key=key)
        await queue.consume(self._on_event, no_ack=True)

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        at = time.perf_counter()
        ref = json.loads(message.body).get("order_ref")
        if ref not in self.sent or ref in self.done:
            return  # not ours, or a duplicate
        self.done[ref] = at
        key = message.routing_key or ""
        self.outcome[ref] = {"order.fraud": "fraud", "order.rejected": "rejected"}.get(key, "screened")
        self._arrived(ref)

    def expect(self, refs: Iterable[str]) -> None:
        self._expect({ref for ref in refs if ref not in self.done})


@dataclass
class Publisher:
    exchange: AbstractExchange
    tracker: Tracker
    user_id: str | None = None  # the connection's user: the workers check who publishes

    async def publish(self, ref: str, body: dict[str, Any]) -> None:
        message = broker.json_message(body, routing_key="order.place", user_id=self.user_id)
        self.tracker.sent[ref] = time.perf_counter()
        await broker.publish(self.exchange, "order.place", message)

    async def burst(self, orders: list[Order]) -> None:
        """As fast as confirms allow: a batch in flight at a time."""
        for start in range(0, len(orders), PUBLISH_BATCH):
            batch = orders[start:start + PUBLISH_BATCH]
            await asyncio.gather(*(self.publish(ref, body) for ref, body in batch))

    async def steady(self, orders: list[Order], rate: float) -> None:
        """One order every 1/rate s on a fixed schedule, confirms awaited in the background."""
        started = time.perf_counter()
        pending: list[asyncio.Task[None]] = []
        for n, (ref, body) in enumerate(orders):
            delay = started + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(self.publish(ref, body)))
        await asyncio.gather(*pending)


class OrderSource:
    """Honest orders (kind 'honest' of the demo's generator) with unique refs."""

    def __init__(self, run_id: str, seed: int = 1) -> None:
        self.run_id = run_id
        self.rng = random.Random(seed)
        self.count = 0

    def take(self, n: int, label: str) -> list[Order]:
        orders = []
        for _ in range(n):
            self.count += 1
            ref = f"bench-{self.run_id}-{label}-{self.count:06d}"
            orders.append((ref, make_order(self.rng, ref, "honest", "192.0.2.1")))
        return orders


# -- processes: workers, CPU and memory ----------------------------------------------------------


def _cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


@dataclass(frozen=True)
class CpuUsage:
    seconds: dict[str, float]  # CPU seconds by process group
    wall: float
    # Per worker process: CPU seconds, and seconds its main thread was runnable but had no CPU.
    worker_seconds: dict[int, float]
    worker_waiting: dict[int, float]

    def cores(self) -> dict[str, float]:
        return {group: round(used / self.wall, 2) for group, used in self.seconds.items()}

    def worker_busy(self) -> float:
        """Share of the time the worker's event loop ran or waited for a CPU: 1.0 is saturated.
        With one process per service, the busiest one's."""
        return round(max((self.worker_seconds.get(pid, 0.0) + waiting) / self.wall
                         for pid, waiting in self.worker_waiting.items()), 2)


def _run_queue_wait(pid: int) -> float:
    """Seconds a process's main thread has waited for a CPU (Linux schedstat; 0 elsewhere)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class CpuMeter:
    """CPU used per group of processes over a phase, in cores (CPU seconds / wall seconds)."""

    def __init__(self, worker_pids: int | Sequence[int], database: str) -> None:
        self.worker_pids = [worker_pids] if isinstance(worker_pids, int) else list(worker_pids)
        self.database = database
        self._start: dict[str, dict[int, float]] = {}
        self._system_start = 0.0
        self._wall_start = 0.0
        self._wait_start: dict[int, float] = {}

    def _waiting(self) -> dict[int, float]:
        return {pid: _run_queue_wait(pid) for pid in self.worker_pids}

    def _group(self, proc: psutil.Process) -> str | None:
        if proc.pid in self.worker_pids:
            return "worker"
        if proc.pid == os.getpid():
            return "bench"
        name = proc.info["name"] or ""
        if name == "beam.smp":
            return "rabbitmq"
        if name == "postgres":
            cmdline = " ".join(proc.info["cmdline"] or [])
            # This run's backends and the server's own processes, not other databases' backends.
            if self.database in cmdline or "(" not in cmdline:
                return "postgres"
        return None

    def _snapshot(self) -> dict[str, dict[int, float]]:
        groups: dict[str, dict[int, float]] = {}
        for proc in psutil.process_iter(["name", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                group = self._group(proc)
                if group:
                    groups.setdefault(group, {})[proc.pid] = _cpu_seconds(proc)
        return groups

    @staticmethod
    def _system_busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    def start(self) -> None:
        self._start = self._snapshot()
        self._system_start = self._system_busy()
        self._wait_start = self._waiting()
        self._wall_start = time.perf_counter()

    def stop(self) -> CpuUsage:
        end = self._snapshot()
        wall = time.perf_counter() - self._wall_start
        seconds = {
            group: sum(v - self._start.get(group, {}).get(pid, 0.0) for pid, v in pids.items())
            for group, pids in end.items()
        }
        system = self._system_busy() - self._system_start
        seconds["other"] = max(0.0, system - sum(seconds.values()))
        workers = end.get("worker", {})
        return CpuUsage(
            seconds, wall,
            {pid: v - self._start.get("worker", {}).get(pid, 0.0) for pid, v in workers.items()},
            {pid: v - self._wait_start.get(pid, 0.0) for pid, v in self._waiting().items()})


class WorkerProcess:
    """A worker subprocess: started, waited for (its consumers attached), measured, stopped."""

    def __init__(self, label: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.label = label
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.proc: asyncio.subprocess.Process | None = None
        self.peak_rss = 0
        self._pids: list[int] = []
        self._sampler: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        """The process and, when it supervises worker processes (WORKER_PROCESSES), those."""
        return self._pids or [self.pid]

    async def start(self, connection: AbstractRobustConnection, queues: list[str]) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, stdout=subprocess.DEVNULL, stderr=self._log)
        await self._wait_for_consumers(connection, queues)
        # Consuming on every queue: any worker processes it supervises have started.
        self._pids = [self.pid, *(c.pid for c in psutil.Process(self.pid).children(recursive=True))]
        self._sampler = asyncio.create_task(self._sample_rss())

    async def _wait_for_consumers(self, connection: AbstractRobustConnection, queues: list[str]) -> None:
        channel = await connection.channel()
        deadline = time.monotonic() + START_SECONDS
        try:
            declared = [await channel.declare_queue(name, passive=True) for name in queues]
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.returncode is not None:
                    raise RuntimeError(f"{self.label} exited at start: see {self.log_path}")
                # queue.declare(): a robust channel answers a repeated passive declare from its cache.
                counts = [(await queue.declare()).consumer_count for queue in declared]
                if all(counts):
                    return
                await asyncio.sleep(0.2)
        finally:
            await channel.close()
        raise RuntimeError(f"{self.label} did not start consuming within {START_SECONDS:.0f} s")

    def rss(self) -> int:
        try:
            rss = sum(psutil.Process(pid).memory_info().rss for pid in self.pids)
        except psutil.Error:  # it exited: the phase reports that, with its log
            return 0
        self.peak_rss = max(self.peak_rss, rss)
        return rss

    async def _sample_rss(self) -> None:
        while self.proc is not None and self.proc.returncode is None:
            self.rss()
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it may have stopped on a Ctrl-C of its own
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=45)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._log.close()


class WorkerGroup:
    """Several `ordermill run SERVICE...` processes: one per service as docker-compose deploys
    them (`--split`), or the groups given (sustained.py's `--processes`); measured together
    (CPU and RSS summed, busy of the busiest)."""

    def __init__(self, groups: Sequence[Sequence[str]], env: dict[str, str], names: Names,
                 prefix: str = "ordermill") -> None:
        self.label = (f"ordermill run, {len(groups)} processes"
                      if any(len(group) > 1 for group in groups)
                      else "ordermill run, one process per service")
        self.names = names
        self.processes = {tuple(group): WorkerProcess(
            f"ordermill run {' '.join(group)}", [str(ORDERMILL), "run", *group],
            {**env, "WORKER_PROCESSES": "1"},  # each group one process, as asked
            RESULTS / f"{prefix}-{'-'.join(group)}-worker.log") for group in groups}
        self.log_path = RESULTS / f"{prefix}-*-worker.log"

    @property
    def pids(self) -> list[int]:
        return [pid for process in self.processes.values() for pid in process.pids]

    @property
    def peak_rss(self) -> int:
        return sum(process.peak_rss for process in self.processes.values())

    async def start(self, connection: AbstractRobustConnection, queues: list[str]) -> None:
        for group, process in self.processes.items():
            await process.start(connection, [self.names.queue(service) for service in group])

    def rss(self) -> int:
        return sum(process.rss() for process in self.processes.values())

    async def stop(self) -> None:
        await asyncio.gather(*(process.stop() for process in self.processes.values()))


# -- webhooks (--webhooks N) -------------------------------------------------------------------------


async def serve_receiver(port: int) -> None:
    """A webhook receiver for the bench: 204 to every POST, nothing checked (the integrator's
    work is not Ordermill's). A subprocess of its own, so its CPU is not the bench's."""
    from aiohttp import web

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", hook)
    runner = web.AppRunner(app, handle_signals=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


@contextlib.contextmanager
def webhook_receiver(port: int, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(THIS_SCRIPT), "--serve-receiver", str(port)],
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        answers(port, proc)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def add_endpoints(s: Settings, port: int, count: int) -> None:
    """`count` endpoints on the receiver, subscribed to every event, disabled until a phase
    turns them on (the CLI's `add` would do the same, with a secret printed)."""
    from services.webhooks.sealing import Sealer
    from services.webhooks.signing import new_secret

    conn = await asyncpg.connect(s.database_url)
    try:
        for n in range(count):
            await conn.execute(
                "INSERT INTO webhook_endpoints (url, events, secret, status)"
                " VALUES ($1, '{*}', $2, 'disabled')",
                f"http://127.0.0.1:{port}/hook/{n}", Sealer().seal(new_secret()))
    finally:
        await conn.close()


async def set_endpoints(s: Settings, on: bool) -> None:
    conn = await asyncpg.connect(s.database_url)
    try:
        await conn.execute("UPDATE webhook_endpoints SET status = $1",
                           "active" if on else "disabled")
    finally:
        await conn.close()


DELIVERY_DRAIN_SECONDS = 600.0


async def deliveries_drained(s: Settings) -> tuple[float, int]:
    """Wait until every webhook delivery is delivered (none pending, the webhooks queue
    empty); the seconds it took and how many were delivered in all."""
    started = time.perf_counter()
    conn = await asyncpg.connect(s.database_url)
    quiet = 0
    try:
        while quiet < 3:
            if time.perf_counter() - started > DELIVERY_DRAIN_SECONDS:
                raise RuntimeError(f"webhooks not delivered within {DELIVERY_DRAIN_SECONDS:.0f} s")
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE status NOT IN ('delivered', 'cancelled')) AS open,"
                " count(*) FILTER (WHERE status = 'delivered') AS delivered,"
                " (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS unpublished"
                " FROM webhook_deliveries")
            quiet = quiet + 1 if row["open"] == 0 and row["unpublished"] == 0 else 0
            await asyncio.sleep(0.2)
        return round(time.perf_counter() - started - 0.4, 1), row["delivered"]
    finally:
        await conn.close()


# -- phases ------------------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    pipeline: str
    phase: str
    orders: int
    completed: int
    screened: int
    fraud: int
    rejected: int
    publish_seconds: float  # first publish to last confirm
    seconds: float  # first publish to last outcome
    orders_per_second: float
    backlog_at_publish_end: int  # published orders not yet done when the last confirm came
    latency_ms: dict[str, float]  # publish -> outcome
    cpu_cores: dict[str, float]  # by process group, over the phase
    worker_busy: float  # the worker's main thread running or waiting for a CPU, share of the time
    worker_cpu_ms_per_order: float
    worker_rss_mb: float
    target_rate: float | None = None  # orders/s of a steady phase
    # Ordermill: after the phase, how long until its customer mails were all sent (the next
    # phase starts then, so it does not pay for this one's mail).
    mail_drain_seconds: float | None = None
    webhook_endpoints: int = 0  # endpoints subscribed to every event during the phase
    webhook_drain_seconds: float | None = None  # after the phase, until all were delivered
    webhooks_delivered: int | None = None  # in all, so far


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def latency_summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {name: round(percentile(ordered, q), 1) for name, q in
            (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}


@dataclass
class PipelineRun:
    """One pipeline under test: its worker, tracker, publisher and results."""

    name: str
    worker: WorkerProcess | WorkerGroup
    tracker: Tracker
    publisher: Publisher
    cpu: CpuMeter
    results: list[PhaseResult] = field(default_factory=list)
    rss_checkpoints: list[dict[str, float]] = field(default_factory=list)
    orders_done: int = 0
    per_order: dict[str, float] = field(default_factory=dict)  # database work, over every phase
    vacuum_settings: Settings | None = None  # --vacuum: the bench's, when wanted
    vacuum_seconds: list[float] = field(default_factory=list)  # each VACUUM (ANALYZE)'s
    vacuum_counts: dict[str, int] = field(default_factory=dict)  # theirs, left out of per_order

    async def vacuum(self) -> None:
        """Before a timed phase after the warm-up (--vacuum): the bench database as autovacuum
        would have left it, outside every phase's time and CPU, and its database counters
        (a whole database's pages read: more than a bare burst's own) out of per_order. An
        open connection left idle reports its last counters within 10 s (PostgreSQL 15), so
        the phase's are all in before the first reading only after IDLE_STATS_SECONDS (else
        the phase's tail would be counted as the vacuum's and left out); the vacuum's own
        connection reports them as it closes, before the second."""
        s = self.vacuum_settings
        if s is None:
            return
        await asyncio.sleep(IDLE_STATS_SECONDS)
        before = await database_counters(s)
        self.vacuum_seconds.append(await autovacuum.vacuum(s.database_url))
        await asyncio.sleep(STATS_FLUSH_SECONDS)
        for key, value in (await database_counters(s)).items():
            self.vacuum_counts[key] = self.vacuum_counts.get(key, 0) + value - before[key]

    def add_per_order(self, before: dict[str, int], after: dict[str, int]) -> None:
        for key, value in after.items():
            own = value - before.get(key, 0) - self.vacuum_counts.get(key, 0)
            self.per_order[key] = round(own / max(1, self.orders_done), 2)

    async def phase(self, label: str, orders: list[Order],
                    publish: Callable[[list[Order]], Awaitable[None]],
                    target_rate: float | None = None) -> PhaseResult:
        refs = [ref for ref, _ in orders]
        self.tracker.expect(refs)
        self.cpu.start()
        await publish(orders)
        published = time.perf_counter()
        finished = await self.tracker.wait()
        cpu = self.cpu.stop()
        result = self._result(label, refs, published, cpu)
        result.target_rate = target_rate
        self.results.append(result)
        self.orders_done += len(refs)
        self.rss_checkpoints.append({"orders": self.orders_done, "rss_mb": result.worker_rss_mb})
        _progress(result)
        if not finished:
            raise RuntimeError(f"{self.name} {label}: {len(refs) - result.completed} order(s) not done "
                               f"after {STALL_SECONDS:.0f} s without progress; see {self.worker.log_path}")
        return result

    def _result(self, label: str, refs: list[str], published: float, cpu: CpuUsage) -> PhaseResult:
        t = self.tracker
        done = [ref for ref in refs if ref in t.done]
        first_sent = min(t.sent[ref] for ref in refs)
        seconds = (max(t.done[ref] for ref in done) - first_sent) if done else float("nan")
        outcomes = [t.outcome[ref] for ref in done]
        return PhaseResult(
            pipeline=self.name, phase=label, orders=len(refs), completed=len(done),
            screened=outcomes.count("screened"), fraud=outcomes.count("fraud"),
            rejected=outcomes.count("rejected"), publish_seconds=round(published - first_sent, 2),
            seconds=round(seconds, 2), orders_per_second=round(len(done) / seconds, 1) if done else 0.0,
            backlog_at_publish_end=sum(1 for ref in refs if t.done.get(ref, published + 1) > published),
            latency_ms=latency_summary([(t.done[ref] - t.sent[ref]) * 1000 for ref in done]),
            cpu_cores=cpu.cores(), worker_busy=cpu.worker_busy(),
            worker_cpu_ms_per_order=round(cpu.seconds.get("worker", 0.0) * 1000 / max(1, len(done)), 2),
            worker_rss_mb=round(self.worker.rss() / 2**20, 1),
        )


def _progress(r: PhaseResult) -> None:
    print(f"  {r.pipeline:9} {r.phase:18} {r.completed}/{r.orders} in {r.seconds:.1f} s: "
          f"{r.orders_per_second:.0f} orders/s, p50 {r.latency_ms['p50']:.0f} ms, "
          f"p99 {r.latency_ms['p99']:.0f} ms", flush=True)


@contextlib.asynccontextmanager
async def pipeline_run(name: str, bench: Bench, connection: AbstractRobustConnection,
                       worker: WorkerProcess | WorkerGroup, queues: list[str],
                       exchange_name: str, vacuum: bool = False) -> AsyncIterator[PipelineRun]:
    """A pipeline's worker started and a listener on its events; the worker stopped at the end.
    `vacuum`: `PipelineRun.vacuum` vacuums the bench database (--vacuum)."""
    try:
        before = await database_counters(bench.settings)
        tracker = Tracker()
        await tracker.listen(connection, exchange_name)
        channel = await broker.open_publisher(connection)
        exchange = await channel.get_exchange(exchange_name)
        await worker.start(connection, queues)
        db_name = urlsplit(bench.settings.database_url).path.lstrip("/")
        publisher = Publisher(exchange, tracker, amqp_user(bench.settings.amqp_url))
        run = PipelineRun(name, worker, tracker, publisher, CpuMeter(worker.pids, db_name),
                          vacuum_settings=bench.settings if vacuum else None)
        run.rss_checkpoints.append({"orders": 0, "rss_mb": round(worker.rss() / 2**20, 1)})
        yield run
    finally:
        await worker.stop()
    await asyncio.sleep(STATS_FLUSH_SECONDS)
    run.add_per_order(before, await database_counters(bench.settings))


@dataclass
class Options:
    orders: int
    rate: float
    seconds: float
    warmup: int
    memory_orders: int
    skip_memory: bool
    skip_bare: bool
    services: tuple[str, ...] = ()  # empty: every worker, as `ordermill run` does by default
    split: bool = False  # one process per service instead of one for all
    metrics_ab: int = 0  # rounds of the burst without and with METRICS_PORT, alternating
    webhooks: int = 0  # endpoints subscribed to every event in the "+hooks" bursts
    webhook_rounds: int = 2  # bursts with them, and as many without, alternately
    vacuum: str = "auto"  # --vacuum (autovacuum.CHOICES): VACUUM (ANALYZE) between phases
    vacuum_phases: bool = False  # what `vacuum` came to on this server (run_bench)


async def bench_ordermill(bench: Bench, connection: AbstractRobustConnection, source: OrderSource,
                          opts: Options) -> PipelineRun:
    names = bench.names
    worker: WorkerProcess | WorkerGroup
    if opts.split:
        worker = WorkerGroup([[service] for service in opts.services or tuple(WORKERS)],
                             bench.env(), names)
    else:
        worker = WorkerProcess(" ".join(["ordermill run", *opts.services]),
                               [str(ORDERMILL), "run", *opts.services], bench.env(),
                               RESULTS / "ordermill-worker.log")
    async with pipeline_run("ordermill", bench, connection, worker,
                            [names.queue("placement"), names.queue("fraud")], names.exchange,
                            vacuum=opts.vacuum_phases) as run:
        mail = opts.services == () or "notify" in opts.services

        async def phase(label: str, orders: list[Order],
                        publish: Callable[[list[Order]], Awaitable[None]],
                        target_rate: float | None = None) -> None:
            if run.results:  # after the warm-up (--vacuum)
                await run.vacuum()
            result = await run.phase(label, orders, publish, target_rate=target_rate)
            if mail:  # the next phase starts once this one's mails are sent
                await phase_mail_drained(bench, result)

        await phase("warm-up", source.take(opts.warmup, "warm"), run.publisher.burst)
        if opts.webhooks:
            await webhook_bursts(bench, run, source, opts, phase)
        else:
            await phase("throughput", source.take(opts.orders, "tput"), run.publisher.burst)
        steady = source.take(round(opts.rate * opts.seconds), "rate")
        await phase(f"steady {opts.rate:g}/s", steady,
                    lambda orders: run.publisher.steady(orders, opts.rate), target_rate=opts.rate)
        fill = opts.memory_orders - run.orders_done
        if not opts.skip_memory and fill > 0:
            await phase("memory fill", source.take(fill, "fill"), run.publisher.burst)
    run.add_per_order({}, await outbox_counters(bench.settings))
    return run


async def bench_metrics_ab(bench: Bench, connection: AbstractRobustConnection, source: OrderSource,
                           opts: Options) -> tuple[list[PipelineRun], dict[str, Any]]:
    """The metrics' cost: the same burst through `ordermill run` without METRICS_PORT and with
    it (every message counted and timed, /metrics served), a fresh worker each time, the two
    alternating (off, on; then on, off; ...) so a noisy neighbour hurts both alike."""
    names, runs, pairs = bench.names, [], []
    for n in range(opts.metrics_ab):
        order = ((False, True), (True, False))[n % 2]
        got: dict[bool, float] = {}
        for metrics_on in order:
            label = f"metrics {'on' if metrics_on else 'off'} #{n + 1}"
            env = {**bench.env(), "METRICS_PORT": "0", "METRICS_HOST": "127.0.0.1"}
            if not metrics_on:
                del env["METRICS_PORT"]
            worker = WorkerProcess(label, [str(ORDERMILL), "run", *opts.services], env,
                                   RESULTS / "ordermill-worker.log")
            async with pipeline_run(label, bench, connection, worker,
                                    [names.queue("placement"), names.queue("fraud")],
                                    names.exchange, vacuum=opts.vacuum_phases) as run:
                mail = opts.services == () or "notify" in opts.services
                warm = await run.phase("warm-up", source.take(opts.warmup, f"w{n}{int(metrics_on)}"),
                                       run.publisher.burst)
                if mail:
                    await phase_mail_drained(bench, warm)
                await run.vacuum()
                burst = await run.phase("throughput", source.take(opts.orders, f"t{n}{int(metrics_on)}"),
                                        run.publisher.burst)
                if mail:
                    await phase_mail_drained(bench, burst)
            got[metrics_on] = burst.orders_per_second
            runs.append(run)
        pairs.append({"round": n + 1, "order": ["on" if o else "off" for o in order],
                      "off": got[False], "on": got[True],
                      "on_vs_off": round(got[True] / got[False], 3) if got[False] else None})
    offs, ons = [p["off"] for p in pairs], [p["on"] for p in pairs]
    summary = {"rounds": pairs, "mean_off": round(sum(offs) / len(offs), 1),
               "mean_on": round(sum(ons) / len(ons), 1)}
    summary["mean_on_vs_off"] = round(summary["mean_on"] / summary["mean_off"], 3)
    return runs, summary


async def webhook_bursts(bench: Bench, run: PipelineRun, source: OrderSource, opts: Options,
                         phase: Callable[..., Awaitable[None]]) -> None:
    """The burst without endpoints and with them, alternately (A B, then B A, ...): the
    machine's drift (a neighbour's load, the tables growing) favours neither."""
    label = f"throughput +{opts.webhooks} hooks"
    for n in range(opts.webhook_rounds):
        for on in ((False, True) if n % 2 == 0 else (True, False)):
            await set_endpoints(bench.settings, on)
            await phase(label if on else "throughput", source.take(opts.orders, f"t{n}{int(on)}"),
                        run.publisher.burst)
            result = run.results[-1]
            if on:
                result.webhook_endpoints = opts.webhooks
                result.webhook_drain_seconds, result.webhooks_delivered = \
                    await deliveries_drained(bench.settings)
                print(f"  {'':9} {'':18} webhooks delivered {result.webhook_drain_seconds:.1f} s"
                      f" later ({result.webhooks_delivered:,} in all)", flush=True)
    await set_endpoints(bench.settings, False)


MAIL_DRAIN_SECONDS = 300.0


async def mail_drained(s: Settings, already_sent: int = 0) -> float:
    """Wait until every `email.send` request written so far is recorded by the mail worker
    and sent (each request has its own dedupe key: one mail each); the seconds it took.
    `already_sent`: mails recorded sent without a request (a seeded history's)."""
    started = time.perf_counter()
    conn = await asyncpg.connect(s.database_url)
    quiet = 0
    try:
        while quiet < 2:  # twice in a row, 0.2 s apart
            if time.perf_counter() - started > MAIL_DRAIN_SECONDS:
                raise RuntimeError(f"customer mails not sent within {MAIL_DRAIN_SECONDS:.0f} s")
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM outbox WHERE routing_key = 'email.send') AS requested,"
                " (SELECT count(*) FROM emails WHERE status = 'sent') AS sent")
            quiet = quiet + 1 if row["requested"] + already_sent == row["sent"] else 0
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    return round(time.perf_counter() - started, 1)


async def phase_mail_drained(bench: Bench, result: PhaseResult) -> None:
    """After an Ordermill phase: its mails sent before the next phase starts."""
    result.mail_drain_seconds = await mail_drained(bench.settings)
    print(f"  {'':9} {'':18} customer mails sent {result.mail_drain_seconds:.1f} s later", flush=True)


async def bench_bare(bench: Bench, connection: AbstractRobustConnection, source: OrderSource,
                     opts: Options) -> PipelineRun:
    worker = WorkerProcess("bare pipeline", [sys.executable, str(THIS_SCRIPT), "--serve-bare"],
                           bench.env(), RESULTS / "bare-worker.log")
    bare = bench.bare
    async with pipeline_run("bare", bench, connection, worker, [bare.stage1, bare.stage2],
                            bare.exchange, vacuum=opts.vacuum_phases) as run:
        await run.phase("warm-up", source.take(min(opts.warmup, BARE_WARMUP), "bwarm"),
                        run.publisher.burst)
        await run.vacuum()
        await run.phase("throughput", source.take(opts.orders, "btput"), run.publisher.burst)
    return run


async def remove_topology(connection: AbstractRobustConnection, bench: Bench) -> None:
    steps: list[tuple[str, Callable[[AbstractChannel], Awaitable[None]]]] = [
        ("Ordermill topology", lambda channel: delete_topology(channel, bench.names)),
        ("bare topology", lambda channel: delete_bare_topology(channel, bench.bare)),
    ]
    for what, remove in steps:
        try:
            channel = await connection.channel()
            await remove(channel)
            await channel.close()
        except Exception as exc:  # report it, and go on cleaning up
            print(f"cleanup: could not delete the {what}: {exc!r}", file=sys.stderr)


def announce(bench: Bench) -> None:
    """Name the run's database and namespace; SIGTERM, like Ctrl-C, then cancels the run
    (its clean-up still happens)."""
    s = bench.settings
    print(f"bench {bench.run_id}: database {urlsplit(s.database_url).path.lstrip('/')}, "
          f"namespace {s.namespace}", flush=True)
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)


async def run_bench(bench: Bench, opts: Options) -> dict[str, Any]:
    s = bench.settings
    announce(bench)
    connection: AbstractRobustConnection | None = None
    runs: list[PipelineRun] = []
    with MailSink(s.smtp_port) as mail:
        try:
            await create_database(s)
            opts.vacuum_phases = await autovacuum.wanted(s.database_url, opts.vacuum, VACUUM_PHASES)
            connection = await broker.connect(s.amqp_url, attempts=3)
            channel = await connection.channel()
            await declare_topology(connection, bench.names, delivery_limit=s.queue_delivery_limit)
            await declare_bare_topology(channel, bench.bare)
            source = OrderSource(bench.run_id)
            async with contextlib.AsyncExitStack() as stack:
                if opts.webhooks:
                    port = _free_port()
                    stack.enter_context(webhook_receiver(port, RESULTS / "webhook-receiver.log"))
                    await add_endpoints(s, port, opts.webhooks)
                if opts.metrics_ab:
                    ab_runs, metrics_ab = await bench_metrics_ab(bench, connection, source, opts)
                    runs += ab_runs
                else:
                    runs.append(await bench_ordermill(bench, connection, source, opts))
            if not opts.skip_bare and not opts.metrics_ab:
                runs.append(await bench_bare(bench, connection, source, opts))
        finally:
            if connection is not None:
                await remove_topology(connection, bench)
                await connection.close()
            await drop_database(s)
    data = report_data(bench, opts, runs)
    data["emails_delivered"] = mail.received
    if opts.metrics_ab:
        data["metrics_ab"] = metrics_ab
    return data


# -- the report ----------------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, check=True, timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def report_data(bench: Bench, opts: Options, runs: list[PipelineRun]) -> dict[str, Any]:
    s = bench.settings
    data: dict[str, Any] = {
        "run_id": bench.run_id,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "options": asdict(opts),
        "settings": {"worker_prefetch": s.worker_prefetch, "db_pool_max": s.db_pool_max,
                     "relay_batch": s.relay_batch, "publish_batch": PUBLISH_BATCH},
        "pipelines": {run.name: {
            "phases": [asdict(r) for r in run.results],
            "per_order": run.per_order,
            "rss_mb": run.rss_checkpoints,
            "peak_rss_mb": round(run.worker.peak_rss / 2**20, 1),
            "vacuum_seconds": run.vacuum_seconds,
            "vacuum_counts": run.vacuum_counts,
        } for run in runs},
    }
    throughput = {run.name: next((r.orders_per_second for r in run.results if r.phase == "throughput"), None)
                  for run in runs}
    data["throughput"] = throughput
    # CPU per order in the burst, where every pipeline saturates the machine: what counts
    # there is the work per order, so this is where a throughput gap comes from.
    data["burst_cpu_ms_per_order"] = {
        run.name: {group: round(r.cpu_cores.get(group, 0.0) / r.orders_per_second * 1000, 2)
                   for group in ("worker", "postgres", "rabbitmq")}
        for run in runs for r in run.results if r.phase == "throughput" and r.orders_per_second}
    ordermill = next((run for run in runs if run.name == "ordermill"), None)
    if ordermill is not None and opts.webhooks:
        without = [r.orders_per_second for r in ordermill.results if r.phase == "throughput"]
        with_ = [r.orders_per_second for r in ordermill.results if r.webhook_endpoints]
        data["webhooks"] = {
            "endpoints": opts.webhooks, "without": without, "with": with_,
            "drain_seconds": [r.webhook_drain_seconds for r in ordermill.results if r.webhook_endpoints],
            "ratio": round(sum(with_) / len(with_) / (sum(without) / len(without)), 3)}
    if throughput.get("ordermill") and throughput.get("bare"):
        data["ordermill_vs_bare"] = round(throughput["ordermill"] / throughput["bare"], 3)
    return data


PHASE_COLUMNS = ("pipeline", "phase", "orders", "secs", "orders/s", "p50 ms", "p99 ms", "max ms",
                 "busy", "worker", "postgres", "rabbitmq", "bench", "other", "cpu ms/order")
CPU_GROUPS = ("worker", "postgres", "rabbitmq", "bench", "other")


def _phase_row(p: dict[str, Any]) -> list[str]:
    cpu, lat = p["cpu_cores"], p["latency_ms"]
    done = str(p["orders"]) if p["completed"] == p["orders"] else f"{p['completed']}/{p['orders']}"
    return [p["pipeline"], p["phase"], done, f"{p['seconds']:.1f}", f"{p['orders_per_second']:.0f}",
            f"{lat['p50']:.0f}", f"{lat['p99']:.0f}", f"{lat['max']:.0f}", f"{p['worker_busy']:.2f}",
            *(f"{cpu.get(g, 0.0):.2f}" for g in CPU_GROUPS), f"{p['worker_cpu_ms_per_order']:.1f}"]


def _table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    return "\n".join(
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in [list(columns), *rows])


def _throughput_line(data: dict[str, Any]) -> str:
    tput = data["throughput"]
    line = f"throughput, burst of {data['options']['orders']:,}: Ordermill {tput['ordermill']:.0f} orders/s"
    if "ordermill_vs_bare" in data:
        ratio = data["ordermill_vs_bare"]
        line += (f"; bare aio-pika + asyncpg {tput['bare']:.0f} orders/s; Ordermill / bare = {ratio:.2f}"
                 f" (bare is {1 / ratio:.1f}x faster)")
    return line


def _warnings(data: dict[str, Any]) -> list[str]:
    warnings = []
    for run in data["pipelines"].values():
        for p in run["phases"]:
            if p["fraud"] or p["rejected"]:
                warnings.append(f"{p['pipeline']} {p['phase']}: {p['fraud']} order(s) Fraud and"
                                f" {p['rejected']} rejected, not screened; see the worker's log")
            rate = p.get("target_rate")
            if rate and p["orders_per_second"] < 0.9 * rate:
                warnings.append(
                    f"{p['pipeline']} did not keep up with {rate:g} orders/s ({p['orders_per_second']:.0f}/s,"
                    f" {p['backlog_at_publish_end']} waiting when publishing ended): its latency figures"
                    " measure a growing backlog; try --rate below its throughput")
    return warnings


def _cpu_lines(data: dict[str, Any]) -> list[str]:
    cpu = data.get("burst_cpu_ms_per_order", {})
    lines = [f"{name} CPU per order in the burst: "
             + ", ".join(f"{g} {ms:.2f} ms" for g, ms in groups.items()) for name, groups in cpu.items()]
    if "ordermill" in cpu and "bare" in cpu:
        own = cpu["ordermill"]["postgres"] + cpu["ordermill"]["rabbitmq"]
        lines.append(f"Ordermill's PostgreSQL and RabbitMQ alone {own:.2f} ms per order, the yardstick's"
                     f" worker, PostgreSQL and RabbitMQ in all {sum(cpu['bare'].values()):.2f} ms")
    return lines


def _per_order_line(name: str, run: dict[str, Any]) -> str:
    work = ", ".join(f"{value:g} {key.replace('_', ' ')}" for key, value in run["per_order"].items())
    return f"{name} per order: {work}"


def _memory_line(name: str, run: dict[str, Any]) -> str:
    checkpoints = ", ".join(f"{c['rss_mb']:.0f} MB after {c['orders']:,}" for c in run["rss_mb"])
    return f"{name} worker RSS: {checkpoints} orders; peak {run['peak_rss_mb']:.0f} MB"


def print_report(data: dict[str, Any]) -> None:
    s, m = data["settings"], data["machine"]
    print(f"\nOrdermill pipeline benchmark {data['run_id']} ({data['at']}, {data['commit']}): "
          f"{m['cpus']} CPUs, load {m['load_avg_1m']}, prefetch {s['worker_prefetch']}, "
          f"pool {s['db_pool_max']}, {data['elapsed_seconds']:.0f} s in all")
    if data["options"].get("split"):
        print("Ordermill: one `ordermill run SERVICE` process per service (worker = all of them)")
    print("latency: publish -> screened. busy: the worker's event loop running or waiting for a CPU"
          " (1.00 = saturated).\nworker ... other: CPU cores used over the phase by each; other ="
          " processes outside this bench.\n")
    print(_table(PHASE_COLUMNS, [_phase_row(p) for run in data["pipelines"].values()
                                 for p in run["phases"]]))
    print()
    if "metrics_ab" in data:
        ab = data["metrics_ab"]
        print("metrics' cost (burst orders/s, without and with METRICS_PORT, alternating):")
        for r in ab["rounds"]:
            print(f"  round {r['round']} ({' then '.join(r['order'])}): off {r['off']:.0f},"
                  f" on {r['on']:.0f}, on/off {r['on_vs_off']}")
        print(f"  mean: off {ab['mean_off']:.0f}, on {ab['mean_on']:.0f},"
              f" on/off {ab['mean_on_vs_off']}\n")
    else:
        print(_throughput_line(data))
        for line in _cpu_lines(data):
            print(line)
    for name, run in data["pipelines"].items():
        print(_per_order_line(name, run))
    for name, run in data["pipelines"].items():
        print(_memory_line(name, run))
    if data["options"].get("vacuum_phases"):
        print(autovacuum.report_line(VACUUM_PHASES, data["options"]["vacuum"], {
            name: run["vacuum_seconds"] for name, run in data["pipelines"].items()}))
    if "webhooks" in data:
        w = data["webhooks"]
        print(f"burst with {w['endpoints']} webhook endpoints / without: {w['ratio']:.3f}"
              f" (orders/s without {', '.join(f'{x:.0f}' for x in w['without'])};"
              f" with {', '.join(f'{x:.0f}' for x in w['with'])}; deliveries drained"
              f" {', '.join(f'{x:.1f}' for x in w['drain_seconds'])} s after each burst)")
    if "emails_delivered" in data:
        print(f"customer emails delivered to the bench's SMTP sink: {data['emails_delivered']:,}")
    for warning in _warnings(data):
        print(f"warning: {warning}")


def write_results(data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "latest.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# -- command line ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--orders", type=int, default=2000, help="orders in the throughput burst")
    parser.add_argument("--rate", type=float, default=100.0, help="orders/s in the steady phase")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the steady phase")
    parser.add_argument("--warmup", type=int, default=1000,
                        help="orders before the measured phases (also the first memory checkpoint)")
    parser.add_argument("--memory-orders", type=int, default=10_000,
                        help="orders through the worker in all before the last RSS reading")
    parser.add_argument("--skip-memory", action="store_true", help="no fill up to --memory-orders")
    parser.add_argument("--skip-bare", action="store_true", help="no yardstick pipeline")
    parser.add_argument("--services", default="",
                        help="comma-separated workers for `ordermill run` (default: all of them);"
                             " placement,fraud runs the same two stages as the yardstick")
    parser.add_argument("--split", action="store_true",
                        help="one `ordermill run SERVICE` process per service, as docker-compose"
                             " deploys them, instead of one process for all")
    parser.add_argument("--metrics-ab", type=int, default=0, metavar="ROUNDS",
                        help="only the metrics' cost: ROUNDS pairs of warm-up + burst through a fresh"
                             " `ordermill run` without and with METRICS_PORT, alternating")
    parser.add_argument("--webhooks", type=int, default=0, metavar="N",
                        help="N webhook endpoints (a local receiver) subscribed to every event:"
                             " the burst is run with them and without, alternately")
    parser.add_argument("--webhook-rounds", type=int, default=2,
                        help="bursts with the endpoints (and as many without) for --webhooks")
    parser.add_argument("--vacuum", choices=autovacuum.CHOICES, default="auto",
                        help="VACUUM (ANALYZE) the bench database between the warm-up and each"
                             " timed phase, as autovacuum would (auto: when the server's"
                             " autovacuum is off)")
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-receiver", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--serve-mail", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.orders, args.warmup) < 1 or args.rate <= 0 or args.seconds <= 0:
        parser.error("--orders and --warmup must be at least 1; --rate and --seconds positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve_mail:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve_mail(args.serve_mail))
        return
    if args.serve_receiver:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve_receiver(args.serve_receiver))
        return
    if args.serve_bare:
        # The same event loop as `ordermill run` (uvloop where installed): a fair yardstick.
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve_bare(Settings()))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    opts = Options(orders=args.orders, rate=args.rate, seconds=args.seconds, warmup=args.warmup,
                   memory_orders=args.memory_orders, skip_memory=args.skip_memory,
                   skip_bare=args.skip_bare, split=args.split, webhooks=args.webhooks,
                   webhook_rounds=args.webhook_rounds,
                   services=tuple(s.strip() for s in args.services.split(",") if s.strip()),
                   metrics_ab=args.metrics_ab, vacuum=args.vacuum)
    started = time.perf_counter()
    try:
        data = asyncio.run(run_bench(Bench.create(), opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: workers stopped, bench database and queues removed", file=sys.stderr)
        raise SystemExit(130) from None
    data["commit"] = _git_commit()
    data["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    path = write_results(data)
    print_report(data)
    print(f"\nwritten to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
