"""The console's reads of clients: search (Add New Order's "choose the client") and the
client page. A search is a prefix of an email, a first or last name, a full name or a
company (indexes of migration 0019), or a client id: never a scan of every client."""

from __future__ import annotations

from typing import Any

import asyncpg

SEARCH_LIMIT = 20
ORDERS_SHOWN = 50

_CLIENT = ("c.id, c.email, c.first_name, c.last_name, c.company, c.country, c.address1,"
           " c.address2, c.city, c.state, c.postcode, c.phone, c.storefront, c.created_at")


def _prefix(text: str) -> str:
    """A LIKE pattern matching what starts with `text` (its own % and _ taken literally)."""
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


async def search(conn: asyncpg.Connection, text: str) -> list[dict[str, Any]]:
    text = " ".join(text.split())[:200]
    if text.isdigit() and len(text) < 19:
        rows = await conn.fetch(f"SELECT {_CLIENT} FROM clients c WHERE c.id = $1", int(text))
        return [dict(r) for r in rows]
    if len(text) < 2:
        return []
    rows = await conn.fetch(
        f"SELECT {_CLIENT} FROM clients c WHERE lower(c.email) LIKE $1"
        " OR lower(c.first_name) LIKE $1 OR lower(c.last_name) LIKE $1"
        " OR lower(c.company) LIKE $1"
        " OR lower(c.first_name || ' ' || c.last_name) LIKE $1"
        f" ORDER BY c.id LIMIT {SEARCH_LIMIT}", _prefix(text))
    return [dict(r) for r in rows]


async def one(conn: asyncpg.Connection, client_id: int) -> dict[str, Any] | None:
    row = await conn.fetchrow(f"SELECT {_CLIENT}, c.credit FROM clients c WHERE c.id = $1",
                              client_id)
    return dict(row) if row else None


async def page(conn: asyncpg.Connection, client_id: int) -> dict[str, Any] | None:
    client = await one(conn, client_id)
    if client is None:
        return None
    client["orders"] = [dict(r) for r in await conn.fetch(
        "SELECT o.id, o.order_ref, o.order_number, o.status, o.screening, o.total, o.currency,"
        " o.created_at, o.deleted_at IS NOT NULL AS deleted, i.status AS invoice_status"
        " FROM orders o LEFT JOIN invoices i ON i.order_id = o.id WHERE o.client_id = $1"
        f" ORDER BY o.created_at DESC LIMIT {ORDERS_SHOWN + 1}", client_id)]
    client["more_orders"] = len(client["orders"]) > ORDERS_SHOWN
    client["orders"] = client["orders"][:ORDERS_SHOWN]
    # Its creator (clients.storefront: new clients get no link row) and those linked to it.
    client["storefronts"] = [r["storefront"] for r in await conn.fetch(
        "SELECT storefront FROM clients WHERE id = $1"
        " UNION SELECT storefront FROM client_storefronts WHERE client_id = $1 ORDER BY storefront",
        client_id)]
    return client
