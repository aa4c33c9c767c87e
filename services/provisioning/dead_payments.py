"""A payment is never dropped, not even by the broker.

A payment message can reach the provisioning queue's dead-letter queue without a worker
ever storing it: its AMQP `expiration` ran out in the queue, it hit the delivery limit
(a worker crashing on it), or the runtime refused it as not a payment at all. Whatever the
cause, this keeper takes each payment it finds there and stores it as an unapplied payment
with the reason (never trusted: it does not take the gateway's transaction id, so the
gateway's re-send is applied normally), announces it with `payment.unapplied`, and removes
the dead letter. Other dead letters are left for operators (`ordermill dead-letters`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from services.provisioning.payments import Problem, _amount, _leave_unapplied, int_or_none
from shared import dead_letters as dl
from shared.contracts import shown
from shared.parties import Party, Publishers
from shared.settings_parts import DeadPaymentsSettings
from shared.sweep import BrokerSweep
from shared.topology import Names
from shared.uow import MessageContext, UnitOfWork, flush_events

log = logging.getLogger("ordermill.provisioning.dead_payments")

CONSUMER = "provisioning.dead-payments"  # its own inbox rows: each dead letter once
TEXT_LIMIT = 200  # what a payment's text columns keep of a field here
BODY_LIMIT = 4000  # what the row keeps of the dead letter's body, for an operator


# What the broker's own dead-lettering means, for the payment's reason.
_BROKER_REASONS = {
    "expired": "expired in the queue before a worker took it (AMQP expiration)",
    "delivery_limit": "reached the queue's delivery limit (redelivered too often)",
    "maxlen": "dropped by the queue's length limit",
    "rejected": "rejected by a consumer",
}


def why_dead(message: AbstractIncomingMessage) -> str:
    if not dl.by_broker(message):
        return f"refused by the worker: {dl.reason(message)[:500]}"
    code = dl.death_reason(message)
    return _BROKER_REASONS.get(code, f"dead-lettered ({code or 'unknown reason'})")


def _field(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if isinstance(value, str | int | Decimal) and not isinstance(value, bool):
        text = str(value).replace("\x00", "\ufffd")
        return text.encode("utf-8", "replace").decode()[:TEXT_LIMIT]
    return None


def _body(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw, parse_float=Decimal)
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


class DeadPayments(BrokerSweep):
    log = log
    failed = "dead payments not swept; will try again"

    def __init__(self, settings: DeadPaymentsSettings) -> None:
        super().__init__(settings.broker.amqp_url, settings.sweep_seconds)  # its own connection
        self.names = Names(settings.broker.namespace)
        # Ordermill's own users: a payment a worker dead-lettered is still the gateway's.
        self.service_users = Publishers.from_settings(settings.publishers).users[Party.SERVICE]

    async def once(self, pool: asyncpg.Pool) -> int:
        return await self.sweep(pool)

    async def sweep(self, pool: asyncpg.Pool) -> int:
        """Store every payment in the dead-letter queue now; returns how many."""
        channel = await (await self.connection()).channel()
        stored = 0
        try:
            queue = await channel.declare_queue(self.names.dead_queue("provisioning"),
                                                passive=True)
            for _ in range(queue.declaration_result.message_count or 0):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                if dl.claimed_key(message) != "payment.received":
                    continue  # not ours: back in its queue when the channel closes
                await self._store(pool, message)
                await message.ack()
                stored += 1
        finally:
            await channel.close()
        if stored:
            log.warning("payments taken from the dead-letter queue and kept unapplied",
                        extra={"count": stored})
        return stored

    async def _store(self, pool: asyncpg.Pool, message: AbstractIncomingMessage) -> None:
        message_id = dl.text(message.message_id, TEXT_LIMIT) or (
            "sha256:" + hashlib.sha256(message.body).hexdigest())
        data = _body(message.body)
        reason = f"not handled: {why_dead(message)}"
        raw_amount = _field(data, "amount") or ""
        amount, problem = _amount(raw_amount) if raw_amount else (None, None)
        if problem:
            reason += f"; {problem}"
        publisher = dl.first_publisher(message, self.service_users)
        async with pool.acquire() as conn, conn.transaction():
            fresh = await conn.fetchval(
                "INSERT INTO inbox (consumer, message_id) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING true", CONSUMER, message_id)
            if not fresh:
                return  # stored before (acked meanwhile lost): only the ack was missing
            payment_id = await conn.fetchval(
                "INSERT INTO payments (gateway, transaction_id, amount, raw_amount, currency,"
                " requested_invoice_id, order_ref, publisher, status, message_id, trusted,"
                " dead_letter) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'unapplied', $9, false,"
                " $10) RETURNING id",
                _field(data, "gateway"), _field(data, "transaction_id"), amount, raw_amount,
                _field(data, "currency"), int_or_none(_field(data, "invoice_id")),
                _field(data, "order_ref"), publisher or None, message_id,
                message.body.decode(errors="replace").replace("\x00", "\ufffd")[:BODY_LIMIT])
            uow = UnitOfWork(conn, MessageContext(
                consumer="provisioning", message_id=f"dead:{message_id}",
                routing_key="payment.received", received_at=datetime.now(UTC),
                user_id=publisher or None, authorized=False))
            await _leave_unapplied(uow, payment_id, Problem(reason))  # waits for a person
            await flush_events(conn, [uow])
        log.warning("payment kept from the dead-letter queue", extra={
            "payment_id": payment_id, "message_id": shown(message_id), "reason": reason})
