"""Parse: the body, within the size limit, as JSON (numbers as Decimal), cleaned of NULs and
lone surrogates where the contract says so, into the handler's type; then its context."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from datetime import UTC, datetime
from decimal import Decimal

from pydantic import ValidationError

from shared.contracts import MAYBE_SURROGATE, has_lone_surrogate, has_nul
from shared.errors import Rejected, RejectKind
from shared.runtime.chain import Middleware, Next
from shared.runtime.text import describe_validation_error, first_line
from shared.runtime.work import Batch, Work
from shared.uow import MessageContext


class Parse(Middleware):
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def __call__(self, batch: Batch, call_next: Next) -> Awaitable[None]:
        for item in batch.items:
            self.parse(item)
            item.context = context_of(item)
        return call_next(batch)

    def parse(self, item: Work) -> None:
        assert item.route is not None
        body = item.message.body
        if len(body) > self.max_bytes:
            raise Rejected(f"body of {len(body)} bytes is over MAX_MESSAGE_BYTES"
                           f" ({self.max_bytes})", kind=RejectKind.MALFORMED)
        try:
            # Numbers as Decimal: money is never a float, not even on the way in.
            item.data = json.loads(body, parse_float=Decimal)
        except RecursionError:
            raise Rejected("body is not JSON we take: nested too deeply",
                           kind=RejectKind.MALFORMED) from None
        except ValueError as exc:  # not UTF-8, not JSON, an integer of 5,000 digits
            raise Rejected(f"body is not JSON: {first_line(str(exc))}",
                           kind=RejectKind.MALFORMED) from None
        model = item.route.model
        # A NUL in JSON text is always written \\u0000: most bodies are passed at a glance.
        try:
            if b"\\u0000" in body and has_nul(item.data):
                item.data = model.without_nul(item.data)
            # Likewise a surrogate is written \\udXXX: a body with no \\u at all (found by
            # a byte search, far cheaper than the pattern's) holds none.
            if (b"\\u" in body and MAYBE_SURROGATE.search(body)
                    and has_lone_surrogate(item.data)):
                item.data = model.without_lone_surrogates(item.data)
        except Rejected as rejection:  # text the contract cannot take: the body's shape
            rejection.kind = RejectKind.INVALID
            raise
        try:
            item.payload = model.model_validate(item.data)
        except RecursionError:
            raise Rejected("body is not JSON we take: nested too deeply",
                           kind=RejectKind.MALFORMED) from None
        except ValidationError as exc:
            raise Rejected(describe_validation_error(exc), kind=RejectKind.INVALID) from None


def context_of(item: Work) -> MessageContext:
    verdict, message = item.verdict, item.message
    assert verdict is not None
    return MessageContext(
        consumer=item.spec.service, message_id=item.message_id, routing_key=item.key,
        received_at=datetime.now(UTC), user_id=verdict.user, parties=verdict.parties,
        authorized=verdict.allowed, replayed_by=verdict.replayed_by,
        correlation_id=message.correlation_id, reply_to=message.reply_to,
        expires_at=item.expires_at,
    )
