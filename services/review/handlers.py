"""review.command: the operator actions of docs/contract.md (section 1), answered on `reply_to`.

Besides the status changes, two actions that change no status: `note` keeps an operator's
note with the order (the console's "Add note"), `report` reports the order's outcome to
MaxMind (the console's "Report to MaxMind"), called in the route's prepare step, outside the
transaction. Both are written to history like the others.

Every action runs under the order's row lock, through the one transition function, and is
written to the order's history with the operator: the broker-validated user_id of an
operator; for a console user (CONSOLE_USERS), the operator signed in to the console, which
the console names in the body; the body's `operator` only where nobody is validated
(development with TRUST_ANY_PUBLISHER).

A batch of commands (several operators at once) locks its orders first, in id order, in one
statement (`lock_orders`, the route's load step), as every transaction locking several
orders does: each command locked its order as it came, so a batch holding a newer order
waited for an older one that a batch locking in id order (provisioning's, fraud's) held while
it waited for the newer one, a deadlock broken only after 1 s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from shared import db
from shared.contracts import (
    AcceptOptions,
    OperatorAction,
    OrderAccepted,
    OrderCancelled,
    OrderDeleted,
    OrderFraud,
    OrderRescreen,
    OrderRetry,
    OrderSetPending,
    ReviewCommand,
    ReviewReply,
)
from shared.orders import allowed_from, ask_for_order_emails, transition
from shared.parties import operator_named
from shared.settings_parts import MaxMindSettings
from shared.states import CLEARED, JobStatus, OrderStatus, Screening
from shared.uow import UnitOfWork

log = logging.getLogger("ordermill.review")


@dataclass(frozen=True)
class Action:
    """What an operator action leads to; where it may start from is the transition table's
    to say (shared/orders.py), so the two cannot disagree."""

    event: type[OperatorAction] | type[OrderFraud]
    result: OrderStatus | None = None  # the status it leads to (None: the status stays)

    def allowed(self, name: str) -> frozenset[OrderStatus]:
        return allowed_from(name, self.result)


ACTIONS: dict[str, Action] = {
    "accept": Action(OrderAccepted, OrderStatus.ACTIVE),
    "deny": Action(OrderCancelled, OrderStatus.CANCELLED),
    "cancel": Action(OrderCancelled, OrderStatus.CANCELLED),
    "fraud": Action(OrderFraud, OrderStatus.FRAUD),
    "pending": Action(OrderSetPending, OrderStatus.PENDING),
    "delete": Action(OrderDeleted),
    "retry": Action(OrderRetry),
    "rescreen": Action(OrderRescreen),
}


def action_table() -> dict[str, tuple[frozenset[OrderStatus], OrderStatus | None]]:
    """action -> (the statuses it may start from, the status it leads to): the operator
    actions table of docs/contract.md (section 1), as the code derives it."""
    return {name: (action.allowed(name), action.result) for name, action in ACTIONS.items()}


# Actions that change no status and have no event: handled apart from ACTIONS.
NOTE, REPORT, RESOLVE = "note", "report", "resolve"


class Refused(Exception):
    pass


@dataclass(frozen=True)
class Reported:
    """What the prepare step of a `report` did: sent (with minFraud's id of the transaction,
    if screening had one), or why not."""

    sent: bool
    minfraud_id: str | None = None
    error: str | None = None


def preparer(maxmind: MaxMindSettings):  # -> Prepare
    """The review route's prepare step: a `report` calls MaxMind here, before the order's
    transaction, so a slow answer holds no row lock; any other action needs nothing."""
    from services.fraud.providers.base import ProviderError
    from services.fraud.providers.maxmind import report

    async def prepare(cmd: ReviewCommand, pool: asyncpg.Pool) -> Reported | None:
        if cmd.action != REPORT:
            return None
        if cmd.tag is None:
            return Reported(False, error="report needs a tag (chargeback, not_fraud,"
                            " suspected_fraud or spam_or_abuse)")
        if maxmind.account_id is None or maxmind.license_key is None:
            return Reported(False, error="reporting to MaxMind needs MAXMIND_ACCOUNT_ID and"
                            " MAXMIND_LICENSE_KEY on the review service")
        row = await pool.fetchrow(
            "SELECT o.order_number, o.ip_address, (SELECT f.raw->>'id' FROM fraud_checks f"
            "  WHERE f.order_id = o.id AND f.provider = 'maxmind' AND f.raw ? 'id'"
            "  ORDER BY f.id DESC LIMIT 1) AS minfraud_id FROM orders o WHERE o.id = $1",
            cmd.order_id)
        if row is None:
            return None  # the handler says the order does not exist
        try:
            await report(maxmind, tag=cmd.tag, transaction_id=str(row["order_number"]),
                         ip_address=str(row["ip_address"]) if row["ip_address"] else None,
                         minfraud_id=row["minfraud_id"], notes=cmd.note)
        except ProviderError as exc:
            return Reported(False, error=f"MaxMind refused the report: {exc}")
        return Reported(True, minfraud_id=row["minfraud_id"])

    return prepare


def operator_of(cmd: ReviewCommand, uow: UnitOfWork) -> str:
    # The console vouches for the operator it signed in (shared/parties.py operator_named).
    return operator_named(uow.context.user_id, uow.context.parties, cmd.operator) or cmd.operator


_ORDER = "SELECT o.*, c.email FROM orders o JOIN clients c ON c.id = o.client_id"


async def lock_orders(cmds: Sequence[ReviewCommand],
                      conn: asyncpg.Connection) -> list[asyncpg.Record | None]:
    """The route's load step: the batch's orders locked in id order and read, in one
    statement. Each order's row goes to the first command naming it; a later one reads it
    again (under the lock already held), after what the first one wrote."""
    rows = {r["id"]: r for r in await conn.fetch(
        _ORDER + " WHERE o.id = ANY(" + db.planned_once("$1", "bigint[]")
        + ") ORDER BY o.id FOR NO KEY UPDATE OF o",
        sorted({cmd.order_id for cmd in cmds}))}
    return [rows.pop(cmd.order_id, None) for cmd in cmds]


async def on_command(cmd: ReviewCommand, uow: UnitOfWork) -> None:
    operator = operator_of(cmd, uow)
    conn = uow.conn
    order = uow.loaded if isinstance(uow.loaded, asyncpg.Record) else await conn.fetchrow(
        _ORDER + " WHERE o.id = $1 FOR NO KEY UPDATE OF o", cmd.order_id)
    try:
        expires_at = uow.context.expires_at
        late = expires_at is not None and datetime.now(UTC) > expires_at
        sent = isinstance(uow.prepared, Reported) and uow.prepared.sent  # recorded however late
        if late and not sent:
            # Its sender stopped waiting and said it expired unapplied (it waited in this
            # worker's prefetch, or for the order's lock): it is not carried out late.
            raise Refused("the command expired before it could be applied; nothing changed")
        if order is None:
            raise Refused(f"order {cmd.order_id} does not exist")
        status = await _apply(conn, uow, cmd, order, operator)
    except Refused as refusal:
        uow.reply(ReviewReply(ok=False, order_id=cmd.order_id, error=str(refusal)))
        log.info("operator action refused", extra={
            "order_id": cmd.order_id, "action": cmd.action, "operator": operator,
            "reason": str(refusal)})
        return
    uow.reply(ReviewReply(ok=True, order_id=cmd.order_id, status=status))
    log.info("operator action", extra={"order_id": cmd.order_id, "order_ref": order["order_ref"],
                                       "action": cmd.action, "operator": operator,
                                       "status": status})


async def _apply(conn: asyncpg.Connection, uow: UnitOfWork, cmd: ReviewCommand,
                 order: asyncpg.Record, operator: str) -> OrderStatus:
    current = OrderStatus(order["status"])
    if cmd.action == NOTE:
        return await _note(uow, cmd, order, operator)
    if cmd.action == REPORT:
        return await _report(uow, cmd, order, operator)
    if cmd.action == RESOLVE:
        return await _resolve(uow, cmd, order, operator)
    action = ACTIONS[cmd.action]
    if order["deleted_at"] is not None:
        if cmd.action == "delete":
            return current  # already what was asked
        raise Refused(f"order {order['id']} is deleted")
    if action.result is not None and current == action.result:
        return current  # the status it already has: nothing changes
    allowed = action.allowed(cmd.action)
    if current not in allowed:
        needs = " or ".join(sorted(allowed))
        raise Refused(f"order {order['id']} is {current}; {cmd.action} needs {needs}")
    screening = Screening(order["screening"])
    options: dict[str, bool] | None = None
    if cmd.action == "accept":
        if screening == Screening.QUEUED:
            raise Refused(f"order {order['id']} is still being screened; accept needs it finished")
        options = cmd.options.model_dump()
        # Accepting an order held by its screening (the review band, or a screening that
        # could not complete) clears it: the operator's decision overrides the screening, as
        # setting an order back to Pending does (its items may be set up).
        await conn.execute(
            "UPDATE orders SET accept_options = $2,"
            " screening_override = screening_override OR NOT (screening = ANY($3::text[]))"
            " WHERE id = $1", order["id"], options, sorted(CLEARED))
    if cmd.action == "retry":
        if cmd.job_id is not None:
            await _parked_job(conn, order["id"], cmd.job_id, "retry")
        elif not await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE order_id = $1 AND status = $2", order["id"],
                JobStatus.PARKED):
            raise Refused(f"order {order['id']} has no parked setup; retry needs one")
    if action.result is not None:
        await transition(conn, order, action.result, actor=operator, action=cmd.action,
                         detail=options and {"options": options})
        if cmd.action == "pending":
            # The operator overrides the screening: the order may be set up again. One never
            # screened (Cancelled or Fraud before its turn came) is not screened later either:
            # screening would undo the operator's decision.
            await conn.execute(
                "UPDATE orders SET screening_override = true, screening = CASE"
                " WHEN screening = $2 THEN $3 ELSE screening END WHERE id = $1",
                order["id"], Screening.QUEUED, Screening.SKIPPED)
        if cmd.action in ("pending", "accept") and screening not in CLEARED:
            # Cleared by the operator, not by screening: the emails screening held back go now.
            ask_for_order_emails(uow, order)
    else:
        if cmd.action == "delete":
            await conn.execute("UPDATE orders SET deleted_at = now() WHERE id = $1", order["id"])
        await uow.history(order["id"], cmd.action, actor=operator,
                          detail={"job_id": cmd.job_id} if cmd.job_id else None)
    uow.emit(_event(action, order, operator, options, cmd.job_id))
    return action.result or current


async def _note(uow: UnitOfWork, cmd: ReviewCommand, order: asyncpg.Record,
                operator: str) -> OrderStatus:
    """An operator's note, kept with the order (a deleted order's too: notes say why)."""
    text = (cmd.note or "").strip()
    if not text:
        raise Refused("a note needs some text")
    note_id = await uow.conn.fetchval(
        "INSERT INTO order_notes (order_id, operator, note) VALUES ($1, $2, $3) RETURNING id",
        order["id"], operator, text)
    await uow.history(order["id"], NOTE, actor=operator, detail={"note_id": note_id})
    return OrderStatus(order["status"])


async def _report(uow: UnitOfWork, cmd: ReviewCommand, order: asyncpg.Record,
                  operator: str) -> OrderStatus:
    reported = uow.prepared
    if not isinstance(reported, Reported):
        raise Refused("the report was not sent")
    if not reported.sent:
        raise Refused(reported.error or "the report was not sent")
    await uow.history(order["id"], "fraud_reported", actor=operator,
                      detail={"tag": cmd.tag, "minfraud_id": reported.minfraud_id})
    return OrderStatus(order["status"])


async def _parked_job(conn: asyncpg.Connection, order_id: int, job_id: int,
                      action: str) -> asyncpg.Record:
    job = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1 AND order_id = $2 FOR UPDATE",
                              job_id, order_id)
    if job is None:
        raise Refused(f"order {order_id} has no job {job_id}")
    if job["status"] != JobStatus.PARKED:
        raise Refused(f"job {job_id} is {job['status']}; {action} needs it parked")
    return job


# What an item becomes when its parked job is resolved by hand: what the job would have
# made it (reconcile then has nothing left to queue for it).
_RESOLVED = {
    "create": "UPDATE services SET live = true, status = CASE WHEN status = 'Pending'"
              " THEN 'Active' ELSE status END WHERE id = $1",
    "terminate": "UPDATE services SET live = false, terminated_at = now() WHERE id = $1",
    "register": "UPDATE domains SET status = CASE WHEN status = 'Pending' THEN 'Active'"
                " ELSE status END, registered_at = now() WHERE id = $1",
    "transfer": "UPDATE domains SET status = CASE WHEN status = 'Pending' THEN 'Active'"
                " ELSE status END, registered_at = now(), epp_code = NULL WHERE id = $1",
}


async def _resolve(uow: UnitOfWork, cmd: ReviewCommand, order: asyncpg.Record,
                   operator: str) -> OrderStatus:
    """A parked job an operator did by hand (the console's module queue "Mark resolved"): the
    job is `resolved`, its item what the job would have made it, and history says who."""
    if cmd.job_id is None:
        raise Refused("resolve needs a job_id")
    conn = uow.conn
    job = await _parked_job(conn, order["id"], cmd.job_id, RESOLVE)
    await conn.execute(
        "UPDATE jobs SET status = $2, updated_at = now(), lease_until = NULL, leased_by = NULL,"
        " detail = detail || jsonb_build_object('resolved_by', $3::text) WHERE id = $1",
        job["id"], JobStatus.RESOLVED, operator)
    await conn.execute(_RESOLVED[job["kind"]], job["service_id"] or job["domain_id"])
    await uow.history(order["id"], RESOLVE, actor=operator, detail={
        "job_id": job["id"], "kind": job["kind"], "service_id": job["service_id"],
        "domain_id": job["domain_id"], "last_error": job["last_error"]})
    return OrderStatus(order["status"])


def _event(action: Action, order: asyncpg.Record, operator: str,
           options: dict[str, bool] | None, job_id: int | None = None
           ) -> OperatorAction | OrderFraud:
    ids = {"order_id": order["id"], "order_ref": order["order_ref"], "operator": operator}
    if action.event is OrderRetry and job_id is not None:
        return OrderRetry(**ids, job_id=job_id)
    if action.event is OrderFraud:
        return OrderFraud(**ids, source="operator")
    if action.event is OrderAccepted:
        return OrderAccepted(**ids, options=AcceptOptions.model_validate(options))
    return action.event(**ids)
