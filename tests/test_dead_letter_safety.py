"""Hostile messages against the runtime's dead letters and the CLI's replay (issue 11).

Poison properties are sent as raw frames: the AMQP client would never encode them, so the
test swaps pamqp's encoders for values marked `Raw` (bytes sent as they are) and for integer
timestamps (sent as the 64-bit number). Everything else encodes as usual.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pytest
from pamqp import commands as spec
from pamqp import decode, encode, frame
from pamqp.header import ContentHeader
from test_cli import cli

from conftest import TEST_USER, Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.worker import worker as provisioning_worker
from services.review.worker import worker as review_worker
from shared.contracts import has_nul

TIMESTAMP_OVERFLOW = 2**64 - 1


class Raw(bytes):
    """A short string sent as these bytes, UTF-8 or not."""


@pytest.fixture
def raw_encoders(monkeypatch: pytest.MonkeyPatch) -> None:
    shortstr, timestamp = encode.METHODS["shortstr"], encode.METHODS["timestamp"]

    def raw_shortstr(value: Any) -> bytes:
        return bytes([len(value)]) + value if isinstance(value, Raw) else shortstr(value)

    def raw_timestamp(value: Any) -> bytes:
        return struct.pack(">Q", value) if isinstance(value, int) else timestamp(value)

    monkeypatch.setitem(encode.METHODS, "shortstr", raw_shortstr)
    monkeypatch.setitem(encode.METHODS, "timestamp", raw_timestamp)


@pytest.fixture
async def raw(harness: Harness, raw_encoders: None) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A plain aiormq channel with publisher confirms, on a connection of its own."""
    connection = await aiormq.connect(harness.settings.amqp_url)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


async def publish_raw(channel: aiormq.abc.AbstractChannel, exchange: str, key: str, body: bytes,
                      **properties: Any) -> None:
    properties.setdefault("delivery_mode", 2)
    properties.setdefault("user_id", TEST_USER)  # as a storefront the workers know
    confirm = await channel.basic_publish(body, exchange=exchange, routing_key=key,
                                          properties=spec.Basic.Properties(**properties))
    assert isinstance(confirm, spec.Basic.Ack), confirm


def watch_connection(runtime: Any) -> list[str]:
    """Every reconnection of the runtime's connection (the poison used to drop it)."""
    reconnects: list[str] = []
    runtime.connection.reconnect_callbacks.add(lambda *_: reconnects.append("reconnected"))
    runtime.connection.close_callbacks.add(lambda *_: reconnects.append("closed"))
    return reconnects


async def collect_dead(harness: Harness, service: str, count: int) -> dict[str, Any]:
    seen: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def enough() -> bool:
        seen.extend(await harness.dead_letters(service))
        return len(seen) >= count
    await eventually(enough, timeout=30)
    return {m.headers.get("x-ordermill-reason"): m for m in seen}


POISONS = {
    # The attack: unparseable, an overflowing timestamp, a forged routing key and reason.
    "timestamp": "timestamp property is not a valid time",
    # A time that is valid (pamqp reads it as milliseconds: 9999-12-31) until the expiry is
    # added to it, which used to happen outside _parse's try: requeued to the delivery limit.
    "expiry": "timestamp and expiration do not make a valid time: date value out of range",
    "message_id": "message_id is not valid UTF-8",
    "correlation_id": "correlation_id is not valid UTF-8",
    # Refused for its body, with headers that leave less room in a frame than ours take.
    "frame": "schema: currency: String should match pattern '^[A-Z]{3}$'",
}


