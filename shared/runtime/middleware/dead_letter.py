"""Dead letter: what fails for good leaves the queue at once with its reason, never requeued.

Bad input (`Rejected`) is also answered with the worker's rejection event where the publisher
can be told (a storefront's order_ref); a handler's failure, or a transient error that
persisted while the database answered, is dead-lettered for an operator to replay once fixed.
The copy carries only Ordermill's headers (a forged reason or routing key must not pass for
ours) and the worker's own user_id, with secrets redacted from the body."""

from __future__ import annotations

import copy as copying
import json
import logging
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from shared import broker, db
from shared.errors import Rejected, RejectKind
from shared.runtime.chain import Middleware, Next
from shared.runtime.middleware.retry import transient_retrying
from shared.runtime.routes import WorkerSpec
from shared.runtime.text import (
    REASON_HEADER,
    REASON_LIMIT,
    REPLAYS_HEADER,
    header_text,
    property_text,
    redact,
)
from shared.runtime.work import Batch, Outcome, StepFailed, Transport, Work
from shared.topology import Names
from shared.uow import event_id, write_event, write_reply

log = logging.getLogger("ordermill.runtime")


class DeadLetter(Middleware):
    def __init__(self, spec: WorkerSpec, *, names: Names, pool: asyncpg.Pool,
                 transport: Transport, user: str | None, attempts: int) -> None:
        self.spec = spec
        self.queue = names.queue(spec.service)
        self.pool = pool
        self.transport = transport
        self.user = user  # the dead letter goes under the worker's own user
        self.attempts = attempts
        self.catch_all = True

    def bad_input_only(self) -> DeadLetter:
        """The same, for intake: only `Rejected` (anything else is the worker's, not the
        message's: the batch is requeued)."""
        intake = copying.copy(self)
        intake.catch_all = False
        return intake

    async def __call__(self, batch: Batch, call_next: Next) -> None:
        try:
            await call_next(batch)
        except Rejected as rejection:
            for item in batch.items:
                await self.reject(item, rejection.reason, rejection.kind,
                                  tell_publisher=rejection.tell_publisher)
        except StepFailed as failure:
            for item in batch.items:
                await self.reject(item, failure.reason, RejectKind.PREPARE_FAILED)
        except Exception as exc:
            if not self.catch_all:
                raise
            if isinstance(exc, db.TRANSIENT_DB_ERRORS):
                reason = f"transient error persisted after retries: {type(exc).__name__}: {exc}"
                kind = RejectKind.TRANSIENT
            else:
                reason = f"handler failed: {type(exc).__name__}: {exc}"
                kind = RejectKind.HANDLER_ERROR
                log.exception("handler failed", extra={
                    "service": self.spec.service,
                    "message_id": batch.items[0].message_id if batch.items else None})
            for item in batch.items:
                await self.reject(item, reason, kind)

    async def reject(self, item: Work, reason: str, kind: RejectKind, *,
                     tell_publisher: bool = False) -> None:
        message = item.message
        reason = header_text(reason, REASON_LIMIT)
        order_ref = item.data.get("order_ref") if isinstance(item.data, dict) else None
        if not (isinstance(order_ref, str) and 0 < len(order_ref) <= 200
                and "\x00" not in order_ref and not broker.undecodable(order_ref)):
            order_ref = None  # not one a storefront could have sent, nor one we can store
        log.warning("message rejected", extra={
            "service": self.spec.service, "message_id": item.message_id,
            "routing_key": message.routing_key, "order_ref": order_ref, "reason": reason,
        })
        if tell_publisher and self.spec.rejection_event and order_ref:
            await self._emit_rejection(item.message_id, order_ref, reason)
        if self.spec.rejection_reply and order_ref and message.reply_to:
            await self._reply_refused(message, item.message_id, order_ref, reason)
        await self.transport.dead_letter(
            self.queue, message,
            dead_letter_copy(message, item.message_id, reason, item.data,
                             queue=self.queue, user=self.user))
        item.settled = True
        item.outcome, item.rejected_as = Outcome.DEAD, kind

    async def _emit_rejection(self, message_id: str, order_ref: str, reason: str) -> None:
        assert self.spec.rejection_event
        try:
            async for attempt in transient_retrying(self.attempts):
                with attempt:
                    async with self.pool.acquire() as conn:
                        await write_event(
                            conn, self.spec.rejection_event(order_ref=order_ref, reason=reason),
                            message_id=event_id(self.spec.service, message_id, "rejected"),
                            correlation_id=message_id, source=self.spec.service,
                        )
        except Exception as exc:  # the dead letter still goes: it keeps the reason
            log.error("could not record the rejection event; the dead letter keeps the reason",
                      extra={"order_ref": order_ref, "error": f"{type(exc).__name__}: {exc}"})


    async def _reply_refused(self, message: AbstractIncomingMessage, message_id: str,
                             order_ref: str, reason: str) -> None:
        """Its sender waits on a reply queue (the console's Add New Order): told at once."""
        assert self.spec.rejection_reply
        reply_to = property_text(message.reply_to)
        if not reply_to:
            return
        try:
            async with self.pool.acquire() as conn:
                await write_reply(
                    conn, reply_to,
                    self.spec.rejection_reply(ok=False, order_ref=order_ref, error=reason),
                    message_id=event_id(self.spec.service, message_id, "refused"),
                    correlation_id=property_text(message.correlation_id) or None,
                    source=self.spec.service)
        except Exception as exc:  # the dead letter still goes; the sender times out
            log.error("could not record the refusal's reply", extra={
                "order_ref": order_ref, "error": f"{type(exc).__name__}: {exc}"})


def dead_letter_copy(message: AbstractIncomingMessage, message_id: str, reason: str, data: Any,
                     *, queue: str, user: str | None) -> aio_pika.Message:
    """The copy for `<queue>.dead`: the body redacted, the properties that can be sent again,
    and none of the publisher's headers: a forged x-ordermill-reason or -routing-key must not
    pass for ours (a replay trusts them), and theirs with ours could exceed the frame size."""
    body = message.body
    if isinstance(data, dict | list):
        try:
            body = json.dumps(redact(data), default=str).encode()
        except RecursionError:  # too deep to redact: kept as it came
            body = message.body
    headers: dict[str, Any] = {
        REASON_HEADER: reason,
        "x-ordermill-routing-key": header_text(message.routing_key or ""),
        "x-ordermill-queue": queue,
        "x-ordermill-user-id": header_text(message.user_id or ""),
        "x-ordermill-dead-at": datetime.now(UTC).isoformat(),
    }
    # How often `dead-letters --replay` sent it back (the CLI's count; only a number).
    replays = (message.headers or {}).get(REPLAYS_HEADER)
    if type(replays) is int and 0 < replays <= 1_000_000:
        headers[REPLAYS_HEADER] = replays
    return aio_pika.Message(
        body,
        content_type=property_text(message.content_type),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        correlation_id=property_text(message.correlation_id),
        reply_to=property_text(message.reply_to),
        type=property_text(message.type),
        timestamp=None if isinstance(message.timestamp, broker.UndecodableTimestamp)
        else message.timestamp,
        # Under the worker's own user: the replay believes its x-ordermill-user-id.
        user_id=user,
        headers=headers,
    )
