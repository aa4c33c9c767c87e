"""Publisher check (shared/parties.py): the validated user_id may send this route, before the
body is read. Anyone else's message is dead-lettered unread, and the publisher is not told
(a storefront's forged command must not learn anything from it)."""

from __future__ import annotations

from collections.abc import Awaitable

from shared.errors import Rejected, RejectKind
from shared.parties import REPLAY_OF_HEADER, Publishers
from shared.runtime.chain import Middleware, Next
from shared.runtime.work import Batch


class PublisherCheck(Middleware):
    def __init__(self, publishers: Publishers) -> None:
        self.publishers = publishers

    def __call__(self, batch: Batch, call_next: Next) -> Awaitable[None]:
        for item in batch.items:
            assert item.route is not None
            replay_of = (item.message.headers or {}).get(REPLAY_OF_HEADER)
            item.verdict = self.publishers.check(
                item.message.user_id, item.route.publishers,
                replay_of=replay_of if isinstance(replay_of, str) and replay_of else None)
            if not (item.verdict.allowed or item.route.handle_unauthorized):
                raise Rejected(item.verdict.reason, tell_publisher=False,
                               kind=RejectKind.PUBLISHER)  # unread, not acted on
        return call_next(batch)
