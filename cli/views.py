"""Read models for operators: what `orders`, `pending`, `show` and `failures` print."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Any

import asyncpg

from shared.states import Screening

# Characters that act on a terminal instead of showing: C0 and C1 controls (ESC starts a
# sequence, U+009B is a one-byte CSI), DEL, format characters (the bidi overrides U+202A-E and
# isolates U+2066-9 reorder what follows, zero-width ones hide), line and paragraph separators
# and lone surrogates.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def printable(value: object, *, multiline: bool = False) -> str:
    """Text from outside (a client, a storefront, a provider, a server) as the operator's
    terminal may show it: every character that would act on the terminal is written as its
    escape (`\\x1b`, `\\x9b`, `\\u202e`), a newline too unless the field is multi-line.
    Every line and table cell the CLI prints goes through here (`--json` is exact JSON)."""
    text = "" if value is None else str(value)
    if text.isprintable() or (multiline and text.replace("\n", "").isprintable()):
        return text  # the common case; isprintable() is False for every character below
    return "".join(_escaped(ch, multiline) for ch in text)


def _escaped(ch: str, multiline: bool) -> str:
    if (ch == "\n" and multiline) or unicodedata.category(ch) not in _UNPRINTABLE:
        return ch
    code = ord(ch)
    if code < 0x100:
        return {"\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(ch, f"\\x{code:02x}")
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


# A client's optional billing address, as the PlaceOrder contract names its fields.
CLIENT_ADDRESS_FIELDS = ("address1", "address2", "city", "state", "postcode", "phone")

_ORDER_COLUMNS = (
    "o.id, o.order_ref, o.order_number, o.status, o.screening, o.screening_override,"
    " o.needs_review, o.total, o.currency, o.created_at, c.email, c.id AS client_id,"
    " f.score, f.review_reasons"
)
# The order's latest screening (fraud_checks_order_idx): its score and why it needs review.
_LATEST_CHECK = (
    " LEFT JOIN LATERAL (SELECT score, review_reasons FROM fraud_checks f"
    "  WHERE f.order_id = o.id ORDER BY f.id DESC LIMIT 1) f ON true"
)


def _order_row(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": r["id"], "order_ref": r["order_ref"], "order_number": r["order_number"],
        "status": r["status"], "screening": r["screening"], "client_id": r["client_id"],
        "email": r["email"], "total": str(r["total"]), "currency": r["currency"],
        "score": str(r["score"]) if r["score"] is not None else None,
        "needs_review": r["needs_review"],
        "review_reasons": [reason["code"] for reason in r["review_reasons"] or []]
        if r["needs_review"] else [],
        "created_at": r["created_at"].isoformat(),
    }


async def list_orders(
    conn: asyncpg.Connection, *, status: str | None = None, client: str | None = None,
    since: datetime | None = None, until: datetime | None = None, limit: int = 50,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Orders, newest first (placed, then id: a range of orders_status_created_idx with a
    status, of orders_created_id_idx without); `client` is a client id or an email address."""
    client_id = int(client) if client and client.isdigit() else None
    email = client if client and client_id is None else None
    rows = await conn.fetch(
        f"SELECT {_ORDER_COLUMNS} FROM orders o JOIN clients c ON c.id = o.client_id"
        f"{_LATEST_CHECK}"
        " WHERE o.deleted_at IS NULL AND ($1::text IS NULL OR o.status = $1)"
        " AND ($4::bigint IS NULL OR o.client_id = $4)"
        " AND ($5::text IS NULL OR lower(c.email) = lower($5))"
        " AND ($6::timestamptz IS NULL OR o.created_at >= $6)"
        " AND ($7::timestamptz IS NULL OR o.created_at < $7)"
        " ORDER BY o.created_at DESC, o.id DESC LIMIT $2 OFFSET $3",
        status, limit, offset, client_id, email, since, until,
    )
    return [_order_row(r) for r in rows]


