"""One reconcile step per order: from the database state, under the order's row lock,
decide what each item still needs (set up, register, terminate, or nothing) and queue
it as a job. It runs on every event about the order, any number of times: the jobs'
unique key makes a second run a no-op.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from shared.states import CLEARED, ENDED, InvoiceStatus, OrderStatus

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
    queued: list[str] = []
    if order.status in ENDED:
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
        queued += [f"terminate service {r['service_id']}" for r in rows]
    else:
        # Every item still waiting, services and domains, in one read; and, in the same
        # statement, an order set back to Pending before its accounts were terminated keeps
        # them (its waiting terminations are cancelled).
        items = await conn.fetch(
            "WITH reinstated AS (UPDATE jobs SET status = 'cancelled', updated_at = now()"
            "  WHERE order_id = $1 AND kind = 'terminate' AND status IN ('pending', 'parked'))"
            " SELECT 'service' AS kind, s.id, p.auto_setup AS rule, NULL::boolean AS auto_register,"
            f"  NULL AS action, s.domain, p.slug, p.server_id, {SERVICE_LANE} AS lane"
            "  FROM services s"
            "  JOIN products p ON p.id = s.product_id"
            "  WHERE s.order_id = $1 AND s.status = 'Pending' AND NOT s.live"
            " UNION ALL SELECT 'domain', d.id, NULL, t.auto_register, d.action, d.domain, NULL, NULL,"
            "  'registrar:' || t.registrar FROM domains d JOIN tlds t ON t.tld = d.tld"
            "  WHERE d.order_id = $1 AND d.status = 'Pending'", order_id,
        )
        setups = [i for i in items if i["kind"] == "service" and order.wants_setup(i["rule"])]
        registrations = [i for i in items
                         if i["kind"] == "domain" and order.wants_registration(i["auto_register"])]
        if setups or registrations:
            # The account's identity (username, server) is saved with the job, before any
            # call: every attempt addresses the same account.
            rows = await conn.fetch(
                "WITH ident AS (UPDATE services s SET username = coalesce(s.username, u.username),"
                "   server_id = coalesce(s.server_id, u.server_id)"
                "  FROM unnest($2::bigint[], $3::text[], $4::bigint[]) AS u(id, username, server_id)"
                "  WHERE s.id = u.id)"
                " INSERT INTO jobs (order_id, service_id, domain_id, kind, lane, caused_by)"
                " SELECT $1, u.service_id, u.domain_id, u.kind, u.lane, $9"
                " FROM unnest($5::bigint[], $6::bigint[], $7::text[], $8::text[])"
                "  AS u(service_id, domain_id, kind, lane)"
                " ON CONFLICT DO NOTHING RETURNING kind, coalesce(service_id, domain_id) AS item",
                order_id,
                [i["id"] for i in setups],
                [username_for(i["domain"], i["slug"], i["id"]) for i in setups],
                [i["server_id"] for i in setups],
                [i["id"] for i in setups] + [None] * len(registrations),
                [None] * len(setups) + [i["id"] for i in registrations],
                ["create"] * len(setups) + [i["action"] for i in registrations],
                [i["lane"] for i in setups + registrations],
                caused_by,
            )
            queued += [f"{r['kind']} {r['item']}" for r in rows]
    if queued:
        log.info("jobs queued", extra={"order_id": order_id, "order_ref": order.order_ref,
                                       "jobs": queued})
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