@pytest.mark.parametrize("poison", POISONS)
async def test_a_poison_frame_is_dead_lettered_with_its_reason_and_the_connection_stays(
    harness: Harness, raw: aiormq.abc.AbstractChannel, poison: str,
) -> None:
    """A timestamp of 2^64-1, a message_id or correlation_id that is not UTF-8, and headers so
    large that ours no longer fit a frame: each once dropped the worker's whole connection on
    every redelivery. Now each is dead-lettered at once with its reason, the connection stays,
    and the good orders behind it are handled."""
    runtime = await harness.start([placement_worker(harness.settings),
                                   fraud_worker(harness.settings)])
    assert runtime.connection is not None
    transport = runtime.connection.transport
    reconnects = watch_connection(runtime)
    ns = harness.names.exchange
    good = json.dumps(order_body("poisoned")).encode()
    if poison == "timestamp":
        await publish_raw(raw, ns, "order.place", b"{not json", message_id="poison",
                          timestamp=TIMESTAMP_OVERFLOW, expiration="60000", headers={
                              "x-ordermill-routing-key": "review.command",
                              "x-ordermill-reason": "forged", "x-shop": "mine"})
    elif poison == "expiry":
        await publish_raw(raw, ns, "order.place", good, message_id="poison",
                          timestamp=253_402_300_799_000, expiration="60000")
    elif poison == "message_id":
        await publish_raw(raw, ns, "order.place", good, message_id=Raw(b"id-\xff\xfe"))
    elif poison == "correlation_id":
        await publish_raw(raw, ns, "order.place", good, message_id="poison",
                          correlation_id=Raw(b"\xc3\x28"), reply_to=Raw(b"\xff"))
    else:
        tune = runtime.connection.transport.connection.connection_tune
        bad = json.dumps(order_body("poisoned", currency="usd")).encode()
        properties = spec.Basic.Properties(message_id="poison", delivery_mode=2,
                                           headers={"pad": ""})
        overhead = len(frame.marshal(ContentHeader(0, len(bad), properties), 1))
        await publish_raw(raw, ns, "order.place", bad, message_id="poison",
                          headers={"pad": "p" * (tune.frame_max - overhead - 40)})
    for n in range(3):
        await harness.publish("order.place", order_body(f"after-poison-{n}"))

    for n in range(3):
        assert (await harness.screened(f"after-poison-{n}"))["screening"] == "passed"
    dead = await collect_dead(harness, "placement", 1)
    assert list(dead) == [POISONS[poison]]
    [message] = dead.values()
    # None of the publisher's headers survive: ours say where it came from (and the broker's
    # count of deliveries from the dead-letter queue).
    assert set(message.headers) - {"x-delivery-count"} == {
        "x-ordermill-reason", "x-ordermill-routing-key", "x-ordermill-queue",
        "x-ordermill-user-id", "x-ordermill-dead-at"}
    assert message.headers["x-ordermill-routing-key"] == "order.place"
    if poison == "message_id":  # one that can be stored and sent: the body's
        assert message.message_id.startswith("sha256:")
    else:
        assert message.message_id == "poison"
    if poison == "timestamp":
        assert message.body == b"{not json" and message.timestamp is None
    if poison == "correlation_id":
        assert (message.correlation_id, message.reply_to) == (None, None)
    # The worker's connection was never dropped, nor replaced.
    assert reconnects == []
    assert runtime.connection.transport is transport
    assert await harness.pool.fetchval("SELECT count(*) FROM orders") == 3


async def test_a_nul_in_reply_to_or_correlation_id_is_refused_with_a_reason(
    harness: Harness,
) -> None:
    await harness.start([review_worker(harness.settings)])
    command = {"order_id": 1, "action": "accept", "operator": "alice"}
    await harness.publish("review.command", command, message_id="nul-reply", reply_to="re\x00ply")
    await harness.publish("review.command", command, message_id="nul-corr",
                          reply_to="replies", correlation_id="c\x00rr")
    dead = await collect_dead(harness, "review", 2)
    assert {m.message_id: reason for reason, m in dead.items()} == {
        "nul-reply": "reply_to holds a NUL character",
        "nul-corr": "correlation_id holds a NUL character"}


async def test_lone_surrogates_are_refused_in_orders(harness: Harness) -> None:
    store = await harness.listen("order.rejected")
    await harness.start([placement_worker(harness.settings), fraud_worker(harness.settings)])
    body = json.dumps(order_body("surrogate")).replace('"Ann"', '"\\ud800"').encode()
    assert b"\\ud800" in body
    message_id = await harness.publish("order.place", None, raw=body)
    # A pair (an emoji written escaped) is text: that order is placed.
    paired = json.dumps(order_body("paired")).replace('"Ann"', '"\\ud83d\\ude00"').encode()
    await harness.publish("order.place", None, raw=paired)
    assert (await harness.screened("paired"))["screening"] == "passed"
    dead = await collect_dead(harness, "placement", 1)
    assert {m.message_id: r for r, m in dead.items()} == {
        message_id: "a text value holds a lone surrogate (such as \\ud800), which is not text"}
    await store.wait_for("order.rejected", lambda b: b["order_ref"] == "surrogate")


