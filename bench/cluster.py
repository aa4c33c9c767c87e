"""Ordermill on a three-node RabbitMQ cluster: the node holding the queue leaders is SIGKILLed in
the middle of --orders orders with payments, and nothing is lost, doubled or left behind.

One run, on this machine, beside its own RabbitMQ (5672, node rabbit@<host>, never touched):

- Three nodes from Debian's package (bench/own_servers.py's OwnRabbit: `rabbitmq-server` as a
  child of the bench, free AMQP and distribution ports, data and logs in a temporary directory,
  no plugins so no fixed management port), named om1-<pid>@localhost .. om3-<pid>@localhost,
  with one Erlang cookie of their own (a HOME of the bench's: ~/.erlang.cookie is not read or
  written). om2 and om3 join om1 (`rabbitmqctl stop_app; join_cluster; start_app`).
- The topology is declared through om1 with QUEUE_REPLICAS=3: every quorum queue has a replica on
  each node, and (RabbitMQ's client-local leader placement) its leader on om1.
- Two `ordermill run` processes (every service), AMQP_URL the three nodes' URLs, rotated: worker-1
  starts on the leaders' node, worker-2 on the next. The storefront (the chaos bench's Shop:
  places orders of an autorelease product at --rate, pays each once its order.placed tells the
  invoice) connects to the third node first; a publish that fails is sent again until the broker
  confirms it (the same order_ref is one order, the same gateway transaction one payment).
- When half the orders are out, the node holding most queue leaders gets SIGKILL (its Erlang VM,
  no goodbye). The remaining two elect new leaders; worker-1 moves to its list's next node.

Measured from the bench's database: orders lost, duplicated or screened twice; payments lost or
recorded twice; paid setups not Active; and the stall across the kill: the longest stretch with
no message handled (orders placed, screened, payments recorded, by their transactions' times)
from the last one before the kill on.

Run: PYTHONPATH=$PWD .venv/bin/python bench/cluster.py [--orders 2000] [--rate 20]
The report is printed and written as JSON to bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import psutil
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from chaos import (
    AUTORELEASE,
    Shop,
    Worker,
    create_database,
    dead_letter_depths,
    wait_for_consumers,
    wait_until,
)
from own_servers import OwnRabbit
from pipeline import Bench, MailSink, _git_commit, drop_database
from provisioning import RESULTS, ROOT

from cli.main import loop_factory
from shared import broker
from shared.parties import amqp_user
from shared.topology import Names, declare_topology

NOWHERE_WHM = 9  # web1's port in the bench database: no cPanel product is ordered


# -- the cluster ----------------------------------------------------------------------------------


class ClusterNode(OwnRabbit):
    """An OwnRabbit named `<name>-<pid>@localhost` whose Erlang cookie is the cluster's (a HOME
    shared by the nodes and their rabbitmqctl)."""

    def __init__(self, name: str, home: Path) -> None:
        super().__init__()
        self.name = name
        self.node = f"{name}-{os.getpid()}@localhost"
        self.env.update(RABBITMQ_NODENAME=self.node, HOME=str(home))
        self.killed_at: float | None = None

    async def ctl(self, *args: str, within: float = 120) -> str:
        status, out = await self._ctl(*args, within=within)
        if status != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.node} {' '.join(args)}: {out.strip()[-400:]}")
        return out


class Cluster:
    def __init__(self, size: int = 3) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="ordermill-cluster-home-"))
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        self.nodes = [ClusterNode(f"om{n}", self.home) for n in range(1, size + 1)]

    def urls(self, first: int) -> str:
        """AMQP_URL: every node's URL, starting at nodes[first]."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(node.url for node in order)

    def live(self) -> ClusterNode:
        return next(node for node in self.nodes if node.killed_at is None)

    async def start(self) -> float:
        began = time.monotonic()
        await asyncio.gather(*(node.start() for node in self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            await node.ctl("stop_app")
            await node.ctl("join_cluster", first.node)
            await node.ctl("start_app")
        status = await first.ctl("cluster_status", "--formatter", "json")
        running = json.loads(status[status.index("{"):]).get("running_nodes", [])
        if sorted(running) != sorted(node.node for node in self.nodes):
            raise RuntimeError(f"the cluster runs {running}, not all of its nodes")
        return time.monotonic() - began

    async def queues(self) -> dict[str, dict[str, Any]]:
        """Every queue's leader and members, asked of a live node."""
        out = await self.live().ctl("list_queues", "name", "leader", "members", "--formatter", "json")
        return {q["name"]: q for q in json.loads(out[out.index("["):])}

    async def close(self) -> None:
        await asyncio.gather(*(node.close() for node in self.nodes), return_exceptions=True)
        shutil.rmtree(self.home, ignore_errors=True)


# -- the storefront's publishes, sent again until confirmed ------------------------------------------


@dataclass
class Resending:
    """An exchange whose publish is sent again until the broker confirms it: while a queue's
    leader is being elected a publish can fail or wait; the storefront's retry is safe because
    Ordermill deduplicates (order_ref, gateway transaction)."""

    exchange: AbstractExchange
    resent: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    within: float = 180.0

    async def publish(self, message: aio_pika.Message, routing_key: str, **kwargs: Any) -> Any:
        deadline = time.monotonic() + self.within
        while True:
            try:
                return await asyncio.wait_for(
                    self.exchange.publish(message, routing_key=routing_key, **kwargs), 15)
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise
                self.resent[routing_key] += 1
                self.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.5)


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class Options:
    orders: int
    rate: float
    settle: float


async def completions(conn: asyncpg.Connection, refs: list[str]) -> list[float]:
    """When a worker handled a message of the bench's orders from RabbitMQ, by its
    transaction's time: an order placed (order.place), screened (order.placed), a payment
    recorded (payment.received). Not the job runner's setups, which need no broker."""
    rows = await conn.fetch(
        "SELECT extract(epoch FROM h.at)::float8 AS t FROM order_history h"
        " JOIN orders o ON o.id = h.order_id"
        " WHERE o.order_ref = ANY($1::text[]) AND h.action = 'placed'"
        " UNION ALL SELECT extract(epoch FROM f.created_at)::float8 FROM fraud_checks f"
        " JOIN orders o ON o.id = f.order_id WHERE o.order_ref = ANY($1::text[])"
        " UNION ALL SELECT extract(epoch FROM received_at)::float8 FROM payments"
        " WHERE transaction_id = ANY($2::text[])",
        refs, [f"chaos-{ref}" for ref in refs])
    return sorted(r["t"] for r in rows)


def gap_across(times: list[float], at: float) -> dict[str, float | None]:
    """The longest stretch without a completion from the last one before `at` on (the stall
    the kill caused), the first completion after `at`, and, for scale, the longest stretch in
    the same length of time before `at`."""
    before = [t for t in times if t <= at]
    after = [t for t in times if t > at]
    if not before or not after:
        return {"stall_s": None, "first_after_kill_s": None, "longest_before_s": None}
    span = [before[-1], *after]
    stall = max(b - a for a, b in itertools.pairwise(span))
    window = [t for t in before if t >= at - (after[-1] - at)]
    longest_before = max((b - a for a, b in itertools.pairwise(window)), default=0.0)
    return {"stall_s": round(stall, 2), "first_after_kill_s": round(after[0] - at, 2),
            "longest_before_s": round(longest_before, 2)}


async def settle(s: Any, refs: list[str], paid: dict[str, float], limit: float) -> float:
    """Wait until every order is screened and every paid one's service Active; returns when."""
    deadline = time.time() + limit
    conn = await asyncpg.connect(s.database_url)
    try:
        while time.time() < deadline:
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE o.screening <> 'queued') AS screened,"
                " (SELECT count(*) FROM services sv JOIN orders o2 ON o2.id = sv.order_id"
                "   WHERE o2.order_ref = ANY($1::text[]) AND sv.status = 'Active') AS active"
                " FROM orders o WHERE o.order_ref = ANY($1::text[])", refs)
            if row["screened"] >= len(refs) and row["active"] >= len(paid):
                break
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
    return time.time()


