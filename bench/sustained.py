"""Ordermill under sustained load (issue 15, target 2), and its tables after a large volume
(target 3), through `ordermill run` (every worker and the relay; laid out as WORKER_PROCESSES
says, `auto` by default: three processes on two or more cores. `WORKER_PROCESSES=1` measures
them all in one process; the report says how many processes ran).

The full flow, as a storefront and a gateway drive it: an order (one autorelease `starter`
product, a new client each) is placed; when it is screened, its invoice is paid (for
--pay-share of the orders, as bench/provisioning.py publishes payments); the service is set
up (autorelease) and Active; the customer's mails (confirmation, invoice, welcome) go to the
bench's SMTP sink. An order is done when its service is Active (paid) or it is screened
(unpaid); a phase ends when every order is done and every mail is sent.

1. warm-up: --warmup orders as a burst.
2. burst: --orders orders published as fast as confirms allow (payments as each is
   screened): the all-in-one burst throughput of the full flow (orders per second until
   the last order is screened, every paid one Active and every customer mail sent). Also
   reported: the rate to the last order done (screened, Active if paid; mails still going
   out: the steady phase's reference before stop 23) and to the last order screened.
3. steady: --rate-share (default 0.8) of the --reference rate (default the full flow's),
   for --seconds: publish->screened
   and payment->Active p50/p99, the backlog (orders in flight, messages ready in the queues,
   unpublished events, unsent mails) sampled each second and its growth, the worker's CPU per
   order against the burst's.
With --ab, the burst and the steady phase run twice per round on fresh workers, without and
with WORKER_LINGER_MS (the runtime's batching of what waits; --linger, by default what ships),
in alternating order; WORKER_FLOW_GAP_MS is what ships on both sides.

--volume N instead pushes N orders through the full flow (bursts of --chunk), with short
retention windows (--window seconds) so that the workers' own housekeeping prunes as it
goes, and reports inbox, outbox, jobs and emails (rows and pg_total_relation_size) after
each chunk, then after a final prune of everything past the window.

Run: .venv/bin/python bench/sustained.py [--orders N] [--seconds S] [--ab ROUNDS] [--volume N]
The report is printed and written as JSON to bench/results/sustained.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import hops
import psutil
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pipeline import (
    ORDERMILL,
    RESULTS,
    STATS_FLUSH_SECONDS,
    Bench,
    CpuMeter,
    MailSinkProcess,
    WorkerGroup,
    WorkerProcess,
    _free_port,
    _git_commit,
    _table,
    announce,
    create_database,
    database_counters,
    drop_database,
    latency_summary,
    mail_drained,
    webhook_receiver,
)
from provisioning import SCREENING_KEYS, SETUP_KEYS, Placed, Storefront

from bench import autovacuum, quorum_log
from bench.quorum_log import QuorumLog
from shared import broker, db
from shared.housekeeping import Housekeeper
from shared.parties import amqp_user
from shared.settings import Settings
from shared.topology import SERVICE_BINDINGS, declare_topology, delete_topology

PRODUCT = "starter"  # autorelease on payment
BOUNDED_TABLES = ("inbox", "outbox", "jobs", "emails", "webhook_deliveries", "webhook_attempts")


# -- the storefront and the gateway ------------------------------------------------------------


@dataclass
class FullFlow(Storefront):
    """Places orders, pays the chosen ones when screened, and says when each is done."""

    placed_at: dict[str, float] = field(default_factory=dict)
    paid_at: dict[str, float] = field(default_factory=dict)
    ended_at: dict[str, float] = field(default_factory=dict)
    to_pay: set[str] = field(default_factory=set)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    paying: set[asyncio.Task[None]] = field(default_factory=set)

    async def listen(self, connection: AbstractRobustConnection, exchange_name: str) -> None:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in ("order.placed", *SCREENING_KEYS, *SETUP_KEYS):
            await queue.bind(exchange_name, routing_key=key)
        await queue.consume(self._on_event, no_ack=True)

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        at = time.time()
        body = json.loads(message.body)
        ref, key = body.get("order_ref"), message.routing_key or ""
        if ref not in self.placed_at:
            return  # not ours
        self.seen.setdefault(key, {}).setdefault(ref, at)
        if key == "order.placed":
            self.invoices[ref] = body
        if key in ("order.placed", "order.screened") and ref in self.to_pay:
            self._pay_when_ready(ref)
        paid = ref in self.to_pay
        if (key in SETUP_KEYS and paid) or (key in SCREENING_KEYS and not paid):
            self._end(ref, at)
        elif key in SCREENING_KEYS and key != "order.screened":
            self._end(ref, at)  # Fraud or rejected: nothing to pay (reported as a warning)

    def _pay_when_ready(self, ref: str) -> None:
        invoice = self.invoices.get(ref)
        if ref in self.paid_at or invoice is None or not self.at("order.screened", ref):
            return
        self.paid_at[ref] = time.time()
        task = asyncio.create_task(self.pay(Placed(ref, PRODUCT, invoice["invoice_id"],
                                                   str(invoice["total"]), invoice["currency"])))
        self.paying.add(task)
        task.add_done_callback(self.paying.discard)

    def _end(self, ref: str, at: float) -> None:
        if ref not in self.ended_at:
            self.ended_at[ref] = at
            if ref in self._waiting:
                self._arrived(ref)

    async def place_one(self, item: tuple[str, bool]) -> None:
        ref, pay = item
        if pay:
            self.to_pay.add(ref)
        self.placed_at[ref] = time.time()
        await self.place(ref, PRODUCT)

    def screening_at(self, ref: str) -> float | None:
        """When the bench heard the order's screening outcome (screened, Fraud or rejected)."""
        return min((at for key in SCREENING_KEYS if (at := self.at(key, ref)) is not None),
                   default=None)

    @property
    def in_flight(self) -> int:
        return len(self.placed_at) - len(self.ended_at)