async def pending_orders(conn: asyncpg.Connection, *, limit: int = 200,
                         offset: int = 0) -> dict[str, Any]:
    """Pending orders whose screening is finished (errors flagged), and those still queued:
    those that need review first, then oldest first; `more` counts those past this page."""
    # The page's ids first, on orders_pending_idx (Pending only, in this list's order), then
    # only their clients and latest checks: joined before the LIMIT, every Pending order's
    # client would be read. The count is its own subquery (once, index only).
    rows = await conn.fetch(
        f"SELECT {_ORDER_COLUMNS}, (SELECT count(*) FROM orders WHERE status = 'Pending'"
        "  AND deleted_at IS NULL) AS listed"
        " FROM (SELECT id FROM orders WHERE deleted_at IS NULL AND status = 'Pending'"
        "  ORDER BY needs_review DESC, id LIMIT $1 OFFSET $2) page"
        f" JOIN orders o ON o.id = page.id JOIN clients c ON c.id = o.client_id{_LATEST_CHECK}"
        " ORDER BY o.needs_review DESC, o.id",
        limit, offset,
    )
    orders = [_order_row(r) | {"flagged": r["screening"] == Screening.ERROR}
              for r in rows if r["screening"] != Screening.QUEUED]
    queued = [_order_row(r) for r in rows if r["screening"] == Screening.QUEUED]
    more = max(0, rows[0]["listed"] - offset - len(rows)) if rows else 0
    return {"pending": orders, "queued": queued, "more": more}


# An order's payments: applied to its invoice, naming its ref and applied to none, or naming
# its invoice. Three index lookups joined by id (one OR across them would read every payment).
_ORDER_PAYMENTS = (
    "WITH inv AS (SELECT id FROM invoices WHERE order_id = $1)"
    " SELECT p.* FROM payments p WHERE p.id IN ("
    "  SELECT id FROM payments WHERE invoice_id = (SELECT id FROM inv)"
    "  UNION SELECT id FROM payments WHERE order_ref = $2 AND invoice_id IS NULL"
    "  UNION SELECT id FROM payments WHERE requested_invoice_id = (SELECT id FROM inv))"
    " ORDER BY p.id"
)


async def show_order(conn: asyncpg.Connection, order_id: int) -> dict[str, Any] | None:
    o = await conn.fetchrow(
        "SELECT o.*, c.email, c.first_name, c.last_name, c.company, c.country,"
        " c.address1, c.address2, c.city, c.state, c.postcode, c.phone"
        " FROM orders o JOIN clients c ON c.id = o.client_id WHERE o.id = $1", order_id,
    )
    if o is None:
        return None
    items = [
        {"id": r["id"], "type": r["type"], "status": r["status"], "domain": r["domain"],
         "product": r["product"], "billing_cycle": r["billing_cycle"], "action": r["action"],
         "amount": str(r["amount"]), "username": r["username"], "live": r["live"],
         "setup": {"job": r["job_kind"], "status": r["job_status"], "attempts": r["attempts"],
                   "last_error": r["last_error"]} if r["job_kind"] else None}
        for r in await conn.fetch(
            "SELECT i.*, j.kind AS job_kind, j.status AS job_status, j.attempts, j.last_error"
            " FROM (SELECT s.id, 'product' AS type, s.status, s.domain, p.slug AS product,"
            "   s.billing_cycle, NULL AS action, s.amount, s.username, s.live FROM services s"
            "   JOIN products p ON p.id = s.product_id WHERE s.order_id = $1"
            "  UNION ALL SELECT d.id, 'domain', d.status, d.domain, NULL, NULL, d.action, d.amount,"
            "   NULL, NULL FROM domains d WHERE d.order_id = $1) i"
            " LEFT JOIN LATERAL (SELECT * FROM jobs j WHERE j.order_id = $1"
            "   AND CASE WHEN i.type = 'product' THEN j.service_id ELSE j.domain_id END = i.id"
            "   ORDER BY j.id DESC LIMIT 1) j ON true"
            " ORDER BY i.type DESC, i.id",
            order_id,
        )
    ]
    payments = [_payment_row(r) for r in await conn.fetch(_ORDER_PAYMENTS, order_id, o["order_ref"])]
    invoice = None
    inv = await conn.fetchrow("SELECT * FROM invoices WHERE order_id = $1", order_id)
    if inv is not None:
        lines = await conn.fetch(
            "SELECT description, amount FROM invoice_items WHERE invoice_id = $1 ORDER BY id",
            inv["id"],
        )
        invoice = {
            "id": inv["id"], "status": inv["status"], "currency": inv["currency"],
            "subtotal": str(inv["subtotal"]), "discount": str(inv["discount"]),
            "total": str(inv["total"]), "amount_paid": str(inv["amount_paid"]),
            "paid_at": inv["paid_at"].isoformat() if inv["paid_at"] else None,
            "lines": [{"description": r["description"], "amount": str(r["amount"])}
                      for r in lines],
        }
    # Every screening, the latest first (re-screens add rows; none is overwritten).
    screenings = [_screening(c) for c in await conn.fetch(
        "SELECT * FROM fraud_checks WHERE order_id = $1 ORDER BY id DESC", order_id)]
    fraud = None
    if screenings:
        fraud = dict(screenings[0])
        if fraud["provider"] == "maxmind" and fraud["raw"]:
            fraud["maxmind"] = maxmind_summary(fraud["raw"])
        if fraud["provider"] == "fraudlabspro" and fraud["raw"]:
            fraud["fraudlabspro"] = fraudlabspro_summary(fraud["raw"])
    history = [
        {"at": r["at"].isoformat(), "actor": r["actor"], "action": r["action"],
         "from": r["from_status"], "to": r["to_status"], "detail": r["detail"]}
        for r in await conn.fetch(
            "SELECT * FROM order_history WHERE order_id = $1 ORDER BY id", order_id
        )
    ]
    return {
        "id": o["id"], "order_ref": o["order_ref"], "order_number": o["order_number"],
        "storefront": o["storefront"],  # the publisher's user ('' for none): refs are per storefront
        "status": o["status"], "screening": o["screening"],
        "screening_override": o["screening_override"], "needs_review": o["needs_review"],
        "deleted": o["deleted_at"] is not None,
        "client": {"id": o["client_id"], "email": o["email"], "first_name": o["first_name"],
                   "last_name": o["last_name"], "company": o["company"], "country": o["country"]}
        | {f: o[f] for f in CLIENT_ADDRESS_FIELDS},
        "currency": o["currency"], "total": str(o["total"]),
        "payment_method": o["payment_method"], "promo_code": o["promo_code"],
        "ip_address": str(o["ip_address"]) if o["ip_address"] else None,
        "send_confirmation": o["send_confirmation"], "generate_invoice": o["generate_invoice"],
        "accept_options": o["accept_options"], "created_at": o["created_at"].isoformat(),
        "items": items, "invoice": invoice, "payments": payments, "fraud": fraud,
        "screenings": screenings, "history": history,
    }