def leaders_node(cluster: Cluster, names: Names, queues: dict[str, Any]) -> tuple[ClusterNode, Counter[str]]:
    """The node that leads most of the namespace's queues, and the count by node."""
    leaders = Counter(q["leader"] for name, q in queues.items()
                      if name.startswith(f"{names.namespace}."))
    return next(n for n in cluster.nodes if n.node == leaders.most_common(1)[0][0]), leaders


async def kill_at(victim: ClusterNode, leaders: Counter[str], at: float,
                  log: list[dict[str, Any]]) -> None:
    """SIGKILL the node's Erlang VM at `at` (wall clock)."""
    await asyncio.sleep(max(0.0, at - time.time()))
    victim.killed_at = time.time()
    await victim.stop("kill")
    print(f"  {victim.killed_at - START:6.1f} s  SIGKILL {victim.node}, leader of "
          f"{leaders[victim.node]} of {sum(leaders.values())} queues", flush=True)
    log.append({"node": victim.node, "at": victim.killed_at, "leaders_before": dict(leaders)})


START = time.time()


async def run_cluster(bench: Bench, opts: Options) -> dict[str, Any]:
    global START
    names = bench.names
    cluster = Cluster(3)
    connection: AbstractRobustConnection | None = None
    workers: list[Worker] = []
    kills: list[dict[str, Any]] = []
    print(f"cluster run {bench.run_id}: database {bench.settings.database_url.rsplit('/', 1)[1]},"
          f" namespace {names.namespace}; {opts.orders} orders at {opts.rate:g}/s", flush=True)
    with MailSink(bench.settings.smtp_port) as mail:
        try:
            took = await cluster.start()
            print(f"  cluster of {len(cluster.nodes)} up in {took:.1f} s: "
                  + ", ".join(f"{n.node} (AMQP {n.port})" for n in cluster.nodes), flush=True)
            s = bench.settings.model_copy(update={"amqp_url": cluster.urls(2), "queue_replicas": 3})
            first = await broker.connect(cluster.urls(0), attempts=3)  # leaders on om1
            async with first:
                await declare_topology(first, names, delivery_limit=s.queue_delivery_limit,
                                       replicas=3)
            before = await cluster.queues()
            await create_database(s, NOWHERE_WHM)
            connection = await broker.connect(s.amqp_url, attempts=3)  # om3 first
            env = {**bench.env(), "QUEUE_REPLICAS": "3"}
            workers = [Worker(f"worker-{n + 1}", {**env, "AMQP_URL": cluster.urls(n)},
                              RESULTS / f"cluster-worker-{n + 1}.log") for n in (0, 1)]
            for w in workers:
                await w.start()
            await wait_for_consumers(connection, names, workers)
            exchange = Resending(await (await broker.open_publisher(connection)).get_exchange(
                names.exchange))
            shop = Shop(exchange=exchange, user_id=amqp_user(s.amqp_url))  # type: ignore[arg-type]
            await shop.listen(connection, names.exchange)

            refs = [f"cluster-{bench.run_id}-{n:05d}" for n in range(opts.orders)]
            for ref in refs:
                shop.sent[ref] = 0.0
            START = time.time()
            victim, leaders = leaders_node(cluster, names, before)
            killer = asyncio.create_task(
                kill_at(victim, leaders, START + opts.orders / opts.rate / 2, kills))
            await shop.steady(lambda ref: shop.place(ref, AUTORELEASE), refs, opts.rate)
            placed_at = time.time()
            print(f"  {placed_at - START:6.1f} s  {len(refs)} orders published", flush=True)
            await killer
            await wait_until(lambda: len(shop.paid) + len(shop.pay_errors) >= len(refs), opts.settle)
            while shop.payments:
                await asyncio.gather(*list(shop.payments))
            print(f"  {time.time() - START:6.1f} s  {len(shop.paid)} payments published", flush=True)
            done = await settle(s, refs, shop.paid, opts.settle)
            print(f"  {done - START:6.1f} s  settled", flush=True)
            await asyncio.sleep(2)
            after = await cluster.queues()
            report = await gather_report(bench, s, opts, shop, exchange, kills, workers, before,
                                         after, placed_at, done, connection)
            for w in workers:
                await w.stop()
        finally:
            for w in workers:
                with contextlib.suppress(Exception):
                    await w.stop()
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()
            await drop_database(bench.settings)
            await cluster.close()
    report["emails_delivered"] = mail.received
    return report