# -- the backlog, sampled ----------------------------------------------------------------------


@dataclass
class Backlog:
    """Each second: orders in flight, messages ready in the work queues, unpublished events,
    mails not sent yet."""

    store: FullFlow
    queues: list[str]
    database_url: str
    wal: QuorumLog | None = None  # the broker's log file, sampled too (bench/quorum_log.py)
    samples: list[dict[str, Any]] = field(default_factory=list)

    async def run(self, connection: AbstractRobustConnection, stop: asyncio.Event) -> None:
        channel = await connection.channel()
        conn = await asyncpg.connect(self.database_url)
        started = time.time()
        try:
            declared = [await channel.declare_queue(name, passive=True) for name in self.queues]
            while not stop.is_set():
                ready = sum([(await q.declare()).message_count or 0 for q in declared])
                row = await conn.fetchrow(
                    "SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS events,"
                    " (SELECT count(*) FROM emails WHERE status IN ('pending', 'sending')) AS mails,"
                    " (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter)"
                    " AS checkpoints")
                now = time.time()
                self.samples.append({"t": round(now - started, 1), "at": now,
                                     "in_flight": self.store.in_flight, "ready": ready,
                                     "events": row["events"], "mails": row["mails"],
                                     "checkpoints": row["checkpoints"],
                                     "wal": self.wal.current() if self.wal else None})
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass
        finally:
            await conn.close()
            await channel.close()

    def growth(self, until: float) -> dict[str, float]:
        """Orders in flight: mean over the first and last quarter of the publishing, and the
        least-squares slope (orders per second) over it."""
        points = [(s["t"], s["in_flight"]) for s in self.samples if s["t"] <= until]
        if len(points) < 4:
            return {}
        quarter = max(1, len(points) // 4)
        n = len(points)
        mean_t = sum(t for t, _ in points) / n
        mean_v = sum(v for _, v in points) / n
        var = sum((t - mean_t) ** 2 for t, _ in points) or 1.0
        slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / var
        return {"first_quarter": round(sum(v for _, v in points[:quarter]) / quarter, 1),
                "last_quarter": round(sum(v for _, v in points[-quarter:]) / quarter, 1),
                "slope_per_s": round(slope, 2),
                "max_ready": max(s["ready"] for s in self.samples),
                "max_events": max(s["events"] for s in self.samples),
                "max_mails": max(s["mails"] for s in self.samples)}


# -- phases ----------------------------------------------------------------------------------


@dataclass
class Orders:
    run_id: str
    pay_share: float
    count: int = 0

    def take(self, n: int, label: str) -> list[tuple[str, bool]]:
        out = []
        for _ in range(n):
            self.count += 1
            # Every 1/(1-share)-th order unpaid, spread evenly.
            unpaid = self.pay_share < 1 and self.count % max(2, round(1 / (1 - self.pay_share))) == 0
            out.append((f"sus-{self.run_id}-{label}-{self.count:06d}", not unpaid))
        return out


@dataclass
class Run:
    bench: Bench
    connection: AbstractRobustConnection
    worker: WorkerProcess | WorkerGroup
    store: FullFlow
    cpu: CpuMeter
    hops: bool = False
    wal: QuorumLog | None = None

    async def hop_report(self, refs: list[str], first: float, ended: float,
                         samples: list[dict[str, float]]) -> dict[str, Any]:
        """The phase's orders hop by hop (bench/hops.py), and its timeline per second."""
        store = self.store
        mine: dict[str, dict[str, float]] = {}
        for ref in refs:
            stamp = {"published": store.placed_at[ref]}
            if (heard := store.at("order.screened", ref)) is not None:
                stamp["screened_heard"] = heard
            if ref in store.paid_at and (active := store.at("service.created", ref)) is not None:
                stamp |= {"paid": store.paid_at[ref], "active_heard": active}
            mine[ref] = stamp
        url = self.bench.settings.database_url
        orders = await hops.stamps(url, mine)
        passes, claims, counts = await hops.passes_and_claims(url, first, ended)
        sizes = await hops.batch_sizes(url, first, ended)
        checkpoints = [s for s in samples if s.get("checkpoints") is not None]
        rebased = [{**s, "t": s["at"] - first} for s in samples if "at" in s]
        return {"breakdown": hops.breakdown(orders),
                "per_order": {k: round(v / len(refs), 2) for k, v in counts.items()},
                "provisioning_batches": sizes,
                "checkpoints": (checkpoints[-1]["checkpoints"] - checkpoints[0]["checkpoints"])
                if checkpoints else None,
                "timeline": hops.timeline(orders, first, claims, passes, rebased)}

    async def phase(self, label: str, orders: list[tuple[str, bool]], rate: float | None,
                    *, wait_mail: bool = True) -> dict[str, Any]:
        store = self.store
        refs = [ref for ref, _ in orders]
        store._expect(set(refs))
        backlog = Backlog(store, [self.bench.names.queue(s) for s in SERVICE_BINDINGS],
                          self.bench.settings.database_url, self.wal)
        stop = asyncio.Event()
        sampler = asyncio.create_task(backlog.run(self.connection, stop))
        counted = await database_counters(self.bench.settings)
        self.cpu.start()
        first = time.time()
        if rate is None:
            await Storefront.burst(store.place_one, orders)
        else:
            await Storefront.steady(store.place_one, orders, rate)
        published = time.time() - first
        if not await store.wait():
            stop.set()
            await sampler
            raise RuntimeError(f"{label}: {len(store._waiting)} order(s) not done;"
                               f" see {self.worker.log_path}")
        done = max(store.ended_at[ref] for ref in refs) - first
        mail_seconds = await mail_drained(self.bench.settings) if wait_mail else 0.0
        # The full flow's end: every order done (screened; paid ones Active) and every mail
        # of theirs sent (the emails' own sent_at: the sink is on this machine's clock).
        last_mail = await last_mail_sent(self.bench.settings.database_url, refs) \
            if wait_mail else None
        full = max(done, (last_mail or first) - first)
        cpu = self.cpu.stop()
        ended = time.time()
        stop.set()
        await sampler
        await asyncio.sleep(STATS_FLUSH_SECONDS)
        transactions = (await database_counters(self.bench.settings))["transactions"] \
            - counted["transactions"]
        paid = [ref for ref in refs if ref in store.paid_at and store.at("service.created", ref)]
        screened = [ref for ref in refs if store.at("order.screened", ref)]
        screening = [at for ref in refs if (at := store.screening_at(ref)) is not None]
        screened_seconds = max(screening) - first if screening else done
        result = {
            "phase": label, "orders": len(refs), "paid": len(paid), "target_rate": rate,
            "publish_seconds": round(published, 2), "seconds": round(done, 2),
            # Three rates, each the phase's orders over the time until the last of them was
            # (1) screened, (2) done: screened, and Active if paid (the steady phase's
            # reference until stop 23), (3) done and every customer mail sent: the full flow
            # (issue 15's "all-in-one burst throughput", the reference now).
            "orders_per_second": round(len(refs) / done, 1),
            "screened_seconds": round(screened_seconds, 2),
            "screened_per_second": round(len(refs) / screened_seconds, 1),
            "full_flow_seconds": round(full, 2),
            "full_flow_per_second": round(len(refs) / full, 1),
            "not_screened": len(refs) - len(screened),
            "screened_ms": latency_summary([(store.at("order.screened", r) - store.placed_at[r]) * 1000
                                            for r in screened]),
            "active_ms": latency_summary([(store.at("service.created", r) - store.paid_at[r]) * 1000
                                          for r in paid]),
            "mail_drain_seconds": mail_seconds,
            "cpu_cores": cpu.cores(), "worker_busy": cpu.worker_busy(),
            "worker_cpu_ms_per_order": round(cpu.seconds.get("worker", 0.0) * 1000 / len(refs), 2),
            # Each worker process's share: which group of services costs what (stop 30 found
            # the mail group the heaviest by `ps`).
            "worker_cpu_ms_per_order_by_process": by_process(cpu.worker_seconds, len(refs)),
            "postgres_cpu_ms_per_order": round(cpu.seconds.get("postgres", 0.0) * 1000 / len(refs), 2),
            "rabbitmq_cpu_ms_per_order": round(cpu.seconds.get("rabbitmq", 0.0) * 1000 / len(refs), 2),
            "backlog": backlog.growth(published),
            # Seconds into the phase at which the broker's quorum-queue log rolled over (None:
            # not seen from here): each roll can pause the pipeline (bench/quorum_log.py).
            "broker_log_rolls_at": quorum_log.rolls(backlog.samples),
            # The phase's commits (the sampler's and the counters' own included: about one
            # a second), and its wall-clock span, to find its statements in the server's log.
            "transactions_per_order": round(transactions / len(refs), 1),
            "started_at": first, "ended_at": ended,
            "samples": backlog.samples,
        }
        if self.hops:
            result["hops"] = await self.hop_report(refs, first, ended, backlog.samples)
        _progress(result)
        return result


async def last_mail_sent(database_url: str, refs: list[str]) -> float | None:
    """When the last customer mail of these orders was sent (epoch seconds), if any was."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(
            "SELECT extract(epoch FROM max(e.sent_at))::float8 FROM emails e"
            " JOIN orders o ON o.id = e.order_id WHERE o.order_ref = ANY($1::text[])", refs)
    finally:
        await conn.close()


# --reference: which of the burst's rates the steady phase takes its share of.
REFERENCES = {"full": "full_flow_per_second", "done": "orders_per_second",
              "screened": "screened_per_second"}
REFERENCE_NAMES = {"full": "full flow: screened, Active and mailed",
                   "done": "screened and Active, mails not waited for",
                   "screened": "screened only"}


def process_label(pid: int) -> str:
    """A worker process by what it runs: the services after `--processes 1` in its command
    line (`placement,fraud`), `supervisor` for the parent of several, `worker` for one
    process of every service; its pid if it is gone."""
    try:
        proc = psutil.Process(pid)
        argv = proc.cmdline()
        if "--processes" not in argv:
            return "supervisor" if proc.children() else "worker"
    except psutil.Error:
        return str(pid)
    after = argv[argv.index("--processes") + 1:]
    if after[:1] != ["1"]:
        return "supervisor"
    return ",".join(a for a in after[1:] if not a.startswith("-")) or "worker"


def by_process(seconds: dict[int, float], orders: int) -> dict[str, float]:
    """CPU ms an order by process label (`process_label`), processes of one label added."""
    out: dict[str, float] = {}
    for pid, used in sorted(seconds.items()):
        label = process_label(pid)
        out[label] = out.get(label, 0.0) + used * 1000 / max(1, orders)
    return {label: round(ms, 2) for label, ms in out.items()}


def _progress(r: dict[str, Any]) -> None:
    print(f"  {r['phase']:22} {r['orders']} orders ({r['paid']} paid) in {r['seconds']:.1f} s:"
          f" {r['orders_per_second']:.0f}/s (screened {r['screened_per_second']:.0f}/s,"
          f" full flow {r['full_flow_per_second']:.0f}/s); screened p99 {r['screened_ms']['p99']:.0f} ms,"
          f" active p99 {r['active_ms']['p99']:.0f} ms; worker {r['worker_cpu_ms_per_order']:.2f}"
          f" ms/order; mails +{r['mail_drain_seconds']:.1f} s;"
          f" {r['transactions_per_order']:.1f} transactions/order"
          + ("" if (at := r.get("broker_log_rolls_at")) is None else
             f"; broker log rolled {len(at)}x" + (f" (at {', '.join(f'{t:.0f}' for t in at)} s)"
                                                   if at else "")), flush=True)
    by_process = r.get("worker_cpu_ms_per_order_by_process") or {}
    if len(by_process) > 1:
        print(f"  {'':22} worker ms/order by process: "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in by_process.items()), flush=True)


def as_shipped() -> dict[str, str]:
    """`ordermill run`'s own layout (`auto`) unless the environment sets WORKER_PROCESSES
    (bench/pipeline.py's default is one process)."""
    return {"WORKER_PROCESSES": os.environ.get("WORKER_PROCESSES", "auto")}


async def with_worker(bench: Bench, connection: AbstractRobustConnection, env: dict[str, str],
                      label: str, processes: list[list[str]] | None = None,
                      ) -> tuple[WorkerProcess | WorkerGroup, FullFlow, CpuMeter]:
    store = FullFlow(exchange=await (await broker.open_publisher(connection)).get_exchange(
        bench.names.exchange), user_id=amqp_user(bench.settings.amqp_url))
    await store.listen(connection, bench.names.exchange)
    worker: WorkerProcess | WorkerGroup
    if processes:  # --processes: the workers in several processes, the console left out
        worker = WorkerGroup(processes, env, bench.names,
                             prefix=f"sustained-{label.replace(' ', '-')}")
    else:
        worker = WorkerProcess(label, [str(ORDERMILL), "run"], env,
                               RESULTS / f"sustained-{label.replace(' ', '-')}-worker.log")
    await worker.start(connection, [bench.names.queue(s) for s in SERVICE_BINDINGS])
    db_name = urlsplit(bench.settings.database_url).path.lstrip("/")
    return worker, store, CpuMeter(worker.pids, db_name)


async def sustained_round(bench: Bench, connection: AbstractRobustConnection, orders: Orders,
                          opts: argparse.Namespace, label: str, env: dict[str, str],
                          wal: QuorumLog | None = None) -> dict[str, Any]:
    """Warm-up, burst, then steady at rate-share of the burst, on a fresh worker."""
    worker, store, cpu = await with_worker(bench, connection, env, label, opts.processes)
    run = Run(bench, connection, worker, store, cpu, hops=opts.hops, wal=wal)
    before = await database_counters(bench.settings)
    started_at = time.time()
    vacuum_seconds: list[float] = []  # before the burst and before the steady phase (--vacuum)

    async def vacuum_if_wanted() -> None:
        if opts.vacuum_phases:
            vacuum_seconds.append(await autovacuum.vacuum(bench.settings.database_url))

    try:
        await run.phase(f"{label}: warm-up", orders.take(opts.warmup, "w"), None)
        await vacuum_if_wanted()
        burst = await run.phase(f"{label}: burst", orders.take(opts.orders, "b"), None)
        await vacuum_if_wanted()
        rate = opts.rate or round(opts.rate_share * burst[REFERENCES[opts.reference]], 1)
        steady = await run.phase(f"{label}: steady {rate:g}/s",
                                 orders.take(round(rate * opts.seconds), "s"), rate)
    finally:
        await worker.stop()
    await asyncio.sleep(STATS_FLUSH_SECONDS)
    after = await database_counters(bench.settings)
    total = opts.warmup + opts.orders + steady["orders"]
    return {"label": label, "env": {k: v for k, v in env.items() if k.startswith("WORKER_")},
            "worker_pids": len(worker.pids),
            "burst": burst, "steady": steady, "vacuum_seconds": vacuum_seconds,
            "steady_vs_burst_cpu": round(steady["worker_cpu_ms_per_order"]
                                         / burst["worker_cpu_ms_per_order"], 2),
            "transactions_per_order": round((after["transactions"] - before["transactions"]) / total, 1),
            # Exact once the worker's connections have closed (a busy backend's counters may
            # wait until then): the phases' own counts above can miss some.
            "transactions": after["transactions"] - before["transactions"], "orders": total,
            "started_at": started_at, "ended_at": time.time(),
            "peak_rss_mb": round(worker.peak_rss / 2**20, 1)}


# -- volume: bounded tables ------------------------------------------------------------------


async def table_sizes(database_url: str) -> dict[str, dict[str, int]]:
    conn = await asyncpg.connect(database_url)
    try:
        out = {}
        for table in (*BOUNDED_TABLES, "orders"):
            row = await conn.fetchrow(f"SELECT count(*) AS rows, pg_total_relation_size('{table}')"
                                      " AS bytes FROM " + table)
            out[table] = dict(row)
        return out
    finally:
        await conn.close()


async def settled(database_url: str, limit: float = 600.0) -> None:
    """Until no event waits for the relay, no mail to be sent, no job to run and no webhook to
    deliver (twice, 0.5 s
    apart): mail_drained's count cannot be used once the housekeeper prunes what it counts."""
    conn = await asyncpg.connect(database_url)
    deadline, quiet = time.monotonic() + limit, 0
    try:
        while quiet < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the flow did not settle within {limit:.0f} s")
            left = await conn.fetchval(
                "SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL)"
                " + (SELECT count(*) FROM emails WHERE status IN ('pending', 'sending'))"
                " + (SELECT count(*) FROM jobs WHERE status IN ('pending', 'running'))"
                " + (SELECT count(*) FROM webhook_deliveries WHERE status IN ('pending', 'sending'))")
            quiet = quiet + 1 if left == 0 else 0
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


def retention_env(window: float) -> dict[str, str]:
    """Every retention window `window` seconds; the housekeeper runs every window / 2."""
    return {"OUTBOX_RETENTION_HOURS": str(window / 3600), "INBOX_RETENTION_DAYS": str(window / 86400),
            "JOB_RETENTION_DAYS": str(window / 86400), "EMAIL_RETENTION_DAYS": str(window / 86400),
            "WEBHOOK_RETENTION_DAYS": str(window / 86400),
            "HOUSEKEEPING_SECONDS": str(max(1.0, window / 2))}


VACUUM_TABLES = "VACUUM " + ", ".join(BOUNDED_TABLES)  # after each --volume chunk (--vacuum)
VACUUM_PHASES = "VACUUM (ANALYZE) after the warm-up and after the burst"  # --vacuum's, said


async def chunk_checkpoint(database_url: str, orders: int, started: float, *,
                           vacuum_tables: bool, settle_limit: float = 1800) -> dict[str, Any]:
    """After a --volume chunk: until the flow has settled, then `VACUUM_TABLES` when
    `vacuum_tables` (--vacuum; its seconds, or None), then the bounded tables' rows and sizes.
    `started`: the volume run's perf_counter start."""
    settling = time.perf_counter()
    await settled(database_url, limit=settle_limit)
    settle_seconds = round(time.perf_counter() - settling, 1)
    vacuum_seconds = (await autovacuum.vacuum(database_url, VACUUM_TABLES)
                      if vacuum_tables else None)
    checkpoint = {"orders": orders, "seconds": round(time.perf_counter() - started, 1),
                  "settle_seconds": settle_seconds, "vacuumed": vacuum_tables,
                  "vacuum_seconds": vacuum_seconds,
                  "tables": await table_sizes(database_url),
                  "load_1m": round(os.getloadavg()[0], 2)}
    sizes = ", ".join(f"{t} {v['rows']:,} rows {v['bytes'] / 2**20:.1f} MB"
                      for t, v in checkpoint["tables"].items())
    vacuumed = f", vacuumed in {vacuum_seconds:.2f} s" if vacuum_seconds is not None else ""
    print(f"    settled {settle_seconds:.0f} s later{vacuumed}; {sizes}", flush=True)
    return checkpoint


async def add_endpoint(database_url: str, port: int, events: list[str]) -> None:
    """One webhook endpoint on the bench's receiver (pipeline.py's: 204 to everything),
    subscribed to `events`, as an integrator's would be."""
    from services.webhooks.sealing import Sealer
    from services.webhooks.signing import new_secret

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO webhook_endpoints (url, events, secret) VALUES ($1, $2, $3)",
                           f"http://127.0.0.1:{port}/hook", events, Sealer().seal(new_secret()))
    finally:
        await conn.close()


async def volume(bench: Bench, connection: AbstractRobustConnection, orders: Orders,
                 opts: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        events = [e.strip() for e in opts.webhook_events.split(",") if e.strip()]
        if events:
            port = _free_port()
            stack.enter_context(webhook_receiver(port, RESULTS / "volume-webhook-receiver.log"))
            await add_endpoint(bench.settings.database_url, port, events)
        return await _volume(bench, connection, orders, opts) | {"webhook_events": events}


async def _volume(bench: Bench, connection: AbstractRobustConnection, orders: Orders,
                  opts: argparse.Namespace) -> dict[str, Any]:
    env = {**bench.env(), **as_shipped(), "JOB_BACKOFF_SECONDS": "1", **retention_env(opts.window)}
    worker, store, cpu = await with_worker(bench, connection, env, "volume")
    run = Run(bench, connection, worker, store, cpu)
    checkpoints = []
    each_chunk = await autovacuum.wanted(bench.settings.database_url, opts.vacuum,
                                         "VACUUM of the bounded tables after each chunk")
    started = time.perf_counter()
    try:
        done = 0
        while done < opts.volume:
            n = min(opts.chunk, opts.volume - done)
            # mail_drained cannot tell when the mails are out (the housekeeper prunes what it
            # counts): settled does, for the mails, webhooks, jobs and events of the chunk. The
            # next chunk waits for them: bursts alone outrun the senders, and their backlog
            # (unsent, so never pruned) would be measured instead of retention.
            await run.phase(f"volume {done + n:,}", orders.take(n, "v"), None, wait_mail=False)
            done += n
            checkpoints.append(await chunk_checkpoint(bench.settings.database_url, done, started,
                                                      vacuum_tables=each_chunk))
        await asyncio.sleep(opts.window)  # the last rows past the window too
    finally:
        await worker.stop()
    before = await table_sizes(bench.settings.database_url)
    keeper = Housekeeper(Settings(**{k.lower(): v for k, v in retention_env(opts.window).items()})
                         .housekeeping)
    pool = await db.create_pool(bench.settings.database_url, max_size=2, attempts=3)
    try:
        pruning = time.perf_counter()
        deleted = await keeper.once(pool)
        prune_seconds = round(time.perf_counter() - pruning, 2)
        await pool.execute(VACUUM_TABLES)
    finally:
        await pool.close()
    return {"orders": opts.volume, "window_seconds": opts.window, "checkpoints": checkpoints,
            "vacuum_each_chunk": each_chunk,
            "before_final_prune": before, "final_prune_deleted": deleted,
            "final_prune_seconds": prune_seconds,
            "after_final_prune": await table_sizes(bench.settings.database_url)}


# -- the run and the report ------------------------------------------------------------------


async def set_database(database_url: str, setting: str, value: str) -> None:
    """A setting of the bench database's sessions (opened from now on)."""
    name = urlsplit(database_url).path.lstrip("/")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'ALTER DATABASE "{name}" SET {setting} = \'{value}\'')
    finally:
        await conn.close()
    print(f"  database {name}: {setting} = {value}", flush=True)


async def log_statements(database_url: str, *, durations: bool = False,
                         cpu: bool = False) -> None:
    """Every statement of the bench database's sessions in the server's log (a per-database
    setting, for sessions opened from now on), for bench/transactions.py to count; with
    `durations`, each once with its time in the server instead (log_min_duration_statement)."""
    name = urlsplit(database_url).path.lstrip("/")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'ALTER DATABASE "{name}" SET log_statement = \'all\'')
        if durations:  # each statement once, with its time (its parse and bind too)
            await conn.execute(f'ALTER DATABASE "{name}" SET log_min_duration_statement = 0')
            await conn.execute(f'ALTER DATABASE "{name}" SET log_statement = \'none\'')
        if cpu:  # each plannable statement's CPU (the backend's, read after it)
            await conn.execute(f'ALTER DATABASE "{name}" SET log_executor_stats = on')
    finally:
        await conn.close()
    print(f"  every statement of database {name} goes to the server's log"
          + (", with its duration" if durations else ""), flush=True)


