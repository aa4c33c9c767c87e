"""review.command: the operator actions of the design's table, answered on `reply_to`.

Every action runs under the order's row lock, through the one transition function, and is
written to the order's history with the operator: the broker-validated user_id of an
operator; for a console user (CONSOLE_USERS), the operator signed in to the console, which
the console names in the body; the body's `operator` only where nobody is validated
(development with TRUST_ANY_PUBLISHER).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from shared.contracts import ReviewCommand
from shared.orders import add_history, ask_for_order_emails, transition
from shared.parties import Party
from shared.uow import UnitOfWork

log = logging.getLogger("ordermill.review")


@dataclass(frozen=True)
class Rule:
    allowed: frozenset[str]  # statuses the action may start from
    result: str | None  # the status it leads to (None: the status does not change)
    event: str


ANY = frozenset({"Pending", "Active", "Cancelled", "Fraud"})
RULES: dict[str, Rule] = {
    "accept": Rule(frozenset({"Pending"}), "Active", "order.accepted"),
    "deny": Rule(frozenset({"Pending"}), "Cancelled", "order.cancelled"),
    "cancel": Rule(frozenset({"Pending", "Active"}), "Cancelled", "order.cancelled"),
    "fraud": Rule(frozenset({"Pending", "Active", "Cancelled"}), "Fraud", "order.fraud"),
    "pending": Rule(frozenset({"Cancelled", "Fraud"}), "Pending", "order.pending"),
    "delete": Rule(frozenset({"Cancelled", "Fraud"}), None, "order.deleted"),
    "retry": Rule(ANY, None, "order.retry"),
    "rescreen": Rule(frozenset({"Pending"}), None, "order.rescreen"),
}


class Refused(Exception):
    pass


def operator_of(cmd: ReviewCommand, uow: UnitOfWork) -> str:
    ctx = uow.context
    if ctx.user_id is None:
        return cmd.operator
    if Party.CONSOLE in ctx.parties and Party.OPERATOR not in ctx.parties:
        return cmd.operator  # vouched for by the console, which signed the operator in
    return ctx.user_id


async def on_command(cmd: ReviewCommand, uow: UnitOfWork) -> None:
    operator = operator_of(cmd, uow)
    conn = uow.conn
    order = await conn.fetchrow(
        "SELECT o.*, c.email FROM orders o JOIN clients c ON c.id = o.client_id"
        " WHERE o.id = $1 FOR UPDATE OF o", cmd.order_id)
    try:
        expires_at = uow.context.expires_at
        if expires_at is not None and datetime.now(UTC) > expires_at:
            # Its sender stopped waiting and said it expired unapplied (it waited in this
            # worker's prefetch, or for the order's lock): it is not carried out late.
            raise Refused("the command expired before it could be applied; nothing changed")
        if order is None:
            raise Refused(f"order {cmd.order_id} does not exist")
        status = await _apply(conn, uow, cmd, order, operator)
    except Refused as refusal:
        uow.reply({"ok": False, "order_id": cmd.order_id, "error": str(refusal)})
        log.info("operator action refused", extra={
            "order_id": cmd.order_id, "action": cmd.action, "operator": operator,
            "reason": str(refusal)})
        return
    uow.reply({"ok": True, "order_id": cmd.order_id, "status": status})
    log.info("operator action", extra={"order_id": cmd.order_id, "order_ref": order["order_ref"],
                                       "action": cmd.action, "operator": operator,
                                       "status": status})


async def _apply(conn: asyncpg.Connection, uow: UnitOfWork, cmd: ReviewCommand,
                 order: asyncpg.Record, operator: str) -> str:
    rule = RULES[cmd.action]
    current = order["status"]
    if order["deleted_at"] is not None:
        if cmd.action == "delete":
            return current  # already what was asked
        raise Refused(f"order {order['id']} is deleted")
    if rule.result is not None and current == rule.result:
        return current  # the status it already has: nothing changes
    if current not in rule.allowed:
        needs = " or ".join(sorted(rule.allowed))
        raise Refused(f"order {order['id']} is {current}; {cmd.action} needs {needs}")
    body: dict[str, object] = {"order_id": order["id"], "order_ref": order["order_ref"],
                               "operator": operator}
    if cmd.action == "accept":
        if order["screening"] == "queued":
            raise Refused(f"order {order['id']} is still being screened; accept needs it finished")
        options = cmd.options.model_dump()
        await conn.execute("UPDATE orders SET accept_options = $2 WHERE id = $1", order["id"],
                           options)
        body["options"] = options
    if cmd.action == "retry":
        parked = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE order_id = $1 AND status = 'parked'", order["id"])
        if not parked:
            raise Refused(f"order {order['id']} has no parked setup; retry needs one")
    if rule.result is not None:
        await transition(conn, order, rule.result, actor=operator, action=cmd.action,
                         detail=body.get("options") and {"options": body["options"]})
        if cmd.action == "pending":
            # The operator overrides the screening: the order may be set up again. One never
            # screened (Cancelled or Fraud before its turn came) is not screened later either:
            # screening would undo the operator's decision.
            await conn.execute(
                "UPDATE orders SET screening_override = true, screening = CASE"
                " WHEN screening = 'queued' THEN 'skipped' ELSE screening END WHERE id = $1",
                order["id"])
        if cmd.action in ("pending", "accept") and order["screening"] not in ("passed", "skipped"):
            # Cleared by the operator, not by screening: the emails screening held back go now.
            ask_for_order_emails(uow, order)
    else:
        if cmd.action == "delete":
            await conn.execute("UPDATE orders SET deleted_at = now() WHERE id = $1", order["id"])
        await add_history(conn, order["id"], actor=operator, action=cmd.action)
    if cmd.action == "fraud":
        body["source"] = "operator"
    uow.emit(rule.event, body)
    return rule.result or current
