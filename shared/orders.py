"""The one place that changes an order's status (design rule 8): allowed transitions,
items and invoice following along, history written, all under the order's row lock."""

from __future__ import annotations

from typing import Any

import asyncpg

from shared.contracts import EmailSend
from shared.uow import UnitOfWork

ORDER_STATUSES = ("Pending", "Active", "Cancelled", "Fraud")

# (from, to) pairs allowed by the operator actions table and the screening outcome.
TRANSITIONS: frozenset[tuple[str, str]] = frozenset({
    ("Pending", "Active"),
    ("Pending", "Cancelled"),
    ("Active", "Cancelled"),
    ("Pending", "Fraud"),
    ("Active", "Fraud"),
    ("Cancelled", "Fraud"),
    ("Cancelled", "Pending"),
    ("Fraud", "Pending"),
})

# Items that are already ended keep their status when the order is cancelled or marked Fraud.
_ENDED_SERVICE = ("Terminated", "Cancelled", "Fraud")
_ENDED_DOMAIN = ("Cancelled", "Fraud")


class TransitionRefused(Exception):
    pass


async def add_history(
    conn: asyncpg.Connection, order_id: int, *, actor: str, action: str,
    from_status: str | None = None, to_status: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO order_history (order_id, actor, action, from_status, to_status, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        order_id, actor, action, from_status, to_status, detail or {},
    )


async def transition(
    conn: asyncpg.Connection, order: asyncpg.Record, to_status: str, *,
    actor: str, action: str, detail: dict[str, Any] | None = None,
) -> None:
    """Move a locked order to `to_status`, with its items and invoice. Raises TransitionRefused."""
    current = order["status"]
    if (current, to_status) not in TRANSITIONS:
        raise TransitionRefused(f"order {order['id']} is {current}; {action} cannot make it {to_status}")
    order_id = order["id"]
    await conn.execute(
        "UPDATE orders SET status = $2, updated_at = now() WHERE id = $1", order_id, to_status
    )
    if to_status in ("Cancelled", "Fraud"):
        await conn.execute(
            "UPDATE services SET status = $2 WHERE order_id = $1 AND status <> ALL($3::text[])",
            order_id, to_status, list(_ENDED_SERVICE),
        )
        await conn.execute(
            "UPDATE domains SET status = $2 WHERE order_id = $1 AND status <> ALL($3::text[])",
            order_id, to_status, list(_ENDED_DOMAIN),
        )
        await conn.execute(
            "UPDATE invoices SET status = 'Cancelled' WHERE order_id = $1 AND status = 'Unpaid'",
            order_id,
        )
    elif to_status == "Pending":
        # Set back to Pending: items that followed the order follow it back, an account
        # already terminated stays so; a cancelled invoice not paid in full is reopened.
        await conn.execute(
            "UPDATE services SET status = CASE WHEN live THEN 'Active' ELSE 'Pending' END"
            " WHERE order_id = $1 AND status IN ('Cancelled', 'Fraud') AND terminated_at IS NULL",
            order_id,
        )  # a live account (its termination not yet done) is the order's again: Active
        await conn.execute(
            "UPDATE domains SET status = 'Pending' WHERE order_id = $1"
            " AND status IN ('Cancelled', 'Fraud') AND registered_at IS NULL", order_id,
        )
        await conn.execute(
            "UPDATE invoices SET status = 'Unpaid' WHERE order_id = $1 AND status = 'Cancelled'"
            " AND amount_paid < total", order_id,
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
        uow.emit("email.send", EmailSend(
            template=template, recipient=order["email"], order_id=order["id"],
            order_ref=order["order_ref"], dedupe_key=f"{template}:{order['id']}"))