def _screening(check: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": check["id"], "provider": check["provider"], "result": check["result"],
        "score": str(check["score"]) if check["score"] is not None else None,
        "threshold": str(check["threshold"]),
        "review_threshold": str(check["review_threshold"])
        if check["review_threshold"] is not None else None,
        "reasons": check["reasons"], "rules": check["rule_matches"],
        "rule_set_id": check["rule_set_id"], "review_reasons": check["review_reasons"],
        "rescreen": check["rescreen"], "error": check["error"], "raw": check["raw"],
        "checked_at": check["created_at"].isoformat(),
    }


def fraudlabspro_summary(raw: dict[str, Any]) -> dict[str, Any]:
    """What an operator reads of FraudLabs Pro's answer."""
    geo = raw.get("ip_geolocation") or {}
    return {
        "transaction_id": raw.get("fraudlabspro_id"), "score": raw.get("fraudlabspro_score"),
        "status": raw.get("fraudlabspro_status"), "rules": raw.get("fraudlabspro_rules") or [],
        "ip_country": geo.get("country_code"), "is_proxy": geo.get("is_proxy"),
        "remaining_credits": raw.get("remaining_credits"),
    }


def maxmind_summary(raw: dict[str, Any]) -> dict[str, Any]:
    """What WHMCS shows as "Fraud Check Results": the parts of minFraud's answer that matter."""
    reasons = [{"code": r.get("code"), "reason": r.get("reason"), "multiplier": g.get("multiplier")}
               for g in raw.get("risk_score_reasons", []) for r in g.get("reasons", [])]
    ip = raw.get("ip_address", {})
    return {
        "transaction_id": raw.get("id"), "service": raw.get("service"),
        "risk_score": raw.get("risk_score"), "ip_risk": ip.get("risk"),
        "ip_country": ip.get("country", {}).get("iso_code"),
        "ip_risk_reasons": [r.get("code") for r in ip.get("risk_reasons", [])],
        "disposition": raw.get("disposition") or None,
        "warnings": [{"code": w.get("code"), "warning": w.get("warning"),
                      "input": w.get("input_pointer")} for w in raw.get("warnings", [])],
        "risk_reasons": reasons[:5],
        "funds_remaining": raw.get("funds_remaining"),
        "queries_remaining": raw.get("queries_remaining"),
    }


