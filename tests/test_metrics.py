"""Prometheus metrics: /metrics scraped over HTTP and read with prometheus_client's own parser,
the counters following orders through the pipeline (broker-free harness and a real runtime on
RabbitMQ), the database gauges cached per scrape, and a real `ordermill run` process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from conftest import Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.notify.worker import worker as notify_worker
from services.placement.worker import worker as placement_worker
from shared import db
from shared.metrics import EMAILS_BY_STATE, RELAY_GAUGES, DatabaseGauges
from shared.metrics_server import MetricsServer
from shared.runtime.testing import InMemoryFlow
from shared.topology import Names

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> tuple[Samples, str]:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):  # fails on malformed exposition
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Summed over the labels not given."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def serving(registries: Iterable, refresh: Iterable = ()) -> MetricsServer:
    server = MetricsServer(list(registries), refresh=list(refresh))
    await server.start("127.0.0.1", 0)
    return server


async def test_metrics_follow_orders_through_the_pipeline_and_count_rejections_by_kind(
    db_settings, tmp_path: Path,
) -> None:
    """Broker-free: the same pipeline with the metrics middleware, scraped over HTTP."""
    pool = await db.create_pool(db_settings.database_url, max_size=4, attempts=3)
    server = await serving([REGISTRY])
    try:
        flow = InMemoryFlow(db_settings, pool, metrics=True)
        flow.add(placement_worker(db_settings), fraud_worker(db_settings))
        names = Names(db_settings.namespace)
        placement, fraud = names.queue("placement"), names.queue("fraud")
        orders = 4
        for n in range(orders):
            delivery = await flow.send("order.place", order_body(f"metrics-{n}"))
            assert delivery.outcome == "acked"
        await flow.run()
        # Bad input of several kinds: not JSON, a body missing fields, a key no route takes,
        # an unknown product (the handler refuses it), a sender who may not send it.
        await flow.send("order.place", raw=b"{not json")
        await flow.send("order.place", {"order_ref": "metrics-bad"})
        await flow.send("order.nonsense", {"x": 1}, to="placement")
        await flow.send("order.place", order_body(
            "metrics-unknown", items=[{"type": "product", "product": "platinum",
                                       "billing_cycle": "monthly"}]))
        await flow.send("order.place", order_body("metrics-stranger"), user_id="stranger")
        assert len(flow.dead("placement")) == 5

        samples, text = await scrape(server.port)
        assert "# TYPE ordermill_messages_consumed_total counter" in text
        route = {"queue": placement, "route": "order.place"}
        assert value(samples, "ordermill_messages_consumed_total", **route) == orders + 4
        assert value(samples, "ordermill_messages_acked_total", **route) == orders
        for reason in ("malformed", "invalid", "refused", "publisher"):
            assert value(samples, "ordermill_messages_rejected_total", **route,
                         reason=reason) == 1, reason
        assert value(samples, "ordermill_messages_rejected_total", reason="no_route",
                     queue=placement, route="other") == 1  # not a label of its own
        assert value(samples, "ordermill_messages_consumed_total", queue=placement,
                     route="order.nonsense") == 0
        assert value(samples, "ordermill_handler_duration_seconds_count", **route) == orders + 4
        assert value(samples, "ordermill_handler_duration_seconds_sum", **route) > 0
        screened = {"queue": fraud, "route": "order.placed"}
        assert value(samples, "ordermill_messages_consumed_total", **screened) == orders
        assert value(samples, "ordermill_messages_acked_total", **screened) == orders
        assert total(samples, "ordermill_messages_rejected_total", queue=fraud) == 0

        # The same orders again: redeliveries, consumed and acked (the inbox skips them).
        await flow.send("order.place", order_body("metrics-0"))
        after, _ = await scrape(server.port)
        assert value(after, "ordermill_messages_acked_total", **route) == orders + 1
        assert value(after, "ordermill_messages_consumed_total", **route) == orders + 5
        # No order id, client or free text anywhere in the labels.
        for (name, labels) in after:
            if name.startswith("ordermill_"):
                assert not any("metrics-" in v or "@" in v for _, v in labels), (name, labels)
    finally:
        await server.stop()
        await pool.close()


async def test_without_metrics_the_pipeline_counts_nothing(db_settings) -> None:
    pool = await db.create_pool(db_settings.database_url, max_size=2, attempts=3)
    try:
        flow = InMemoryFlow(db_settings, pool).add(placement_worker(db_settings))
        await flow.send("order.place", order_body("quiet-1"))
        queue = Names(db_settings.namespace).queue("placement")
        assert REGISTRY.get_sample_value("ordermill_messages_consumed_total",
                                         {"queue": queue, "route": "order.place"}) is None
    finally:
        await pool.close()


async def test_database_gauges_are_read_once_per_cache_period_however_many_scrapes(
    db_settings,
) -> None:
    pool = await db.create_pool(db_settings.database_url, max_size=4, attempts=3)
    try:
        await pool.execute(
            "INSERT INTO outbox (message_id, routing_key, body, created_at)"
            " SELECT gen_random_uuid(), 'order.placed', '{}', now() - make_interval(secs => 90 - n)"
            " FROM generate_series(1, 3) n")
        await pool.execute(
            "INSERT INTO emails (dedupe_key, template, recipient, message_id, status)"
            " VALUES ('a', 'order_confirmation', 'a@x.example', 'm1', 'parked'),"
            "        ('b', 'order_confirmation', 'b@x.example', 'm2', 'sent'),"
            "        ('c', 'order_confirmation', 'c@x.example', 'm3', 'pending')")
        from prometheus_client import CollectorRegistry
        gauges = DatabaseGauges(pool, [*RELAY_GAUGES, EMAILS_BY_STATE, EMAILS_BY_STATE], ttl=60)
        registry = CollectorRegistry()
        registry.register(gauges)
        server = await serving([registry], [gauges.refresh])
        try:
            results = await asyncio.gather(*(scrape(server.port) for _ in range(5)))
            assert gauges.queries == 1 and gauges.ok
            samples = results[0][0]
            assert value(samples, "ordermill_outbox_backlog") == 3
            assert 88 <= value(samples, "ordermill_outbox_oldest_age_seconds") < 120
            assert value(samples, "ordermill_emails", state="parked") == 1
            assert value(samples, "ordermill_emails", state="pending") == 1
            assert value(samples, "ordermill_emails", state="sending") == 0  # zero, not absent
            assert ("ordermill_emails", frozenset({("state", "sent")})) not in samples
            await pool.execute("UPDATE outbox SET published_at = now()")
            cached, _ = await scrape(server.port)
            assert value(cached, "ordermill_outbox_backlog") == 3  # within the cache period
            gauges.ttl = 0
            fresh, _ = await scrape(server.port)
            assert value(fresh, "ordermill_outbox_backlog") == 0
            assert value(fresh, "ordermill_outbox_oldest_age_seconds") == 0
            assert gauges.queries == 2
        finally:
            await server.stop()
    finally:
        await pool.close()


async def test_a_runtime_on_rabbitmq_serves_metrics_that_move_as_orders_flow(
    harness: Harness,
) -> None:
    runtime = await harness.start([placement_worker(harness.settings), fraud_worker(harness.settings),
                                   notify_worker(harness.settings)],
                                  metrics_port=0, metrics_cache_seconds=0)
    port = runtime.metrics_server.port
    names = harness.names
    route = {"queue": names.queue("placement"), "route": "order.place"}
    before, _ = await scrape(port)
    assert value(before, "ordermill_broker_connected") == 1
    assert value(before, "ordermill_database_outage") == 0
    assert ("ordermill_outbox_backlog", frozenset()) in before
    assert ("ordermill_emails", frozenset({("state", "parked")})) in before  # notify runs here
    assert value(before, "ordermill_messages_consumed_total", **route) == 0
    orders = 5
    for n in range(orders):
        await harness.publish("order.place", order_body(f"live-{n}"))
    await harness.publish("order.place", None, raw=b"\xff not json")
    for n in range(orders):
        await harness.screened(f"live-{n}")

    async def settled() -> Samples | None:
        samples, _ = await scrape(port)
        done = (value(samples, "ordermill_messages_acked_total", **route) == orders
                and value(samples, "ordermill_messages_rejected_total", **route,
                          reason="malformed") == 1
                and value(samples, "ordermill_messages_acked_total", queue=names.queue("fraud"),
                          route="order.placed") == orders)
        return samples if done else None

    samples = await eventually(settled)
    assert value(samples, "ordermill_messages_consumed_total", **route) == orders + 1
    assert value(samples, "ordermill_handler_duration_seconds_count", **route) == orders + 1
    assert total(samples, "ordermill_relay_events_total", outcome="sent") > 0
    assert value(samples, "ordermill_relay_publish_seconds_count") > 0
    assert value(samples, "ordermill_outbox_delay_seconds_count") > 0
    assert "process_cpu_seconds_total" in {n for n, _ in samples}  # the process collector
    assert await harness.dead_letters("placement")  # the rejected one, dead-lettered


async def test_a_port_in_use_stops_the_worker_with_one_line(harness: Harness) -> None:
    from shared.errors import ConfigurationError

    taken = await serving([REGISTRY])
    try:
        with pytest.raises(ConfigurationError, match=r"cannot serve metrics on 127\.0\.0\.1:\d+"):
            await harness.start([placement_worker(harness.settings)], metrics_port=taken.port)
    finally:
        await taken.stop()


@pytest.mark.slow
async def test_ordermill_run_serves_metrics_on_metrics_port(harness: Harness, tmp_path: Path) -> None:
    from test_processes import _running, spawn

    log = tmp_path / "worker.log"
    process = await spawn(harness.settings, log, METRICS_PORT="0", METRICS_HOST="127.0.0.1",
                          LOG_FORMAT="json")
    try:
        async def port() -> int | None:
            for line in log.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("event") == "metrics served":
                    return json.loads(line)["port"]
            return None

        bound = await eventually(port, timeout=30)
        # Every worker process consuming (a process not yet running has no metrics to merge).
        await eventually(lambda: _running(log), timeout=60)
        await harness.publish("order.place", order_body("proc-1"))
        await harness.screened("proc-1")

        async def acked() -> bool:
            samples, _ = await scrape(bound)
            return value(samples, "ordermill_messages_acked_total",
                         queue=harness.names.queue("fraud"), route="order.placed") == 1
        await eventually(acked)
        samples, _ = await scrape(bound)
        assert value(samples, "ordermill_broker_connected") == 1
        assert ("ordermill_emails", frozenset({("state", "parked")})) in samples
        assert ("ordermill_outbox_backlog", frozenset()) in samples
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 60)
