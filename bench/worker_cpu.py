"""The worker's Python per order, without broker or relay: placement + fraud through the
broker-free harness (shared/runtime/testing.py: the same Pipeline the Runtime builds) on a real
database of its own (om_cpu_<hex>, dropped at the end).

Orders (the bench's honest ones) go to placement in batches of --batch (one `Pipeline.handle`
each, as a batcher hands them over under load), their order.placed events to fraud likewise.
Only those calls are measured: the CPU seconds of this process, and, since the machine is
shared and time is noisy, counts that do not depend on the load:

    --profile FILE   cProfile: Python calls per order (a coroutine counts once per resume)
    --lines FILE     sys.settrace: lines executed per order, by function (JSON), for a diff
                     between two checkouts (bench/README.md, "Keep")
    --callgrind LIB  under `valgrind --tool=callgrind --collect-atstart=no`: collection is
                     toggled around the measured calls through LIB, a shared library with
                     `void cg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }` (valgrind/callgrind.h)

--vacuum auto|always|never (default auto: when the server's autovacuum is off, as this machine's
is) runs `VACUUM (ANALYZE)` on the database between the warm-up and the measured orders, as
autovacuum would have by then (bench/autovacuum.py).

Run: PYTHONPATH=. .venv/bin/python bench/worker_cpu.py [--orders 1000] [--batch 16] [...]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import ctypes
import json
import os
import pstats
import random
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # as bench/pipeline.py

from bench import autovacuum  # asyncpg alone: none of pipeline.py's imports

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "catalog.example.toml"
Tracer = Callable[[FrameType, str, Any], Any]


def _environment(run_id: str) -> str:
    """The bench database's URL; the settings the workers read, as bench/pipeline.py sets
    them for its worker (every party is the one RabbitMQ user; no velocity Fraud)."""
    from shared.parties import amqp_user
    from shared.settings import Settings

    base = Settings()
    url = urlunsplit(urlsplit(base.database_url)._replace(path=f"/om_cpu_{run_id}"))
    user = amqp_user(base.amqp_url) or ""
    os.environ.update({
        "DATABASE_URL": url, "LOG_LEVEL": "WARNING", "FRAUD_VELOCITY_MAX_ORDERS": "1000000",
        "ORDERMILL_NAMESPACE": f"cpu.{run_id}",
        **dict.fromkeys(("STOREFRONT_USERS", "PAYMENT_PUBLISHERS", "OPERATOR_USERS"), user),
    })
    return url


class Lines:
    """Lines executed (and calls) per function while on: deterministic for given code."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, ...]] = collections.Counter()

    def _local(self, frame: FrameType, event: str, arg: Any) -> Tracer:
        if event == "line":
            self.counts[frame.f_code.co_filename, frame.f_code.co_name] += 1
        return self._local

    def _global(self, frame: FrameType, event: str, arg: Any) -> Tracer:
        self.counts[frame.f_code.co_filename, frame.f_code.co_name, "calls"] += 1
        return self._local

    def on(self) -> None:
        sys.settrace(self._global)

    def off(self) -> None:
        sys.settrace(None)

    def total(self) -> int:
        return sum(v for k, v in self.counts.items() if len(k) == 2)