# What `failures` lists, each section: (what is selected, FROM ... WHERE ..., ORDER BY ...),
# oldest first. Every WHERE reads a partial or small index (migrations 0017, 0026).
_FAILURES = {
    # Orders whose last check could not complete, whatever FRAUD_ON_ERROR made of them: held
    # (Pending, screening error), made Fraud, or let through (skipped) and not yet accepted.
    "screening_errors": (
        "o.id, o.order_ref, o.status, o.screening, f.error, f.created_at AS at",
        " FROM orders o"
        " JOIN LATERAL (SELECT error, created_at FROM fraud_checks WHERE order_id = o.id"
        "   ORDER BY id DESC LIMIT 1) f ON true"
        " WHERE o.screening IN ('error', 'skipped') AND f.error IS NOT NULL"
        " AND o.status IN ('Pending', 'Fraud') AND o.deleted_at IS NULL", "o.id"),
    "stuck_in_screening": (
        "id, order_ref, screening_redrives, created_at",
        " FROM orders WHERE screening = 'queued' AND status = 'Pending' AND deleted_at IS NULL"
        " AND created_at < now() - make_interval(secs => $1)", "id"),
    "parked_setups": (
        "j.id, j.order_id, j.kind, j.service_id, j.domain_id, j.attempts, j.last_error,"
        " j.updated_at, o.order_ref",
        " FROM jobs j JOIN orders o ON o.id = j.order_id WHERE j.status = 'parked'", "j.id"),
    "unapplied_payments": ("*", " FROM payments WHERE status = 'unapplied'", "id"),
    "parked_emails": (
        "id, order_id, template, recipient, attempts, last_error",
        " FROM emails WHERE status = 'parked'", "id"),
}


async def failures(conn: asyncpg.Connection, *, stuck_seconds: int,
                   limit: int | None = None) -> dict[str, Any]:
    """Everything waiting for an operator, oldest first. `limit`: at most that many of each
    section, and `more` says how many each left out (at a million orders the seeded history's
    2,000 unapplied payments took 60 ms to convert, and far longer to print as tables)."""
    rows: dict[str, list[asyncpg.Record]] = {}
    more: dict[str, int] = {}
    for section, (columns, where, order) in _FAILURES.items():
        args = [float(stuck_seconds)] if "$1" in where else []
        page = f" LIMIT {limit + 1}" if limit is not None else ""
        found = await conn.fetch(f"SELECT {columns}{where} ORDER BY {order}{page}", *args)
        if limit is not None:
            left = 0
            if len(found) > limit:
                found = found[:limit]
                # Two statements: a row resolved between them must not make "-3 more".
                left = max(0, await conn.fetchval(f"SELECT count(*){where}", *args) - limit)
            more[section] = left
        rows[section] = found
    out = {
        "screening_errors": [
            {"order_id": r["id"], "order_ref": r["order_ref"], "status": r["status"],
             "screening": r["screening"], "error": r["error"], "at": r["at"].isoformat()}
            for r in rows["screening_errors"]],
        "stuck_in_screening": [
            {"order_id": r["id"], "order_ref": r["order_ref"],
             "redrives": r["screening_redrives"], "queued_since": r["created_at"].isoformat()}
            for r in rows["stuck_in_screening"]],
        "parked_setups": [
            {"job_id": r["id"], "order_id": r["order_id"], "order_ref": r["order_ref"],
             "job": r["kind"], "item": f"service {r['service_id']}" if r["service_id"]
             else f"domain {r['domain_id']}", "attempts": r["attempts"],
             "error": r["last_error"], "since": r["updated_at"].isoformat()}
            for r in rows["parked_setups"]],
        "unapplied_payments": [_payment_row(r) for r in rows["unapplied_payments"]],
        "parked_emails": [
            {"email_id": r["id"], "order_id": r["order_id"], "template": r["template"],
             "recipient": r["recipient"], "attempts": r["attempts"], "error": r["last_error"]}
            for r in rows["parked_emails"]],
    }
    if limit is not None:
        out["more"] = more
    return out


def _payment_row(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": r["id"], "status": r["status"], "reason": r["reason"],
        "amount": str(r["amount"]) if r["amount"] is not None else r["raw_amount"],
        "currency": r["currency"], "gateway": r["gateway"],
        "transaction_id": r["transaction_id"], "invoice_id": r["invoice_id"],
        "requested_invoice_id": r["requested_invoice_id"], "order_ref": r["order_ref"],
        "credit": str(r["credit"]), "publisher": r["publisher"],
        "received_at": r["received_at"].isoformat(),
    }
