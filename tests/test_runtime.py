"""The worker runtime and the outbox: dead letters, retries, idempotency, relay guarantees."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import asyncpg
import pytest
from aio_pika.exceptions import PublishError

from conftest import Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from shared import broker, db
from shared.contracts import OrderRejected
from shared.housekeeping import Housekeeper
from shared.outbox import OutboxRelay
from shared.runtime import Middleware, Runtime, WorkerSpec, redact, route
from shared.settings import Settings
from shared.topology import (
    SERVICE_BINDINGS,
    Names,
    dead_queue_arguments,
    declare_topology,
    delete_topology,
)
from shared.uow import MessageContext, UnitOfWork, event_id, flush_events, write_event


async def test_malformed_and_schema_invalid_messages_are_dead_lettered_while_good_ones_flow(
    harness: Harness,
) -> None:
    store = await harness.listen("order.rejected")
    await harness.start([placement_worker(harness.settings), fraud_worker(harness.settings)])
    not_json = await harness.publish("order.place", None, raw=b"{not json")
    no_items = order_body("schema-bad", items=[])
    schema_bad = await harness.publish("order.place", no_items)
    secret = order_body("secret-bad", currency="usd")
    secret["items"][1] |= {"action": "transfer", "epp_code": "s3cret-EPP"}
    secret_bad = await harness.publish("order.place", secret)
    await harness.publish("order.place", order_body("good-1"))
    await harness.publish("order.place", order_body("good-2"))

    assert (await harness.screened("good-1"))["screening"] == "passed"
    assert (await harness.screened("good-2"))["screening"] == "passed"

    async def three_dead():
        found = await harness.dead_letters("placement")
        three_dead.seen += found
        return len(three_dead.seen) >= 3
    three_dead.seen = []
    await eventually(three_dead)
    by_id = {m.message_id: m for m in three_dead.seen}
    assert by_id[not_json].headers["x-ordermill-reason"].startswith("body is not JSON")
    assert by_id[not_json].body == b"{not json"
    reason = by_id[schema_bad].headers["x-ordermill-reason"]
    assert reason.startswith("schema: items: List should have at least 1 item")
    assert by_id[schema_bad].headers["x-ordermill-routing-key"] == "order.place"
    # Secrets never reach a dead letter.
    assert b"s3cret-EPP" not in by_id[secret_bad].body
    assert json.loads(by_id[secret_bad].body)["items"][1]["epp_code"] == "[redacted]"
    # The storefront hears about the refused orders it can be told about.
    rejected = await store.wait_for("order.rejected", lambda b: b["order_ref"] == "schema-bad")
    assert "items" in rejected["reason"]
    await store.wait_for("order.rejected", lambda b: b["order_ref"] == "secret-bad")
    assert await harness.pool.fetchval("SELECT count(*) FROM orders") == 2


async def test_hostile_bodies_are_dead_lettered_at_once_with_a_short_reason(
    harness: Harness,
) -> None:
    """Input that broke parsing, redaction or the database now gets a reason on its first
    delivery, never one the size of the input, and good orders keep flowing."""
    store = await harness.listen("order.rejected")
    await harness.start([placement_worker(harness.settings), fraud_worker(harness.settings)],
                        max_message_bytes=512 * 1024)
    huge_domain = order_body("huge-domain")
    huge_domain["items"][0]["domain"] = "\x7f" * 5_000
    nul_name = order_body("nul-name")
    nul_name["client"]["first_name"] = "Ann\x00"
    big_id = order_body("big-client-id", client={"id": 2**63})
    bad_ip = order_body("bad-ip", ip_address="999.1.1.1")
    cases = {
        await harness.publish("order.place", huge_domain): "schema: items.0.product.domain: '",
        await harness.publish("order.place", None, raw=b"[" * 100_000 + b"]" * 100_000):
            "body is not JSON we take: nested too deeply",
        await harness.publish("order.place", None,
                              raw=b'{"order_ref": "digits", "x": ' + b"1" * 5000 + b"}"):
            "body is not JSON: Exceeds the limit",
        await harness.publish("order.place", None,
                              raw=b'{"order_ref": "deep", "client": ' + b"[" * 900 + b"]" * 900
                              + b"}"): "schema: client.ExistingClient: Input should be a valid",
        await harness.publish("order.place", nul_name): "a text value holds a NUL character",
        await harness.publish("order.place", big_id):
            "schema: client.ExistingClient.id: Input should be less than or equal to",
        await harness.publish("order.place", bad_ip):
            "schema: ip_address: Input is not a valid IPv4 address",
        await harness.publish("order.place", None, raw=b"{}" + b" " * 600_000):
            "body of 600002 bytes is over MAX_MESSAGE_BYTES (524288)",
    }
    await harness.publish("order.place", order_body("after-hostile"))
    assert (await harness.screened("after-hostile"))["screening"] == "passed"

    async def all_dead():
        all_dead.seen += await harness.dead_letters("placement")
        return len(all_dead.seen) >= len(cases)
    all_dead.seen = []
    await eventually(all_dead, timeout=30)
    for message in all_dead.seen:
        reason = message.headers["x-ordermill-reason"]
        assert reason.startswith(cases[message.message_id]), reason
        assert len(reason) <= 1003, reason[:100]
        assert "x-death" not in message.headers  # ours, at once: not the broker's, after 20
    rejected = await store.wait_for("order.rejected", lambda b: b["order_ref"] == "huge-domain")
    assert "(5000 chars)" in rejected["reason"] and len(rejected["reason"]) < 400
    for ref in ("nul-name", "big-client-id", "bad-ip"):
        await store.wait_for("order.rejected", lambda b, ref=ref: b["order_ref"] == ref)
    assert await harness.pool.fetchval("SELECT count(*) FROM orders") == 1


async def test_a_message_id_reused_for_another_message_is_refused_not_skipped(
    harness: Harness,
) -> None:
    store = await harness.listen("order.rejected")
    await harness.start([placement_worker(harness.settings), fraud_worker(harness.settings)])
    first = order_body("reuse-first")
    await harness.publish("order.place", first, message_id="storefront-1")
    await harness.screened("reuse-first")
    await harness.publish("order.place", first, message_id="storefront-1")  # a redelivery
    # Re-sent formatted otherwise, with a field the contract ignores: still the same message.
    await harness.publish("order.place", None, message_id="storefront-1",
                          raw=json.dumps(first | {"sent_at": "now"}, indent=1).encode())
    await harness.publish("order.place", order_body("reuse-second"), message_id="storefront-1")
    dead = await eventually(lambda: harness.dead_letters("placement"))
    assert [m.message_id for m in dead] == ["storefront-1"]
    assert dead[0].headers["x-ordermill-reason"].startswith(
        "message_id 'storefront-1' was used before for a different message")
    assert json.loads(dead[0].body)["order_ref"] == "reuse-second"
    await harness.publish("order.place", order_body("reuse-marker"))
    await harness.screened("reuse-marker")
    # Not answered with order.rejected: the id's first order exists, and may share the ref.
    assert store.bodies("order.rejected") == []
    assert await harness.pool.fetchval("SELECT count(*) FROM orders") == 2


async def test_a_background_task_that_fails_is_started_again(
    harness: Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[int] = []

    async def flaky(pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        runs.append(await pool.fetchval("SELECT 1"))
        if len(runs) == 1:
            raise RuntimeError("a bug in a sweeper")
        await stop.wait()

    spec = WorkerSpec(service="fraud", routes={}, background=(flaky,))
    await harness.start([spec], relay=False)
    async def started_again() -> bool:
        return len(runs) == 2
    await eventually(started_again, timeout=10)
    failed = [r for r in caplog.records if r.getMessage() == "background task failed; starting it again"]
    assert [r.task for r in failed] == ["fraud-background"]


async def test_transient_errors_are_retried_then_dead_lettered(harness: Harness) -> None:
    calls: dict[str, int] = {}

    async def flaky(event: OrderRejected, uow: UnitOfWork) -> None:
        calls[event.order_ref] = calls.get(event.order_ref, 0) + 1
        await uow.conn.execute(
            "INSERT INTO catalog_meta (key, value) VALUES ($1, 'x')", f"probe:{event.order_ref}")
        if event.order_ref == "always" or calls[event.order_ref] == 1:
            raise asyncpg.DeadlockDetectedError("deadlock detected (test)")

    spec = WorkerSpec(service="placement", routes={"order.place": route(flaky)})
    await harness.start([spec], relay=False)
    await harness.publish("order.place", {"order_ref": "once", "reason": "x"})
    await harness.publish("order.place", {"order_ref": "always", "reason": "x"})

    async def probe() -> bool:
        return await harness.pool.fetchval(
            "SELECT count(*) FROM catalog_meta WHERE key = 'probe:once'") == 1
    await eventually(probe)
    dead = await eventually(lambda: harness.dead_letters("placement"))
    assert [json.loads(m.body)["order_ref"] for m in dead] == ["always"]
    assert dead[0].headers["x-ordermill-reason"].startswith(
        "transient error persisted after retries: DeadlockDetectedError")
    assert calls == {"once": 2, "always": harness.settings.transient_attempts}
    # Each failed attempt rolled back: only the successful one left its row.
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM catalog_meta WHERE key LIKE 'probe:%'") == 1


async def test_a_handler_bug_dead_letters_the_message_and_the_worker_keeps_going(
    harness: Harness,
) -> None:
    async def buggy(event: OrderRejected, uow: UnitOfWork) -> None:
        if event.order_ref == "boom":
            raise KeyError("missing")
        uow.emit("order.checked", {"order_ref": event.order_ref})

    store = await harness.listen("order.checked")
    await harness.start([WorkerSpec(service="placement", routes={"order.place": route(buggy)})])
    await harness.publish("order.place", {"order_ref": "boom", "reason": "x"})
    await harness.publish("order.place", {"order_ref": "fine", "reason": "x"})
    await store.wait_for("order.checked", lambda b: b["order_ref"] == "fine")
    dead = await eventually(lambda: harness.dead_letters("placement"))
    assert dead[0].headers["x-ordermill-reason"] == "handler failed: KeyError: 'missing'"


async def test_unknown_routing_key_on_a_work_queue_is_dead_lettered(harness: Harness) -> None:
    await harness.start([placement_worker(harness.settings)])
    # Someone bound the placement queue to a key it has no handler for.
    channel = await harness.connection.channel()
    queue = await channel.get_queue(harness.names.queue("placement"))
    await queue.bind(harness.names.exchange, routing_key="order.misrouted")
    message_id = await harness.publish("order.misrouted", {"order_ref": "x"})
    dead = await eventually(lambda: harness.dead_letters("placement"))
    assert dead[0].message_id == message_id
    assert dead[0].headers["x-ordermill-reason"] == (
        "no handler for routing key 'order.misrouted' in placement")


async def test_relay_publishes_nothing_for_a_rolled_back_transaction(harness: Harness) -> None:
    store = await harness.listen("test.event")
    async with harness.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await write_event(conn, "test.event", {"n": "rolled-back"},
                          message_id=event_id("t", 1), correlation_id=None)
        await tx.rollback()
        async with conn.transaction():
            await write_event(conn, "test.event", {"n": "committed"},
                              message_id=event_id("t", 2), correlation_id="cause-1")
    await harness.start([])  # the relay alone
    await store.wait_for("test.event", lambda b: b["n"] == "committed")
    await asyncio.sleep(0.5)
    assert [b["n"] for b in store.bodies("test.event")] == ["committed"]
    message = store.received[0][2]
    assert message.message_id == str(event_id("t", 2))
    assert message.correlation_id == "cause-1"
    assert await harness.pool.fetchval("SELECT count(*) FROM outbox") == 1


async def test_relays_racing_publish_each_event_once(harness: Harness) -> None:
    store = await harness.listen("race.event")
    async with harness.pool.acquire() as conn, conn.transaction():
        for n in range(300):
            await write_event(conn, "race.event", {"n": n}, message_id=event_id("race", n),
                              correlation_id=None)
    relay = harness.settings.model_copy(update={"relay_batch": 25}).relay
    relays = [OutboxRelay(harness.pool, harness.exchange, harness.settings.database_url, relay)
              for _ in range(3)]

    async def drain(relay: OutboxRelay) -> None:
        while await relay.drain_once():
            pass
    await asyncio.gather(*(drain(r) for r in relays))
    await eventually(lambda: _count(store, 300))
    await asyncio.sleep(0.3)
    assert sorted(b["n"] for b in store.bodies("race.event")) == list(range(300))
    assert sum(r.published for r in relays) == 300
    assert all(r.published > 0 for r in relays)


async def _count(store, n: int) -> bool:
    return len(store.bodies("race.event")) >= n


async def test_relay_wakes_on_notify_without_waiting_for_the_sweep(harness: Harness) -> None:
    store = await harness.listen("wake.event")
    await harness.start([], relay_sweep_seconds=30.0)
    await asyncio.sleep(0.3)  # the relay is idle, waiting
    async with harness.pool.acquire() as conn:
        await write_event(conn, "wake.event", {"n": 1}, message_id=event_id("wake", 1),
                          correlation_id=None)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await store.wait_for("wake.event", lambda b: True, timeout=5)
    assert loop.time() - start < 5  # well before the 30 s sweep


async def test_publishes_at_once_are_queued_together_not_flushed_one_by_one(
        harness: Harness) -> None:
    """The relay's publish (broker.publish_queued) holds the channel only to queue a
    message's frames: within two turns of the event loop a pass's messages are queued up
    to the connection's frame buffer and beyond, where `exchange.publish` holds it until
    each frame is written (one or two in that time), and every one is still confirmed and
    delivered."""
    listener = await harness.listen("queued.test")
    channel = await harness.exchange.channel.get_underlay_channel()
    first = channel.delivery_tag
    tasks = [asyncio.create_task(broker.publish_queued(
        harness.exchange, "queued.test", broker.json_message({"n": n}, routing_key="queued.test")))
        for n in range(50)]
    for _ in range(2):
        await asyncio.sleep(0)
    queued = channel.delivery_tag - first
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    assert queued >= 10
    assert channel.delivery_tag - first == 50

    async def received() -> bool:
        return sorted(b["n"] for _, b, _ in listener.received) == list(range(50))
    await eventually(received)


async def test_a_queued_publish_no_queue_takes_raises_as_publish_does(harness: Harness) -> None:
    with pytest.raises(PublishError):
        await asyncio.wait_for(broker.publish_queued(
            harness.exchange, "nobody.listens", broker.json_message({}, routing_key="x")), 30)


async def test_unroutable_events_are_recorded_not_retried(harness: Harness) -> None:
    async with harness.pool.acquire() as conn:
        await write_event(conn, "nobody.listens", {"n": 1}, message_id=event_id("nobody", 1),
                          correlation_id=None)
    await harness.start([])

    async def marked() -> bool:
        return await harness.pool.fetchval(
            "SELECT unroutable AND published_at IS NOT NULL FROM outbox") is True
    await eventually(marked)


async def test_migrations_apply_once_when_several_workers_start_together(settings) -> None:
    fresh = settings.database_url.rsplit("/", 1)[0] + "/" + \
        settings.database_url.rsplit("/", 1)[1] + "_fresh"
    created = await asyncio.gather(*(db.ensure_database(fresh) for _ in range(4)))
    assert sorted(created) == [False, False, False, True]  # the losers of the race do not fail
    assert await db.ensure_database(fresh) is False
    pools = [await db.create_pool(fresh, max_size=2) for _ in range(3)]
    try:
        results = await asyncio.gather(*(db.migrate(p) for p in pools))
        assert sorted(len(r) for r in results)[-1] >= 1
        applied = [v for r in results for v in r]
        assert len(applied) == len(set(applied))  # each migration applied by exactly one
        assert await pools[0].fetchval("SELECT count(*) FROM schema_migrations") == len(applied)
    finally:
        for p in pools:
            await p.close()
        admin = await asyncpg.connect(settings.database_url.rsplit("/", 1)[0] + "/postgres")
        await admin.execute(f'DROP DATABASE "{fresh.rsplit("/", 1)[1]}" WITH (FORCE)')
        await admin.close()


def test_redact_hides_secrets_at_any_depth() -> None:
    body = {"items": [{"epp_code": "abc", "domain": "x.com"}], "password": "p", "token": None}
    assert redact(body) == {"items": [{"epp_code": "[redacted]", "domain": "x.com"}],
                            "password": "[redacted]", "token": None}


async def test_housekeeping_deletes_old_published_events_and_old_inbox_rows(
    harness: Harness,
) -> None:
    async with harness.pool.acquire() as conn:
        for n, published in enumerate(["now() - interval '4 days'", "now()", "NULL"]):
            await write_event(conn, "hk.event", {"n": n}, message_id=event_id("hk", n),
                              correlation_id=None)
            await conn.execute(f"UPDATE outbox SET published_at = {published},"
                               " created_at = now() - interval '5 days' WHERE message_id = $1",
                               event_id("hk", n))
        await conn.execute("INSERT INTO inbox (consumer, message_id, processed_at) VALUES"
                           " ('fraud', 'old', now() - interval '40 days'), ('fraud', 'new', now())")
    keeper = Housekeeper(Settings(outbox_retention_hours=72, inbox_retention_days=30,
                                  housekeeping_seconds=600).housekeeping)
    assert await keeper.once(harness.pool) == {"outbox": 1, "inbox": 1, "jobs": 0, "emails": 0,
                                              "webhook_deliveries": 0, "alerts": 0}
    left = await harness.pool.fetch("SELECT body->>'n' AS n FROM outbox ORDER BY id")
    assert [r["n"] for r in left] == ["1", "2"]  # the unpublished one is never thrown away
    assert [r["message_id"] for r in await harness.pool.fetch("SELECT message_id FROM inbox")] == [
        "new"]


class _FailOnce(Middleware):
    """A failure where no handler can catch it (as a database blip in the inbox look-up
    was), first in the pipeline: the batch must not be left unacknowledged."""

    failures = 1

    async def __call__(self, batch, call_next):
        if self.failures:
            self.failures -= 1
            raise asyncpg.ConnectionDoesNotExistError("connection was closed (test)")
        await call_next(batch)


async def test_a_batch_that_fails_outside_any_handler_is_requeued_not_held(
    harness: Harness,
) -> None:
    prepared: list[str] = []

    async def look_up(event: OrderRejected, pool: asyncpg.Pool) -> str:
        prepared.append(event.order_ref)
        return event.order_ref.upper()

    async def handle(event: OrderRejected, uow: UnitOfWork) -> None:
        uow.emit("order.checked", {"order_ref": event.order_ref, "looked_up": uow.prepared})

    store = await harness.listen("order.checked")
    fault = _FailOnce()
    runtime = Runtime(harness.settings, middleware=[fault])
    spec = WorkerSpec(service="placement",
                      routes={"order.place": route(handle, prepare=look_up)})
    task = asyncio.create_task(runtime.serve([spec]))
    try:
        await harness.publish("order.place", {"order_ref": "blip", "reason": "x"})
        event = await store.wait_for("order.checked", lambda b: b["order_ref"] == "blip")
        assert event["looked_up"] == "BLIP"
        assert fault.failures == 0 and prepared == ["blip"]
        assert await harness.dead_letters("placement") == []
    finally:
        runtime.stop()
        await task


async def test_a_batchs_events_are_written_intact_and_once(harness: Harness) -> None:
    """One statement writes every event of a batch: bodies as emitted (non-ASCII, quotes,
    nulls), replies marked direct, and an event written twice kept once."""
    body = {"a": [1, {"b": "é\u2028\"'\\"}], "n": None, "t": True}
    async with harness.pool.acquire() as conn, conn.transaction():
        uows = []
        for message_id in ("m1", "m2"):
            context = MessageContext(consumer="c", message_id=message_id, routing_key="k",
                                     received_at=datetime.now(UTC), reply_to="amq.gen-replies",
                                     correlation_id="corr")
            uow = UnitOfWork(conn, context)
            uow.emit("x.y", body)
            uow.reply({"ok": 1})
            uows.append(uow)
        uows[1]._events.append(uows[0]._events[0])  # the same event id again
        await flush_events(conn, uows)
    rows = await harness.pool.fetch(
        "SELECT routing_key, body, correlation_id, direct FROM outbox ORDER BY id")
    assert [(r["routing_key"], r["body"], r["correlation_id"], r["direct"]) for r in rows] == [
        ("x.y", body, "m1", False), ("amq.gen-replies", {"ok": 1}, "corr", True),
        ("x.y", body, "m2", False), ("amq.gen-replies", {"ok": 1}, "corr", True)]


async def test_a_heartbeat_file_is_touched_while_the_worker_can_work(
    harness: Harness, tmp_path: Path,
) -> None:
    beat = tmp_path / "alive"
    runtime = await harness.start([placement_worker(harness.settings)],
                                  heartbeat_file=str(beat), heartbeat_seconds=0.2)

    async def touched() -> int:
        return beat.exists() and beat.stat().st_mtime_ns

    first = await eventually(touched)
    assert await eventually(lambda: _later(touched, first))
    assert datetime.fromisoformat(beat.read_text().strip()).tzinfo is not None
    runtime.stop()

    async def gone() -> bool:
        return not beat.exists()
    await eventually(gone)  # a stopped worker is not alive


async def _later(touched, first: int) -> bool:
    return (await touched()) > first


async def test_a_busy_pool_is_no_outage(harness: Harness) -> None:
    # Every pooled connection in a long transaction: the database still answers, so a
    # message's persistent deadlock is its own (dead-lettered), not an outage to wait out.
    runtime = await harness.start([placement_worker(harness.settings)], db_pool_max=2)
    assert runtime.pool is not None
    held = [await runtime.pool.acquire() for _ in range(2)]
    try:
        assert await runtime.database.answers() is True
    finally:
        for conn in held:
            await runtime.pool.release(conn)


async def test_the_heartbeat_survives_a_failed_beat(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    folder = tmp_path / "not-yet"
    beat = folder / "alive"
    await harness.start([placement_worker(harness.settings)],
                        heartbeat_file=str(beat), heartbeat_seconds=0.2)

    async def logged() -> bool:
        return "heartbeat not written" in caplog.text
    await eventually(logged)
    folder.mkdir()

    async def touched() -> bool:
        return beat.exists()
    await eventually(touched)


async def test_dead_letter_queues_carry_a_delivery_limit_of_their_own(harness: Harness) -> None:
    # Redeclaring with the same arguments succeeds only if the queue has them: RabbitMQ 4.x
    # would otherwise give it its default of 20, and 20 looks would drop a dead letter.
    channel = await harness.connection.channel()
    for service in SERVICE_BINDINGS:
        await channel.declare_queue(harness.names.dead_queue(service), durable=True,
                                    arguments=dead_queue_arguments())
    await channel.close()


async def test_a_dead_letter_queue_an_older_release_declared_is_kept_and_still_fed(
    settings: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    names = Names(settings.namespace + ".old")
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(names.dead_queue("placement"), durable=True,
                                    arguments={"x-queue-type": "quorum"})  # no delivery limit
        try:
            await declare_topology(connection, names, delivery_limit=settings.queue_delivery_limit)
            assert "dead-letter queue kept" in caplog.text
            dlx = await channel.get_exchange(names.dead_letter_exchange)
            await dlx.publish(aio_pika.Message(b"{}", message_id="kept"),
                              routing_key=names.queue("placement"))
            dead = await channel.get_queue(names.dead_queue("placement"))
            message = await eventually(lambda: dead.get(fail=False))
            assert message.message_id == "kept"
            await message.ack()
        finally:
            await delete_topology(channel, names)


async def test_a_connection_cut_while_the_schema_is_checked_at_start_is_waited_out(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failover cutting the pool's connections while a worker starts (one process of a
    supervisor's may still be starting when it comes): the start waits it out as it waits for
    the first connection, instead of ending with "cannot reach PostgreSQL" (and, under a
    supervisor, ending the whole run)."""
    real = db.ensure_schema
    calls = 0

    async def cut_once(pool: asyncpg.Pool, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncpg.exceptions.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation")
        await real(pool, **kwargs)

    monkeypatch.setattr(db, "ensure_schema", cut_once)
    runtime = Runtime(settings.model_copy(update={"startup_attempts": 3}))
    try:
        await runtime.start()
        assert calls == 2 and runtime.pool is not None and runtime.connection is not None
    finally:
        await runtime.close()


async def test_the_relay_hears_its_own_process_commit_without_a_notify(harness: Harness) -> None:
    """A unit of work's events wake the relay of its own process in memory (wakeup.heard_here):
    published at once, with the sweep 30 s away, and no NOTIFY for every other process."""
    store = await harness.listen("here.event")
    await harness.start([], relay_sweep_seconds=30.0)
    await asyncio.sleep(0.3)  # the relay is idle, waiting
    heard: list[str] = []
    listener = await asyncpg.connect(harness.settings.database_url)
    await listener.add_listener("ordermill_outbox", lambda *args: heard.append(args[3]))
    try:
        async with harness.pool.acquire() as conn, conn.transaction():
            uow = UnitOfWork(conn, MessageContext(consumer="placement", message_id="here-1",
                                                  routing_key="order.place",
                                                  received_at=datetime.now(UTC)))
            uow.emit("here.event", {"n": 1})
            await flush_events(conn, [uow])
        await store.wait_for("here.event", lambda b: True, timeout=5)
        await listener.execute("SELECT pg_notify('ordermill_outbox', 'mark')")
        await eventually(lambda: asyncio.sleep(0, "mark" in heard), timeout=5)
        assert heard == ["mark"]  # notifications come in commit order: none before the mark
    finally:
        await listener.close()


async def test_a_relay_pass_takes_the_wake_ups_of_what_it_read(harness: Harness) -> None:
    """A wake-up heard before a pass reads is answered by that pass: left set, it started
    another pass that found nothing (half the relay's passes at a steady rate)."""
    relay = OutboxRelay(harness.pool, harness.exchange, harness.settings.database_url,
                        harness.settings.relay)
    async with harness.pool.acquire() as conn:
        await write_event(conn, "taken.event", {"n": 1}, message_id=event_id("taken", 1),
                          correlation_id=None)
    relay._wake.set()  # as the commit's wake-up, heard while the pass waited for its slot
    assert await relay.drain_once() == 1
    assert not relay._wake.is_set()