async def run(opts: argparse.Namespace, url: str, run_id: str, profile: cProfile.Profile | None,
              lines: Lines | None) -> tuple[dict[str, float], int, bool]:
    from cli.catalog import load_catalog, read_catalog
    from cli.demo import make_order
    from services.fraud.worker import worker as fraud_worker
    from services.placement.worker import worker as placement_worker
    from shared import db
    from shared.logs import configure
    from shared.runtime.testing import InMemoryFlow, MemoryMessage
    from shared.settings import Settings

    configure("WARNING")
    settings = Settings()
    await db.ensure_database(url, attempts=3)
    pool = await db.create_pool(url, max_size=10, attempts=3)
    toggle = ctypes.CDLL(opts.callgrind).cg_toggle if opts.callgrind else None
    cpu = {"placement": 0.0, "fraud": 0.0}
    measured, vacuumed = 0, False
    try:
        await db.migrate(pool)
        async with pool.acquire() as conn:
            await load_catalog(conn, read_catalog(CATALOG))
        flow = InMemoryFlow(settings, pool).add(placement_worker(settings), fraud_worker(settings))
        rng = random.Random(1)

        async def handle(service: str, messages: list[MemoryMessage], measure: bool) -> None:
            started = time.process_time()
            if measure:
                for start in (toggle, profile and profile.enable, lines and lines.on):
                    if start:
                        start()
            await flow.pipelines[service].handle(messages)
            if measure:
                for stop in (lines and lines.off, profile and profile.disable, toggle):
                    if stop:
                        stop()
                cpu[service] += time.process_time() - started
            refused = [m.dead.reason for m in messages if m.outcome != "acked" and m.dead]
            assert all(m.outcome == "acked" for m in messages), refused[:3]

        async def orders(n: int, label: str, measure: bool) -> None:
            nonlocal measured
            bodies = [make_order(rng, f"cpu-{run_id}-{label}-{i:06d}", "honest", "192.0.2.1")
                      for i in range(n)]
            for i in range(0, n, opts.batch):
                await handle("placement", [flow.message("order.place", body)
                                           for body in bodies[i:i + opts.batch]], measure)
            placed = [e for e in await flow.drain() if e.routing_key == "order.placed"]
            assert len(placed) == n, f"{len(placed)} of {n} orders placed"
            for i in range(0, n, opts.batch):
                await handle("fraud", [flow.as_delivery(e) for e in placed[i:i + opts.batch]],
                             measure)
            await flow.drain()
            if measure:
                measured += n

        await orders(opts.warmup, "warm", False)
        if await autovacuum.wanted(url, opts.vacuum, "VACUUM (ANALYZE) after the warm-up"):
            await autovacuum.vacuum(url)
            vacuumed = True
        await orders(opts.orders, "run", True)
    finally:
        await pool.close()
        admin = urlunsplit(urlsplit(url)._replace(path="/postgres"))
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "om_cpu_{run_id}" WITH (FORCE)')
        finally:
            await conn.close()
    return cpu, measured, vacuumed


def report(opts: argparse.Namespace, cpu: dict[str, float], measured: int, vacuumed: bool,
           profile: cProfile.Profile | None, lines: Lines | None) -> str:
    per = 1000 / measured
    text = (f"batch {opts.batch}, {measured} orders: worker CPU per order"
            f" {sum(cpu.values()) * per:.3f} ms (placement {cpu['placement'] * per:.3f},"
            f" fraud {cpu['fraud'] * per:.3f}); load {os.getloadavg()[0]:.2f};"
            f" {'vacuumed' if vacuumed else 'not vacuumed'} after the warm-up")
    if profile:
        profile.dump_stats(opts.profile)
        text += f"; Python calls per order {pstats.Stats(opts.profile).total_calls / measured:.0f}"
    if lines:
        Path(opts.lines).write_text(json.dumps(
            {"orders": measured, "vacuumed": vacuumed,
             "lines": [[*k, v] for k, v in lines.counts.items()]}))
        text += f"; lines per order {lines.total() / measured:.0f}"
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16, help="messages per Pipeline.handle")
    parser.add_argument("--profile", metavar="FILE", help="cProfile stats of the measured calls")
    parser.add_argument("--lines", metavar="FILE", help="lines executed per function (JSON)")
    parser.add_argument("--callgrind", metavar="LIB", help="toggle callgrind's collection")
    parser.add_argument("--vacuum", choices=autovacuum.CHOICES, default="auto",
                        help="VACUUM (ANALYZE) the database between the warm-up and the measured"
                             " orders, as autovacuum would (auto: when the server's autovacuum"
                             " is off)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    run_id = uuid.uuid4().hex[:8]
    url = _environment(run_id)
    from cli.main import loop_factory

    profile = cProfile.Profile() if opts.profile else None
    lines = Lines() if opts.lines else None
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        cpu, measured, vacuumed = runner.run(run(opts, url, run_id, profile, lines))
    print(report(opts, cpu, measured, vacuumed, profile, lines), flush=True)


if __name__ == "__main__":
    main()
