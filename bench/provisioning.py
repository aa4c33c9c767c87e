"""Ordermill provisioning benchmark: payment.received -> service Active, through `ordermill run`.

One run, in its own database (om_bench_<hex>) and broker namespace (bench.<hex>), both removed at
the end. `ordermill run` (every worker and the outbox relay in one process) is a subprocess; the
fake WHM servers (tests/fakes/whm.py) run in this process.

0. Setup (not measured): --orders orders are placed and screened by a first `ordermill run`, each
   with one `on_payment` product and no domain item: `starter` (autorelease), `business` (cPanel
   on server web1, pointed at a fake WHM answering after 50 ms) and `business-slow` (a copy of
   `business` on a server web-slow, whose fake WHM answers after 2 s). That process stops; a
   second one handles the payments, warm-up payments first.
1. Autorelease: payments at a steady --rate, then the rest as a burst. Latency is each payment's
   publish to its `service.created` event, seen by a storefront-style exclusive queue.
2. cPanel, WHM answering after 50 ms: the same (--skip-cpanel to leave out).
3. Mixed (--skip-mixed to leave out): at --rate, every other payment for `business-slow` (2 s per
   WHM answer), the others for `starter`: is autorelease slower next to slow servers than alone?

Run: .venv/bin/python bench/provisioning.py [--orders N] [--rate R] [--skip-cpanel] [--skip-mixed]
The report is printed and written as JSON to bench/results/provisioning.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import psutil
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from pipeline import (
    PUBLISH_BATCH,
    STALL_SECONDS,
    STATS_FLUSH_SECONDS,
    Awaiting,
    Bench,
    CpuMeter,
    MailSink,
    WorkerProcess,
    _git_commit,
    _table,
    announce,
    database_counters,
    drop_database,
    latency_summary,
    mail_drained,
    outbox_counters,
)

from cli.catalog import load_catalog, read_catalog
from cli.main import loop_factory
from shared import broker, db
from shared.parties import amqp_user
from shared.settings import Settings
from shared.topology import SERVICE_BINDINGS, Names, declare_topology, delete_topology

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CATALOG = ROOT / "catalog.example.toml"
ORDERMILL = Path(sys.executable).parent / "ordermill"
PY_SPY = Path(sys.executable).parent / "py-spy"
TOKEN_ENV = "WHM_TEST_TOKEN"  # the environment variable the bench's servers name for their token
FAST_WHM_DELAY = 0.05
SLOW_WHM_DELAY = 2.0
PROFILE_RATE = 100  # py-spy samples per second

SCREENING_KEYS = ("order.screened", "order.fraud", "order.rejected")
# A payment's end: its service is Active, or parked (service.failed), or the payment was refused.
SETUP_KEYS = ("service.created", "service.failed", "payment.unapplied")

# Product groups: what a payment is for, and the product its order has.
AUTORELEASE, CPANEL, CPANEL_SLOW = "autorelease", "cpanel 50 ms", "cpanel 2 s"
PRODUCTS = {AUTORELEASE: "starter", CPANEL: "business", CPANEL_SLOW: "business-slow"}


def fake_whm(delay: float) -> Any:
    """A fake WHM server (tests/fakes/whm.py), not started yet."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from fakes.whm import FakeWhm

    return FakeWhm(delay=delay)


# -- the bench database: catalog, servers pointed at the fake WHMs -------------------------------