async def gather_report(bench: Bench, s: Any, opts: Options, shop: Shop, exchange: Resending,
                        kills: list[dict[str, Any]], workers: list[Worker],
                        before: dict[str, Any], after: dict[str, Any], placed_at: float,
                        done: float, connection: AbstractRobustConnection) -> dict[str, Any]:
    refs = list(shop.sent)
    conn = await asyncpg.connect(s.database_url)
    try:
        orders = await conn.fetch(
            "SELECT o.order_ref, o.screening::text AS screening,"
            " (SELECT count(*) FROM fraud_checks f WHERE f.order_id = o.id) AS checks,"
            " (SELECT count(*) FROM order_history h WHERE h.order_id = o.id AND h.action = 'placed')"
            "   AS placed_rows FROM orders o WHERE o.order_ref = ANY($1::text[])", refs)
        payments = await conn.fetch(
            "SELECT transaction_id, status, count(*) AS n FROM payments"
            " WHERE transaction_id = ANY($1::text[]) GROUP BY 1, 2",
            [f"chaos-{ref}" for ref in shop.paid])
        services = await conn.fetch(
            "SELECT sv.status, count(*) AS n FROM services sv JOIN orders o ON o.id = sv.order_id"
            " JOIN invoices i ON i.order_id = o.id WHERE o.order_ref = ANY($1::text[])"
            " AND i.status = 'Paid' GROUP BY 1", refs)
        unpublished = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        times = await completions(conn, refs)
    finally:
        await conn.close()
    by_ref = Counter(r["order_ref"] for r in orders)
    recorded = Counter()
    for r in payments:
        recorded[r["transaction_id"]] += r["n"]
    kill = kills[0] if kills else None
    ours = lambda queues: {n: q for n, q in queues.items()  # noqa: E731
                           if n.startswith(f"{bench.names.namespace}.")}
    moved = {w.name: w.log_path.read_text(errors="replace").count("trying the next") for w in workers}
    return {
        "run_id": bench.run_id,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "options": opts.__dict__,
        "kill": {**kill, "at": round(kill["at"] - START, 1)} if kill else None,
        "queues_before": {n: {"leader": q["leader"], "members": len(q["members"])}
                          for n, q in ours(before).items()},
        "queues_after": {n: {"leader": q["leader"], "members": len(q["members"])}
                         for n, q in ours(after).items()},
        "timeline": {"orders_published": round(placed_at - START, 1),
                     "settled": round(done - START, 1)},
        "orders": {"placed": len(refs), "in_database": len(by_ref),
                   "lost": [r for r in refs if r not in by_ref],
                   "duplicated": [r for r, n in by_ref.items() if n > 1],
                   "screened_twice": [r["order_ref"] for r in orders
                                      if r["checks"] > 1 or r["placed_rows"] > 1],
                   "not_screened": [r["order_ref"] for r in orders if r["screening"] == "queued"]},
        "payments": {"published": len(shop.paid), "publish_errors": shop.pay_errors,
                     "recorded": sum(recorded.values()),
                     "lost": [ref for ref in shop.paid if not recorded.get(f"chaos-{ref}")],
                     "recorded_twice": [t for t, n in recorded.items() if n > 1],
                     "by_status": dict(Counter(r["status"] for r in payments for _ in range(r["n"])))},
        "setups": {r["status"]: r["n"] for r in services},
        "resent": {"by_key": dict(exchange.resent), "errors": dict(exchange.errors)},
        "gap": gap_across(times, kill["at"]) if kill else None,
        "completions": len(times),
        "workers_moved_node": moved,
        "outbox_unpublished_at_end": unpublished,
        "dead_letters": await dead_letter_depths(connection, bench.names),
    }


