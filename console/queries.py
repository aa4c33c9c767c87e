"""The console's read models: every list is a keyset page on an index (migrations 0017 and 0030), and
every count is capped (COUNT_CAP): a million orders never make a page scan them all."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import asyncpg

from cli import views
from shared.states import OrderStatus

COUNT_CAP = 10_000  # "10,000+" beyond it
PAGE_SIZE = 50

# The list's "status" choices: the review queue (Pending, screening finished) is the default.
REVIEW, QUEUED, ALL = "review", "screening", "all"
STATUS_CHOICES = [REVIEW, QUEUED, *(s.value for s in OrderStatus), ALL]
SCREENING_CHOICES = ["passed", "review", "failed", "skipped", "error", "queued"]


# The order list's count stops lower ("1,000+"): a filter on a column its index does not hold
# (a screening with a status, a product) costs a lookup for each row counted.
LIST_COUNT_CAP = 1_000
# A product with at most this many services is read from its services (services_product_
# order_idx), its orders fetched by id and sorted: at most this many lookups, wherever in
# time they are. A more common one is probed order by order in the list's order: at least
# one order in 100 has it at a million orders, so a page finds its 50 in a few thousand.
RARE_PRODUCT = 10_000
# Counting a common product's orders probes them one by one: it checks at most this many
# orders of the list's range (the first ones, in its order) and says "N+" beyond (about 10 ms
# for 2,000 at 1M; 5,000 took 20-30 ms).
PROBED_COUNT_WALK = 2_000


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
    " (SELECT score FROM fraud_checks f WHERE f.order_id = o.id ORDER BY f.id DESC LIMIT 1)"
    "   AS score,"
    " (SELECT threshold FROM fraud_checks f WHERE f.order_id = o.id ORDER BY f.id DESC LIMIT 1)"
    "   AS threshold,"
    " (SELECT coalesce(jsonb_agg(r->>'code'), '[]') FROM fraud_checks f,"
    "   jsonb_array_elements(f.reasons) r WHERE f.id = (SELECT max(id) FROM fraud_checks"
    "   WHERE order_id = o.id)) AS flags,"
    " (SELECT coalesce(jsonb_agg(jsonb_build_object('what', p.slug, 'domain', s.domain)"
    "   ORDER BY s.id), '[]') FROM services s JOIN products p ON p.id = s.product_id"
    "   WHERE s.order_id = o.id) AS products,"
    " (SELECT coalesce(jsonb_agg(jsonb_build_object('what', d.action, 'domain', d.domain)"
    "   ORDER BY d.id), '[]') FROM domains d WHERE d.order_id = o.id) AS domains"
)
_FROM = (" FROM orders o JOIN clients c ON c.id = o.client_id"
         " LEFT JOIN invoices i ON i.order_id = o.id")


def _order(r: asyncpg.Record) -> dict[str, Any]:
    return dict(r) | {"items": list(r["products"]) + list(r["domains"]),
                      # `review`: the fraud policy's band or a rule asks a person (issue 16).
                      "flagged": r["screening"] in ("error", "review") or (
                          r["score"] is not None and r["threshold"] is not None
                          and r["score"] > r["threshold"])}


async def dashboard(conn: asyncpg.Connection) -> dict[str, Any]:
    counts = {}
    for status in OrderStatus:
        counts[status.value] = await capped_count(
            conn, "SELECT 1 FROM orders WHERE status = $1 AND deleted_at IS NULL", status.value)
    review_where = (" WHERE o.status = 'Pending' AND o.deleted_at IS NULL"
                    " AND o.screening <> 'queued'")
    awaiting = [_order(r) for r in await conn.fetch(
        f"SELECT {_ROW}{_FROM}{review_where} ORDER BY o.id LIMIT 10")]
    flagged_where = (" WHERE o.screening = 'error' AND o.deleted_at IS NULL"
                     " AND o.status = 'Pending'")
    flagged = [_order(r) for r in await conn.fetch(
        f"SELECT {_ROW}{_FROM}{flagged_where} ORDER BY o.id LIMIT 10")]
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


# -- the pending orders list ------------------------------------------------------------------

@dataclass
class OrderFilters:
    """The list's filters, as the query string gives them (every one optional)."""

    status: str = REVIEW
    screening: str = ""
    flagged: str = ""  # "1": only orders whose screening errored or scored over the threshold
    client: str = ""  # a client id or email
    product: str = ""  # a product slug
    since: str = ""  # dates, YYYY-MM-DD (UTC)
    until: str = ""
    q: str = ""  # order number or id, ref, email or domain

    @classmethod
    def of(cls, params: Any) -> OrderFilters:
        values = {f.name: str(params.get(f.name) or "").strip()[:200] for f in fields(cls)}
        made = cls(**values)
        if made.status not in STATUS_CHOICES:
            made.status = REVIEW
        if made.screening not in SCREENING_CHOICES:
            made.screening = ""
        return made

    def query(self, **extra: Any) -> dict[str, str]:
        """As query parameters (the ones set), for links that keep the filters."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}
        out.update({k: str(v) for k, v in extra.items() if v is not None})
        return out


class FilterError(ValueError):
    pass


def _day(value: str, name: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.combine(date.fromisoformat(value), time(), UTC)
    except ValueError:
        raise FilterError(f"{name} {value!r} is not a date (YYYY-MM-DD)") from None


@dataclass(frozen=True)
class Product:
    """The product filter's product: its id, and whether few enough orders have it to read
    them from its services (RARE_PRODUCT) rather than probe each order of the list."""

    id: int
    rare: bool

    @classmethod
    async def named(cls, conn: asyncpg.Connection, slug: str) -> Product | None:
        found = await conn.fetchval("SELECT id FROM products WHERE slug = $1", slug)
        if found is None:
            return None
        services = await conn.fetchval(  # capped; in the index's order: read on it
            "SELECT count(*) FROM (SELECT 1 FROM services WHERE product_id = $1"
            f" ORDER BY product_id, order_id LIMIT {RARE_PRODUCT + 1}) x", found)
        return cls(found, services <= RARE_PRODUCT)


def _where(f: OrderFilters, product: Product | None = None) -> tuple[list[str], list[Any]]:
    """WHERE conditions and their arguments; each condition can use an index (migration 0030:
    each filter is a range of an index in the list's order, created_at then id)."""
    conds, args = ["o.deleted_at IS NULL"], []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if f.status == REVIEW:
        conds += ["o.status = 'Pending'", "o.screening <> 'queued'"]
    elif f.status == QUEUED:
        conds += ["o.status = 'Pending'", "o.screening = 'queued'"]
    elif f.status != ALL:
        conds.append(f"o.status = {arg(f.status)}")
    if f.screening:
        conds.append(f"o.screening = {arg(f.screening)}")
    if f.flagged:
        # Screening errored, or scored over the threshold: the fraud service fails an order
        # whose latest score is over its threshold (services/fraud/handlers.py), so that is
        # screening 'failed', read on orders_flagged_created_idx (its predicate, word for
        # word) rather than probing every order's latest check.
        conds.append("o.screening IN ('error', 'failed')")
    if f.client:
        if f.client.isdigit() and len(f.client) < 19:
            conds.append(f"o.client_id = {arg(int(f.client))}")
        else:
            conds.append(f"lower(c.email) = lower({arg(f.client)})")
    since, until = _day(f.since, "from"), _day(f.until, "to")
    if since:
        conds.append(f"o.created_at >= {arg(since)}")
    if until:
        conds.append(f"o.created_at < {arg(until + timedelta(days=1))}")
    if f.q:
        q = f.q
        if re.fullmatch(r"\d{1,18}", q):
            conds.append(f"(o.order_number = {arg(int(q))} OR o.id = ${len(args)}"
                         f" OR o.order_ref = {arg(q)})")
        elif "@" in q:
            conds.append(f"lower(c.email) = lower({arg(q)})")
        else:
            p = arg(q)
            # One set of ids from three index lookups (an OR of the three would scan orders).
            conds.append(
                f"o.id IN (SELECT id FROM orders WHERE order_ref = {p}"
                f" UNION SELECT order_id FROM services WHERE lower(domain) = lower({p})"
                f" UNION SELECT order_id FROM domains WHERE lower(domain) = lower({p}))")
    if product is not None:  # last: _probed_count takes it apart
        # Chosen here, not left to the planner: as a plain EXISTS it may merge the list with
        # every service of the product (a quarter of a million for a common one at 1M: 90
        # ms) or walk every order probing for a product few have (seconds).
        if product.rare:
            # Its orders by id (orders_pkey), from its services (services_product_order_idx).
            conds.append("o.id = ANY (ARRAY(SELECT order_id FROM services"
                         f" WHERE product_id = {arg(product.id)}))")
        else:
            # A probe per order on services_product_order_idx, as the list's index walks
            # (OFFSET 0 keeps it a probe: the planner may not turn it into a join).
            conds.append("EXISTS (SELECT 1 FROM services s WHERE s.order_id = o.id"
                         f" AND s.product_id = {arg(product.id)} OFFSET 0)")
    return conds, args


def _empty(after: int | None, before: int | None) -> dict[str, Any]:
    return {"orders": [], "count": (0, False), "more_after": before is not None,
            "more_before": after is not None, "first_id": None, "last_id": None}


async def order_list(conn: asyncpg.Connection, f: OrderFilters, *, after: int | None = None,
                     before: int | None = None, limit: int = PAGE_SIZE) -> dict[str, Any]:
    """A page of orders oldest first (placed, then id): after an order (the next page), before
    one (the previous), or the first. `more_after`/`more_before` say whether there are pages
    either side. Keyset pages in the order of the filters' indexes (migration 0030): a page
    reads its rows from where its range starts, never the orders before it."""
    product = None
    if f.product:
        product = await Product.named(conn, f.product)
        if product is None:  # no such product: no order has it
            return _empty(after, before)
    conds, args = _where(f, product)
    base_where = " AND ".join(conds)
    page_conds, args_page, order = list(conds), list(args), "ASC"
    anchor_id = after if after is not None else before
    if anchor_id is not None:
        # The page's edge, named by its order's id in the link: where that order stands.
        anchor = await conn.fetchrow("SELECT created_at, id FROM orders WHERE id = $1",
                                     anchor_id)
        if anchor is not None:
            args_page += [anchor["created_at"], anchor["id"]]
            sign = ">" if after is not None else "<"
            page_conds.append(f"(o.created_at, o.id) {sign} (${len(args_page) - 1},"
                              f" ${len(args_page)})")
            order = "ASC" if after is not None else "DESC"
        else:  # no such order (an id typed into the address): the first page
            after = before = None
    rows = await conn.fetch(
        f"SELECT {_ROW}{_FROM} WHERE {' AND '.join(page_conds)}"
        f" ORDER BY o.created_at {order}, o.id {order} LIMIT {limit + 1}", *args_page)
    more = len(rows) > limit
    rows = rows[:limit]
    if order == "DESC":
        rows = list(reversed(rows))
    orders = [_order(r) for r in rows]
    # The clients join only where a filter reads the client: each row counted costs a probe.
    joined = " JOIN clients c ON c.id = o.client_id" if "c.email" in base_where else ""
    if product is not None and not product.rare:
        count = await _probed_count(conn, joined, conds, args)
    else:
        count = await capped_count(conn, f"SELECT 1 FROM orders o{joined} WHERE {base_where}",
                                   *args, cap=LIST_COUNT_CAP, order_by="o.created_at, o.id")
    first_id, last_id = (orders[0]["id"], orders[-1]["id"]) if orders else (None, None)
    return {
        "orders": orders, "count": count,
        "more_after": more if order == "ASC" else before is not None,
        "more_before": (after is not None) if order == "ASC" else more,
        "first_id": first_id, "last_id": last_id,
    }


async def _probed_count(conn: asyncpg.Connection, joined: str, conds: list[str],
                        args: list[Any]) -> tuple[int, bool]:
    """A common product's count: its orders among the first PROBED_COUNT_WALK of the list's
    range in the list's order (each probed), so capped when the range goes on beyond them
    or more than LIST_COUNT_CAP have it. The probe is the last condition (_where)."""
    walk, probe = conds[:-1], conds[-1]
    matched, walked = await conn.fetchrow(
        f"SELECT count(*) FILTER (WHERE {probe}), count(*) FROM (SELECT o.id FROM orders o"
        f"{joined} WHERE {' AND '.join(walk)} ORDER BY o.created_at, o.id"
        f" LIMIT {PROBED_COUNT_WALK}) o", *args)
    return min(matched, LIST_COUNT_CAP), matched > LIST_COUNT_CAP or (
        walked == PROBED_COUNT_WALK)


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
