"""What the two event-only workers (webhooks, alerts) cost an event, counted rather than timed
(load-independent): the statements and transactions their connections send to PostgreSQL,
the Python calls (cProfile) and the CPU seconds of this process, per event they take.

Real events first: `--orders` honest orders go through placement and fraud (the broker-free
harness, shared/runtime/testing.py, on a database of its own), and the events they publish
are kept (order.placed and order.screened: what a burst gives these two workers). Then each
worker takes every event it is bound to, `--batch` at a time (as the runtime hands it a
batch under load), twice: once to warm up (statements prepared), once measured. Cases:

    none        nothing subscribed: no webhook endpoint, no alert rule set (most providers)
    unrelated   an endpoint subscribed only to invoice.paid, a rule set whose only rule is
                about dead letters: something is subscribed, but not to these events
    subscribed  an endpoint subscribed to every event, a rule on every new order

Run: PYTHONPATH=$PWD .venv/bin/python bench/event_workers.py [--orders 200] [--batch 1,16]
     [--cases none,unrelated,subscribed] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.webhook_fanout import Counted, bench_database
from services.alerts.rules import parse_toml
from services.alerts.store import store
from services.alerts.worker import worker as alerts_worker
from services.webhooks.sealing import Sealer
from services.webhooks.signing import new_secret
from services.webhooks.worker import worker as webhooks_worker
from shared import db
from shared.runtime.testing import InMemoryFlow, Published
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CASES = ("none", "unrelated", "subscribed")
RULES = {
    "unrelated": '[channels.m]\ntype = "email"\nto = ["ops@x.example"]\n[[rules]]\nname = "d"\n'
                 'trigger = "dead_letter"\nchannels = ["m"]\n',
    "subscribed": '[channels.m]\ntype = "email"\nto = ["ops@x.example"]\n[[rules]]\nname = "n"\n'
                  'trigger = "new_order"\nchannels = ["m"]\n',
}
ENDPOINT_EVENTS = {"unrelated": ["invoice.paid"], "subscribed": ["*"]}


def kind(query: str) -> str:
    q = " ".join(query.split()).lower()
    for word in ("begin", "commit", "rollback"):
        if q.startswith(word):
            return word
    for table in ("inbox", "webhook_deliveries", "alerts", "emails", "outbox"):
        if f"into {table}" in q:
            return f"insert {table}"
    for table in ("webhook_endpoints", "alert_rule_sets", "orders"):
        if f"from {table}" in q:
            return f"select {table}"
    return "other"


async def subscribe(pool: asyncpg.Pool, case: str) -> None:
    """The case's subscriptions, from nothing."""
    await pool.execute("DELETE FROM inbox WHERE consumer IN ('webhooks', 'alerts');"
                       " DELETE FROM webhook_deliveries; DELETE FROM webhook_endpoints;"
                       " DELETE FROM emails WHERE template = 'staff_alert'; DELETE FROM alerts;"
                       " DELETE FROM alert_rule_sets")
    if case == "none":
        return
    await pool.execute("INSERT INTO webhook_endpoints (url, events, secret) VALUES ($1, $2, $3)",
                       "http://127.0.0.1:9/", ENDPOINT_EVENTS[case], Sealer().seal(new_secret()))
    async with pool.acquire() as conn:
        await store(conn, parse_toml(RULES[case]), source="bench", loaded_by="bench",
                    sealer=Sealer())


async def measure(s: Settings, events: list[Published], service: str, case: str, batch: int,
                  profile: str | None) -> str:
    pool = await db.create_pool(s.database_url, max_size=2, attempts=3)
    try:
        counted, calls, cpu, taken = Counted(kind), 0.0, 0.0, 0
        for measured in (False, True):
            await subscribe(pool, case)
            # A worker of its own each time: nothing cached from the pass before.
            flow = InMemoryFlow(s, pool).add(
                webhooks_worker(s) if service == "webhooks" else alerts_worker(s))
            taken_now = [e for e in events if flow.routed(e.routing_key)]
            if measured:
                await counted.watch(pool, 2)
            prof = cProfile.Profile() if measured and profile else None
            started = time.process_time()
            for i in range(0, len(taken_now), batch):
                deliveries = [flow.as_delivery(e) for e in taken_now[i:i + batch]]
                if prof:
                    prof.enable()
                await flow.deliver(deliveries, to=service)
                if prof:
                    prof.disable()
                assert all(m.outcome == "acked" for m in deliveries), deliveries[0].outcome
            cpu, taken = time.process_time() - started, len(taken_now)
            if prof:
                out = Path(profile) / f"{service}-{case}-{batch}.prof"
                prof.dump_stats(out)
                calls = pstats.Stats(str(out)).total_calls / taken
        stats = counted.statements
        writes = sum(v for k, v in stats.items() if k.startswith("insert"))
    finally:
        await pool.close()
    return (f"{service:8} {case:10} batch {batch:>2}: {taken} events;"
            f" {sum(stats.values()) / taken:.3f} statements an event"
            f" (transactions {stats['begin'] / taken:.3f}, inserts {writes / taken:.3f}:"
            f" {', '.join(f'{k} {v / taken:.3f}' for k, v in sorted(stats.items()))});"
            f"{f' {calls:.0f} Python calls an event;' if profile else ''}"
            f" {cpu / taken * 1e3:.3f} ms CPU an event (this process)")


async def main(opts: argparse.Namespace) -> None:
    async with bench_database("events", opts.orders, seed=15) as (s, events):
        for case in opts.cases.split(","):
            for service in ("webhooks", "alerts"):
                for batch in (int(b) for b in opts.batch.split(",")):
                    print(await measure(s, events, service, case, batch, opts.profile), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    parser.add_argument("--profile", metavar="DIR",
                        help="count Python calls (cProfile; the stats go to DIR)")
    asyncio.run(main(parser.parse_args()))