async def run_bench(bench: Bench, opts: argparse.Namespace) -> dict[str, Any]:
    s = bench.settings
    announce(bench)
    wal = await asyncio.to_thread(quorum_log.find, s.amqp_url)
    if wal is not None:
        print(f"  {quorum_log.describe(wal.max_bytes)}", flush=True)
    data: dict[str, Any] = {"run_id": bench.run_id, "at": datetime.now(UTC).isoformat(timespec="seconds"),
                            "options": vars(opts),
                            "machine": {"cpus": psutil.cpu_count(),
                                        "load_avg_1m": round(os.getloadavg()[0], 2),
                                        "quorum_log_max_bytes": wal.max_bytes if wal else None}}
    with MailSinkProcess(s.smtp_port) as mail:
        connection = None
        try:
            await create_database(s)
            if opts.plan_cache_mode:  # the server's choice of plans, for every session
                await set_database(s.database_url, "plan_cache_mode", opts.plan_cache_mode)
            if opts.log_statements or opts.log_durations or opts.log_cpu:
                await log_statements(s.database_url, durations=opts.log_durations or opts.log_cpu,
                                     cpu=opts.log_cpu)
            if opts.hops:
                await hops.install(s.database_url)
            connection = await broker.connect(s.amqp_url, attempts=3)
            await declare_topology(connection, bench.names, delivery_limit=s.queue_delivery_limit)
            orders = Orders(bench.run_id, opts.pay_share)
            if opts.volume:
                data["volume"] = await volume(bench, connection, orders, opts)
            else:
                opts.vacuum_phases = await autovacuum.wanted(s.database_url, opts.vacuum,
                                                             VACUUM_PHASES)
                rounds = []
                base = {**bench.env(), **as_shipped(), "JOB_BACKOFF_SECONDS": "1"}
                for n in range(max(1, opts.ab)):
                    variants = [("linger 0", {**base, "WORKER_LINGER_MS": "0"}),
                                (f"linger {opts.linger:g}", {**base, "WORKER_LINGER_MS": str(opts.linger)})]
                    if not opts.ab:
                        variants = [("default", base)]
                    elif n % 2:
                        variants.reverse()
                    for label, env in variants:
                        rounds.append({"round": n + 1, **await sustained_round(
                            bench, connection, orders, opts, label, env, wal)})
                data["rounds"] = rounds
        finally:
            if connection is not None:
                try:
                    channel = await connection.channel()
                    await delete_topology(channel, bench.names)
                except Exception as exc:  # report it, and go on cleaning up
                    print(f"cleanup: could not delete the topology: {exc!r}", file=sys.stderr)
                await connection.close()
            await drop_database(s)
    data["emails_delivered"] = mail.received
    return data


