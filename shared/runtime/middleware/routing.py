"""Routing: the route of the message's key in this worker; none is bad input."""

from __future__ import annotations

from collections.abc import Awaitable

from shared.contracts import shown
from shared.errors import Rejected, RejectKind
from shared.runtime.chain import Middleware, Next
from shared.runtime.work import Batch


class Routing(Middleware):
    def __call__(self, batch: Batch, call_next: Next) -> Awaitable[None]:
        for item in batch.items:
            item.route = item.spec.routes.get(item.key)
            if item.route is None:
                raise Rejected(f"no handler for routing key {shown(item.key)}"
                               f" in {item.spec.service}", kind=RejectKind.NO_ROUTE)
        return call_next(batch)
