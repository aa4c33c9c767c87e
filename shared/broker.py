"""RabbitMQ connection and publishing with confirms (shared by workers, relay and CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import struct
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractRobustConnection, DeliveryMode
from pamqp import common as pamqp_common
from pamqp import decode as pamqp_decode
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from shared.failover import FailoverConnection, node_of
from shared.settings_parts import amqp_urls

log = logging.getLogger("ordermill.broker")


# -- decoding any message safely ------------------------------------------------------------------
# pamqp decodes a message's properties inside aiormq's frame reader, where an exception drops the
# whole connection (every channel and consumer on it), and the message, redelivered, does it again
# until the broker's delivery limit (aiormq issue #186). Two kinds of value a publisher can send
# and RabbitMQ passes on did so: a `timestamp` no datetime can hold (2^64-1), and a short string
# (message_id, correlation_id, reply_to, a header's name, ...) that is not UTF-8. The decoders
# below read them instead, marked, so the runtime rejects such a message with a reason and the
# CLI can show it. Installed once, at import of this module (workers and CLI both import it).


class UndecodableTimestamp(datetime):
    """A `timestamp` property (or header) no datetime can hold. It reads as the Unix epoch, so
    nothing that does arithmetic on it fails; `raw` keeps what was sent. Test for it with
    `isinstance`: the runtime rejects such a message ("not a valid time")."""

    raw: int

    @classmethod
    def of(cls, raw: int) -> UndecodableTimestamp:
        value = cls(1970, 1, 1, tzinfo=UTC)
        value.raw = raw
        return value


# A short string that is not UTF-8 is decoded with `surrogateescape`: each byte that is not
# UTF-8 becomes a lone surrogate (U+DC80..U+DCFF), which no valid UTF-8 ever decodes to.
_SURROGATE = re.compile("[\ud800-\udfff]")


def undecodable(value: object) -> bool:
    """Whether a property's text came as bytes that are not UTF-8 (or holds a lone surrogate,
    which no UTF-8 encoder writes: it cannot be published again either)."""
    # An ASCII string (nearly every one: ids, keys, queue names) holds no surrogate, and
    # str.isascii() reads a flag CPython keeps: the search runs only on the others.
    return isinstance(value, str) and not value.isascii() and _SURROGATE.search(value) is not None


def escaped(text: str) -> str:
    """The text with what is not UTF-8 written as escapes (a byte that was not UTF-8 as
    `\\xff`, a lone surrogate as `\\ud800`): for a header, a log line or a terminal."""
    if not undecodable(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no undecodable byte gives
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _short_str(value: bytes) -> tuple[int, str]:
    try:
        length = pamqp_common.Struct.byte.unpack(value[0:1])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err
    return length + 1, value[1:length + 1].decode("utf-8", "surrogateescape")


_pamqp_timestamp = pamqp_decode.timestamp


def _timestamp(value: bytes) -> tuple[int, datetime]:
    try:
        (raw,) = pamqp_common.Struct.timestamp.unpack(value[0:8])
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack timestamp value") from err
    try:
        return _pamqp_timestamp(value)  # pamqp's reading (a value past 2106 as milliseconds)
    except (ValueError, OverflowError, OSError):  # year out of range
        return 8, UndecodableTimestamp.of(raw)


def _field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    """pamqp's field_table, with a key that is not UTF-8 read like a short string."""
    try:
        length = pamqp_common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: dict[str, Any] = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length = pamqp_common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset:offset + key_length].decode("utf-8", "surrogateescape")
            offset += key_length
            consumed, result = pamqp_decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def install_safe_decoders() -> None:
    """Replace pamqp's decoders of short strings, timestamps and tables (by_type and the table
    reader look them up in these mappings on every call). Idempotent."""
    if getattr(pamqp_decode, "_ordermill_safe", False):
        return
    pamqp_decode.METHODS["shortstr"] = _short_str
    pamqp_decode.METHODS["timestamp"] = _timestamp
    pamqp_decode.METHODS["table"] = _field_table
    pamqp_decode.TABLE_MAPPING[b"T"] = _timestamp
    pamqp_decode.TABLE_MAPPING[b"F"] = _field_table
    pamqp_decode._ordermill_safe = True  # type: ignore[attr-defined]


install_safe_decoders()

TRANSIENT_BROKER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
)


def retrying(attempts: int, *, also: type[BaseException] | None = None) -> AsyncRetrying:
    """Bounded waiting for a broker that is (re)starting: exponential, logged, then raised."""
    errors = TRANSIENT_BROKER_ERRORS + ((also,) if also else ())
    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.2, max=5),
        retry=retry_if_exception_type(errors),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )


# A node that does not answer at all (gone from the network, no refusal) is given up on after
# this, for the next URL; aio-pika's default is to wait as long as TCP does (minutes).
CONNECT_TIMEOUT = 10.0


