"""What the webhooks worker's fan-out costs, counted rather than timed (load-independent): the
statements its transactions send to PostgreSQL (each one round trip) per event, and its
CPU seconds per event, with N endpoints subscribed to every event and without any.

Real events first: `--orders` honest orders go through placement and fraud (the broker-free
harness, shared/runtime/testing.py, on a database of its own), and the events they publish
that an integrator may subscribe to are kept. Then, for each endpoint count and batch size,
the webhooks worker handles all of them again from scratch (its inbox and deliveries
emptied), `--batch` at a time as the runtime hands it a batch under load, and every
statement its connections send is counted (asyncpg's query logger), by kind.

Run: PYTHONPATH=$PWD .venv/bin/python bench/webhook_fanout.py [--orders 200] [--endpoints 0,3]
     [--batch 1,8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.catalog import load_catalog, read_catalog
from cli.demo import make_order
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.webhooks.sealing import Sealer
from services.webhooks.signing import new_secret
from services.webhooks.worker import worker as webhooks_worker
from shared import db
from shared.runtime.testing import InMemoryFlow, Published
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def kind(query: str) -> str:
    q = " ".join(query.split()).lower()
    for word, name in (("begin", "begin"), ("commit", "commit"), ("rollback", "rollback")):
        if q.startswith(word):
            return name
    for table in ("inbox", "webhook_deliveries", "outbox"):
        if f"into {table}" in q:
            return f"insert {table}"
    if "from webhook_endpoints" in q:
        return "select webhook_endpoints"
    return "other"


class Counted:
    """Every statement the pool's connections send, by kind (they are all opened first, so
    each has the logger; the pool is Ordermill's own, db.create_pool: no reset query)."""

    def __init__(self, kind_of: Callable[[str], str] | None = None) -> None:
        self.statements: Counter[str] = Counter()
        self.kind_of = kind_of or kind  # bench/event_workers.py names more tables

    def log(self, query: asyncpg.connection.LoggedQuery) -> None:
        self.statements.update([self.kind_of(query.query)])

    async def watch(self, pool: asyncpg.Pool, size: int) -> None:
        held = [await pool.acquire() for _ in range(size)]
        for conn in held:
            conn.add_query_logger(self.log)
        for conn in held:
            await pool.release(conn)


async def handle_all(s: Settings, pool: asyncpg.Pool, events: list[Published],
                     endpoints: int, batch: int, counted: Counted | None = None
                     ) -> tuple[int, float]:
    """The webhooks worker takes every event anew, `batch` at a time; the events it took and
    the CPU seconds this process spent on them."""
    await pool.execute("DELETE FROM inbox WHERE consumer = 'webhooks';"
                       " DELETE FROM webhook_endpoints; DELETE FROM webhook_deliveries")
    for n in range(endpoints):
        await pool.execute("INSERT INTO webhook_endpoints (url, events, secret)"
                           " VALUES ($1, '{*}', $2)", f"http://127.0.0.1:9/{n}",
                           Sealer().seal(new_secret()))
    flow = InMemoryFlow(s, pool).add(webhooks_worker(s))
    taken = [e for e in events if flow.routed(e.routing_key)]
    if counted is not None:
        counted.statements.clear()
    cpu = time.process_time()
    for i in range(0, len(taken), batch):
        await flow.deliver([flow.as_delivery(e) for e in taken[i:i + batch]], to="webhooks")
    return len(taken), time.process_time() - cpu


async def measure(s: Settings, events: list[Published], endpoints: int, batch: int) -> dict[str, float]:
    pool = await db.create_pool(s.database_url, max_size=2, attempts=3)
    try:
        await handle_all(s, pool, events, endpoints, batch)  # warm: statements prepared, types read
        counted = Counted()
        await counted.watch(pool, 2)
        taken, cpu = await handle_all(s, pool, events, endpoints, batch, counted)
        total = sum(counted.statements.values())
        made = await pool.fetchval("SELECT count(*) FROM webhook_deliveries")
    finally:
        await pool.close()
    print(f"endpoints {endpoints}, batch {batch:>2}: {taken} events, {made} deliveries;"
          f" {total / taken:.2f} statements an event"
          f" ({', '.join(f'{k} {v / taken:.2f}' for k, v in sorted(counted.statements.items()))});"
          f" {cpu / taken * 1e3:.2f} ms CPU an event (this process)", flush=True)
    return {"statements_per_event": total / taken, "cpu_ms_per_event": cpu / taken * 1e3}


@contextlib.asynccontextmanager
async def bench_database(name: str, orders: int, seed: int
                         ) -> AsyncIterator[tuple[Settings, list[Published]]]:
    """A database and namespace of the run's own (`om_<name>_<hex>`), migrated, the sample
    catalog loaded, `orders` honest orders placed and screened through the broker-free flow
    (their events returned for the workers to take); the database dropped at the end."""
    run_id = uuid.uuid4().hex[:8]
    base = Settings()
    url = urlunsplit(urlsplit(base.database_url)._replace(path=f"/om_{name}_{run_id}"))
    s = base.model_copy(update={"database_url": url, "ordermill_namespace": f"{name}.{run_id}",
                                "trust_any_publisher": True})
    await db.ensure_database(url, attempts=3)
    try:
        pool = await db.create_pool(url, max_size=4, attempts=3)
        try:
            await db.migrate(pool)
            async with pool.acquire() as conn:
                await load_catalog(conn, read_catalog(ROOT / "catalog.example.toml"))
            flow = InMemoryFlow(s, pool).add(placement_worker(s), fraud_worker(s))
            rng = random.Random(seed)
            for n in range(orders):
                await flow.send("order.place",
                                make_order(rng, f"{name}-{n}", "honest", "203.0.113.9"))
            events = await flow.run()
        finally:
            await pool.close()
        yield s, events
    finally:
        admin = await asyncpg.connect(urlunsplit(urlsplit(url)._replace(path="/postgres")))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "om_{name}_{run_id}" WITH (FORCE)')
        finally:
            await admin.close()


async def main(orders: int, endpoint_counts: list[int], batches: list[int]) -> None:
    async with bench_database("fanout", orders, seed=14) as (s, events):
        for endpoints in endpoint_counts:
            for batch in batches:
                await measure(s, events, endpoints, batch)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--endpoints", default="0,3", help="comma-separated endpoint counts")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    args = parser.parse_args()
    asyncio.run(main(args.orders, [int(x) for x in args.endpoints.split(",")],
                     [int(x) for x in args.batch.split(",")]))
