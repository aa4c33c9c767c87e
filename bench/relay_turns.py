"""How many turns of the event loop an outbox relay pass takes to publish its events, with
the loop kept busy by other work as in a loaded all-in-one worker (issue 15, target 2: where
the tail came from). A count that does not depend on the machine's load, where the pass's
time does: in the worker, every turn also runs every other ready task, so a pass that needs
a turn or two per event holds its events back by that many turns of everything else.

Each round writes `--events` events to the outbox of a fresh bench database, binds a queue
to them, and times `OutboxRelay.drain_once` (one pass: claim, publish with confirms, mark)
while `--busy` tasks each take a small slice of CPU per turn. Publishing is either the
relay's (`broker.publish_queued`: frames queued, then the confirms awaited together) or
aio-pika's `exchange.publish` (the channel held until each frame is written: the relay
before this change), alternating:

    PYTHONPATH=$PWD .venv/bin/python bench/relay_turns.py [--events 50] [--busy 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

from pipeline import Bench, create_database, drop_database

from shared import broker, db
from shared.outbox import OutboxRelay
from shared.topology import declare_topology, delete_topology
from shared.uow import write_event

KEY = "bench.relay.turns"


class CountingLoop(asyncio.SelectorEventLoop):
    """Counts its turns (each runs every callback that was ready)."""

    turns = 0

    def _run_once(self) -> None:
        self.turns += 1
        super()._run_once()  # type: ignore[misc]


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def _busy(stop: asyncio.Event, slice_seconds: float) -> None:
    """Another task of the worker: a little CPU each turn (a consumer's Python)."""
    while not stop.is_set():
        _spin(slice_seconds)
        await asyncio.sleep(0)


async def one_pass(bench: Bench, pool: Any, exchange: Any, events: int, busy: int,
                   slice_ms: float, queued: bool) -> dict[str, float]:
    async with pool.acquire() as conn:
        for n in range(events):
            await write_event(conn, KEY, {"n": n}, message_id=uuid.uuid4(), correlation_id=None)
    relay = OutboxRelay(pool, exchange, None, bench.settings.relay)
    original = broker.publish_queued
    if not queued:
        async def flushed(exchange: Any, routing_key: str, message: Any) -> None:
            await exchange.publish(message, routing_key=routing_key, mandatory=True)
        broker.publish_queued = flushed  # type: ignore[assignment]
    stop = asyncio.Event()
    others = [asyncio.create_task(_busy(stop, slice_ms / 1000)) for _ in range(busy)]
    loop = asyncio.get_running_loop()
    assert isinstance(loop, CountingLoop)
    try:
        await asyncio.sleep(0)
        turns, started = loop.turns, time.perf_counter()
        done = await relay.drain_once()
        turns, seconds = loop.turns - turns, time.perf_counter() - started
    finally:
        stop.set()
        await asyncio.gather(*others)
        broker.publish_queued = original  # type: ignore[assignment]
    assert done == events, f"published {done} of {events}"
    return {"turns": turns, "turns_per_event": round(turns / events, 2),
            "ms": round(seconds * 1000, 1)}


async def run(opts: argparse.Namespace) -> list[dict[str, Any]]:
    bench = Bench.create()
    s = bench.settings
    await create_database(s)
    connection = await broker.connect(s.amqp_url, attempts=3)
    pool = await db.create_pool(s.database_url, max_size=4, attempts=3)
    results = []
    try:
        await declare_topology(connection, bench.names, delivery_limit=s.queue_delivery_limit)
        channel = await broker.open_publisher(connection)
        exchange = await channel.get_exchange(bench.names.exchange)
        sink = await (await connection.channel()).declare_queue(exclusive=True, auto_delete=True)
        await sink.bind(bench.names.exchange, routing_key=KEY)
        for n in range(opts.rounds):
            sides = [True, False] if n % 2 == 0 else [False, True]
            for queued in sides:
                r = await one_pass(bench, pool, exchange, opts.events, opts.busy,
                                   opts.slice_ms, queued)
                r = {"round": n + 1, "publish": "queued" if queued else "flushed", **r}
                print(f"  round {r['round']} {r['publish']:8} {opts.events} events:"
                      f" {r['turns']} turns ({r['turns_per_event']} an event), {r['ms']} ms",
                      flush=True)
                results.append(r)
        await sink.purge()
        await delete_topology(await connection.channel(), bench.names)
    finally:
        await pool.close()
        await connection.close()
        await drop_database(s)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=50, help="events in the pass")
    parser.add_argument("--busy", type=int, default=20, help="other tasks keeping the loop busy")
    parser.add_argument("--slice-ms", type=float, default=0.1,
                        help="CPU each of them takes per turn")
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        results = runner.run(run(opts))
    for side in ("queued", "flushed"):
        mine = [r for r in results if r["publish"] == side]
        print(f"{side}: turns an event {', '.join(str(r['turns_per_event']) for r in mine)};"
              f" ms a pass {', '.join(str(r['ms']) for r in mine)}")


if __name__ == "__main__":
    main()
