"""RabbitMQ connection and publishing with confirms (shared by workers, relay and CLI)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractRobustConnection, DeliveryMode
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

log = logging.getLogger("ordermill.broker")

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


async def connect(amqp_url: str, *, attempts: int = 30) -> AbstractRobustConnection:
    """A robust connection (it reconnects by itself), waiting bounded for the broker to come up."""
    async for attempt in retrying(attempts):
        with attempt:
            try:
                return await aio_pika.connect_robust(amqp_url)
            except StopAsyncIteration as exc:
                # aiormq's frame reader, cut mid-handshake, ends so; raised in here it would
                # end this `async for` as if the connection had been made.
                raise aiormq.exceptions.AMQPConnectionError(
                    "connection closed during the handshake") from exc
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
