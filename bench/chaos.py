"""Ordermill chaos case: two `ordermill run` processes, one SIGKILLed every few seconds, RabbitMQ
and PostgreSQL restarted once each (and their connections cut once each), while orders are
placed and paid.

One run, in its own database (om_bench_<hex>) and broker namespace (bench.<hex>), both removed at
the end. By default on a RabbitMQ node and a PostgreSQL instance of the bench's own
(bench/own_servers.py: own ports, data dirs and node name, removed at the end), so that they can
really be restarted; the machine's servers on 5672 and 5432 are never stopped (others use them).
With --shared-servers the run uses the machine's servers and only cuts connections.

- Two `ordermill run` processes (every service in each) reach RabbitMQ and PostgreSQL through
  two TCP proxies this bench owns (tests/test_processes.py's `Proxy`). A *cut* is a proxy taken
  down for --outage seconds: every open connection of both workers drops without a goodbye and
  new ones are refused, then it comes back (a network failure). A *restart* is the server
  itself stopped and started again on the same data: RabbitMQ by `rabbitmqctl stop` (or its VM
  SIGKILLed, --mq-restart kill), PostgreSQL by `pg_ctl restart -m fast` (or immediate,
  --pg-restart). The storefront and the bench's own checks connect to the servers directly
  (the storefront is cut off by a restart too, and publishes again until confirmed).
- A fake WHM (tests/fakes/whm.py) answers every call after 20-250 ms (uniformly at random).
- A storefront places --orders orders at --rate (half `business`, a cPanel product on the fake
  WHM, half `starter`, autorelease; both set up on payment) and pays each one as soon as its
  `order.placed` tells the invoice. It hears events on a durable queue of its own (acked after
  handling), so that a restart loses none.
- While orders go out, a random one of the two workers is SIGKILLed every --kill-min to
  --kill-max seconds and started again at once. Own servers: RabbitMQ's connections are cut at
  a fifth of the placing, RabbitMQ restarted at two fifths, PostgreSQL's connections cut at
  three fifths, PostgreSQL restarted at four fifths (--no-cuts: the restarts at a third and two
  thirds). Shared servers: the cuts at a third and two thirds.
- Then the kills stop and the bench waits (up to --settle s) for every paid setup.

Measured, from the bench's database, the fake WHM and a sampler of the `jobs` table (every
0.25 s, direct connection): every paid setup complete, and when the last one completed after
the last kill, cut or restart; accounts created twice on the WHM; orders lost or screened twice;
claims that sat `running` under a dead runner's lease, and for how long. A claim is a dead
runner's when its lease ran out while it was still `running` (a live runner renews it every
third of the lease), or when it stayed `running` longer than the lease's renewal period with its
lease never renewed.

Run: PYTHONPATH=$PWD .venv/bin/python bench/chaos.py [--orders N] [--rate R] ...
The report is printed and written as JSON to bench/results/chaos.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesParser
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import psutil
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from own_servers import OwnPostgres, OwnRabbit
from pipeline import Bench, MailSink, _git_commit, drop_database
from provisioning import (
    ORDERMILL,
    RESULTS,
    ROOT,
    SCREENING_KEYS,
    SETUP_KEYS,
    TOKEN_ENV,
    Storefront,
    remove_topology,
)

from cli.catalog import load_catalog, read_catalog
from cli.main import loop_factory
from shared import broker, db
from shared.parties import amqp_user
from shared.settings import Settings
from shared.topology import SERVICE_BINDINGS, Names, declare_topology

CATALOG = ROOT / "catalog.example.toml"
TESTS = str(ROOT / "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from fakes.whm import FakeWhm, _Answer  # noqa: E402

from test_processes import Proxy, through  # noqa: E402

CPANEL, AUTORELEASE = "business", "starter"
SAMPLE_SECONDS = 0.25
PUBLISH_TIMEOUT = 10.0  # seconds for a confirm, then the storefront publishes again
PUBLISH_PATIENCE = 120.0  # seconds a storefront keeps publishing a message


# -- the fake cPanel server: 20-250 ms an answer, every createacct outcome kept -------------------


class JitteryWhm(FakeWhm):
    """FakeWhm answering each call after a random delay in [low, high] s; keeps what each
    createacct did (created, or refused and why), by username and by domain."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self.created: Counter[str] = Counter()  # username -> accounts created
        self.created_domains: Counter[str] = Counter()
        self.refused: list[dict[str, str]] = []
        super().__init__()

    @property  # type: ignore[override]
    def delay(self) -> float:
        return random.uniform(self.low, self.high)

    @delay.setter
    def delay(self, value: float) -> None:
        pass  # FakeWhm.__init__ sets it; the range stands

    def _createacct(self, params: dict[str, str]) -> _Answer:
        answer = super()._createacct(params)
        user, domain = params.get("username", "").lower(), params.get("domain", "").lower()
        if answer.result == 1:
            self.created[user] += 1
            self.created_domains[domain] += 1
        else:
            self.refused.append({"username": user, "domain": domain, "reason": answer.reason})
        return answer


# -- the SMTP server: every mail's Message-ID and when it came -----------------------------------


