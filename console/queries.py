"""The console's read models: every list is a keyset page on an index (migrations 0017, 0030,
0036), and every count is capped (COUNT_CAP): a million orders never make a page scan them all.
The order list, with its filters, is console/order_list.py."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from cli import views
from shared.states import OrderStatus

COUNT_CAP = 10_000  # "10,000+" beyond it
PAGE_SIZE = 50


async def capped_count(conn: asyncpg.Connection, query: str, *args: Any,
                       cap: int = COUNT_CAP, order_by: str = "") -> tuple[int, bool]:
    """(count, capped): counts at most cap + 1 rows of `query` (a SELECT). `order_by`: read
    them in the order of the index their list is read by, so the first cap + 1 are found where
    the list's range starts (unordered, the planner may walk another index from its start)."""
    order = f" ORDER BY {order_by}" if order_by else ""
    n = await conn.fetchval(f"SELECT count(*) FROM ({query}{order} LIMIT {cap + 1}) x", *args)
    return min(n, cap), n > cap


# -- the dashboard -----------------------------------------------------------------------------

_ROW = (
    "o.id, o.order_ref, o.order_number, o.status, o.screening, o.total, o.currency,"
    " o.created_at, o.ip_address, c.id AS client_id, c.email, c.first_name, c.last_name,"
    " c.company, i.status AS invoice_status,"
    # The latest fraud check's score, threshold and reasons' codes, found once (one descent of
    # fraud_checks_order_idx; three lookups read its leaf and heap page three times, and the
    # flags' max(id) a leaf of fraud_checks_pkey too: one more page a row on a first visit).
    # (The codes as text[]: a jsonb inside a record comes in binary, which the pool's json
    # codec does not read.)
    " (SELECT ROW(f.score, f.threshold, (SELECT coalesce(array_agg(r->>'code'), '{}')"
    "   FROM jsonb_array_elements(f.reasons) r)) FROM fraud_checks f WHERE f.order_id = o.id"
    "   ORDER BY f.id DESC LIMIT 1) AS latest,"
    " (SELECT coalesce(jsonb_agg(jsonb_build_object('what', p.slug, 'domain', s.domain)"
    "   ORDER BY s.id), '[]') FROM services s JOIN products p ON p.id = s.product_id"
    "   WHERE s.order_id = o.id) AS products,"
    " (SELECT coalesce(jsonb_agg(jsonb_build_object('what', d.action, 'domain', d.domain)"
    "   ORDER BY d.id), '[]') FROM domains d WHERE d.order_id = o.id) AS domains"
)
_FROM = (" FROM orders o JOIN clients c ON c.id = o.client_id"
         " LEFT JOIN invoices i ON i.order_id = o.id")


def _order(r: asyncpg.Record) -> dict[str, Any]:
    row = dict(r)
    score, threshold, flags = row.pop("latest") or (None, None, [])
    return row | {"score": score, "threshold": threshold, "flags": list(flags),
                  "items": list(r["products"]) + list(r["domains"]),
                  # `review`: the fraud policy's band or a rule asks a person (issue 16).
                  "flagged": r["screening"] in ("error", "review") or (
                      score is not None and threshold is not None and score > threshold)}


def _first_rows(where: str, limit: int) -> str:
    """The first `limit` orders of `where` (on `o`) oldest first, then their rows (_ROW): the
    orders chosen before anything is joined to them. Joined first, the planner may join every
    order of the range and sort them after (the dashboard's flagged orders: the 75 errored of
    3,000 Pending, each client and invoice read, 293 pages on a first visit, for ten rows)."""
    return (f"SELECT {_ROW} FROM (SELECT * FROM orders o{where}"
            f" ORDER BY o.created_at, o.id LIMIT {limit}) o"
            " JOIN clients c ON c.id = o.client_id LEFT JOIN invoices i ON i.order_id = o.id"
            " ORDER BY o.created_at, o.id")


async def dashboard(conn: asyncpg.Connection) -> dict[str, Any]:
    counts = {}
    for status in OrderStatus:
        # In the order of orders_status_created_idx, so read on it alone (about 90 leaves for
        # 10,001 keys): unordered, the planner read Active, most of the table, in a sequential
        # scan, 261 heap pages on a first visit (issue 13, cold reads).
        counts[status.value] = await capped_count(
            conn, "SELECT 1 FROM orders WHERE status = $1 AND deleted_at IS NULL", status.value,
            order_by="created_at, id")
    review_where = (" WHERE o.status = 'Pending' AND o.deleted_at IS NULL"
                    " AND o.screening <> 'queued'")
    # Oldest first in the list's order (placed, then id): read on orders_status_created_idx's
    # Pending range (and orders_screening_created_idx's errors) from its start, ten rows.
    awaiting = [_order(r) for r in await conn.fetch(_first_rows(review_where, 10))]
    flagged_where = (" WHERE o.screening = 'error' AND o.deleted_at IS NULL"
                     " AND o.status = 'Pending'")
    flagged = [_order(r) for r in await conn.fetch(_first_rows(flagged_where, 10))]
    parked = [dict(r) for r in await conn.fetch(
        "SELECT j.id, j.order_id, j.kind, j.attempts, j.last_error, j.updated_at, o.order_ref,"
        " coalesce(s.domain, d.domain) AS item FROM jobs j JOIN orders o ON o.id = j.order_id"
        " LEFT JOIN services s ON s.id = j.service_id LEFT JOIN domains d ON d.id = j.domain_id"
        " WHERE j.status = 'parked' ORDER BY j.id LIMIT 10")]
    unapplied = [dict(r) for r in await conn.fetch(
        "SELECT id, amount, raw_amount, currency, gateway, transaction_id, order_ref, reason,"
        " received_at FROM payments WHERE status = 'unapplied' ORDER BY id LIMIT 10")]
    return {
        "counts": counts,
        "awaiting": awaiting,
        "awaiting_count": await capped_count(conn, "SELECT 1 FROM orders o" + review_where),
        "screening_count": await capped_count(
            conn, "SELECT 1 FROM orders WHERE status = 'Pending' AND deleted_at IS NULL"
            " AND screening = 'queued'"),
        "flagged": flagged,
        "flagged_count": await capped_count(conn, "SELECT 1 FROM orders o" + flagged_where),
        "parked": parked,
        "parked_count": await capped_count(conn, "SELECT 1 FROM jobs WHERE status = 'parked'"),
        "unapplied": unapplied,
        "unapplied_count": await capped_count(
            conn, "SELECT 1 FROM payments WHERE status = 'unapplied'"),
    }


