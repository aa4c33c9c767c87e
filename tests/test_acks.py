"""A committed batch is acked with one frame (`basic.ack` multiple) when its delivery tags
complete the run of settled ones on their channel, else one by one; a message a multiple ack
covered is never nacked after; a requeued one in the middle is not acked by a later multiple
ack (shared/runtime/acks.py). On fake messages for the frames, then on real RabbitMQ."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aio_pika

from shared.runtime.transport import AmqpTransport
from shared.settings import Settings


class _Channel:
    """Stands for an aiormq channel (a reconnect makes another: tags start at 1 again)."""


@dataclass(eq=False)
class _Message:
    delivery_tag: int
    channel: _Channel
    sent: list[tuple[str, int, bool]] = field(default_factory=list)
    processed: bool = False
    message_id: str = ""

    async def ack(self, multiple: bool = False) -> None:
        self.sent.append(("ack", self.delivery_tag, multiple))
        self.processed = True

    async def nack(self, requeue: bool = True) -> None:
        self.sent.append(("nack", self.delivery_tag, False))
        self.processed = True


def _messages(channel: _Channel, sent: list[Any], tags: range) -> list[Any]:
    return [_Message(tag, channel, sent) for tag in tags]


async def test_a_batch_completing_the_run_is_one_frame_and_a_later_one_first_is_one_by_one() -> None:
    transport = AmqpTransport(None, None, startup_attempts=1)  # type: ignore[arg-type]
    channel, sent = _Channel(), []
    first, second, third = (_messages(channel, sent, r) for r in
                            (range(1, 5), range(5, 9), range(9, 13)))
    await transport.ack_all(first)
    assert sent == [("ack", 4, True)]  # 1..4: one frame
    sent.clear()
    await transport.ack_all(third)  # 5..8 still in hand: not covered, never held back
    assert sorted(sent) == [("ack", tag, False) for tag in range(9, 13)]
    sent.clear()
    await transport.ack_all(second)  # completes the run: one frame up to 8 (9..12 are done)
    assert sent == [("ack", 8, True)]
    sent.clear()
    # Covered by a multiple ack, not marked processed by the message itself: never nacked.
    assert not any(m.processed for m in second[:3])
    await transport.requeue(first + second + third)
    assert sent == []

    # A message requeued in the middle: the next batch's multiple ack goes past it only
    # because its nack was sent first (the broker no longer holds it for this channel).
    middle = _messages(channel, sent, range(13, 14))
    await transport.requeue(middle)
    later = _messages(channel, sent, range(14, 16))
    await transport.ack_all(later)
    assert sent == [("nack", 13, False), ("ack", 15, True)]

    # A reconnected channel counts from 1 again, on its own.
    sent.clear()
    await transport.ack_all(_messages(_Channel(), sent, range(1, 3)))
    assert sent == [("ack", 2, True)]


async def test_on_rabbitmq_nothing_is_acked_that_was_not_committed(settings: Settings) -> None:
    """Twenty messages in hand: the last ten acked first (one by one), then the first five
    (one frame); the five between, never acked, are all the broker holds once the worker's
    connection is gone: no multiple ack covered a message still in hand."""
    connection = await aio_pika.connect_robust(settings.amqp_url)
    name = f"{settings.namespace}.acks"
    admin = await aio_pika.connect_robust(settings.amqp_url)
    try:
        channel = await admin.channel()
        queue = await channel.declare_queue(name, durable=True,
                                            arguments={"x-queue-type": "quorum"})
        for n in range(20):
            await channel.default_exchange.publish(aio_pika.Message(str(n).encode()),
                                                   routing_key=name)
        transport = AmqpTransport(connection, channel.default_exchange, startup_attempts=1)
        got: list[Any] = []
        all_in = asyncio.Event()

        async def deliver(message: Any) -> None:
            got.append(message)
            if len(got) == 20:
                all_in.set()

        await transport.consume(name, 32, deliver)
        await asyncio.wait_for(all_in.wait(), 30)
        got.sort(key=lambda m: m.delivery_tag)
        await transport.ack_all(got[10:])
        await transport.ack_all(got[:5])
        await connection.close()  # 5..9 were never acked: back to the queue
        await asyncio.sleep(0.5)
        assert (await queue.declare()).message_count == 5  # (a robust channel caches passive)
        bodies = []
        for _ in range(5):
            message = await queue.get(timeout=5)
            assert message is not None
            bodies.append(int(message.body))
            await message.ack()
        assert sorted(bodies) == [5, 6, 7, 8, 9]
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
        await admin.close()


def _runs(transport: AmqpTransport, channel: _Channel) -> int:
    return len(transport.acks._channels[channel].starts)


async def test_a_message_held_while_many_after_it_are_settled_does_not_end_multiple_acks() -> None:
    """Tag 1 held (a slow handler) while 20,000 after it are acked one by one: the ledger keeps
    one run for them, not 20,000 tags; once 1 is acked the floor is past them all and the next
    batch is one frame again (it was one by one for good past 10,000)."""
    transport = AmqpTransport(None, None, startup_attempts=1)  # type: ignore[arg-type]
    channel, sent = _Channel(), []
    held = _messages(channel, sent, range(1, 2))
    for start in range(2, 20_002, 100):
        await transport.ack_all(_messages(channel, sent, range(start, start + 100)))
    assert len(sent) == 20_000 and not any(multiple for _, _, multiple in sent)
    assert _runs(transport, channel) == 1
    sent.clear()
    await transport.ack_all(held)
    assert sent == [("ack", 1, True)]
    assert _runs(transport, channel) == 0
    sent.clear()
    await transport.ack_all(_messages(channel, sent, range(20_002, 20_018)))
    assert sent == [("ack", 20_017, True)]


class _Gated(_Message):
    """A message whose ack frame waits for `gate` (a busy socket)."""
    gate: asyncio.Event

    async def ack(self, multiple: bool = False) -> None:
        await self.gate.wait()
        await super().ack(multiple)


async def test_messages_a_multiple_ack_covered_stay_settled_while_many_others_settle() -> None:
    """A multiple ack up to 2 still in flight while 3 is held and 12,000 tags after it are
    acked: once it is sent, 1 (covered, never marked processed by its own frame) is settled,
    so a requeue leaves it alone (a nack of a settled tag closes the channel); 3 is nacked."""
    transport = AmqpTransport(None, None, startup_attempts=1)  # type: ignore[arg-type]
    channel, sent = _Channel(), []
    first = _Message(1, channel, sent)
    second = _Gated(2, channel, sent)
    second.gate = asyncio.Event()
    held = _Message(3, channel, sent)
    in_flight = asyncio.create_task(transport.ack_all([first, second]))
    await asyncio.sleep(0)
    for start in range(4, 12_004, 100):
        await transport.ack_all(_messages(channel, sent, range(start, start + 100)))
    second.gate.set()
    await in_flight
    assert ("ack", 2, True) in sent and not first.processed
    sent.clear()
    await transport.requeue([first, second, held])
    assert sent == [("nack", 3, False)]
    sent.clear()
    await transport.ack_all(_messages(channel, sent, range(12_004, 12_010)))
    assert sent == [("ack", 12_009, True)]


async def test_the_runs_kept_are_bounded_and_one_forgotten_never_covers_a_tag_in_hand(
        monkeypatch: Any) -> None:
    """Gaps that never close (tags settled elsewhere) keep at most LIMIT runs: the highest are
    forgotten. A forgotten tag only stops the floor there (one by one above it); its message
    was marked processed by its own frame, so it is still never settled twice."""
    from shared.runtime import acks

    monkeypatch.setattr(acks, "LIMIT", 4)
    transport = AmqpTransport(None, None, startup_attempts=1)  # type: ignore[arg-type]
    channel, sent = _Channel(), []
    odd = [_Message(tag, channel, sent) for tag in range(3, 23, 2)]
    for message in odd:
        await transport.ack_all([message])
    assert _runs(transport, channel) == 4  # 3, 5, 7, 9 kept; 11..21 forgotten
    sent.clear()
    await transport.requeue(odd)
    assert sent == []
    await transport.ack_all(_messages(channel, sent, range(1, 2)) +
                            [_Message(tag, channel, sent) for tag in (2, 4, 6, 8)])
    assert sent == [("ack", 8, True)]  # 1..9 complete: one frame, 10 (in hand) not covered
    sent.clear()
    await transport.ack_all(_messages(channel, sent, range(10, 11)))
    assert sent == [("ack", 10, True)]  # 11 was forgotten: the floor stops at 10
    sent.clear()
    await transport.ack_all(_messages(channel, sent, range(12, 13)))
    assert sent == [("ack", 12, False)]