async def copy_rows(conn: asyncpg.Connection, table: str, where: str, arg: object,
                    changes: dict[str, object]) -> list[int]:
    """Copy a table's rows matching `where` ($1 = arg), every column but id as it is except
    `changes`. Columns are read from the database: the copy follows the schema as it evolves."""
    columns = [r["column_name"] for r in await conn.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = $1 AND column_name <> 'id' ORDER BY ordinal_position", table)]
    values, args = [], [arg]
    for column in columns:
        if column in changes:
            args.append(changes[column])
            values.append(f"${len(args)}")
        else:
            values.append(f'"{column}"')
    names = ", ".join(f'"{c}"' for c in columns)
    returning = " RETURNING id" if await conn.fetchval(
        "SELECT true FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = $1 AND column_name = 'id'", table) else ""
    rows = await conn.fetch(
        f'INSERT INTO "{table}" ({names}) SELECT {", ".join(values)} FROM "{table}" WHERE {where}'
        f"{returning}", *args)
    return [r["id"] for r in rows] if returning else []


async def create_database(s: Settings, fast_port: int, slow_port: int) -> None:
    """Migrated, the sample catalog loaded; web1 on the fast fake WHM; web-slow and business-slow
    (copies of web1 and business) on the slow one."""
    await db.ensure_database(s.database_url, attempts=3)
    pool = await db.create_pool(s.database_url, max_size=2, attempts=3)
    try:
        await db.migrate(pool)
        async with pool.acquire() as conn, conn.transaction():
            await load_catalog(conn, read_catalog(CATALOG))
            await conn.execute(
                "UPDATE servers SET hostname = $1, token_env = $2 WHERE name = 'web1'",
                f"127.0.0.1:{fast_port}", TOKEN_ENV)
            [slow_server] = await copy_rows(conn, "servers", "name = $1", "web1", {
                "name": "web-slow", "hostname": f"127.0.0.1:{slow_port}"})
            [slow_product] = await copy_rows(conn, "products", "slug = $1", "business", {
                "slug": "business-slow", "name": "Business Hosting (slow server)",
                "server_id": slow_server})
            business = await conn.fetchval("SELECT id FROM products WHERE slug = 'business'")
            await copy_rows(conn, "product_prices", "product_id = $1", business,
                            {"product_id": slow_product})
    finally:
        await pool.close()


def worker_env(bench: Bench, token: str) -> dict[str, str]:
    return {
        **bench.env(),  # LOG_LEVEL=WARNING, no velocity limit, the bench's database and namespace
        "JOB_POLL_SECONDS": "0.5",
        "JOB_BACKOFF_SECONDS": "1",  # a transient failure shows as latency (and a retry), not a stall
        "WHM_SCHEME": "http",
        TOKEN_ENV: token,
    }


# -- the storefront: orders and payments out, events in ----------------------------------------------


@dataclass(frozen=True)
class Placed:
    ref: str
    group: str
    invoice_id: int
    total: str
    currency: str


def order_body(ref: str, product: str) -> dict[str, Any]:
    """A new client's order, from the client's own address (as a storefront's customers come):
    one address for every order made each screening count all the run's earlier orders from
    it (the facts read's "orders from this IP", 2,000-7,000 rows by the steady phase)."""
    return {
        "order_ref": ref,
        "client": {"email": f"{ref}@bench.example", "first_name": "Bench", "last_name": "Client",
                   "country": "GB", "company": None},
        "items": [{"type": "product", "product": product, "billing_cycle": "monthly",
                   "domain": f"{ref}.example"}],
        "currency": "USD", "payment_method": "stripe", "promo_code": None,
        "ip_address": client_address(ref), "send_confirmation": True, "generate_invoice": True,
    }


def client_address(ref: str) -> str:
    """The client's address, the same for the same ref, in 198.18.0.0/15 (RFC 2544's range
    for benchmarks: never a real customer's)."""
    n = zlib.crc32(ref.encode()) & 0x1FFFF
    return f"198.{18 + (n >> 16)}.{(n >> 8) & 0xFF}.{n & 0xFF}"


@dataclass
class Storefront(Awaiting):
    """Publishes orders and payments (with confirms) and hears events on an exclusive queue.
    Times are wall-clock (time.time()) so that they compare with the database's timestamps."""

    exchange: AbstractExchange
    user_id: str | None = None  # the connection's user: the workers check who publishes
    sent: dict[str, float] = field(default_factory=dict)  # order_ref -> last publish for it
    seen: dict[str, dict[str, float]] = field(default_factory=dict)  # routing key -> ref -> time
    _done_keys: tuple[str, ...] = ()

    async def listen(self, connection: AbstractRobustConnection, exchange_name: str) -> None:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in (*SCREENING_KEYS, *SETUP_KEYS):
            await queue.bind(exchange_name, routing_key=key)
        await queue.consume(self._on_event, no_ack=True)

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        at = time.time()
        ref = json.loads(message.body).get("order_ref")
        if ref not in self.sent:
            return  # not ours
        self.seen.setdefault(message.routing_key or "", {}).setdefault(ref, at)
        if ref in self._waiting and (message.routing_key or "") in self._done_keys:
            self._arrived(ref)

    def at(self, key: str, ref: str) -> float | None:
        return self.seen.get(key, {}).get(ref)

    def expect(self, refs: Iterable[str], done_keys: tuple[str, ...]) -> None:
        self._done_keys = done_keys
        self._expect({ref for ref in refs if not any(self.at(k, ref) for k in done_keys)})

    async def _publish(self, key: str, ref: str, body: dict[str, Any]) -> None:
        self.sent[ref] = time.time()
        await broker.publish(self.exchange, key, broker.json_message(body, routing_key=key,
                                                                   user_id=self.user_id))

    async def place(self, ref: str, product: str) -> None:
        await self._publish("order.place", ref, order_body(ref, product))

    async def pay(self, p: Placed) -> None:
        await self._publish("payment.received", p.ref, {
            "invoice_id": p.invoice_id, "order_ref": p.ref, "amount": p.total,
            "currency": p.currency, "gateway": "bench", "transaction_id": f"bench-{p.ref}"})

    @staticmethod
    async def burst(send: Callable[[Any], Any], items: list[Any]) -> None:
        """As fast as confirms allow: a batch in flight at a time."""
        for start in range(0, len(items), PUBLISH_BATCH):
            await asyncio.gather(*(send(item) for item in items[start:start + PUBLISH_BATCH]))

    @staticmethod
    async def steady(send: Callable[[Any], Any], items: list[Any], rate: float) -> None:
        """One every 1/rate s on a fixed schedule, confirms awaited in the background."""
        started = time.perf_counter()
        pending = []
        for n, item in enumerate(items):
            delay = started + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(send(item)))
        await asyncio.gather(*pending)