async def _stored_payment(harness: Harness, transaction_id: str) -> Any:
    async def stored() -> Any:
        return await harness.pool.fetchrow(
            "SELECT gateway, status, reason FROM payments WHERE transaction_id = $1",
            transaction_id)
    return await eventually(stored)


async def test_a_payment_holding_a_nul_nested_deep_is_stored_unapplied(harness: Harness) -> None:
    """Once lost: a NUL 450 levels deep raised RecursionError in the NUL check, and the batch
    was requeued until the delivery limit. Money is never dropped."""
    await harness.start([provisioning_worker(harness.settings)])
    deep = {"amount": "5.00", "currency": "USD", "gateway": "stripe", "transaction_id": "deep-nul",
            "invoice_id": 999999, "extra": _nested(450, "x\x00y")}
    await harness.publish("payment.received", deep)
    row = await _stored_payment(harness, "deep-nul")
    assert tuple(row) == ("stripe", "unapplied", "unknown invoice 999999")
    assert await harness.dead_letters("provisioning") == []


async def test_a_payment_holding_a_lone_surrogate_is_stored_unapplied(harness: Harness) -> None:
    """Once lost: `"gateway": "\\ud800"` failed the handler (PydanticSerializationError).
    Stored like a NUL is: U+FFFD marks where it was."""
    await harness.start([provisioning_worker(harness.settings)])
    body = json.dumps({"amount": "6.00", "currency": "USD", "gateway": "GW",
                       "transaction_id": "lone-surrogate", "invoice_id": 999999})
    await harness.publish("payment.received", None,
                          raw=body.replace('"GW"', '"gw\\ud800"').encode())
    row = await _stored_payment(harness, "lone-surrogate")
    assert tuple(row) == ("gw\ufffd", "unapplied", "unknown invoice 999999")
    assert await harness.dead_letters("provisioning") == []


def test_text_checks_hold_at_any_depth() -> None:
    from shared.contracts import PaymentReceived, PlaceOrder, has_lone_surrogate
    from shared.errors import Rejected

    deep = _nested(100_000, {"k\x00": "\ud800"})
    assert has_nul(deep) and has_lone_surrogate(deep)
    cleaned = PaymentReceived.without_nul(deep)
    assert not has_nul(cleaned) and not has_lone_surrogate(cleaned)
    assert not has_lone_surrogate(["\U0001f600", {"a": "b"}])
    with pytest.raises(Rejected, match="lone surrogate"):
        PlaceOrder.without_lone_surrogates(deep)


def test_the_safe_decoders_read_what_pamqp_raised_on() -> None:
    from shared.broker import UndecodableTimestamp, escaped, install_safe_decoders, undecodable

    install_safe_decoders()  # again: idempotent
    _, when = decode.by_type(struct.pack(">Q", TIMESTAMP_OVERFLOW), "timestamp")
    assert isinstance(when, UndecodableTimestamp) and when.raw == TIMESTAMP_OVERFLOW
    _, normal = decode.by_type(struct.pack(">Q", 1_700_000_000), "timestamp")
    assert not isinstance(normal, UndecodableTimestamp) and normal.year == 2023
    _, text = decode.by_type(b"\x03a\xffb", "shortstr")
    assert undecodable(text) and escaped(text) == "a\\xffb"
    assert not undecodable(decode.by_type(b"\x02\xc3\xa9", "shortstr")[1])  # é
    table = b"\x02k\xffT" + struct.pack(">Q", TIMESTAMP_OVERFLOW)
    _, headers = decode.by_type(struct.pack(">I", len(table)) + table, "table")
    [(key, value)] = headers.items()
    assert undecodable(key) and isinstance(value, UndecodableTimestamp)


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# -- the CLI -----------------------------------------------------------------------------------

async def _broker_dead_letter(harness: Harness, service: str) -> None:
    """Take the message at the head of the work queue to the delivery limit: the broker
    dead-letters it itself (with `x-death`, keeping the publisher's headers)."""
    channel = await harness.connection.channel()
    queue = await channel.get_queue(harness.names.queue(service))
    for _ in range(harness.settings.queue_delivery_limit + 1):
        message = await eventually(lambda: queue.get(fail=False), timeout=10)
        await message.nack(requeue=True)
    await channel.close()


async def _depth(harness: Harness, queue_name: str) -> int:
    channel = await harness.connection.channel()
    queue = await channel.declare_queue(queue_name, passive=True)
    await channel.close()
    return queue.declaration_result.message_count


