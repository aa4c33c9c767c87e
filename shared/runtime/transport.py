"""The AMQP transport (aio-pika): a worker's channel, prefetch and consumer, and the broker's
side of settling a delivery: ack, requeue, dead-letter a copy. It decides nothing: the
pipeline does. Reconnection is aio-pika's robust connection; a broker lost while a consumer
starts is waited for, bounded, like the first connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from shared import broker
from shared.runtime.acks import AckLedger

log = logging.getLogger("ordermill.runtime")


class AmqpTransport:
    def __init__(self, connection: AbstractRobustConnection, dead_letter_exchange: AbstractExchange,
                 *, startup_attempts: int) -> None:
        self.connection = connection
        self.dead_letter_exchange = dead_letter_exchange
        self.startup_attempts = startup_attempts
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self.acks = AckLedger()  # which delivery tags are settled: a batch is one ack frame

    async def consume(self, queue_name: str, prefetch: int,
                      deliver: Callable[[AbstractIncomingMessage], Awaitable[None]]) -> None:
        """A channel of its own with `prefetch`, consuming `queue_name` into `deliver`. A robust
        connection that is reconnecting refuses new channels with a RuntimeError: waited for."""
        async for attempt in broker.retrying(self.startup_attempts, also=RuntimeError):
            with attempt:
                channel = await self.connection.channel()
                await channel.set_qos(prefetch_count=prefetch)
                queue = await channel.get_queue(queue_name, ensure=True)
                tag = await queue.consume(deliver)
        self._consumers.append((queue, tag))

    async def cancel(self) -> None:
        """No new deliveries. With the broker away there is nothing to cancel (its consumers
        end with the connection), and a robust channel would wait for the broker to come back."""
        if self.connection.connected.is_set():
            results = await asyncio.gather(
                *(asyncio.wait_for(queue.cancel(tag), timeout=5) for queue, tag in self._consumers),
                return_exceptions=True)
            for exc in (r for r in results if isinstance(r, BaseException)):
                log.warning("consumer cancel failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        self._consumers.clear()

    async def ack(self, message: AbstractIncomingMessage) -> None:
        await self.ack_all([message])

    async def ack_all(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Committed messages (a batch): one multiple ack for the run of delivery tags they
        complete, the others one by one, together (shared/runtime/acks.py)."""
        top, rest = self.acks.plan(messages)
        sends = [self._ack(m, multiple=False) for m in rest]
        if top is not None:
            sends.append(self._ack(top, multiple=True, covered=[
                m for m in messages if m.delivery_tag and m.delivery_tag <= top.delivery_tag]))
        # Together, not one after another: an ack waits for its frame to be written.
        await (sends[0] if len(sends) == 1 else asyncio.gather(*sends))

    async def _ack(self, message: AbstractIncomingMessage, *, multiple: bool,
                   covered: Sequence[AbstractIncomingMessage] = ()) -> None:
        try:
            await message.ack(multiple=multiple)
        except broker.TRANSIENT_BROKER_ERRORS as exc:
            # The channel went away after the commit: the broker redelivers the message and the
            # inbox row makes the redelivery a no-op.
            log.warning("ack failed; the message will be redelivered and deduplicated",
                        extra={"message_id": message.message_id, "error": repr(exc)})
            return
        self.acks.record(covered or [message], upto=message.delivery_tag if multiple else 0)

    async def requeue(self, messages: list[AbstractIncomingMessage]) -> None:
        """A message neither acked nor dead-lettered goes back to the queue, so it is not held
        unacknowledged (taking a prefetch slot) until the channel closes."""
        for message in messages:
            if self.acks.settled(message):
                continue
            try:
                await message.nack(requeue=True)
            except Exception as exc:  # the channel is gone: the broker redelivers anyway
                log.warning("could not requeue a message", extra={
                    "message_id": message.message_id, "error": str(exc)})
                continue
            self.acks.record([message])

    async def dead_letter(self, queue: str, message: AbstractIncomingMessage,
                          copy: aio_pika.Message) -> None:
        """RabbitMQ 3.x cannot add headers on reject: the copy goes to `<ns>.dlx` with the
        queue's own key (its `.dead` queue), confirmed, then the original is acked."""
        await broker.publish(self.dead_letter_exchange, queue, copy)
        await message.ack()
        self.acks.record([message])