# -- py-spy, optional: one raw profile of the worker per phase ----------------------------------------

# Where a sample's time went, by the innermost frame of ours on its stack (first match wins).
# py-spy names files relative to their sys.path entry: "(services/provisioning/jobs.py:42)".
COMPONENTS = (
    ("job runner: module call", ("(services/provisioning/modules/",)),
    ("job runner", ("(services/provisioning/jobs.py",)),
    ("payment handler", ("(services/provisioning/payments.py", "(services/provisioning/reconcile.py",
                         "(services/provisioning/handlers.py")),
    ("placement, fraud", ("(services/placement/", "(services/fraud/")),
    ("outbox relay", ("(shared/outbox.py",)),
    ("runtime (consume, transaction, ack)", ("(shared/runtime/",)),
)
# Samples with no frame of ours: the AMQP client's own tasks, or the event loop itself (its
# native code: polling, socket reads and writes, callbacks), the outermost frame of every stack.
NOT_OURS = (
    ("aio-pika/aiormq tasks", ("(aio_pika/", "(aiormq/", "(pamqp/")),
    ("asyncpg (no caller of ours)", ("(asyncpg/",)),
    ("event loop (uvloop: I/O, callbacks)", ("Runner.run (asyncio/runners.py",)),
)
# ...and by the innermost frame of all (the library doing the work).
LIBRARIES = (
    ("asyncpg", ("(asyncpg/",)), ("aio-pika/aiormq/pamqp", ("(aio_pika/", "(aiormq/", "(pamqp/")),
    ("aiohttp/yarl/multidict", ("(aiohttp/", "(yarl/", "(multidict/")),
    ("pydantic", ("(pydantic",)), ("json", ("(json/",)), ("logging", ("(logging/", "(shared/logs.py")),
    ("event loop (uvloop: I/O, callbacks)", ("Runner.run (asyncio/runners.py",)),
    ("asyncio", ("(asyncio/",)),
    ("ordermill code", ("(shared/", "(services/", "(cli/")),
)