async def test_a_forged_routing_key_header_is_neither_listed_nor_replayed(
    harness: Harness,
) -> None:
    """The issue's escalation: a storefront's order.place carrying `x-ordermill-routing-key:
    review.command`, dead-lettered by the broker, was listed and replayed as an operator's
    command. Now it goes back to order.place, and only with the replay count for a header."""
    s = harness.settings
    forged = {"x-ordermill-routing-key": "review.command", "x-ordermill-reason": "forged",
              "x-ordermill-replays": "many", "x-shop": "mine"}
    message_id = await harness.publish("order.place", {"order_id": 1, "action": "fraud"},
                                       headers=forged)
    await _broker_dead_letter(harness, "placement")

    async def listed():
        _code, out, _ = await cli(s, "dead-letters", "placement", "--json")
        return json.loads(out) or None
    rows = await eventually(listed, timeout=20)
    assert [(r["message_id"], r["routing_key"], r["reason"]) for r in rows] == [
        (message_id, "order.place", "delivery_limit")]
    code, out, err = await cli(s, "dead-letters", "placement", "--replay", "--json")
    assert (code, json.loads(out)) == (0, {"replayed": 1, "discarded": [], "failed": []}), err
    assert await _depth(harness, harness.names.queue("review")) == 0
    channel = await harness.connection.channel()
    queue = await channel.get_queue(harness.names.queue("placement"))
    back = await eventually(lambda: queue.get(fail=False), timeout=10)
    assert (back.message_id, back.routing_key, back.type) == (
        message_id, "order.place", "order.place")
    back.headers.pop("x-delivery-count", None)  # the broker's, on a message taken before
    assert back.headers == {"x-ordermill-replays": 1}
    await back.ack()
    await channel.close()


async def test_a_replay_refuses_keys_its_queue_is_not_bound_to(harness: Harness) -> None:
    """A forged `x-death` entry keeps its routing key when the broker dead-letters the message
    (it updates a matching entry), and a copy in a dead-letter queue may name any key: only the
    queue's own keys are replayed; the others stay, each with a readable reason."""
    s = harness.settings
    ns, queue = harness.names.exchange, harness.names.queue("placement")
    forged_death = [{"queue": queue, "reason": "delivery_limit", "exchange": ns, "count": 1,
                     "routing-keys": ["review.command"]}]
    death_id = await harness.publish("order.place", {"order_id": 1, "action": "fraud"},
                                     headers={"x-death": forged_death})
    await _broker_dead_letter(harness, "placement")
    channel = await harness.connection.channel()
    dlx = await channel.get_exchange(harness.names.dead_letter_exchange)
    await dlx.publish(aio_pika.Message(b'{"order_id": 1, "action": "accept"}', message_id="copy",
                                       headers={"x-ordermill-routing-key": "review.command",
                                                "x-ordermill-reason": "test"}),
                      routing_key=queue)
    await channel.close()

    async def listed():
        _code, out, _ = await cli(s, "dead-letters", "placement", "--json")
        rows = json.loads(out)
        return rows if len(rows) == 2 else None
    rows = {r["message_id"]: r for r in await eventually(listed, timeout=20)}
    assert {m: r["routing_key"] for m, r in rows.items()} == {death_id: None, "copy": None}
    code, out, _ = await cli(s, "dead-letters", "placement", "--replay", "--json")
    result = json.loads(out)
    assert (code, result["replayed"]) == (1, 0)
    assert {f["message_id"]: f["error"] for f in result["failed"]} == {
        m: "routing key 'review.command' is not one the placement queue is bound to (order.place)"
        for m in (death_id, "copy")}
    assert await _depth(harness, harness.names.queue("review")) == 0
    assert sorted(r["message_id"] for r in await listed()) == sorted([death_id, "copy"])


