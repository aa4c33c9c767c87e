"""`ordermill exporter`: its gauges against a seeded database and real queue depths on RabbitMQ,
scraped over HTTP; and its CLI mistakes in one line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aio_pika
from test_metrics import scrape, value

from cli.exporter import serve
from conftest import Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from shared import broker
from shared.runtime.testing import InMemoryFlow

ORDERMILL = str(Path(sys.executable).with_name("ordermill"))


async def _seed(h: Harness) -> dict[str, int]:
    """Three orders awaiting review (one two hours old, one flagged), one still in screening,
    a parked setup and an unapplied payment."""
    flow = InMemoryFlow(h.settings, h.pool).add(placement_worker(h.settings),
                                                 fraud_worker(h.settings))
    for ref in ("exp-1", "exp-2", "exp-3"):
        await flow.send("order.place", order_body(ref))
    await flow.run()
    await flow.send("order.place", order_body("exp-queued"))  # placed, not screened yet
    ids = {r["order_ref"]: r["id"] for r in await h.pool.fetch("SELECT id, order_ref FROM orders")}
    await h.pool.execute("UPDATE orders SET created_at = now() - interval '2 hours' WHERE id = $1",
                         ids["exp-1"])
    await h.pool.execute("UPDATE orders SET screening = 'error' WHERE id = $1", ids["exp-2"])
    service = await h.pool.fetchval("SELECT id FROM services WHERE order_id = $1", ids["exp-3"])
    await h.pool.execute(
        "INSERT INTO jobs (order_id, service_id, kind, status, lane, last_error)"
        " VALUES ($1, $2, 'create', 'parked', 'cpanel:1', 'no token')", ids["exp-3"], service)
    await h.pool.execute(
        "INSERT INTO payments (raw_amount, amount, currency, status, reason, message_id)"
        " VALUES ('5.00', 5.00, 'USD', 'unapplied', 'unknown invoice 999', 'pay-1')")
    return ids


async def test_the_exporter_reports_a_seeded_database_and_real_queue_depths(
    harness: Harness,
) -> None:
    await _seed(harness)
    names = harness.names
    # Three orders waiting in the placement queue (no worker), a consumer on the fraud queue,
    # and two dead letters in review's dead-letter queue.
    for n in range(3):
        await harness.publish("order.place", order_body(f"waiting-{n}"))
    channel = await harness.connection.channel()
    fraud_queue = await channel.get_queue(names.queue("fraud"), ensure=False)

    async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.nack(requeue=True)

    tag = await fraud_queue.consume(hold)
    dlx = await channel.get_exchange(names.dead_letter_exchange)
    for n in range(2):
        await broker.publish(dlx, names.queue("review"), aio_pika.Message(b"{}", message_id=f"d{n}"))

    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    s = harness.settings
    task = asyncio.create_task(serve(
        database_url=s.database_url, amqp_url=s.amqp_url, namespace=s.namespace,
        host="127.0.0.1", port=0, cache_seconds=0, startup_attempts=3, stop=stop, ready=ready))
    try:
        port = await asyncio.wait_for(ready, 30)

        async def depths():
            samples, text = await scrape(port)
            ok = (value(samples, "ordermill_queue_messages", queue=names.queue("placement")) == 3
                  and value(samples, "ordermill_dead_letters", queue=names.dead_queue("review")) == 2)
            return (samples, text) if ok else None

        samples, text = await eventually(depths)
        assert value(samples, "ordermill_queue_consumers", queue=names.queue("fraud")) == 1
        assert value(samples, "ordermill_queue_consumers", queue=names.queue("placement")) == 0
        assert value(samples, "ordermill_queue_messages", queue=names.dead_queue("review")) == 2
        assert value(samples, "ordermill_dead_letters", queue=names.dead_queue("placement")) == 0
        assert ("ordermill_dead_letters", frozenset({("queue", names.queue("placement"))})) \
            not in samples  # dead letters are the .dead queues only
        assert value(samples, "ordermill_orders_awaiting_review") == 3  # not the one in screening
        assert 7200 <= value(samples, "ordermill_orders_awaiting_review_oldest_age_seconds") < 7300
        assert value(samples, "ordermill_screenings_flagged") == 1
        assert value(samples, "ordermill_setups_parked") == 1
        assert value(samples, "ordermill_payments_unapplied") == 1
        assert value(samples, "ordermill_exporter_source_up", source="database") == 1
        assert value(samples, "ordermill_exporter_source_up", source="broker") == 1
        # Its own registry: no worker's message counters, no process collector.
        assert "ordermill_messages_consumed_total" not in text and "process_cpu" not in text

        # The review handled: the gauges follow at the next scrape (no cache here).
        await harness.pool.execute("UPDATE orders SET status = 'Active' WHERE order_ref = 'exp-1'")
        await harness.pool.execute("UPDATE jobs SET status = 'pending'")
        samples, _ = await scrape(port)
        assert value(samples, "ordermill_orders_awaiting_review") == 2
        assert value(samples, "ordermill_orders_awaiting_review_oldest_age_seconds") < 600
        assert value(samples, "ordermill_setups_parked") == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await fraud_queue.cancel(tag)
        await channel.close()


def test_exporter_cli_mistakes_are_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/om_missing_db",
           "STARTUP_ATTEMPTS": "1"}
    for args, expected in ((["--port", "70000"], "65535"),
                           (["--port", "0"], "database missing")):
        result = subprocess.run([ORDERMILL, "exporter", *args], env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode != 0
        assert expected in result.stderr + result.stdout
        assert "Traceback" not in result.stderr
