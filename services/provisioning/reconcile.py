"""One reconcile step per order: from the database state, under the order's row lock,
decide what each item still needs (set up, register, terminate, or nothing) and queue
it as a job. It runs on every event about the order, any number of times: the jobs'
unique key makes a second run a no-op.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

log = logging.getLogger("ordermill.provisioning")

ENDED = ("Cancelled", "Fraud")


@dataclass(frozen=True)
class OrderState:
    id: int
    order_ref: str
    status: str
    cleared: bool  # screening passed or skipped, or an operator overrode it
    has_invoice: bool
    paid: bool
    accepted: bool
    run_module_create: bool
    register_domains: bool

    @classmethod
    def of(cls, row: asyncpg.Record) -> OrderState:
        options = row["accept_options"] or {}
        accepted = row["status"] == "Active"
        return cls(
            id=row["id"], order_ref=row["order_ref"], status=row["status"],
            cleared=row["screening"] in ("passed", "skipped") or row["screening_override"],
            has_invoice=row["invoice_status"] is not None,
            paid=row["invoice_status"] == "Paid",
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
        " FOR UPDATE OF o", order_id,
    )
    return OrderState.of(row) if row else None


async def reconcile(conn: asyncpg.Connection, order_id: int) -> list[str]:
    """Queue the jobs the order's items need now. Returns what it queued, for logs and tests."""
    order = await lock_order_state(conn, order_id)
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
            "INSERT INTO jobs (order_id, service_id, kind)"
            " SELECT order_id, id, 'terminate' FROM services WHERE order_id = $1 AND live"
            " ON CONFLICT DO NOTHING RETURNING service_id", order_id,
        )
        queued += [f"terminate service {r['service_id']}" for r in rows]
    else:
        services = await conn.fetch(
            "SELECT s.id, p.auto_setup FROM services s JOIN products p ON p.id = s.product_id"
            " WHERE s.order_id = $1 AND s.status = 'Pending' AND NOT s.live", order_id,
        )
        wanted = [s["id"] for s in services if order.wants_setup(s["auto_setup"])]
        domains = await conn.fetch(
            "SELECT d.id, d.action, t.auto_register FROM domains d JOIN tlds t ON t.tld = d.tld"
            " WHERE d.order_id = $1 AND d.status = 'Pending'", order_id,
        )
        to_register = [(d["id"], d["action"]) for d in domains
                       if order.wants_registration(d["auto_register"])]
        if wanted:
            rows = await conn.fetch(
                "INSERT INTO jobs (order_id, service_id, kind)"
                " SELECT $1, unnest($2::bigint[]), 'create'"
                " ON CONFLICT DO NOTHING RETURNING service_id", order_id, wanted,
            )
            queued += [f"create service {r['service_id']}" for r in rows]
        if to_register:
            rows = await conn.fetch(
                "INSERT INTO jobs (order_id, domain_id, kind)"
                " SELECT $1, * FROM unnest($2::bigint[], $3::text[])"
                " ON CONFLICT DO NOTHING RETURNING domain_id, kind",
                order_id, [d for d, _ in to_register], [a for _, a in to_register],
            )
            queued += [f"{r['kind']} domain {r['domain_id']}" for r in rows]
    if queued:
        log.info("jobs queued", extra={"order_id": order_id, "order_ref": order.order_ref,
                                       "jobs": queued})
    return queued


async def retry_parked(conn: asyncpg.Connection, order_id: int) -> int:
    """order.retry: parked jobs run again, from a fresh attempt count."""
    status = await conn.execute(
        "UPDATE jobs SET status = 'pending', attempts = 0, next_attempt_at = now(),"
        " updated_at = now() WHERE order_id = $1 AND status = 'parked'", order_id,
    )
    return int(status.split()[-1])