def _round_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in data["rounds"]:
        for part in ("burst", "steady"):
            p = r[part]
            b = p["backlog"]
            rows.append([f"{r['round']} {r['label']}", part, str(p["orders"]),
                         f"{p['screened_per_second']:.0f}/{p['orders_per_second']:.0f}"
                         f"/{p['full_flow_per_second']:.0f}",
                         f"{p['screened_ms']['p50']:.0f}/{p['screened_ms']['p99']:.0f}",
                         f"{p['active_ms']['p50']:.0f}/{p['active_ms']['p99']:.0f}",
                         f"{b.get('first_quarter', 0):.0f}->{b.get('last_quarter', 0):.0f}",
                         f"{b.get('slope_per_s', 0):+.2f}", f"{p['mail_drain_seconds']:.1f}",
                         f"{p['worker_busy']:.2f}", f"{p['worker_cpu_ms_per_order']:.2f}",
                         f"{p['postgres_cpu_ms_per_order']:.2f}", f"{p['cpu_cores'].get('other', 0):.2f}"])
    return rows


COLUMNS = ("round", "phase", "orders", "orders/s scr/done/full", "screened p50/p99 ms", "active p50/p99 ms",
           "in flight", "growth/s", "mail +s", "busy", "worker ms/order", "pg ms/order", "other")