def _classify(frames: list[str], *tables: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    """The first table with a match, searching each from the innermost frame outwards."""
    for table in tables:
        for frame in reversed(frames):
            for name, needles in table:
                if any(n in frame for n in needles):
                    return name
    return "other"


def summarize_profile(path: Path) -> dict[str, Any]:
    """Samples of a py-spy raw (collapsed) profile by component and by library (py-spy records
    no idle samples: the shares are of the time the worker was running Python or native code)."""
    by_component: Counter[str] = Counter()
    by_library: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, n = stack.split(";"), int(count)
        total += n
        by_component[_classify(frames, COMPONENTS, NOT_OURS)] += n
        by_library[_classify(frames[-1:], LIBRARIES)] += n

    def shares(counter: Counter[str]) -> dict[str, float]:
        return {k: round(v / max(1, total), 3) for k, v in counter.most_common()}
    return {"file": str(path.relative_to(ROOT)), "samples": total,
            "components": shares(by_component), "libraries": shares(by_library)}


class Profiler:
    def __init__(self, pid: int, enabled: bool) -> None:
        self.pid = pid
        self.enabled = enabled
        self._proc: asyncio.subprocess.Process | None = None
        self._path: Path | None = None

    async def start(self, label: str) -> None:
        if not self.enabled:
            return
        slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
        self._path = RESULTS / f"provisioning-profile-{slug}.txt"
        self._proc = await asyncio.create_subprocess_exec(
            str(PY_SPY), "record", "--pid", str(self.pid), "--format", "raw", "--rate",
            str(PROFILE_RATE), "-o", str(self._path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await asyncio.sleep(0.5)  # attached

    async def stop(self) -> dict[str, Any] | None:
        if self._proc is None or self._path is None:
            return None
        self._proc.send_signal(signal.SIGINT)  # py-spy writes its file and exits
        await asyncio.wait_for(self._proc.wait(), timeout=30)
        self._proc = None
        return summarize_profile(self._path) if self._path.exists() else None


# -- phases ------------------------------------------------------------------------------------------


@dataclass
class GroupResult:
    """One product group's payments in a phase."""

    group: str
    payments: int
    created: int
    failed: int  # service.failed (parked) or payment.unapplied
    retried: int  # jobs that needed more than one attempt
    seconds: float  # first publish of the phase to this group's last service.created
    services_per_second: float
    backlog_at_publish_end: int  # paid, not yet Active when the phase's last confirm came
    latency_ms: dict[str, float]  # payment published -> service.created heard
    # The latency cut in three: publish -> payment applied (queue wait and the payment's
    # transaction start), applied -> job done (waiting for a runner slot, the module call),
    # job done -> event heard (outbox relay, broker). p50 and p99 of each.
    to_applied_ms: dict[str, float]
    to_job_done_ms: dict[str, float]
    to_event_ms: dict[str, float]


@dataclass
class PhaseResult:
    phase: str
    mode: str  # steady or burst
    target_rate: float | None
    payments: int
    publish_seconds: float
    seconds: float  # first publish to the last service.created
    groups: list[GroupResult]
    cpu_cores: dict[str, float]
    worker_busy: float
    worker_cpu_ms_per_service: float
    worker_rss_mb: float
    profile: dict[str, Any] | None = None


def _summary(values: list[float]) -> dict[str, float]:
    s = latency_summary(values)
    return {"p50": s["p50"], "p99": s["p99"]}


@dataclass
class Run:
    bench: Bench
    worker: WorkerProcess
    store: Storefront
    cpu: CpuMeter
    profiler: Profiler
    results: list[PhaseResult] = field(default_factory=list)
    rss_checkpoints: list[dict[str, Any]] = field(default_factory=list)
    # Database work and events per payment, warm-up and phases (PostgreSQL backends report
    # their counters late, and at exit: read with no worker running, before and after).
    per_payment: dict[str, float] = field(default_factory=dict)

    def checkpoint(self, after: str) -> float:
        rss = round(self.worker.rss() / 2**20, 1)
        self.rss_checkpoints.append({"after": after, "rss_mb": rss})
        return rss

    async def phase(self, label: str, payments: list[Placed], rate: float | None) -> PhaseResult:
        """Pay for `payments` (in their order), steadily at `rate` or as a burst, and wait for
        every one's service.created (or failure)."""
        refs = [p.ref for p in payments]
        self.store.expect(refs, SETUP_KEYS)
        await self.profiler.start(label)
        self.cpu.start()
        first = time.time()
        if rate:
            await self.store.steady(self.store.pay, payments, rate)
        else:
            await self.store.burst(self.store.pay, payments)
        published = time.time()
        finished = await self.store.wait()
        cpu = self.cpu.stop()
        profile = await self.profiler.stop()
        await asyncio.sleep(STATS_FLUSH_SECONDS)  # the tail (welcome emails) out of the next phase
        timings = await self._timings(refs)
        groups = [self._group(g, [p.ref for p in payments if p.group == g], first, published, timings)
                  for g in dict.fromkeys(p.group for p in payments)]
        created = sum(g.created for g in groups)
        ends = [t for ref in refs if (t := self.store.at("service.created", ref))]
        seconds = (max(ends) - first) if ends else float("nan")
        result = PhaseResult(
            phase=label, mode="steady" if rate else "burst", target_rate=rate,
            payments=len(refs), publish_seconds=round(published - first, 2), seconds=round(seconds, 2),
            groups=groups, cpu_cores=cpu.cores(), worker_busy=cpu.worker_busy(),
            worker_cpu_ms_per_service=round(cpu.seconds.get("worker", 0.0) * 1000 / max(1, created), 2),
            worker_rss_mb=self.checkpoint(label), profile=profile,
        )
        self.results.append(result)
        _progress(result)
        if not finished:
            missing = [ref for ref in refs if not any(self.store.at(k, ref) for k in SETUP_KEYS)]
            raise RuntimeError(
                f"{label}: {len(missing)} payment(s) without a service after {STALL_SECONDS:.0f} s "
                f"without progress ({await self._diagnose(missing)}); see {self.worker.log_path}")
        return result

    async def _diagnose(self, refs: list[str]) -> str:
        """Where the stuck ones are: their payments' and create jobs' states, counted."""
        conn = await asyncpg.connect(self.bench.settings.database_url)
        try:
            rows = await conn.fetch(
                "SELECT coalesce(p.status, 'no payment') AS payment,"
                " coalesce(j.status || ' after ' || j.attempts || ' attempt(s)', 'no job') AS job,"
                " left(j.last_error, 200) AS error, count(*) AS n"
                " FROM orders o JOIN invoices i ON i.order_id = o.id"
                " LEFT JOIN payments p ON p.invoice_id = i.id"
                " LEFT JOIN jobs j ON j.order_id = o.id AND j.kind = 'create'"
                " WHERE o.order_ref = ANY($1::text[]) GROUP BY 1, 2, 3 ORDER BY n DESC", refs)
        finally:
            await conn.close()
        return "; ".join(f"{r['n']}: payment {r['payment']}, job {r['job']}"
                         + (f" ({r['error']})" if r["error"] else "") for r in rows)

    async def _timings(self, refs: list[str]) -> dict[str, asyncpg.Record]:
        """Per order: when its payment was applied and its create job finished (database clock,
        transaction start times), and the job's attempts."""
        conn = await asyncpg.connect(self.bench.settings.database_url)
        try:
            rows = await conn.fetch(
                "SELECT o.order_ref, extract(epoch FROM max(p.applied_at))::float8 AS applied,"
                " extract(epoch FROM max(j.updated_at) FILTER (WHERE j.status = 'done'))::float8"
                "  AS job_done, max(j.attempts) AS attempts"
                " FROM orders o JOIN invoices i ON i.order_id = o.id"
                " LEFT JOIN payments p ON p.invoice_id = i.id AND p.status = 'applied'"
                " LEFT JOIN jobs j ON j.order_id = o.id AND j.kind = 'create'"
                " WHERE o.order_ref = ANY($1::text[]) GROUP BY o.order_ref", refs)
        finally:
            await conn.close()
        return {r["order_ref"]: r for r in rows}

    def _group(self, group: str, refs: list[str], first: float, published: float,
               timings: dict[str, asyncpg.Record]) -> GroupResult:
        s = self.store
        created = {ref: t for ref in refs if (t := s.at("service.created", ref))}
        failed = sum(1 for ref in refs if ref not in created
                     and (s.at("service.failed", ref) or s.at("payment.unapplied", ref)))
        segments: dict[str, list[float]] = {"applied": [], "job": [], "event": []}
        for ref, done in created.items():
            t = timings.get(ref)
            if t is None or t["applied"] is None or t["job_done"] is None:
                continue
            segments["applied"].append((t["applied"] - s.sent[ref]) * 1000)
            segments["job"].append((t["job_done"] - t["applied"]) * 1000)
            segments["event"].append((done - t["job_done"]) * 1000)
        seconds = (max(created.values()) - first) if created else float("nan")
        return GroupResult(
            group=group, payments=len(refs), created=len(created), failed=failed,
            retried=sum(1 for ref in refs if ((timings.get(ref) or {}).get("attempts") or 0) > 1),
            seconds=round(seconds, 2),
            services_per_second=round(len(created) / seconds, 1) if created else 0.0,
            backlog_at_publish_end=sum(1 for ref in refs if created.get(ref, published + 1) > published),
            latency_ms=latency_summary([(created[ref] - s.sent[ref]) * 1000 for ref in created]),
            to_applied_ms=_summary(segments["applied"]), to_job_done_ms=_summary(segments["job"]),
            to_event_ms=_summary(segments["event"]),
        )


def _progress(r: PhaseResult) -> None:
    for g in r.groups:
        print(f"  {r.phase:22} {g.group:12} {g.created}/{g.payments} in {g.seconds:.1f} s: "
              f"{g.services_per_second:.0f} services/s, p50 {g.latency_ms['p50']:.0f} ms, "
              f"p99 {g.latency_ms['p99']:.0f} ms", flush=True)


@dataclass
class Options:
    orders: int
    rate: float
    skip_cpanel: bool
    skip_mixed: bool
    profile: bool


def plan(opts: Options) -> dict[str, int]:
    """How the orders are shared: a fifth for the mixed phase (half slow cPanel, half
    autorelease), the rest between autorelease and cPanel, each half steady, half burst."""
    mixed_half = 0 if opts.skip_mixed else opts.orders // 10
    rest = opts.orders - 2 * mixed_half
    cpanel = 0 if opts.skip_cpanel else rest // 2
    auto = rest - cpanel
    return {"auto_steady": auto // 2, "auto_burst": auto - auto // 2, "cpanel_steady": cpanel // 2,
            "cpanel_burst": cpanel - cpanel // 2, "mixed_auto": mixed_half, "mixed_slow": mixed_half}


PARTS = {"auto_steady": AUTORELEASE, "auto_burst": AUTORELEASE, "cpanel_steady": CPANEL,
         "cpanel_burst": CPANEL, "mixed_auto": AUTORELEASE, "mixed_slow": CPANEL_SLOW,
         "warm_auto": AUTORELEASE, "warm_cpanel": CPANEL, "warm_slow": CPANEL_SLOW}


def warmup_plan(counts: dict[str, int]) -> dict[str, int]:
    """Payments per product before the phases, so that one-time costs (the cPanel module's first
    import of aiohttp, each server's HTTP session, statements prepared on each pooled database
    connection) stay out of the figures."""
    return {"warm_auto": 20, "warm_cpanel": 20 if counts["cpanel_steady"] else 0,
            "warm_slow": 1 if counts["mixed_slow"] else 0}


async def place_orders(store: Storefront, bench: Bench, counts: dict[str, int],
                       log_path: Path) -> dict[str, list[Placed]]:
    """Place every order, wait for all to be screened, read their invoices."""
    wanted = [(f"pv-{bench.run_id}-{part.replace('_', '-')}-{n:05d}", part)
              for part, count in counts.items() for n in range(count)]
    store.expect([ref for ref, _ in wanted], SCREENING_KEYS)
    started = time.perf_counter()
    for ref, _ in wanted:
        store.sent[ref] = 0.0  # ours: the listener records its events
    await store.burst(lambda w: store.place(w[0], PRODUCTS[PARTS[w[1]]]), wanted)
    if not await store.wait():
        raise RuntimeError(f"setup: orders not screened; see {log_path}")
    not_passed = [ref for ref, _ in wanted if not store.at("order.screened", ref)]
    if not_passed:
        raise RuntimeError(f"setup: {len(not_passed)} order(s) Fraud or rejected, e.g. {not_passed[0]}")
    elapsed = time.perf_counter() - started
    print(f"  setup: {len(wanted)} orders placed and screened in {elapsed:.1f} s "
          f"({len(wanted) / elapsed:.0f} orders/s)", flush=True)
    conn = await asyncpg.connect(bench.settings.database_url)
    try:
        rows = {r["order_ref"]: r for r in await conn.fetch(
            "SELECT o.order_ref, i.id, i.total::text AS total, i.currency FROM orders o"
            " JOIN invoices i ON i.order_id = o.id WHERE o.order_ref = ANY($1::text[])",
            [ref for ref, _ in wanted])}
    finally:
        await conn.close()
    placed: dict[str, list[Placed]] = {part: [] for part in counts}
    for ref, part in wanted:
        r = rows[ref]
        placed[part].append(Placed(ref, PARTS[part], r["id"], r["total"], r["currency"]))
    await asyncio.sleep(STATS_FLUSH_SECONDS)  # the setup's tail (emails) published
    return placed


async def warm_up(run: Run, warm: list[Placed]) -> None:
    started = time.perf_counter()
    run.store.expect([p.ref for p in warm], SETUP_KEYS)
    await run.store.burst(run.store.pay, warm)
    if not await run.store.wait() or not all(run.store.at("service.created", p.ref) for p in warm):
        raise RuntimeError(f"warm-up: services not created; see {run.worker.log_path}")
    print(f"  warm-up: {len(warm)} services Active in {time.perf_counter() - started:.1f} s", flush=True)
    await asyncio.sleep(STATS_FLUSH_SECONDS)  # the tail (welcome emails) out of the first phase


def interleave(a: list[Placed], b: list[Placed]) -> list[Placed]:
    out: list[Placed] = []
    for x, y in zip(a, b, strict=False):
        out += [x, y]
    n = min(len(a), len(b))
    return out + a[n:] + b[n:]


async def bench_provisioning(bench: Bench, connection: AbstractRobustConnection, opts: Options,
                             token: str) -> Run:
    """Orders placed by one worker process; payments handled by a second, started afterwards,
    so that the database counters read between the two (no backend of theirs left behind to
    report late) are the payments' work alone."""
    names = bench.names
    queues = [names.queue(s) for s in SERVICE_BINDINGS]
    env = worker_env(bench, token)
    store = Storefront(exchange=await (await broker.open_publisher(connection)).get_exchange(
        names.exchange), user_id=amqp_user(bench.settings.amqp_url))
    await store.listen(connection, names.exchange)
    counts = plan(opts)
    setup = WorkerProcess("ordermill run (setup)", [str(ORDERMILL), "run"], env,
                          RESULTS / "provisioning-setup-worker.log")
    try:
        await setup.start(connection, queues)
        placed = await place_orders(store, bench, {**counts, **warmup_plan(counts)}, setup.log_path)
        setup_rss = {"after": f"placing {sum(len(v) for v in placed.values())} orders (setup process)",
                     "rss_mb": round(setup.rss() / 2**20, 1)}
        # Their confirmation and invoice mails too, or the measured worker would send them.
        await mail_drained(bench.settings)
    finally:
        await setup.stop()
    await asyncio.sleep(STATS_FLUSH_SECONDS)
    before = {**await database_counters(bench.settings), **await outbox_counters(bench.settings)}
    worker = WorkerProcess("ordermill run", [str(ORDERMILL), "run"], env,
                           RESULTS / "provisioning-worker.log")
    try:
        await worker.start(connection, queues)
        db_name = urlsplit(bench.settings.database_url).path.lstrip("/")
        run = Run(bench, worker, store, CpuMeter(worker.pid, db_name), Profiler(worker.pid, opts.profile))
        run.rss_checkpoints.append(setup_rss)
        run.checkpoint("start")
        warm = [p for part, items in placed.items() if part.startswith("warm_") for p in items]
        await warm_up(run, warm)
        run.checkpoint(f"{len(warm)} warm-up payments")
        rate = f"{opts.rate:g}/s"
        await run.phase(f"autorelease {rate}", placed["auto_steady"], opts.rate)
        await run.phase("autorelease burst", placed["auto_burst"], None)
        if counts["cpanel_steady"]:
            await run.phase(f"cpanel 50 ms {rate}", placed["cpanel_steady"], opts.rate)
            await run.phase("cpanel 50 ms burst", placed["cpanel_burst"], None)
        if counts["mixed_slow"]:
            await run.phase(f"mixed {rate}", interleave(placed["mixed_auto"], placed["mixed_slow"]),
                            opts.rate)
    finally:
        await worker.stop()
    await asyncio.sleep(STATS_FLUSH_SECONDS)
    after = {**await database_counters(bench.settings), **await outbox_counters(bench.settings)}
    paid = len(warm) + sum(r.payments for r in run.results)
    run.per_payment = {k: round((v - before.get(k, 0)) / max(1, paid), 2) for k, v in after.items()}
    return run


async def remove_topology(connection: AbstractRobustConnection, names: Names) -> None:
    try:
        channel = await connection.channel()
        await delete_topology(channel, names)
        await channel.close()
    except Exception as exc:  # report it, and go on cleaning up
        print(f"cleanup: could not delete the topology: {exc!r}", file=sys.stderr)


async def run_bench(bench: Bench, opts: Options) -> dict[str, Any]:
    s = bench.settings
    announce(bench)
    fast, slow = fake_whm(FAST_WHM_DELAY), fake_whm(SLOW_WHM_DELAY)
    connection: AbstractRobustConnection | None = None
    with MailSink(s.smtp_port) as mail:
        try:
            await fast.start()
            await slow.start()
            await create_database(s, fast.port, slow.port)
            connection = await broker.connect(s.amqp_url, attempts=3)
            await declare_topology(connection, bench.names, delivery_limit=s.queue_delivery_limit)
            run = await bench_provisioning(bench, connection, opts, fast.token)
            whm_calls = {"web1": dict(fast.calls), "web-slow": dict(slow.calls)}
        finally:
            await fast.stop()
            await slow.stop()
            if connection is not None:
                await remove_topology(connection, bench.names)
                await connection.close()
            await drop_database(s)
    data = report_data(bench, opts, run, whm_calls)
    data["emails_delivered"] = mail.received
    return data


# -- the report ----------------------------------------------------------------------------------------


def report_data(bench: Bench, opts: Options, run: Run, whm_calls: dict[str, Any]) -> dict[str, Any]:
    s = bench.settings
    return {
        "run_id": bench.run_id,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "options": asdict(opts),
        "orders": plan(opts),
        "warmup_orders": warmup_plan(plan(opts)),
        "settings": {"worker_prefetch": s.worker_prefetch, "worker_concurrency": s.worker_concurrency,
                     "worker_batch": s.worker_batch, "db_pool_max": s.db_pool_max,
                     "job_concurrency": s.job_concurrency,
                     # Calls in flight per server, where the tree has lanes (None where it has not).
                     "job_lane_concurrency": getattr(s, "job_lane_concurrency", None),
                     "job_poll_seconds": 0.5,
                     "whm_delay_seconds": {"web1": FAST_WHM_DELAY, "web-slow": SLOW_WHM_DELAY}},
        "phases": [asdict(r) for r in run.results],
        "per_payment": run.per_payment,
        "whm_calls": whm_calls,
        "rss_mb": run.rss_checkpoints,
        "peak_rss_mb": round(run.worker.peak_rss / 2**20, 1),
    }


COLUMNS = ("phase", "group", "services", "secs", "svc/s", "p50 ms", "p99 ms", "max ms",
           "→applied", "→job done", "→event", "busy", "worker", "postgres", "rabbitmq", "bench",
           "other", "cpu ms/svc")
CPU_GROUPS = ("worker", "postgres", "rabbitmq", "bench", "other")


def _rows(p: dict[str, Any]) -> list[list[str]]:
    rows = []
    for n, g in enumerate(p["groups"]):
        lat = g["latency_ms"]
        done = str(g["payments"]) if g["created"] == g["payments"] else f"{g['created']}/{g['payments']}"
        shared = ([f"{p['worker_busy']:.2f}", *(f"{p['cpu_cores'].get(c, 0.0):.2f}" for c in CPU_GROUPS),
                   f"{p['worker_cpu_ms_per_service']:.1f}"] if n == 0 else [""] * 7)
        rows.append([p["phase"] if n == 0 else "", g["group"], done, f"{g['seconds']:.1f}",
                     f"{g['services_per_second']:.0f}", f"{lat['p50']:.0f}", f"{lat['p99']:.0f}",
                     f"{lat['max']:.0f}", f"{g['to_applied_ms']['p50']:.0f}",
                     f"{g['to_job_done_ms']['p50']:.0f}", f"{g['to_event_ms']['p50']:.0f}", *shared])
    return rows


def _find(data: dict[str, Any], phase_prefix: str, group: str) -> dict[str, Any] | None:
    for p in data["phases"]:
        if p["phase"].startswith(phase_prefix):
            for g in p["groups"]:
                if g["group"] == group:
                    return g
    return None


def _mixed_line(data: dict[str, Any]) -> str | None:
    alone, mixed = _find(data, "autorelease", AUTORELEASE), _find(data, "mixed", AUTORELEASE)
    slow = _find(data, "mixed", CPANEL_SLOW)
    if not (alone and mixed and slow):
        return None
    a, m = alone["latency_ms"], mixed["latency_ms"]
    held = m["p99"] > 2 * a["p99"] + 100
    verdict = ("slow servers DO hold back fast ones" if held
               else "slow servers do not hold back fast ones")
    return (f"autorelease latency alone p50 {a['p50']:.0f} ms, p99 {a['p99']:.0f} ms; next to a WHM "
            f"answering after {SLOW_WHM_DELAY:g} s p50 {m['p50']:.0f} ms, p99 {m['p99']:.0f} ms "
            f"(the slow cPanel services: p50 {slow['latency_ms']['p50']:.0f} ms): {verdict}")


def _warnings(data: dict[str, Any]) -> list[str]:
    warnings = []
    for p in data["phases"]:
        for g in p["groups"]:
            if g["failed"]:
                warnings.append(f"{p['phase']} {g['group']}: {g['failed']} setup(s) failed (parked) or "
                                "payment(s) unapplied; see the worker's log")
            if g["retried"]:
                warnings.append(f"{p['phase']} {g['group']}: {g['retried']} job(s) needed a retry")
        rate = p.get("target_rate")
        for g in p["groups"] if rate else []:
            wanted = rate * g["payments"] / p["payments"]  # the group's share of the rate
            # (A second or two is too short to tell: the last payment's latency counts.)
            if g["seconds"] >= 2 and g["services_per_second"] < 0.9 * wanted:
                warnings.append(
                    f"{p['phase']} {g['group']}: did not keep up with {wanted:g} payments/s "
                    f"({g['services_per_second']:g}/s): its latency measures a growing backlog")
    return warnings


def _profile_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    for p in data["phases"]:
        prof = p.get("profile")
        if not prof:
            continue
        top = ", ".join(f"{k} {v:.0%}" for k, v in list(prof["components"].items())[:5])
        libs = ", ".join(f"{k} {v:.0%}" for k, v in list(prof["libraries"].items())[:5])
        lines.append(f"  {p['phase']}: {prof['samples']} samples in {prof['file']}\n"
                     f"    by component: {top}\n    by library: {libs}")
    return lines


def print_report(data: dict[str, Any]) -> None:
    s, m = data["settings"], data["machine"]
    print(f"\nOrdermill provisioning benchmark {data['run_id']} ({data['at']}, {data['commit']}): "
          f"{m['cpus']} CPUs, load {m['load_avg_1m']}, prefetch {s['worker_prefetch']}, "
          f"job concurrency {s['job_concurrency']}"
          + (f" ({s['job_lane_concurrency']} per server)" if s["job_lane_concurrency"] else "")
          + f", {data['elapsed_seconds']:.0f} s in all")
    print("latency: payment published -> service.created heard, cut into p50s of publish -> payment\n"
          "applied (→applied), -> create job done (→job done), -> event heard (→event). busy: the\n"
          "worker's event loop running or waiting for a CPU (1.00 = saturated). worker ... other:\n"
          "CPU cores used over the phase (bench includes the fake WHM servers).\n")
    print(_table(COLUMNS, [row for p in data["phases"] for row in _rows(p)]))
    print()
    if line := _mixed_line(data):
        print(line)
    work = ", ".join(f"{v:g} {k.replace('_', ' ')}" for k, v in data["per_payment"].items())
    print(f"per payment, over the warm-up and every phase: {work}")
    rss = ", ".join(f"{c['rss_mb']:.0f} MB after {c['after']}" for c in data["rss_mb"])
    print(f"worker RSS: {rss}; peak {data['peak_rss_mb']:.0f} MB")
    calls = "; ".join(f"{server}: " + ", ".join(f"{fn} {n}" for fn, n in sorted(c.items()))
                      for server, c in data["whm_calls"].items() if c) or "none"
    print(f"WHM calls: {calls}")
    print(f"customer emails delivered to the bench's SMTP sink: {data['emails_delivered']:,}")
    if lines := _profile_lines(data):
        print(f"py-spy, {PROFILE_RATE} samples/s of the worker while it runs (not idle), by the innermost "
              "frame of ours and by the innermost frame of all:")
        print("\n".join(lines))
    for warning in _warnings(data):
        print(f"warning: {warning}")


# -- command line ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--orders", type=int, default=1000,
                        help="orders placed (and paid) in all, shared between the phases")
    parser.add_argument("--rate", type=float, default=50.0, help="payments/s in the steady phases")
    parser.add_argument("--skip-cpanel", action="store_true", help="no cPanel (50 ms WHM) phases")
    parser.add_argument("--skip-mixed", action="store_true", help="no mixed (2 s WHM) phase")
    parser.add_argument("--profile", action="store_true",
                        help="record the worker with py-spy during each phase (slows it a little)")
    args = parser.parse_args(argv)
    if args.orders < 20 or args.rate <= 0:
        parser.error("--orders must be at least 20 and --rate positive")
    if args.profile and not PY_SPY.exists():
        parser.error(f"--profile needs py-spy in the virtualenv ({PY_SPY}): pip install py-spy")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    opts = Options(orders=args.orders, rate=args.rate, skip_cpanel=args.skip_cpanel,
                   skip_mixed=args.skip_mixed, profile=args.profile)
    started = time.perf_counter()
    try:
        # The fake WHM servers run in this process: uvloop, where installed, keeps them cheap.
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            data = runner.run(run_bench(Bench.create(), opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: worker stopped, bench database and queues removed", file=sys.stderr)
        raise SystemExit(130) from None
    data["commit"] = _git_commit()
    data["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    path = RESULTS / "provisioning.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print_report(data)
    print(f"\nwritten to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
