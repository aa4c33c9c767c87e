"""The one place that changes an order's status (docs/contract.md, section 4, rule 8):
allowed transitions, items and invoice following along, history written, all under the
order's row lock. Every order lock is `FOR NO KEY UPDATE` (rule 8 says why: a `FOR UPDATE`
blocked, and deadlocked with, the foreign-key checks of mails inserted for the same orders)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import asyncpg

from shared.contracts import EmailSend
from shared.states import ENDED, DomainStatus, InvoiceStatus, OrderStatus, ServiceStatus
from shared.uow import UnitOfWork
from shared.uow import write_history as add_history  # the CLI's name for it

# The statuses as text (the CLI's --status choices).
ORDER_STATUSES = tuple(status.value for status in OrderStatus)

P, A, C, F = OrderStatus.PENDING, OrderStatus.ACTIVE, OrderStatus.CANCELLED, OrderStatus.FRAUD

# The one transition table: every status change an order may make, and the actions that may
# make it (the operator actions of docs/contract.md, section 1, and `screening`, the fraud
# service's verdict). `transition` refuses any other change; review's allowed actions derive
# from it.
TRANSITIONS: Mapping[tuple[OrderStatus, OrderStatus], frozenset[str]] = MappingProxyType({
    (P, A): frozenset({"accept"}),
    (P, C): frozenset({"deny", "cancel"}),
    (A, C): frozenset({"cancel"}),
    (P, F): frozenset({"fraud", "screening"}),
    (A, F): frozenset({"fraud"}),
    (C, F): frozenset({"fraud"}),
    (C, P): frozenset({"pending"}),
    (F, P): frozenset({"pending"}),
})

# Operator actions that change no status, and the statuses they may start from.
IN_PLACE: Mapping[str, frozenset[OrderStatus]] = MappingProxyType({
    "delete": ENDED,
    "retry": frozenset(OrderStatus),
    "rescreen": frozenset({P}),
})


def allowed_from(action: str, to_status: OrderStatus | None) -> frozenset[OrderStatus]:
    """The statuses `action` may start from to reach `to_status` (None: it changes no status)."""
    if to_status is None:
        return IN_PLACE.get(action, frozenset())
    return frozenset(start for (start, end), actions in TRANSITIONS.items()
                     if end == to_status and action in actions)


# Items that are already ended keep their status when the order is cancelled or marked Fraud.
_ENDED_SERVICE = (ServiceStatus.TERMINATED, ServiceStatus.CANCELLED, ServiceStatus.FRAUD)
_ENDED_DOMAIN = (DomainStatus.CANCELLED, DomainStatus.FRAUD)


class TransitionRefused(Exception):
    pass


async def transition(
    conn: asyncpg.Connection, order: asyncpg.Record, to_status: OrderStatus, *,
    actor: str, action: str, detail: dict[str, Any] | None = None,
) -> None:
    """Move a locked order to `to_status`, with its items and invoice. Raises TransitionRefused
    for a change the transition table does not have. (Which action may make it, deny only from
    Pending, is the caller's to check: review derives that from the same table.)"""
    current = OrderStatus(order["status"])
    if (current, to_status) not in TRANSITIONS:
        raise TransitionRefused(f"order {order['id']} is {current}; {action} cannot make it {to_status}")
    order_id = order["id"]
    await conn.execute(
        "UPDATE orders SET status = $2, updated_at = now() WHERE id = $1", order_id, to_status
    )
    if to_status in ENDED:
        await conn.execute(
            "UPDATE services SET status = $2 WHERE order_id = $1 AND status <> ALL($3::text[])",
            order_id, to_status, list(_ENDED_SERVICE),
        )
        await conn.execute(
            "UPDATE domains SET status = $2 WHERE order_id = $1 AND status <> ALL($3::text[])",
            order_id, to_status, list(_ENDED_DOMAIN),
        )
        await conn.execute(
            "UPDATE invoices SET status = $2 WHERE order_id = $1 AND status = $3",
            order_id, InvoiceStatus.CANCELLED, InvoiceStatus.UNPAID,
        )
    elif to_status == OrderStatus.PENDING:
        # Set back to Pending: items that followed the order follow it back, an account
        # already terminated stays so; a cancelled invoice not paid in full is reopened.
        await conn.execute(
            "UPDATE services SET status = CASE WHEN live THEN $2 ELSE $3 END"
            " WHERE order_id = $1 AND status = ANY($4::text[]) AND terminated_at IS NULL",
            order_id, ServiceStatus.ACTIVE, ServiceStatus.PENDING, list(ENDED),
        )  # a live account (its termination not yet done) is the order's again: Active
        await conn.execute(
            "UPDATE domains SET status = $2 WHERE order_id = $1"
            " AND status = ANY($3::text[]) AND registered_at IS NULL",
            order_id, DomainStatus.PENDING, list(ENDED),
        )
        await conn.execute(
            "UPDATE invoices SET status = $2 WHERE order_id = $1 AND status = $3"
            " AND amount_paid < total", order_id, InvoiceStatus.UNPAID, InvoiceStatus.CANCELLED,
        )
    await add_history(
        conn, order_id, actor=actor, action=action, from_status=current, to_status=to_status,
        detail=detail,
    )


def ask_for_order_emails(uow: UnitOfWork, order: asyncpg.Record) -> None:
    """The confirmation and invoice emails the order asked for, once screening has cleared it:
    screening passed or skipped, or an operator overrode it (set back to Pending, or accepted an
    order that could not be screened). The mail worker sends each (dedupe key) once at most.
    `order` is the order's row with its client's `email`."""
    templates = []
    if order["send_confirmation"]:
        templates.append("order_confirmation")
    if order["generate_invoice"]:
        templates.append("invoice_created")
    for template in templates:
        uow.emit(EmailSend(
            template=template, recipient=order["email"], order_id=order["id"],
            order_ref=order["order_ref"], dedupe_key=f"{template}:{order['id']}"))