def print_report(data: dict[str, Any]) -> None:
    m = data["machine"]
    print(f"\nOrdermill sustained-load benchmark {data['run_id']} ({data['at']}, {data['commit']}):"
          f" {m['cpus']} CPUs, load {m['load_avg_1m']}, {data['elapsed_seconds']:.0f} s in all")
    if (wal_bytes := m.get("quorum_log_max_bytes")) is not None:
        print(quorum_log.describe(wal_bytes))
    if "rounds" in data:
        print("screened: order published -> order.screened; active: payment published -> service"
              " Active;\nin flight: orders not done, mean of the first -> last quarter of the"
              " publishing; growth: its slope.\n")
        print(_table(COLUMNS, _round_rows(data)))
        print()
        reference = data["options"].get("reference", "done")
        for r in data["rounds"]:
            s, b = r["steady"], r["burst"]
            rates = ", ".join(f"{name} {b[REFERENCES[name]]:.1f}/s"
                              + (f" (80 % = {0.8 * b[REFERENCES[name]]:.1f}/s)" if name != "screened" else "")
                              for name in ("full", "done", "screened"))
            print(f"round {r['round']} {r['label']}: {r['worker_pids']} process(es)"
                  f" (WORKER_PROCESSES={r['env'].get('WORKER_PROCESSES', 'auto')}); burst {rates}")
            share = (f"a fixed rate (--rate), {s['target_rate'] / b[REFERENCES[reference]]:.0%}"
                     if data["options"].get("rate") else f"{data['options']['rate_share']:.0%}")
            print(f"round {r['round']} {r['label']}: steady at {s['target_rate']:g}/s"
                  f" ({share} of the burst's {reference} rate, {REFERENCE_NAMES[reference]}:"
                  f" {b[REFERENCES[reference]]:.1f}/s):"
                  f" screened p99 {s['screened_ms']['p99']:.0f} ms (target < 250),"
                  f" active p99 {s['active_ms']['p99']:.0f} ms (< 500), worker CPU per order"
                  f" {r['steady_vs_burst_cpu']:.2f}x the burst's (<= 1.3); backlog growth"
                  f" {s['backlog'].get('slope_per_s', 0):+.2f} orders/s;"
                  f" {s['transactions_per_order']} transactions per order steady"
                  f" ({r['burst']['transactions_per_order']} in the burst,"
                  f" {r['transactions_per_order']} over the round)")
        if line := vacuum_line(data):
            print(line)
        for r in data["rounds"]:
            for part in ("burst", "steady"):
                if "hops" in r[part]:
                    print_hops(f"round {r['round']} {r['label']}, {part}", r[part]["hops"])
    if "volume" in data:
        v = data["volume"]
        print(f"volume: {v['orders']:,} orders, retention windows {v['window_seconds']:g} s\n")
        rows = [[f"{c['orders']:,}", f"{c['seconds']:.0f}",
                 "" if c.get("vacuum_seconds") is None else f"{c['vacuum_seconds']:.2f}",
                 *(f"{c['tables'][t]['rows']:,} / {c['tables'][t]['bytes'] / 2**20:.1f} MB"
                   for t in (*BOUNDED_TABLES, "orders"))] for c in v["checkpoints"]]
        for label, key in (("before prune", "before_final_prune"), ("after prune", "after_final_prune")):
            rows.append([label, "", "", *(f"{v[key][t]['rows']:,} / {v[key][t]['bytes'] / 2**20:.1f} MB"
                                          for t in (*BOUNDED_TABLES, "orders"))])
        print(_table(("after orders", "secs", "vacuum s", *BOUNDED_TABLES, "orders"), rows))
        print(f"final prune: {v['final_prune_deleted']} in {v['final_prune_seconds']} s")
    print(f"customer emails delivered to the bench's SMTP sink: {data['emails_delivered']:,}")