# The pending orders list: console/order_list.py.


# -- one order ----------------------------------------------------------------------------------

async def order_page(conn: asyncpg.Connection, order_id: int) -> dict[str, Any] | None:
    data = await views.show_order(conn, order_id)
    if data is None:
        return None
    data["created_at"] = datetime.fromisoformat(data["created_at"])
    data["notes"] = [dict(r) for r in await conn.fetch(
        "SELECT operator, note, created_at FROM order_notes WHERE order_id = $1 ORDER BY id",
        order_id)]
    data["other_orders"] = [dict(r) for r in await conn.fetch(
        "SELECT id, order_ref, status, total, currency, created_at FROM orders"
        " WHERE client_id = $1 AND id <> $2 AND deleted_at IS NULL"
        " ORDER BY created_at DESC LIMIT 10", data["client"]["id"], order_id)]
    data["jobs"] = [dict(r) for r in await conn.fetch(
        "SELECT id, kind, status, attempts, last_error, service_id, domain_id, updated_at"
        " FROM jobs WHERE order_id = $1 ORDER BY id", order_id)]
    data["parked"] = any(j["status"] == "parked" for j in data["jobs"])
    return data


async def order_heads(conn: asyncpg.Connection, ids: list[int]) -> list[dict[str, Any]]:
    """What a bulk confirmation lists about each order."""
    return [dict(r) for r in await conn.fetch(
        "SELECT o.id, o.order_ref, o.status, o.total, o.currency, c.email FROM orders o"
        " JOIN clients c ON c.id = o.client_id WHERE o.id = ANY($1::bigint[]) ORDER BY o.id",
        ids)]


# -- the module queue ---------------------------------------------------------------------------

_JOB = (
    "j.id, j.order_id, j.kind, j.status, j.attempts, j.last_error, j.lane, j.created_at,"
    " j.updated_at, j.service_id, j.domain_id, o.order_ref, o.status AS order_status,"
    " coalesce(s.domain, d.domain) AS item, p.slug AS product"
    " FROM jobs j JOIN orders o ON o.id = j.order_id"
    " LEFT JOIN services s ON s.id = j.service_id LEFT JOIN products p ON p.id = s.product_id"
    " LEFT JOIN domains d ON d.id = j.domain_id"
)


async def parked_jobs(conn: asyncpg.Connection, *, after: int | None = None,
                      limit: int = PAGE_SIZE) -> dict[str, Any]:
    """Parked jobs oldest first, a keyset page on jobs_parked_idx."""
    rows = await conn.fetch(
        f"SELECT {_JOB} WHERE j.status = 'parked' AND j.id > $1 ORDER BY j.id LIMIT {limit + 1}",
        after or 0)
    return {"jobs": [dict(r) for r in rows[:limit]], "more": len(rows) > limit,
            "last_id": rows[min(len(rows), limit) - 1]["id"] if rows else None,
            "count": await capped_count(conn, "SELECT 1 FROM jobs WHERE status = 'parked'")}


async def job(conn: asyncpg.Connection, job_id: int) -> dict[str, Any] | None:
    row = await conn.fetchrow(f"SELECT {_JOB} WHERE j.id = $1", job_id)
    return dict(row) if row else None


async def orders_with_parked(conn: asyncpg.Connection, *, limit: int) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(
        "SELECT j.order_id, min(j.id) AS id, o.order_ref, count(*) AS parked FROM jobs j"
        " JOIN orders o ON o.id = j.order_id WHERE j.status = 'parked'"
        f" GROUP BY j.order_id, o.order_ref ORDER BY min(j.id) LIMIT {limit}")]


# -- payments -----------------------------------------------------------------------------------

async def unapplied_payments(conn: asyncpg.Connection, *, after: int | None = None,
                             limit: int = PAGE_SIZE) -> dict[str, Any]:
    """Unapplied payments oldest first, with what each waits for (payments.waiting_for)."""
    rows = await conn.fetch(
        "SELECT p.id, p.gateway, p.transaction_id, p.amount, p.raw_amount, p.currency,"
        " p.requested_invoice_id, p.order_ref, p.publisher, p.reason, p.waiting_for, p.trusted,"
        " p.dead_letter, p.received_at, p.message_id,"
        " (SELECT o.id FROM orders o WHERE o.order_ref = p.order_ref ORDER BY o.id LIMIT 1)"
        "   AS order_id"
        " FROM payments p WHERE p.status = 'unapplied' AND p.id > $1"
        f" ORDER BY p.id LIMIT {limit + 1}", after or 0)
    return {"payments": [dict(r) for r in rows[:limit]], "more": len(rows) > limit,
            "last_id": rows[min(len(rows), limit) - 1]["id"] if rows else None,
            "count": await capped_count(
                conn, "SELECT 1 FROM payments WHERE status = 'unapplied'")}