class CountingMailSink(MailSink):
    """bench/pipeline.py's MailSink, also keeping when each Message-ID came: a mail sent twice
    (its sender killed between the server's acceptance and its record) shows as two."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.deliveries: dict[str, list[float]] = {}

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        message = BytesParser().parsebytes(envelope.content, headersonly=True)
        self.deliveries.setdefault(str(message["Message-ID"] or ""), []).append(time.time())
        return await super().handle_DATA(server, session, envelope)


# -- the bench database -------------------------------------------------------------------------


async def create_database(s: Settings, whm_port: int) -> None:
    """Migrated, the sample catalog loaded, web1 on the fake WHM (room for every account)."""
    await db.ensure_database(s.database_url, attempts=3)
    pool = await db.create_pool(s.database_url, max_size=2, attempts=3)
    try:
        await db.migrate(pool)
        async with pool.acquire() as conn, conn.transaction():
            await load_catalog(conn, read_catalog(CATALOG))
            await conn.execute(
                "UPDATE servers SET hostname = $1, token_env = $2, max_accounts = 100000"
                " WHERE name = 'web1'", f"127.0.0.1:{whm_port}", TOKEN_ENV)
    finally:
        await pool.close()


# -- the two workers --------------------------------------------------------------------------------


class Worker:
    """One `ordermill run` (every service), killed and started again at will; its stderr is
    appended to one log across its lives."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.proc: asyncio.subprocess.Process | None = None
        self.lives: list[dict[str, Any]] = []

    async def start(self) -> None:
        self._log.write(f"--- {self.name} started at {time.time():.3f}\n".encode())
        self._log.flush()
        self.proc = await asyncio.create_subprocess_exec(
            str(ORDERMILL), "run", env=self.env, stdout=self._log, stderr=self._log)
        self.lives.append({"pid": self.proc.pid, "started": time.time(), "ended": None, "how": None})

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> float:
        """SIGKILL: no chance to finish, release or renew anything. Returns when it was sent."""
        assert self.proc is not None
        at = time.time()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        self.lives[-1].update(ended=at, how="SIGKILL")
        return at

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=45)
                how = f"SIGTERM, exit {self.proc.returncode}"
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
                how = "SIGTERM ignored for 45 s: SIGKILL"
            self.lives[-1].update(ended=time.time(), how=how)
        self._log.close()

    def exited_by_itself(self) -> list[dict[str, Any]]:
        return [life for life in self.lives if life["how"] and life["how"].startswith("exited")]


# -- the storefront: places orders, pays each once its invoice is known -----------------------------