def vacuum_line(data: dict[str, Any]) -> str | None:
    """The report's line for the rounds' vacuums (--vacuum), as pipeline.py's (both through
    bench/autovacuum.py): each round's before its burst and before its steady phase; None when
    none ran. (--volume's, after each chunk, are a column of its table.)"""
    if not data["options"].get("vacuum_phases"):
        return None
    seconds = {f"round {r['round']} {r['label']}": r["vacuum_seconds"] for r in data["rounds"]
               if r.get("vacuum_seconds")}  # a JSON from before they were recorded: none
    return autovacuum.report_line(VACUUM_PHASES, data["options"]["vacuum"], seconds) \
        if seconds else None


def print_hops(title: str, h: dict[str, Any]) -> None:
    per = h["per_order"]
    print(f"\n{title}: per order {per.get('relay_passes', 0):.2f} relay passes,"
          f" {per.get('events', 0):.2f} events, {per.get('job_claims', 0):.2f} job claims;"
          f" {h['checkpoints']} checkpoint(s)")
    if sizes := h.get("provisioning_batches"):
        t, p = sizes["per_transaction"], sizes.get("per_payment") or {}
        print(f"provisioning consumer: {sizes['transactions']} transactions, messages in one"
              f" p50/p99/max {t['p50']:.0f}/{t['p99']:.0f}/{t['max']:.0f} (mean {sizes['mean']});"
              f" as a payment saw it p50/p99 {p.get('p50', 0):.0f}/{p.get('p99', 0):.0f}")
    for path, b in h["breakdown"].items():
        e = b["end_to_end"]
        print(f"{path}: {b['orders']} orders, end to end p50/p99 {e['p50']:.0f}/{e['p99']:.0f} ms;"
              f" tail = the slowest {b['tail_orders']}")
        print(_table(("hop", "p50 ms", "p90", "p99", "max", "mean", "tail mean"),
                     [[x["hop"], f"{x['p50']:.0f}", f"{x['p90']:.0f}", f"{x['p99']:.0f}",
                       f"{x['max']:.0f}", f"{x['mean']:.0f}", f"{x['tail_mean']:.0f}"]
                      for x in b["hops"]]))
    slow = sorted((s for s in h["timeline"] if s["screened_p99"] is not None),
                  key=lambda s: -s["screened_p99"])[:8]
    if slow:
        print("slowest seconds (by screened p99 of the orders published in them):")
        print(_table(("t s", "orders", "screened p99", "worst hop", "ms", "job claims",
                      "relay passes", "ready", "events", "mails", "ckpt"),
                     [[str(s["t"]), str(s["orders"]), f"{s['screened_p99']:.0f}", s["worst_hop"],
                       f"{s['worst_hop_ms']:.0f}", str(s["job_claims"]), str(s["relay_passes"]),
                       str(s["ready"]), str(s["events"]), str(s["mails"]), str(s["checkpoints"])]
                      for s in sorted(slow, key=lambda s: s["t"])]))


