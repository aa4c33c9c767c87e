"""One reconcile step per order: from the database state, under the order's row lock,
decide what each item still needs (set up, register, terminate, or nothing) and queue
it as a job. It runs on every event about the order, any number of times: the jobs'
unique key makes a second run a no-op.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from shared.states import CLEARED, ENDED, InvoiceStatus, OrderStatus
from shared.wakeup import heard_here

# The channel new and rescheduled jobs wake the job runner on (jobs.JOBS).
JOBS_CHANNEL = "ordermill_jobs"

log = logging.getLogger("ordermill.provisioning")


def username_for(domain: str | None, fallback: str, service_id: int) -> str:
    """A cPanel-valid username (a letter first, lowercase letters and digits, at most 16),
    the same on every attempt: derived from the domain and the service id."""
    letters = re.sub(r"[^a-z]", "", (domain or fallback).lower())[:7] or "svc"
    return f"{letters}{_base36(service_id)}"[:16]


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out

# A service's lane: its module and, when it has one, its server (`s` services, `p` products).
SERVICE_LANE = "p.module || coalesce(':' || coalesce(s.server_id, p.server_id), '')"


@dataclass(frozen=True)
class OrderState:
    id: int
    order_ref: str
    status: OrderStatus
    cleared: bool  # screening passed or skipped, or an operator overrode it
    has_invoice: bool
    paid: bool
    accepted: bool
    run_module_create: bool
    register_domains: bool

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> OrderState:
        options = row["accept_options"] or {}
        accepted = row["status"] == OrderStatus.ACTIVE
        return cls(
            id=row["id"], order_ref=row["order_ref"], status=OrderStatus(row["status"]),
            cleared=row["screening"] in CLEARED or row["screening_override"],
            has_invoice=row["invoice_status"] is not None,
            paid=row["invoice_status"] == InvoiceStatus.PAID,
            accepted=accepted,
            run_module_create=accepted and options.get("run_module_create", True),
            register_domains=accepted and options.get("register_domains", True),
        )

    def wants_setup(self, auto_setup: str) -> bool:
        """Design section 1, the auto-setup table."""
        if self.status in ENDED:
            return False
        if self.run_module_create or (self.accepted and auto_setup == "on_accept"):
            return True
        if not self.cleared or not self.has_invoice:
            return False  # no invoice: nothing automatic, it waits for Accept
        return auto_setup == "on_order" or (auto_setup == "on_payment" and self.paid)

    def wants_registration(self, auto_register: bool) -> bool:
        if self.status in ENDED:
            return False
        return self.register_domains or (auto_register and self.cleared and self.paid)


async def lock_order_state(conn: asyncpg.Connection, order_id: int) -> OrderState | None:
    row = await conn.fetchrow(
        "SELECT o.id, o.order_ref, o.status, o.screening, o.screening_override,"
        " o.accept_options, i.status AS invoice_status"
        " FROM orders o LEFT JOIN invoices i ON i.order_id = o.id WHERE o.id = $1"
        " FOR NO KEY UPDATE OF o", order_id,
    )
    return OrderState.of(row) if row else None


async def reconcile(conn: asyncpg.Connection, order_id: int, *,
                    caused_by: str | None = None, state: OrderState | None = None) -> list[str]:
    """Queue the jobs the order's items need now. Returns what it queued, for logs and tests.
    `caused_by`, the message that made them needed, is their events' correlation_id.
    `state`: the order's state as the caller read it under the order's lock, which its
    transaction still holds, with nothing it wrote since left out (a payment: the invoice it
    paid); without it the step locks the order and reads it (one statement more)."""
    order = state if state is not None else await lock_order_state(conn, order_id)
    if order is None:
        return []
    if order.status not in ENDED:
        return (await reconcile_many(conn, [(order_id, order, caused_by)])).get(order_id, [])
    # Nothing of an ended order is set up; what is live on a server is terminated.
    await conn.execute(
        "UPDATE jobs SET status = 'cancelled', updated_at = now() WHERE order_id = $1"
        " AND kind IN ('create', 'register', 'transfer') AND status IN ('pending', 'parked')",
        order_id,
    )
    rows = await conn.fetch(
        "INSERT INTO jobs (order_id, service_id, kind, lane, caused_by)"
        f" SELECT s.order_id, s.id, 'terminate', {SERVICE_LANE}, $2 FROM services s"
        "  JOIN products p ON p.id = s.product_id WHERE s.order_id = $1 AND s.live"
        " ON CONFLICT DO NOTHING RETURNING service_id", order_id, caused_by,
    )
    queued = [f"terminate service {r['service_id']}" for r in rows]
    if queued:
        log.info("jobs queued", extra={"order_id": order_id, "order_ref": order.order_ref,
                                       "jobs": queued})
    return queued


# One step of an order not ended: (order id, its state as read under its lock, caused_by).
Step = tuple[int, OrderState, str | None]


async def reconcile_many(conn: asyncpg.Connection, steps: Sequence[Step]) -> dict[int, list[str]]:
    """The steps of orders not ended (their locks held), in two statements for all of them,
    the same as running `reconcile` for each in turn: what each queued, by order.

    Equal because nothing between two steps of one order changes what the next reads: the
    order's items (services and domains still Pending) change only under the order's lock by
    a status change, never by a payment or this step (its identity update sets a username
    and a server, to the same values every time); a terminate job, which the first statement
    cancels, is queued only by an ended order's step, which runs after the steps before it
    (handlers.py). Each item's job goes to the first step that wants it (the one whose own
    insert would have won: `ON CONFLICT DO NOTHING`), in the order the steps came."""
    assert all(state.status not in ENDED for _, state, _ in steps)
    order_ids = sorted({order_id for order_id, _, _ in steps})
    if not order_ids:
        return {}
    # Every item still waiting, services and domains, in one read; and, in the same
    # statement, an order set back to Pending before its accounts were terminated keeps
    # them (its waiting terminations are cancelled).
    items = await conn.fetch(
        "WITH reinstated AS (UPDATE jobs SET status = 'cancelled', updated_at = now()"
        "  WHERE order_id = ANY($1::bigint[]) AND kind = 'terminate'"
        "  AND status IN ('pending', 'parked'))"
        " SELECT s.order_id, 'service' AS kind, s.id, p.auto_setup AS rule,"
        "  NULL::boolean AS auto_register, NULL AS action, s.domain, p.slug, p.server_id,"
        f"  {SERVICE_LANE} AS lane"
        "  FROM services s"
        "  JOIN products p ON p.id = s.product_id"
        "  WHERE s.order_id = ANY($1::bigint[]) AND s.status = 'Pending' AND NOT s.live"
        " UNION ALL SELECT d.order_id, 'domain', d.id, NULL, t.auto_register, d.action,"
        "  d.domain, NULL, NULL, 'registrar:' || t.registrar FROM domains d"
        "  JOIN tlds t ON t.tld = d.tld"
        "  WHERE d.order_id = ANY($1::bigint[]) AND d.status = 'Pending'", order_ids,
    )
    by_order: dict[int, list[asyncpg.Record]] = {}
    for item in items:
        by_order.setdefault(item["order_id"], []).append(item)
    taken: set[tuple[str, int]] = set()
    wanted: list[tuple[asyncpg.Record, str | None]] = []  # (item, caused_by), as inserted
    for order_id, order, caused_by in steps:
        mine = by_order.get(order_id, [])
        for item in [i for i in mine if i["kind"] == "service" and order.wants_setup(i["rule"])] \
                + [i for i in mine if i["kind"] == "domain"
                   and order.wants_registration(i["auto_register"])]:
            if (item["kind"], item["id"]) not in taken:
                taken.add((item["kind"], item["id"]))
                wanted.append((item, caused_by))
    setups = [(i, c) for i, c in wanted if i["kind"] == "service"]
    queued: dict[int, list[str]] = {}
    if wanted:
        # The account's identity (username, server) is saved with the job, before any
        # call: every attempt addresses the same account.
        rows = await conn.fetch(
            "WITH ident AS (UPDATE services s SET username = coalesce(s.username, u.username),"
            "   server_id = coalesce(s.server_id, u.server_id)"
            "  FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS u(id, username, server_id)"
            "  WHERE s.id = u.id)"
            " INSERT INTO jobs (order_id, service_id, domain_id, kind, lane, caused_by)"
            " SELECT u.order_id, u.service_id, u.domain_id, u.kind, u.lane, u.caused_by"
            " FROM unnest($4::bigint[], $5::bigint[], $6::bigint[], $7::text[], $8::text[],"
            "  $9::text[]) WITH ORDINALITY AS u(order_id, service_id, domain_id, kind, lane,"
            "  caused_by, n) WHERE (SELECT ordermill_heard_here($10::text)) ORDER BY u.n"
            " ON CONFLICT DO NOTHING"
            " RETURNING order_id, kind, coalesce(service_id, domain_id) AS item",
            [i["id"] for i, _ in setups],
            [username_for(i["domain"], i["slug"], i["id"]) for i, _ in setups],
            [i["server_id"] for i, _ in setups],
            [i["order_id"] for i, _ in wanted],
            [i["id"] if i["kind"] == "service" else None for i, _ in wanted],
            [i["id"] if i["kind"] == "domain" else None for i, _ in wanted],
            ["create" if i["kind"] == "service" else i["action"] for i, _ in wanted],
            [i["lane"] for i, _ in wanted],
            [caused_by for _, caused_by in wanted],
            # The job runner of this process, when it runs here, is woken after the commit
            # in memory, not by a NOTIFY to every process (shared/wakeup.py).
            heard_here(conn, JOBS_CHANNEL),
        )
        for r in rows:
            queued.setdefault(r["order_id"], []).append(f"{r['kind']} {r['item']}")
    refs = {order_id: state.order_ref for order_id, state, _ in steps}
    for order_id, jobs in queued.items():
        log.info("jobs queued", extra={"order_id": order_id, "order_ref": refs[order_id],
                                       "jobs": jobs})
    return queued


async def retry_parked(conn: asyncpg.Connection, order_id: int, *,
                       caused_by: str | None = None, job_id: int | None = None) -> int:
    """order.retry: parked jobs (or the one named) run again, from a fresh attempt count."""
    status = await conn.execute(
        "UPDATE jobs SET status = 'pending', attempts = 0, next_attempt_at = now(),"
        " updated_at = now(), caused_by = coalesce($2, caused_by)"
        " WHERE order_id = $1 AND status = 'parked' AND ($3::bigint IS NULL OR id = $3)",
        order_id, caused_by, job_id,
    )
    return int(status.split()[-1])
