"""What the two event-only workers cost an event through the real broker: `ordermill run
webhooks alerts` (nothing else) takes a burst of order.placed and order.screened events
published to the exchange, and its CPU seconds, PostgreSQL's transactions and RabbitMQ's CPU
over the drain are divided by the deliveries it took. Unlike bench/pipeline.py's burst, no
other worker shares the process and the figures are per delivery of these two queues.

Real bodies: `--orders` honest orders go through placement and fraud in the broker-free
harness first (their events kept); the burst publishes them again and again with fresh
message ids, `--events` in all, each taken by both queues. The worker starts on the empty
queues; its CPU is read once it consumes, and again when both queues are empty and every
delivery acked. Its own database and namespace, removed at the end.

Run: PYTHONPATH=$PWD .venv/bin/python bench/event_drain.py [--events 10000] [--orders 100]
     [--rate N] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

import aio_pika
import asyncpg
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline import (
    ORDERMILL,
    RESULTS,
    Bench,
    WorkerProcess,
    create_database,
    drop_database,
)
from cli.demo import make_order
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from shared import broker, db
from shared.parties import amqp_user
from shared.runtime.testing import InMemoryFlow, Published
from shared.topology import declare_topology, delete_topology

KEYS = ("order.placed", "order.screened")


async def events_of(bench: Bench, orders: int) -> list[Published]:
    s = bench.settings.model_copy(update={"trust_any_publisher": True})
    pool = await db.create_pool(s.database_url, max_size=4, attempts=3)
    try:
        flow = InMemoryFlow(s, pool).add(placement_worker(s), fraud_worker(s))
        rng = random.Random(15)
        for n in range(orders):
            await flow.send("order.place", make_order(rng, f"drain-{n}", "honest", "203.0.113.9"))
        return [e for e in await flow.run() if e.routing_key in KEYS]
    finally:
        await pool.close()


def rabbitmq_cpu() -> float:
    total = 0.0
    for proc in psutil.process_iter(["name", "username"]):
        if proc.info["name"] == "beam.smp":
            with_times = proc.cpu_times()
            total += with_times.user + with_times.system
    return total


async def commits(bench: Bench) -> tuple[int, int]:
    """This database's transactions committed and rows inserted so far."""
    conn = await asyncpg.connect(bench.settings.database_url)
    try:
        row = await conn.fetchrow("SELECT xact_commit, tup_inserted FROM pg_stat_database"
                                  " WHERE datname = current_database()")
        return row["xact_commit"], row["tup_inserted"]
    finally:
        await conn.close()


async def drained(channel: aio_pika.abc.AbstractChannel, names: list[str], deadline: float) -> None:
    queues = [await channel.declare_queue(name, passive=True) for name in names]
    while time.monotonic() < deadline:
        counts = [(await q.declare()).message_count for q in queues]
        if not any(counts):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"not drained: {counts}")


async def main(opts: argparse.Namespace) -> None:
    bench = Bench.create()
    s = bench.settings
    names = bench.names
    print(f"drain {bench.run_id}: {opts.events} events, load {os.getloadavg()[0]:.2f}", flush=True)
    connection = await broker.connect(s.amqp_url, attempts=3)
    profile = [sys.executable, "-m", "cProfile", "-o", opts.profile] if opts.profile else []
    worker = WorkerProcess("ordermill run webhooks alerts",
                           [*profile, str(ORDERMILL), "run", "webhooks", "alerts"], bench.env(),
                           RESULTS / "drain-worker.log")
    try:
        await create_database(s)
        await declare_topology(connection, names, delivery_limit=s.queue_delivery_limit)
        events = await events_of(bench, opts.orders)
        queues = [names.queue("webhooks"), names.queue("alerts")]
        await worker.start(connection, queues)
        await asyncio.sleep(2)  # its start-up settled
        proc = psutil.Process(worker.pid)
        cpu0, rmq0 = sum(proc.cpu_times()[:2]), rabbitmq_cpu()
        xact0, t0 = await commits(bench), time.monotonic()
        channel = await broker.open_publisher(connection)
        exchange = await channel.get_exchange(names.exchange)
        user = amqp_user(s.amqp_url)
        pending = []
        started = time.monotonic()
        for n in range(opts.events):
            if opts.rate and n % 10 == 0:  # paced: ten at a time, as a pipeline emits them
                await asyncio.sleep(max(0.0, started + n / opts.rate - time.monotonic()))
            event = events[n % len(events)]
            message = broker.json_message(event.body, routing_key=event.routing_key,
                                          message_id=f"drain-{n}", user_id=user)
            pending.append(broker.publish(exchange, event.routing_key, message))
            if len(pending) >= 200:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        await drained(channel, queues, time.monotonic() + 600)
        await asyncio.sleep(1.5)  # the last batch's acks; PostgreSQL's counters (flushed each second)
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        (xact1, rows1), wall = await commits(bench), time.monotonic() - t0
        rmq, xact, rows = rabbitmq_cpu() - rmq0, xact1 - xact0[0], rows1 - xact0[1]
        dead = [(await channel.declare_queue(names.dead_queue(q), passive=True)).declaration_result
                .message_count for q in ("webhooks", "alerts")]
        assert dead == [0, 0], f"dead letters: {dead}"
        deliveries = 2 * opts.events
        print(f"{deliveries} deliveries in {wall:.1f} s; per delivery: worker CPU"
              f" {cpu / deliveries * 1e3:.3f} ms, PostgreSQL transactions {xact / deliveries:.3f}"
              f" and rows inserted {rows / deliveries:.3f},"
              f" RabbitMQ CPU {rmq / deliveries * 1e3:.3f} ms (with the publishing);"
              f" load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        await worker.stop()
        channel = await connection.channel()
        await delete_topology(channel, names)
        await connection.close()
        await drop_database(s)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10000)
    parser.add_argument("--orders", type=int, default=100)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="events/s to publish at (default: as fast as confirms allow)")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the worker under cProfile, its stats written to FILE at its stop")
    asyncio.run(main(parser.parse_args()))