def _process_groups(text: str) -> list[list[str]]:
    """--processes: every worker once, in the groups given (a queue no process consumed would
    only grow, and a worker twice would take its queue's messages in two processes)."""
    groups = [group.replace(",", " ").split() for group in text.split("/")]
    named = [service for group in groups for service in group]
    if [] in groups or sorted(named) != sorted(SERVICE_BINDINGS):
        raise argparse.ArgumentTypeError(
            f"name every worker once: {', '.join(sorted(SERVICE_BINDINGS))}")
    return groups


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--warmup", type=int, default=300, help="orders before the burst")
    parser.add_argument("--orders", type=int, default=1500, help="orders in the burst")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the steady phase")
    parser.add_argument("--rate-share", type=float, default=0.8,
                        help="steady rate as a share of the burst's throughput")
    parser.add_argument("--reference", choices=sorted(REFERENCES), default="full",
                        help="the burst's rate that --rate-share takes a share of: full (every"
                             " order screened, every paid one Active, every mail sent: issue"
                             " 15's reference), done (screened and Active, mails not waited"
                             " for: the reference before stop 23) or screened")
    parser.add_argument("--rate", type=float, default=0.0, help="a fixed steady rate instead")
    parser.add_argument("--pay-share", type=float, default=0.9, help="orders paid when screened")
    parser.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                        help="rounds of WORKER_LINGER_MS=0 against --linger, alternating")
    parser.add_argument("--linger", type=float,
                        default=Settings.model_fields["worker_linger_ms"].default,
                        help="WORKER_LINGER_MS of --ab's B side (default: what ships)")
    parser.add_argument("--volume", type=int, default=0, metavar="N",
                        help="only the bounded-tables run: N orders through the full flow")
    parser.add_argument("--chunk", type=int, default=2000, help="--volume: orders per burst")
    parser.add_argument("--window", type=float, default=30.0,
                        help="--volume: every retention window, seconds")
    parser.add_argument("--vacuum", choices=autovacuum.CHOICES, default="auto",
                        help="VACUUM the tables after each chunk (--volume), or VACUUM"
                             " (ANALYZE) the database after the warm-up and after the burst,"
                             " as autovacuum would (auto: when the server's autovacuum is off)")
    parser.add_argument("--webhook-events", default="order.placed,service.created",
                        help="--volume: one webhook endpoint subscribed to these ('' for none)")
    parser.add_argument("--log-statements", action="store_true",
                        help="log every statement of the bench database (log_statement = all,"
                             " set on the database) for bench/transactions.py")
    parser.add_argument("--log-durations", action="store_true",
                        help="as --log-statements, each statement with its time in the server"
                             " (log_min_duration_statement = 0): bench/transactions.py adds"
                             " them up by kind")
    parser.add_argument("--plan-cache-mode", choices=["auto", "force_generic_plan",
                                                      "force_custom_plan"],
                        help="PostgreSQL's plan_cache_mode for the bench database's sessions")
    parser.add_argument("--log-cpu", action="store_true",
                        help="as --log-durations, and the backends' CPU read after each"
                             " statement (log_executor_stats): CPU by kind of transaction")
    parser.add_argument("--hops", action="store_true",
                        help="stamp events and jobs in the bench database (bench/hops.py) and"
                             " report each order's latency hop by hop, and a timeline")
    parser.add_argument("--processes", type=_process_groups, default=None,
                        metavar="'SERVICES/SERVICES...'",
                        help="the workers in several processes instead of one `ordermill run`:"
                             " groups of services (spaces or commas) separated by '/', e.g."
                             " 'placement fraud review webhooks alerts/provisioning notify'")
    args = parser.parse_args(argv)
    if min(args.orders, args.warmup) < 1 or args.seconds <= 0 or not 0 < args.rate_share <= 1:
        parser.error("--orders and --warmup at least 1, --seconds positive, --rate-share in (0, 1]")
    if not 0 <= args.pay_share <= 1 or args.window <= 0 or args.chunk < 1:
        parser.error("--pay-share in [0, 1], --window positive, --chunk at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        data = asyncio.run(run_bench(Bench.create(), opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: workers stopped, bench database and queues removed", file=sys.stderr)
        raise SystemExit(130) from None
    data["commit"] = _git_commit()
    data["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    path = RESULTS / ("volume.json" if opts.volume else "sustained.json")
    path.write_text(json.dumps(data, indent=2) + "\n")
    print_report(data)
    print(f"\nwritten to {path.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