async def connect(amqp_url: str, *, attempts: int = 30,
                  start: int = 0) -> AbstractRobustConnection:
    """A robust connection (it reconnects by itself), waiting bounded for the broker to come up.

    `amqp_url` may be several URLs, comma-separated (a cluster's nodes): each attempt tries
    them in order from `start` and keeps the first that answers; once connected, a lost node
    sends the connection to the next one (shared/failover.py)."""
    urls = amqp_urls(amqp_url)
    async for attempt in retrying(attempts):
        with attempt:
            failed: BaseException | None = None
            for n in range(len(urls)):
                connection = FailoverConnection(urls, start=start + n)
                try:
                    await connection.connect(timeout=CONNECT_TIMEOUT)
                    return connection
                except StopAsyncIteration as exc:
                    # aiormq's frame reader, cut mid-handshake, ends so; raised in here it
                    # would end this `async for` as if the connection had been made.
                    failed = aiormq.exceptions.AMQPConnectionError(
                        "connection closed during the handshake")
                    failed.__cause__ = exc
                except TimeoutError as exc:
                    failed = aiormq.exceptions.AMQPConnectionError(
                        f"no answer from {node_of(connection.url)} within {CONNECT_TIMEOUT:g} s")
                    failed.__cause__ = exc
                except TRANSIENT_BROKER_ERRORS as exc:
                    failed = exc
                    if len(urls) > 1:
                        log.warning("RabbitMQ node unreachable", extra={
                            "node": node_of(connection.url), "error": repr(exc)})
                except BaseException:
                    # Cancelled mid-attempt (stopped while the broker is still coming up):
                    # aio-pika takes that for a failed attempt and schedules a reconnect of
                    # its own, which outlived the cancellation and kept the process from
                    # ending (its event loop waits for every task). Closed, it has none.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(connection.close())
                    raise
                await connection.close()
            assert failed is not None
            raise failed
    raise AssertionError("unreachable")


def json_message(
    body: object,
    *,
    routing_key: str,
    message_id: str | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    headers: Mapping[str, object] | None = None,
    user_id: str | None = None,
    expiration: float | None = None,
) -> aio_pika.Message:
    return aio_pika.Message(
        json.dumps(body, default=str).encode(),
        content_type="application/json",
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=message_id or str(uuid.uuid4()),
        correlation_id=correlation_id,
        reply_to=reply_to,
        type=routing_key,
        timestamp=datetime.now(UTC),
        headers=dict(headers or {}),
        # RabbitMQ checks it against the connection's user: consumers may trust it.
        user_id=user_id,
        expiration=expiration,
    )


async def publish(
    exchange: AbstractExchange, routing_key: str, message: aio_pika.Message
) -> None:
    """Publish, mandatory, and wait for the broker's confirm. Raises if unroutable or nacked."""
    await exchange.publish(message, routing_key=routing_key, mandatory=True)


async def publish_queued(
    exchange: AbstractExchange, routing_key: str, message: aio_pika.Message
) -> None:
    """As `publish` (mandatory, confirmed; raises if unroutable or nacked), for many messages
    published at once (the outbox relay's pass): the channel is held only while the frames
    are queued for the connection's writer, not until they have been written to the socket.

    `exchange.publish` holds the channel's lock until its frames are flushed, so concurrent
    publishes on one channel go out one at a time, each after two or three turns of the
    event loop; in a busy worker (every consumer, the job runner and the relay in one
    process) a pass of a few dozen events took hundreds of milliseconds to leave, and what
    it carried reached its consumers that much later (docs/performance.md, "Where the tail came from").
    Queued, a pass's frames leave in one writer run and its confirms come back together."""
    channel = await exchange.channel.get_underlay_channel()
    await channel.basic_publish(
        message.body, exchange=exchange.name, routing_key=routing_key,
        properties=message.properties, mandatory=True, wait=False)


async def open_publisher(connection: AbstractRobustConnection) -> aio_pika.abc.AbstractChannel:
    # on_return_raises: a message no queue takes is an error, not a success.
    return await connection.channel(publisher_confirms=True, on_return_raises=True)


async def declare_reply_queue(channel: aio_pika.abc.AbstractChannel) -> aio_pika.Queue:
    """An exclusive, auto-delete queue named by the broker (`amq.gen-...`): where a sender asks
    for replies (`reply_to`), the only kind of queue, with the direct reply-to pseudo-queue,
    that Ordermill answers (see UnitOfWork.reply). Declared as a plain queue: aio-pika's
    robust channel would name it `amq_<hex>` itself, a name anyone may declare."""
    queue = aio_pika.Queue(channel, None, durable=False, exclusive=True, auto_delete=True,
                           arguments=None)
    await queue.declare()
    return queue
