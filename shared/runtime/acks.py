"""Acking a batch with one frame: `basic.ack(multiple=True)` on the batch's highest delivery
tag settles every tag up to it on that channel, so a batch of 16 committed messages costs one
ack frame (one write to the socket, one settle in the broker) instead of 16.

That is only right when no tag below is still in hand: a multiple ack would settle a
message another batch has not committed yet (lost if the worker then died). Delivery tags are
consecutive on a channel (1, 2, 3, ...), so each channel keeps `floor`, the highest tag below
which every one has been settled by this process (acked, requeued, dead-lettered: recorded
only once its frame was sent), and the settled tags above it. A batch's tags that extend
that run are acked with one frame; the others (a later batch that finished first) one by
one, as before, never held back: an ack waiting for an earlier batch would keep its message
counting against the prefetch. A channel whose run cannot close (a tag settled elsewhere)
stops being tracked past `LIMIT` tags and is acked one by one from then on.

A message a multiple ack covered is not marked processed by aio-pika (only the one whose tag
was sent is): `settled()` says so for the transport's requeue, which must not nack it."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage

LIMIT = 10_000  # settled tags kept above a gap before a channel is given up on


@dataclass
class _Channel:
    floor: int = 0  # every tag <= floor is settled
    above: set[int] = field(default_factory=set)  # settled tags > floor
    tracked: bool = True

    def settled(self, tag: int) -> bool:
        return tag <= self.floor or tag in self.above

    def record(self, tags: Sequence[int]) -> None:
        self.above.update(tag for tag in tags if tag > self.floor)
        while self.floor + 1 in self.above:
            self.floor += 1
            self.above.discard(self.floor)
        if len(self.above) > LIMIT:
            self.tracked, self.above = False, set()


class AckLedger:
    """Per channel (the aiormq channel a message came on: a reconnected robust channel is a
    new one, with tags from 1 again), which delivery tags this process has settled."""

    def __init__(self) -> None:
        self._channels: weakref.WeakKeyDictionary[object, _Channel] = weakref.WeakKeyDictionary()

    def _of(self, message: AbstractIncomingMessage) -> _Channel | None:
        try:
            channel = message.channel
        except Exception:  # closed: nothing to settle on it any more
            return None
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel()
        return state if state.tracked else None

    def plan(self, messages: Sequence[AbstractIncomingMessage]
             ) -> tuple[AbstractIncomingMessage | None, list[AbstractIncomingMessage]]:
        """The message whose multiple ack settles the run these messages extend (None: no
        run), and the rest, to ack one by one. All of them on one channel, or all one by one."""
        tagged = [m for m in messages if m.delivery_tag]
        state = self._of(tagged[0]) if tagged else None
        if state is None or any(self._of(m) is not state for m in tagged[1:]):
            return None, list(messages)
        mine = {m.delivery_tag: m for m in tagged}
        end = state.floor  # the run of settled-or-ours tags from the floor up
        while end + 1 in mine or end + 1 in state.above:
            end += 1
        top = max((tag for tag in mine if tag <= end), default=None)
        if top is None:
            return None, list(messages)
        return mine[top], [m for m in messages if not (m.delivery_tag and m.delivery_tag <= top)]

    def settled(self, message: AbstractIncomingMessage) -> bool:
        """Settled by this process (by a multiple ack too), so never to be settled again."""
        if message.processed:
            return True
        state = self._of(message)
        return state is not None and bool(message.delivery_tag) and state.settled(
            message.delivery_tag)

    def record(self, messages: Sequence[AbstractIncomingMessage], upto: int = 0) -> None:
        """These messages' tags (and, with `upto`, every tag up to it) were settled: their
        frames are sent."""
        if not messages:
            return
        state = self._of(messages[0])
        if state is None:
            return
        if upto > state.floor:
            state.above.update(range(state.floor + 1, upto + 1))
        state.record([m.delivery_tag for m in messages if m.delivery_tag])