@dataclass
class Shop(Storefront):
    """bench/provisioning.py's Storefront, also hearing order.placed: each order is paid (once)
    as soon as its invoice is known, as a customer at a checkout would. As a storefront that
    must survive a broker restart: it hears events on a durable queue of its own (acked once
    handled: a restart loses nothing published meanwhile) and publishes each message again,
    the same message id, until the broker confirms it."""

    placed: dict[str, dict[str, Any]] = field(default_factory=dict)  # ref -> order.placed body
    paid: dict[str, float] = field(default_factory=dict)  # ref -> payment confirmed
    heard: Counter[str] = field(default_factory=Counter)  # routing key -> events (duplicates too)
    payments: set[asyncio.Task[None]] = field(default_factory=set)
    pay_errors: list[str] = field(default_factory=list)
    publish_retries: Counter[str] = field(default_factory=Counter)  # routing key -> messages published again

    async def listen(self, connection: AbstractRobustConnection, exchange_name: str) -> None:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.declare_queue(shop_queue(exchange_name), durable=True,
                                            arguments={"x-queue-type": "quorum"})
        for key in (*SCREENING_KEYS, *SETUP_KEYS, "order.placed"):
            await queue.bind(exchange_name, routing_key=key)
        await queue.consume(self._on_any)

    async def _on_any(self, message: AbstractIncomingMessage) -> None:
        if message.routing_key == "order.placed":
            await self._on_placed(message)
        else:
            await self._on_event(message)
        await message.ack()

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        self.heard[message.routing_key or ""] += 1
        await super()._on_event(message)

    async def _on_placed(self, message: AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        ref = body.get("order_ref")
        self.heard["order.placed"] += 1
        if ref not in self.sent or ref in self.placed:
            return  # not ours, or heard again (an event republished after a kill)
        self.placed[ref] = body
        task = asyncio.create_task(self._pay(ref, body))
        self.payments.add(task)
        task.add_done_callback(self.payments.discard)

    async def _publish(self, key: str, ref: str, body: dict[str, Any]) -> None:
        self.sent[ref] = time.time()
        await self._until_confirmed(key, broker.json_message(body, routing_key=key,
                                                             user_id=self.user_id))

    async def _until_confirmed(self, key: str, message: aio_pika.Message) -> None:
        """Publish until confirmed (PUBLISH_PATIENCE s at most): while the broker restarts a
        publish fails or never hears its confirm. A message that did arrive is published again
        with its message id: the workers' inbox takes it once."""
        deadline = time.monotonic() + PUBLISH_PATIENCE
        again = False
        while True:
            try:
                await asyncio.wait_for(broker.publish(self.exchange, key, message), PUBLISH_TIMEOUT)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                if not again:
                    self.publish_retries[key] += 1
                again = True
                await asyncio.sleep(0.5)

    async def _pay(self, ref: str, body: dict[str, Any]) -> None:
        message = broker.json_message(
            {"invoice_id": body["invoice_id"], "amount": str(body["total"]),
             "currency": body["currency"], "gateway": "chaos", "transaction_id": f"chaos-{ref}"},
            routing_key="payment.received", user_id=self.user_id)
        try:
            await self._until_confirmed("payment.received", message)
            self.paid[ref] = time.time()
        except Exception as exc:  # reported
            self.pay_errors.append(f"{ref}: {exc!r}")


def shop_queue(exchange_name: str) -> str:
    return f"{exchange_name}.chaos-shop"


# -- the jobs sampler: who holds which claim, and for how long ---------------------------------------


@dataclass
class Claim:
    job_id: int
    token: str  # leased_by: runner id / claim nonce
    kind: str
    first_seen: float
    last_seen: float
    lease_until: float  # the latest seen
    renewed: bool = False
    expired_seen: bool = False  # seen `running` with its lease run out
    gone: float | None = None  # first sample without it (finished, failed or taken over)


class JobSampler:
    """Every SAMPLE_SECONDS, the `running` jobs with their claim token and lease, read on a
    connection of the bench's own (not through the proxy)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.claims: dict[tuple[int, str], Claim] = {}
        self.samples = 0
        self.errors = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        conn: asyncpg.Connection | None = None
        try:
            while True:
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self.database_url)
                    await self._sample(conn)
                except (OSError, asyncpg.PostgresError):
                    self.errors += 1
                    conn = None
                await asyncio.sleep(SAMPLE_SECONDS)
        finally:
            if conn is not None:
                await conn.close()

    async def _sample(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM clock_timestamp())::float8 AS now, id, kind, leased_by,"
            " extract(epoch FROM lease_until)::float8 AS lease_until"
            " FROM jobs WHERE status = 'running'")
        now = rows[0]["now"] if rows else time.time()
        self.samples += 1
        seen = set()
        for r in rows:
            key = (r["id"], r["leased_by"])
            seen.add(key)
            claim = self.claims.get(key)
            if claim is None:
                claim = self.claims[key] = Claim(r["id"], r["leased_by"], r["kind"], now, now,
                                                 r["lease_until"])
            claim.last_seen = now
            if r["lease_until"] > claim.lease_until + 0.001:
                claim.renewed = True
            claim.lease_until = r["lease_until"]
            if r["lease_until"] < now:
                claim.expired_seen = True
        for key, claim in self.claims.items():
            if claim.gone is None and key not in seen:
                claim.gone = now

    def dead(self, lease: float) -> list[Claim]:
        """Claims a dead runner held: seen expired while running, or running longer than a
        renewal period (a third of the lease, and some) without ever being renewed."""
        return [c for c in self.claims.values() if c.expired_seen
                or (not c.renewed and c.last_seen - c.first_seen > lease / 3 + 2)]


class QueueSampler:
    """Every second, the depth of each work queue (a passive declare on the bench's own
    connection; nothing while the broker is away): the backlog a restart leaves behind."""

    def __init__(self, connection: AbstractRobustConnection, names: Names) -> None:
        self.connection, self.names = connection, names
        self.depths: list[tuple[float, dict[str, int]]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                channel = await self.connection.channel()
                try:
                    while True:
                        depths = {svc: (await channel.declare_queue(
                            self.names.queue(svc), passive=True)).declaration_result.message_count
                            for svc in SERVICE_BINDINGS}
                        self.depths.append((time.time(), depths))
                        await asyncio.sleep(1.0)
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
            await asyncio.sleep(1.0)

    def peaks(self) -> dict[str, dict[str, float]]:
        """Per queue: its deepest backlog, when, and when it was last seen above 10."""
        out = {}
        for svc in SERVICE_BINDINGS:
            series = [(at, d[svc]) for at, d in self.depths]
            if not series:
                continue
            at, depth = max(series, key=lambda x: x[1])
            busy = [a for a, n in series if n > 10]
            out[svc] = {"max": depth, "at": round(at - START, 1),
                        "last_above_10": round(busy[-1] - START, 1) if busy else None}
        return out


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class Options:
    orders: int
    rate: float
    kill_min: float
    kill_max: float
    outage: float
    settle: float
    cpanel_share: float
    whm_low: float
    whm_high: float
    seed: int
    own_servers: bool  # restart a RabbitMQ node and a PostgreSQL instance of the bench's own
    cuts: bool  # and cut their connections through the proxies
    mq_restart: str  # stop | kill
    pg_restart: str  # fast | immediate


@dataclass
class Chaos:
    kills: list[dict[str, Any]] = field(default_factory=list)
    outages: list[dict[str, Any]] = field(default_factory=list)


async def kill_loop(workers: list[Worker], chaos: Chaos, opts: Options, rng: random.Random,
                    stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=rng.uniform(opts.kill_min, opts.kill_max))
        if stop.is_set():
            return
        worker = rng.choice(workers)
        if not worker.alive():  # it exited by itself: a finding, reported; started again
            worker.lives[-1].update(ended=time.time(), how=f"exited {worker.proc.returncode}")
        else:
            at = await worker.kill()
            chaos.kills.append({"worker": worker.name, "pid": worker.lives[-1]["pid"], "at": at,
                                "lived": round(at - worker.lives[-1]["started"], 1)})
            print(f"  {at - START:6.1f} s  SIGKILL {worker.name} (pid {worker.lives[-1]['pid']})",
                  flush=True)
        await worker.start()


async def outage(proxy: Proxy, what: str, at: float, seconds: float, chaos: Chaos) -> None:
    """A cut: the proxy down for `seconds` (connections dropped, new ones refused), then up."""
    await asyncio.sleep(max(0.0, at - time.time()))
    down = time.time()
    dropped = len(proxy.writers)
    proxy.down()
    print(f"  {down - START:6.1f} s  {what} cut ({dropped} connection ends dropped)", flush=True)
    await asyncio.sleep(seconds)
    proxy.up()
    print(f"  {time.time() - START:6.1f} s  {what} up", flush=True)
    chaos.outages.append({"what": f"{what} cut", "down": down, "up": time.time(),
                          "connections_dropped": dropped})


async def restart(server: OwnRabbit | OwnPostgres, what: str, how: str, at: float,
                  chaos: Chaos) -> None:
    """A restart of the server itself, on its data: down when the stop begins, up when it
    accepts clients again."""
    await asyncio.sleep(max(0.0, at - time.time()))
    down = time.time()
    print(f"  {down - START:6.1f} s  {what} restart ({how}) begins", flush=True)
    if isinstance(server, OwnRabbit):
        stop_s, start_s = await server.restart(how)
        extra = {"stop_s": round(stop_s, 1), "start_s": round(start_s, 1)}
    else:
        extra = {"restart_s": round(await server.restart(how), 1)}
    up = time.time()
    print(f"  {up - START:6.1f} s  {what} up again ({up - down:.1f} s)", flush=True)
    chaos.outages.append({"what": f"{what} restart ({how})", "down": down, "up": up, **extra})


def disruptions(opts: Options, mq: Proxy, pg: Proxy, own_mq: OwnRabbit | None,
                own_pg: OwnPostgres | None, placing: float, chaos: Chaos) -> list[Any]:
    """The cuts and restarts, spread evenly over the placing, each at its own moment."""
    steps: list[tuple[str, Any]] = []
    if opts.cuts or own_mq is None:
        steps.append(("cut", lambda at: outage(mq, "RabbitMQ", at, opts.outage, chaos)))
    if own_mq is not None:
        steps.append(("restart", lambda at: restart(own_mq, "RabbitMQ", opts.mq_restart, at, chaos)))
    if opts.cuts or own_pg is None:
        steps.append(("cut", lambda at: outage(pg, "PostgreSQL", at, opts.outage, chaos)))
    if own_pg is not None:
        steps.append(("restart", lambda at: restart(own_pg, "PostgreSQL", opts.pg_restart, at, chaos)))
    return [make(START + placing * (n + 1) / (len(steps) + 1)) for n, (_, make) in enumerate(steps)]


START = time.time()


async def setups_done(s: Settings) -> tuple[int, int]:
    """(services of paid invoices, of them Active)."""
    conn = await asyncpg.connect(s.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS paid, count(*) FILTER (WHERE sv.status = 'Active') AS active"
            " FROM services sv JOIN invoices i ON i.order_id = sv.order_id WHERE i.status = 'Paid'")
    finally:
        await conn.close()
    return row["paid"], row["active"]


STARTED: list[OwnRabbit | OwnPostgres] = []  # for main's last resort, a second Ctrl-C


def remove_left_over() -> None:
    """Without the event loop (a second Ctrl-C stopped it before the cleanup ran): the own
    RabbitMQ node's process group SIGKILLed, PostgreSQL stopped (immediate), their directories
    removed."""
    for server in STARTED:
        if not server.dir.exists():
            continue
        if isinstance(server, OwnRabbit):
            if server.proc is not None and server.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.proc.pid, signal.SIGKILL)
        elif (server.data / "postmaster.pid").exists():
            subprocess.run([*server.as_user, str(server.bin / "pg_ctl"), "-D", str(server.data),
                            "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60,
                           check=False)
        shutil.rmtree(server.dir, ignore_errors=True)


async def run_chaos(bench: Bench, opts: Options) -> dict[str, Any]:
    """Own servers first (if asked), then the run on them; everything removed at the end."""
    own_mq = own_pg = None
    try:
        if opts.own_servers:
            own_mq, own_pg = OwnRabbit(), OwnPostgres()
            STARTED.extend((own_mq, own_pg))
            print(f"own servers: RabbitMQ node {own_mq.node} on port {own_mq.port}, PostgreSQL "
                  f"{own_pg.bin.parent.name} on port {own_pg.port} ...", flush=True)
            mq_s, pg_s = await asyncio.gather(own_mq.start(), own_pg.start())
            print(f"  up: RabbitMQ in {mq_s:.1f} s, PostgreSQL in {pg_s:.1f} s", flush=True)
            url = urlsplit(bench.settings.database_url)
            bench = Bench(bench.run_id, bench.settings.model_copy(update={
                "amqp_url": own_mq.url,
                "database_url": urlunsplit(urlsplit(own_pg.url)._replace(path=url.path))}))
        report = await chaos_on(bench, opts, own_mq, own_pg)
    finally:
        for server in (own_mq, own_pg):
            if server is not None:
                await server.close()
    if own_mq is not None and own_pg is not None:
        report["servers"] = {"own": True, "rabbitmq_node": own_mq.node, "rabbitmq_port": own_mq.port,
                             "postgresql_port": own_pg.port, "postgresql": str(own_pg.bin)}
    else:
        report["servers"] = {"own": False}
    return report


async def chaos_on(bench: Bench, opts: Options, own_mq: OwnRabbit | None,
                   own_pg: OwnPostgres | None) -> dict[str, Any]:
    global START
    s = bench.settings
    rng = random.Random(opts.seed)
    whm = JitteryWhm(opts.whm_low, opts.whm_high)
    mq, pg = Proxy(urlsplit(s.amqp_url).port or 5672), Proxy(urlsplit(s.database_url).port or 5432)
    connection: AbstractRobustConnection | None = None
    workers: list[Worker] = []
    chaos = Chaos()
    sampler = JobSampler(s.database_url)
    queues: QueueSampler | None = None
    chaos_tasks: list[asyncio.Task[Any]] = []  # the killer, the cuts and restarts
    print(f"chaos run {bench.run_id}: database {s.database_url.rsplit('/', 1)[1]}, namespace "
          f"{s.namespace}; {opts.orders} orders at {opts.rate:g}/s", flush=True)
    with CountingMailSink(s.smtp_port) as mail:
        try:
            await whm.start()
            await mq.start()
            await pg.start()
            await create_database(s, whm.port)
            connection = await broker.connect(s.amqp_url, attempts=3)
            await declare_topology(connection, bench.names, delivery_limit=s.queue_delivery_limit)
            env = {**bench.env(), "WHM_SCHEME": "http", TOKEN_ENV: whm.token,
                   "AMQP_URL": through(s.amqp_url, mq), "DATABASE_URL": through(s.database_url, pg)}
            lease = float(env.get("JOB_LEASE_SECONDS", s.job_lease_seconds))
            shop = Shop(exchange=await (await broker.open_publisher(connection)).get_exchange(
                bench.names.exchange), user_id=amqp_user(s.amqp_url))
            await shop.listen(connection, bench.names.exchange)
            workers = [Worker(f"worker-{n}", env, RESULTS / f"chaos-worker-{n}.log") for n in (1, 2)]
            for w in workers:
                await w.start()
            await wait_for_consumers(connection, bench.names, workers)
            sampler.start()
            queues = QueueSampler(connection, bench.names)
            queues.start()

            refs = [(f"chaos-{bench.run_id}-{n:05d}",
                     CPANEL if rng.random() < opts.cpanel_share else AUTORELEASE)
                    for n in range(opts.orders)]
            for ref, _ in refs:
                shop.sent[ref] = 0.0
            placing = opts.orders / opts.rate
            START = time.time()
            stop_kills = asyncio.Event()
            killer = asyncio.create_task(kill_loop(workers, chaos, opts, rng, stop_kills))
            outages = [asyncio.create_task(d)
                       for d in disruptions(opts, mq, pg, own_mq, own_pg, placing, chaos)]
            chaos_tasks += [killer, *outages]
            await shop.steady(lambda r: shop.place(r[0], r[1]), refs, opts.rate)
            placed_at = time.time()
            print(f"  {placed_at - START:6.1f} s  {len(refs)} orders published", flush=True)
            await asyncio.gather(*outages)
            # Kills go on until every order has been paid (or no more order.placed comes).
            await wait_until(lambda: len(shop.paid) + len(shop.pay_errors) >= len(refs), 60)
            while shop.payments:
                await asyncio.gather(*list(shop.payments))
            stop_kills.set()
            await killer
            last_disruption = max([k["at"] for k in chaos.kills] + [o["up"] for o in chaos.outages],
                                  default=time.time())
            print(f"  {time.time() - START:6.1f} s  {len(shop.paid)} payments published; kills "
                  f"stopped ({len(chaos.kills)} in all)", flush=True)
            settled = await settle(s, shop, last_disruption, opts.settle)
            sampler_stop_at = time.time()
            await sampler.stop()
            await queues.stop()
            for w in workers:
                await w.stop()
            report = await gather_report(bench, opts, shop, whm, chaos, sampler, workers, lease,
                                         last_disruption, settled, placed_at, connection)
            report["timeline"]["sampler_stopped"] = round(sampler_stop_at - START, 1)
            report["queue_backlog"] = queues.peaks()
        finally:
            # Interrupted or failed: no kill or restart may go on behind the cleanup (a
            # restart finishing after the node's directory is removed would leave it running).
            for task in chaos_tasks:
                task.cancel()
            await asyncio.gather(*chaos_tasks, return_exceptions=True)
            await sampler.stop()
            if queues is not None:
                await queues.stop()
            for w in workers:
                with contextlib.suppress(Exception):
                    await w.stop()
            mq.close()
            pg.close()
            await whm.stop()
            if connection is not None:
                await remove_topology(connection, bench.names)
                with contextlib.suppress(Exception):
                    channel = await connection.channel()
                    await channel.queue_delete(shop_queue(bench.names.exchange))
                    await channel.close()
                await connection.close()
            await drop_database(s)
    report["emails_delivered"] = mail.received
    report["emails_twice"] = mails_twice(mail, chaos)
    return report


def mails_twice(mail: CountingMailSink, chaos: Chaos) -> dict[str, Any]:
    """Mails that came more than once, each put down to what happened within a second after
    its first delivery: its sender SIGKILLed, or a server's connections cut or restarted."""
    kills = [k["at"] for k in chaos.kills]
    downs = [o["down"] for o in chaos.outages]
    why: Counter[str] = Counter()
    for times in mail.deliveries.values():
        if len(times) < 2:
            continue
        first = min(times)
        if any(0 <= k - first <= 1.0 for k in kills):
            why["a SIGKILL within 1 s"] += 1
        elif any(0 <= d - first <= 1.0 for d in downs):
            why["a cut or restart within 1 s"] += 1
        else:
            why["neither"] += 1
    return {"distinct": len(mail.deliveries),
            "twice_or_more": sum(1 for times in mail.deliveries.values() if len(times) > 1),
            "extra_deliveries": mail.received - len(mail.deliveries), "after": dict(why)}


async def wait_for_consumers(connection: AbstractRobustConnection, names: Names,
                             workers: list[Worker]) -> None:
    """Both workers consuming every work queue (two consumers each) before the chaos starts."""
    channel = await connection.channel()
    try:
        queues = [await channel.declare_queue(names.queue(svc), passive=True) for svc in SERVICE_BINDINGS]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            for w in workers:
                if not w.alive():
                    raise RuntimeError(f"{w.name} exited at start: see {w.log_path}")
            counts = [(await q.declare()).consumer_count for q in queues]
            if all(n >= len(workers) for n in counts):
                return
            await asyncio.sleep(0.3)
    finally:
        await channel.close()
    raise RuntimeError("the workers did not start consuming within 90 s")


async def wait_until(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.2)
    return condition()


async def settle(s: Settings, shop: Shop, last_kill: float, limit: float) -> dict[str, Any]:
    """Wait for every paid setup (service Active) or `limit` s after the last kill; then for
    every customer mail to be sent (a mail claimed by a killed sender waits for its lease), and
    a little longer for the tail (events) to go out."""
    paid = active = 0
    while time.time() - last_kill < limit:
        paid, active = await setups_done(s)
        if paid >= len(shop.paid) and active >= paid:
            break
        await asyncio.sleep(0.5)
    done = time.time()
    print(f"  {done - START:6.1f} s  {active}/{paid} paid setups Active", flush=True)
    unsent = await mails_unsent(s)
    while unsent and time.time() - last_kill < limit:
        await asyncio.sleep(0.5)
        unsent = await mails_unsent(s)
    mails_done = time.time()
    print(f"  {mails_done - START:6.1f} s  customer mails: {unsent} not sent yet", flush=True)
    await asyncio.sleep(3)
    return {"paid": paid, "active": active, "waited_until": done,
            "all_done": paid >= len(shop.paid) and active >= paid,
            "mails_unsent": unsent, "mails_done_after_last_disruption_s":
                round(mails_done - last_kill, 1) if not unsent else None}


async def mails_unsent(s: Settings) -> int:
    conn = await asyncpg.connect(s.database_url)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM emails WHERE status IN ('pending', 'sending')")
    finally:
        await conn.close()


# -- the findings --------------------------------------------------------------------------------------


async def dead_letter_depths(connection: AbstractRobustConnection, names: Names) -> dict[str, int]:
    channel = await connection.channel()
    try:
        return {svc: (await channel.declare_queue(f"{names.queue(svc)}.dead", passive=True))
                .declaration_result.message_count for svc in SERVICE_BINDINGS}
    finally:
        await channel.close()


async def gather_report(bench: Bench, opts: Options, shop: Shop, whm: JitteryWhm, chaos: Chaos,
                        sampler: JobSampler, workers: list[Worker], lease: float, last_disruption: float,
                        settled: dict[str, Any], placed_at: float,
                        connection: AbstractRobustConnection) -> dict[str, Any]:
    s = bench.settings
    refs = list(shop.sent)
    conn = await asyncpg.connect(s.database_url)
    try:
        orders = await conn.fetch(
            "SELECT o.order_ref, o.id, o.status, o.screening::text AS screening,"
            " (SELECT count(*) FROM fraud_checks f WHERE f.order_id = o.id) AS checks,"
            " (SELECT count(*) FROM order_history h WHERE h.order_id = o.id AND h.action = 'placed')"
            "   AS placed_rows"
            " FROM orders o WHERE o.order_ref = ANY($1::text[])", refs)
        by_ref: dict[str, list[asyncpg.Record]] = {}
        for r in orders:
            by_ref.setdefault(r["order_ref"], []).append(r)
        services = await conn.fetch(
            "SELECT o.order_ref, p.slug AS product, sv.id, sv.status, sv.username, sv.domain,"
            " i.status AS invoice,"
            " extract(epoch FROM (SELECT max(j.updated_at) FROM jobs j WHERE j.service_id = sv.id"
            "   AND j.kind = 'create' AND j.status = 'done'))::float8 AS done_at,"
            " (SELECT max(j.attempts) FROM jobs j WHERE j.service_id = sv.id AND j.kind = 'create')"
            "   AS attempts,"
            " (SELECT string_agg(j.status || coalesce(': ' || left(j.last_error, 160), ''), '; ')"
            "   FROM jobs j WHERE j.service_id = sv.id) AS jobs"
            " FROM services sv JOIN orders o ON o.id = sv.order_id JOIN products p ON p.id = sv.product_id"
            " LEFT JOIN invoices i ON i.order_id = o.id WHERE o.order_ref = ANY($1::text[])", refs)
        payments = await conn.fetch(
            "SELECT status::text AS status, count(*) AS n FROM payments GROUP BY 1")
        unapplied = await conn.fetch(
            "SELECT reason, count(*) AS n FROM payments WHERE status <> 'applied' GROUP BY 1")
        history = await conn.fetch(
            "SELECT action, count(*) AS n, count(DISTINCT order_id) AS orders FROM order_history"
            " WHERE action IN ('service created', 'placed') GROUP BY 1")
        unpublished = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        emails = await conn.fetch("SELECT status::text AS status, count(*) AS n FROM emails GROUP BY 1")
        # The last setups to complete, stage by stage (database times: transaction starts).
        last_setups = await conn.fetch(
            "SELECT o.order_ref, p.slug AS product, j.id AS job_id, j.attempts,"
            " extract(epoch FROM o.created_at)::float8 AS order_stored,"
            " extract(epoch FROM (SELECT min(y.received_at) FROM payments y"
            "   WHERE y.invoice_id = i.id))::float8 AS payment_received,"
            " extract(epoch FROM j.created_at)::float8 AS job_created,"
            " extract(epoch FROM j.updated_at)::float8 AS job_done"
            " FROM jobs j JOIN services sv ON sv.id = j.service_id JOIN orders o ON o.id = j.order_id"
            " JOIN products p ON p.id = sv.product_id LEFT JOIN invoices i ON i.order_id = o.id"
            " WHERE j.kind = 'create' AND j.status = 'done' AND o.order_ref = ANY($1::text[])"
            " ORDER BY j.updated_at DESC LIMIT 8", refs)
    finally:
        await conn.close()

    missing = [ref for ref in refs if ref not in by_ref]
    duplicated_orders = [ref for ref, rows in by_ref.items() if len(rows) > 1]
    screened_twice = [r["order_ref"] for r in orders if r["checks"] > 1 or r["placed_rows"] > 1]
    not_screened = [r["order_ref"] for r in orders if r["screening"] == "queued"]
    paid_services = [r for r in services if r["invoice"] == "Paid"]
    not_active = [dict(r) for r in paid_services if r["status"] != "Active"]
    done_times = [r["done_at"] for r in paid_services if r["done_at"] is not None]
    last_done = max(done_times) if done_times else None
    heard_created = [t for ref in refs if (t := shop.at("service.created", ref))]

    cpanel_active = {r["username"] for r in paid_services
                     if r["product"] == CPANEL and r["status"] == "Active"}
    twice = {u: n for u, n in whm.created.items() if n > 1}
    twice_domains = {d: n for d, n in whm.created_domains.items() if n > 1}
    strangers = sorted(set(whm.accounts) - {r["username"] for r in services if r["username"]})

    dead = sampler.dead(lease)
    kills = [k["at"] for k in chaos.kills]
    # What may have left a claim behind: a SIGKILL of its runner, or a server going away.
    blows = sorted(kills + [o["down"] for o in chaos.outages])
    dead_rows = []
    for c in dead:
        since = c.lease_until - lease  # its last claim or renewal, made by a live runner
        killed = min((k for k in blows if k >= since - 1), default=None)
        ended = c.gone or c.last_seen
        dead_rows.append({
            "job_id": c.job_id, "kind": c.kind, "runner": c.token.split("/")[0],
            "claimed_or_renewed": round(since - START, 1),
            "holder_killed": round(killed - START, 1) if killed else None,
            "lease_ran_out": round(c.lease_until - START, 1), "taken_over": round(ended - START, 1),
            "sat_after_kill_s": round(ended - killed, 1) if killed else None,
            "after_lease_ran_out_s": round(ended - c.lease_until, 1)})
    sat = [r["sat_after_kill_s"] for r in dead_rows if r["sat_after_kill_s"] is not None]

    def at(value: float | None) -> float | None:
        return round(value - START, 1) if value else None

    slowest = [{"order_ref": r["order_ref"], "product": r["product"], "job_id": r["job_id"],
                "attempts": r["attempts"], "order_sent": at(shop.sent.get(r["order_ref"])),
                "order_stored": at(r["order_stored"]), "paid": at(shop.paid.get(r["order_ref"])),
                "payment_received": at(r["payment_received"]), "job_created": at(r["job_created"]),
                "job_done": at(r["job_done"])} for r in last_setups]

    return {
        "run_id": bench.run_id,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "options": opts.__dict__,
        "method": ("two `ordermill run` processes (all services) reach RabbitMQ and PostgreSQL "
                   "through TCP proxies owned by the bench; a cut is the proxy down (open "
                   "connections dropped, new ones refused) for options.outage seconds; "
                   + ("a restart is the bench's own RabbitMQ node stopped and started again on "
                      "its data (rabbitmqctl stop, or its VM SIGKILLed), its own PostgreSQL "
                      "restarted with pg_ctl restart -m fast|immediate" if opts.own_servers
                      else "the machine's servers are shared: no restart")),
        "settings": {"job_lease_seconds": lease,
                     "job_poll_seconds": float(os.environ.get("JOB_POLL_SECONDS", s.job_poll_seconds)),
                     "job_backoff_seconds": s.job_backoff_seconds},
        "timeline": {
            "orders_published": round(placed_at - START, 1),
            "kills": len(chaos.kills), "first_kill": round(kills[0] - START, 1) if kills else None,
            "last_kill": round(kills[-1] - START, 1) if kills else None,
            "last_disruption": round(last_disruption - START, 1),
            "outages": [{**o, "down": round(o["down"] - START, 1), "up": round(o["up"] - START, 1)}
                        for o in chaos.outages],
            "last_setup_done": round(last_done - START, 1) if last_done else None,
        },
        "orders": {"placed": len(refs), "in_database": len(by_ref), "lost": missing,
                   "duplicated": duplicated_orders, "screened_twice": screened_twice,
                   "not_screened": not_screened,
                   "statuses": dict(Counter(r["status"] for r in orders)),
                   "screening": dict(Counter(r["screening"] for r in orders)),
                   "history": {r["action"]: {"rows": r["n"], "orders": r["orders"]} for r in history}},
        "payments": {"published": len(shop.paid), "publish_errors": shop.pay_errors,
                     "storefront_publishes_again": dict(shop.publish_retries),
                     "by_status": {r["status"]: r["n"] for r in payments},
                     "not_applied": {r["reason"]: r["n"] for r in unapplied}},
        "setups": {
            "paid": len(paid_services), "active": len(paid_services) - len(not_active),
            "by_product": {p: dict(Counter(r["status"] for r in paid_services if r["product"] == p))
                           for p in (CPANEL, AUTORELEASE)},
            "not_active": not_active[:50],
            "retried": sum(1 for r in paid_services if (r["attempts"] or 0) > 1),
            "last_to_complete": slowest,
            "all_done_within_settle": settled["all_done"],
            "last_done_after_last_disruption_s":
                round(last_done - last_disruption, 1) if last_done else None,
            "last_service_created_heard_after_last_disruption_s":
                round(max(heard_created) - last_disruption, 1) if heard_created else None,
        },
        "whm": {"calls": dict(whm.calls), "accounts": len(whm.accounts),
                "cpanel_services_active": len(cpanel_active),
                "created_twice_usernames": twice, "created_twice_domains": twice_domains,
                "createacct_refused": whm.refused[:50], "accounts_without_service": strangers[:50]},
        "dead_runner_claims": {
            "count": len(dead_rows), "claims_seen": len(sampler.claims), "samples": sampler.samples,
            "sampler_errors": sampler.errors,
            "sat_after_kill_s": {"max": max(sat), "mean": round(sum(sat) / len(sat), 1)} if sat else None,
            "claims": dead_rows},
        "events_heard": dict(shop.heard),
        "outbox_unpublished_at_end": unpublished,
        "dead_letters": await dead_letter_depths(connection, bench.names),
        "emails": {r["status"]: r["n"] for r in emails},
        "emails_done_after_last_disruption_s": settled["mails_done_after_last_disruption_s"],
        "workers": {w.name: {"lives": len(w.lives), "log": str(w.log_path.relative_to(ROOT)),
                             "exited_by_itself": w.exited_by_itself()} for w in workers},
    }


def verdict(d: dict[str, Any]) -> list[str]:
    problems = []
    o, st, w = d["orders"], d["setups"], d["whm"]
    for key in ("lost", "duplicated", "screened_twice", "not_screened"):
        if o[key]:
            problems.append(f"orders {key.replace('_', ' ')}: {len(o[key])}, e.g. {o[key][:3]}")
    if st["active"] < st["paid"]:
        problems.append(f"{st['paid'] - st['active']} paid setup(s) not Active")
    if st["paid"] < d["payments"]["published"]:
        problems.append(f"{d['payments']['published'] - st['paid']} paid order(s) without a Paid invoice")
    after = st["last_done_after_last_disruption_s"]
    if after is not None and after > 60:
        problems.append(f"the last setup completed {after:g} s after the last kill, cut or restart"
                        " (target 60 s)")
    if w["created_twice_usernames"] or w["created_twice_domains"]:
        twice = w["created_twice_usernames"] or w["created_twice_domains"]
        problems.append(f"accounts created twice: {twice}")
    if w["createacct_refused"]:
        refused = w["createacct_refused"]
        problems.append(f"{len(refused)} createacct refused, e.g. {refused[:2]}")
    if w["accounts_without_service"]:
        problems.append(f"accounts with no service: {w['accounts_without_service'][:5]}")
    if d["emails_twice"]["distinct"] < d["emails"].get("sent", 0):
        problems.append(f"mails recorded sent but never delivered: "
                        f"{d['emails'].get('sent', 0) - d['emails_twice']['distinct']}")
    stuck = {k: n for k, n in d["emails"].items() if k != "sent"}
    if stuck:
        problems.append(f"customer mails not sent: {stuck}")
    if any(d["dead_letters"].values()):
        problems.append(f"dead letters: {d['dead_letters']}")
    for name, info in d["workers"].items():
        if info["exited_by_itself"]:
            problems.append(f"{name} exited by itself: {info['exited_by_itself']}")
    return problems


def print_report(d: dict[str, Any]) -> None:
    t, o, st, w, dr = d["timeline"], d["orders"], d["setups"], d["whm"], d["dead_runner_claims"]
    print(f"\nOrdermill chaos case {d['run_id']} ({d['at']}, {d['commit']}), {d['machine']['cpus']} CPUs, "
          f"{d['elapsed_seconds']:.0f} s in all")
    print(f"  {o['placed']} orders placed at {d['options']['rate']:g}/s "
          f"(published by {t['orders_published']} s); "
          f"{d['payments']['published']} paid; {t['kills']} SIGKILLs from {t['first_kill']} s to "
          f"{t['last_kill']} s; " + ("own servers" if d["servers"]["own"] else "shared servers")
          + ": " + ", ".join(f"{x['what']} {x['down']}-{x['up']} s" for x in t["outages"]))
    print(f"  orders: {o['in_database']} in the database, lost {len(o['lost'])}, duplicated "
          f"{len(o['duplicated'])}, screened twice {len(o['screened_twice'])}, not screened "
          f"{len(o['not_screened'])}; statuses {o['statuses']}, screening {o['screening']}")
    print(f"  payments: {d['payments']['by_status']}" + (f", not applied {d['payments']['not_applied']}"
                                                          if d["payments"]["not_applied"] else "")
          + f"; messages the storefront published again (no confirm): "
          f"{d['payments']['storefront_publishes_again']}")
    print(f"  paid setups: {st['active']}/{st['paid']} Active ({st['by_product']}); {st['retried']} "
          f"needed more than one attempt; the last completed "
          f"{st['last_done_after_last_disruption_s']} s after the last kill, cut or restart "
          f"(at {t['last_disruption']} s; its service.created heard at "
          f"{st['last_service_created_heard_after_last_disruption_s']} s)")
    for r in st["last_to_complete"][:3]:
        print(f"    {r['order_ref']} ({r['product']}): order sent {r['order_sent']} s, stored "
              f"{r['order_stored']}, paid {r['paid']}, payment received {r['payment_received']}, "
              f"job created {r['job_created']}, done {r['job_done']} (attempt {r['attempts']})")
    print(f"  fake WHM: {w['accounts']} accounts for {w['cpanel_services_active']} Active cPanel services; "
          f"created twice: {len(w['created_twice_usernames']) + len(w['created_twice_domains'])}; "
          f"createacct refused: {len(w['createacct_refused'])}; calls {w['calls']}")
    sat = dr["sat_after_kill_s"]
    print(f"  claims held by a dead runner: {dr['count']} of {dr['claims_seen']} claims seen"
          + (f", taken over {sat['mean']} s after the kill (or server down) on average,"
             f" {sat['max']} s at most"
             f" (lease {d['settings']['job_lease_seconds']:g} s,"
             f" poll {d['settings']['job_poll_seconds']:g} s)"
             if sat else ""))
    print(f"  dead letters {d['dead_letters']}; outbox unpublished at the end "
          f"{d['outbox_unpublished_at_end']}; "
          f"emails {d['emails']} ({d['emails_delivered']} delivered to the sink; the last sent "
          f"{d['emails_done_after_last_disruption_s']} s after the last kill, cut or restart)")
    print("  deepest work queues: " + ", ".join(
        f"{svc} {q['max']} at {q['at']} s (above 10 until {q['last_above_10']} s)"
        for svc, q in d["queue_backlog"].items() if q["max"] > 10))
    tw = d["emails_twice"]
    print(f"  mails: {tw['distinct']} distinct delivered, {tw['twice_or_more']} of them more than "
          f"once ({tw['extra_deliveries']} extra), first delivery followed by {tw['after']}")
    problems = verdict(d)
    d["problems"] = problems
    print("  verdict: " + ("PASS" if not problems else "FAIL"))
    for p in problems:
        print(f"    - {p}")


# -- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--orders", type=int, default=1200)
    p.add_argument("--rate", type=float, default=10.0, help="orders placed per second")
    p.add_argument("--kill-min", type=float, default=3.0, help="seconds between kills, at least")
    p.add_argument("--kill-max", type=float, default=7.0, help="seconds between kills, at most")
    p.add_argument("--outage", type=float, default=5.0, help="seconds each proxy stays down")
    p.add_argument("--settle", type=float, default=180.0,
                   help="seconds after the last kill to wait for every paid setup")
    p.add_argument("--cpanel-share", type=float, default=0.5, help="share of cPanel orders")
    p.add_argument("--whm-low", type=float, default=0.02)
    p.add_argument("--whm-high", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--shared-servers", action="store_true",
                   help="use the machine's RabbitMQ and PostgreSQL (only cuts, no restart)")
    p.add_argument("--no-cuts", action="store_true",
                   help="own servers: restart them, but cut no connection through the proxies")
    p.add_argument("--mq-restart", choices=("stop", "kill"), default="stop",
                   help="rabbitmqctl stop, or SIGKILL of the node's Erlang VM")
    p.add_argument("--pg-restart", choices=("fast", "immediate"), default="fast",
                   help="pg_ctl restart -m fast, or -m immediate (crash recovery)")
    a = p.parse_args(argv)
    return Options(a.orders, a.rate, a.kill_min, a.kill_max, a.outage, a.settle, a.cpanel_share,
                   a.whm_low, a.whm_high, a.seed, own_servers=not a.shared_servers,
                   cuts=not a.no_cuts, mq_restart=a.mq_restart, pg_restart=a.pg_restart)


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            data = runner.run(run_chaos(Bench.create(), opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        remove_left_over()
        print("interrupted: workers stopped, bench database and queues removed", file=sys.stderr)
        raise SystemExit(130) from None
    data["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    print_report(data)
    path = RESULTS / "chaos.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nwritten to {path.relative_to(ROOT)}")
    raise SystemExit(1 if data["problems"] else 0)


if __name__ == "__main__":
    main()