def verdict(d: dict[str, Any], within: float) -> list[str]:
    problems = []
    o, p = d["orders"], d["payments"]
    for key in ("lost", "duplicated", "screened_twice", "not_screened"):
        if o[key]:
            problems.append(f"orders {key.replace('_', ' ')}: {len(o[key])}, e.g. {o[key][:3]}")
    for key in ("lost", "recorded_twice", "publish_errors"):
        if p[key]:
            problems.append(f"payments {key.replace('_', ' ')}: {len(p[key])}, e.g. {p[key][:3]}")
    active = d["setups"].get("Active", 0)
    if active < p["published"]:
        problems.append(f"{p['published'] - active} paid setup(s) not Active: {d['setups']}")
    gap = d["gap"] or {}
    if gap.get("stall_s") is None or gap["stall_s"] > within:
        problems.append(f"processing stalled {gap.get('stall_s')} s across the kill (target {within:g} s)")
    if any(d["dead_letters"].values()):
        problems.append(f"dead letters: {d['dead_letters']}")
    if d["outbox_unpublished_at_end"]:
        problems.append(f"{d['outbox_unpublished_at_end']} events never published")
    return problems


def print_report(d: dict[str, Any], within: float) -> None:
    o, p, g, k = d["orders"], d["payments"], d["gap"] or {}, d["kill"] or {}
    print(f"\nOrdermill on a 3-node RabbitMQ cluster {d['run_id']} ({d['at']}, {d['commit']}),"
          f" {d['machine']['cpus']} CPUs, {d['elapsed_seconds']:.0f} s in all")
    print(f"  {o['placed']} orders at {d['options']['rate']:g}/s, published by "
          f"{d['timeline']['orders_published']} s; {k.get('node')} (leader of "
          f"{k.get('leaders_before', {}).get(k.get('node'), 0)} queues) SIGKILLed at {k.get('at')} s;"
          f" settled at {d['timeline']['settled']} s")
    members = sorted({q["members"] for q in d["queues_before"].values()})
    leaders_after = Counter(q["leader"] for q in d["queues_after"].values())
    print(f"  quorum queues: {members} replicas each; leaders after the kill {dict(leaders_after)}")
    print(f"  orders: {o['in_database']} in the database, lost {len(o['lost'])}, duplicated "
          f"{len(o['duplicated'])}, screened twice {len(o['screened_twice'])}, not screened "
          f"{len(o['not_screened'])}")
    print(f"  payments: {p['published']} published, {p['recorded']} recorded "
          f"{p['by_status']}, lost {len(p['lost'])}, recorded twice {len(p['recorded_twice'])};"
          f" paid setups {d['setups']}")
    print(f"  processing stalled {g.get('stall_s')} s across the kill (first completion "
          f"{g.get('first_after_kill_s')} s after it; longest pause before it "
          f"{g.get('longest_before_s')} s); workers that moved node: {d['workers_moved_node']}")
    print(f"  storefront publishes sent again: {d['resent']['by_key']} ({d['resent']['errors']});"
          f" dead letters {d['dead_letters']}; outbox unpublished {d['outbox_unpublished_at_end']};"
          f" mails delivered {d['emails_delivered']}")
    problems = verdict(d, within)
    d["problems"] = problems
    print("  verdict: " + ("PASS" if not problems else "FAIL"))
    for problem in problems:
        print(f"    - {problem}")


def parse_args(argv: list[str] | None = None) -> tuple[Options, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--orders", type=int, default=2000)
    p.add_argument("--rate", type=float, default=20.0, help="orders placed per second")
    p.add_argument("--settle", type=float, default=180.0,
                   help="seconds to wait, after the last publish, for every order and setup")
    p.add_argument("--within", type=float, default=10.0,
                   help="the longest stall across the kill that passes, in seconds")
    a = p.parse_args(argv)
    return Options(a.orders, a.rate, a.settle), a.within


def main(argv: list[str] | None = None) -> None:
    opts, within = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            data = runner.run(run_cluster(Bench.create(), opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: workers and nodes stopped, bench database removed", file=sys.stderr)
        raise SystemExit(130) from None
    data["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    print_report(data, within)
    path = RESULTS / "cluster.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nwritten to {path.relative_to(ROOT)}")
    raise SystemExit(1 if data["problems"] else 0)


if __name__ == "__main__":
    main()
