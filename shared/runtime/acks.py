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
counting against the prefetch.

The settled tags above the floor are kept as runs (first, last), not one by one: a message
held for minutes while thousands after it are settled is one run, and once it is settled the
floor moves past them all and multiple acks go on. What is kept is one run per tag still
unsettled above the floor (at most the prefetch, unless a tag was settled elsewhere, never
recorded). Past `LIMIT` runs the highest are forgotten: only a lost multiple ack above them,
never a wrong settle, since a run only holds tags sent with their own frame (which aio-pika
marks processed); a multiple ack's tags are always at or below the floor once recorded.

A message a multiple ack covered is not marked processed by aio-pika (only the one whose tag
was sent is): `settled()` says so for the transport's requeue, which must not nack it."""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage

LIMIT = 4096  # runs kept above the floor: far more than tags in hand (the prefetch, <= 1000)


@dataclass
class _Channel:
    floor: int = 0  # every tag <= floor is settled
    starts: list[int] = field(default_factory=list)  # the settled runs above the floor:
    ends: list[int] = field(default_factory=list)  # sorted, disjoint, a gap before each

    def settled(self, tag: int) -> bool:
        if tag <= self.floor:
            return True
        at = bisect.bisect_right(self.starts, tag) - 1
        return at >= 0 and self.ends[at] >= tag

    def run_from(self, tag: int) -> int:
        """The last tag of the settled run starting at `tag` (tag - 1: none starts there)."""
        at = bisect.bisect_left(self.starts, tag)
        return self.ends[at] if at < len(self.starts) and self.starts[at] == tag else tag - 1

    def add(self, first: int, last: int) -> None:
        """Tags first..last are settled: merged with the runs they touch, the floor moved up."""
        first = max(first, self.floor + 1)
        if first > last:
            return
        lo = bisect.bisect_left(self.ends, first - 1)  # first run ending at or after first - 1
        hi = bisect.bisect_right(self.starts, last + 1)  # runs from lo to hi touch or overlap
        if lo < hi:
            first, last = min(first, self.starts[lo]), max(last, self.ends[hi - 1])
        self.starts[lo:hi], self.ends[lo:hi] = [first], [last]
        if self.starts[0] == self.floor + 1:
            self.floor = self.ends[0]
            del self.starts[0], self.ends[0]
        if len(self.starts) > LIMIT:
            del self.starts[LIMIT:], self.ends[LIMIT:]

    def record(self, tags: Sequence[int]) -> None:
        for tag in sorted(tags):
            self.add(tag, tag)


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
        return state

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
        while True:
            if end + 1 in mine:
                end += 1
            elif (last := state.run_from(end + 1)) > end:
                end = last
            else:
                break
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
        state.add(state.floor + 1, upto)
        state.record([m.delivery_tag for m in messages if m.delivery_tag])