async def test_poison_properties_in_a_dead_letter_queue_are_listed_and_left(
    harness: Harness, raw: aiormq.abc.AbstractChannel,
) -> None:
    """Dead letters the broker took there before the fix (or anyone's): listing them no longer
    drops the CLI's connection ("refused to open virtual host"), and the replay leaves them."""
    s = harness.settings
    dlx, queue = harness.names.dead_letter_exchange, harness.names.queue("placement")
    headers = {"x-ordermill-routing-key": "order.place", "x-ordermill-reason": "old"}
    await publish_raw(raw, dlx, queue, b"{}", message_id="ts", timestamp=TIMESTAMP_OVERFLOW,
                      headers=headers)
    await publish_raw(raw, dlx, queue, b"{}", message_id=Raw(b"id-\xff"), headers=headers)
    code, out, err = await cli(s, "dead-letters", "placement", "--json")
    assert code == 0, err
    assert sorted(r["message_id"] for r in json.loads(out)) == ["id-\\xff", "ts"]
    code, out, err = await cli(s, "dead-letters", "placement")  # the table, to a terminal's eyes
    assert code == 0, err
    code, out, err = await cli(s, "dead-letters", "placement", "--replay", "--json")
    result = json.loads(out)
    assert (code, result["replayed"]) == (1, 0)
    assert {f["message_id"]: f["error"] for f in result["failed"]} == {
        "ts": "timestamp property is not a valid time",
        "id-\\xff": "message_id is not valid UTF-8"}
    assert await _depth(harness, harness.names.dead_queue("placement")) == 2


async def test_a_dead_letter_nested_too_deep_is_listed_and_replayed(harness: Harness) -> None:
    s = harness.settings
    deep = b"[" * 200_000 + b"]" * 200_000
    message_id = await harness.publish("order.place", None, raw=deep)
    await harness.start([placement_worker(s)], relay=False)

    async def listed():
        _code, out, _ = await cli(s, "dead-letters", "placement", "--json")
        return json.loads(out) or None
    rows = await eventually(listed, timeout=20)
    assert [(r["message_id"], r["reason"], r["body"]) for r in rows] == [
        (message_id, "body is not JSON we take: nested too deeply", "[" * 2000)]
    code, out, err = await cli(s, "dead-letters", "placement", "--replay", "--json")
    assert (code, json.loads(out)) == (0, {"replayed": 1, "discarded": [], "failed": []}), err


async def test_poisons_among_a_hundred_orders_and_fifty_payments_lose_nothing(
    harness: Harness, raw: aiormq.abc.AbstractChannel,
) -> None:
    """The issue's run: poisons in the middle of real traffic. Every good order is screened,
    every payment applied, each poison dead-lettered with its reason, and the shared
    connection never drops (it used to, with good messages in its prefetch window going to
    the delivery limit without a reason, and payments lost)."""
    s = harness.settings.model_copy(update={"fraud_velocity_max_orders": 100_000})  # one IP
    runtime = await harness.start([placement_worker(s), fraud_worker(s), provisioning_worker(s)])
    assert runtime.connection is not None
    transport = runtime.connection.transport
    reconnects = watch_connection(runtime)
    ns = harness.names.exchange
    for n in range(100):
        await harness.publish("order.place", order_body(f"crowd-{n}"))
        if n == 30:
            await publish_raw(raw, ns, "order.place", b"{}", message_id="poison-order",
                              timestamp=TIMESTAMP_OVERFLOW)
    for n in range(100):
        assert (await harness.screened(f"crowd-{n}", timeout=60))["status"] == "Pending"
    invoices = await harness.pool.fetch(
        "SELECT i.id, i.total FROM invoices i JOIN orders o ON o.id = i.order_id"
        " WHERE o.order_ref LIKE 'crowd-%' ORDER BY o.id LIMIT 50")
    for n, invoice in enumerate(invoices):
        body = json.dumps({"invoice_id": invoice["id"], "amount": str(invoice["total"]),
                           "currency": "USD", "gateway": "stripe",
                           "transaction_id": f"crowd-pay-{n}"}).encode()
        await publish_raw(raw, ns, "payment.received", body, message_id=f"crowd-pay-{n}")
        if n == 20:
            await publish_raw(raw, ns, "payment.received", body, message_id=Raw(b"pay-\xff"))

    async def all_paid() -> bool:
        return await harness.pool.fetchval(
            "SELECT count(*) FROM invoices WHERE id = ANY($1) AND status = 'Paid'",
            [i["id"] for i in invoices]) == 50
    await eventually(all_paid, timeout=60)
    assert set(await collect_dead(harness, "placement", 1)) == {POISONS["timestamp"]}
    assert set(await collect_dead(harness, "provisioning", 1)) == {POISONS["message_id"]}
    assert await harness.pool.fetchval("SELECT count(*) FROM orders") == 100
    assert reconnects == [] and runtime.connection.transport is transport
