"""Read what a fraud provider looks at from the database."""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from services.fraud.providers.base import CartLine, OrderFacts


async def gather_facts(
    conn: asyncpg.Connection, order: asyncpg.Record, velocity_window: timedelta
) -> OrderFacts:
    client = await conn.fetchrow("SELECT * FROM clients WHERE id = $1", order["client_id"])
    counts = await conn.fetchrow(
        "SELECT"
        " (SELECT count(*) FROM orders WHERE client_id = $1 AND id < $2) AS earlier,"
        " (SELECT count(*) FROM orders WHERE ip_address = $3"
        "    AND created_at > $4::timestamptz - $5::interval AND id <= $2) AS from_ip,"
        " (SELECT count(*) FROM orders WHERE client_id = $1"
        "    AND created_at > $4::timestamptz - $5::interval AND id <= $2) AS from_client",
        order["client_id"], order["id"], order["ip_address"], order["created_at"], velocity_window,
    )
    cart = tuple(
        CartLine(r["kind"], r["name"], r["amount"])
        for r in await conn.fetch(
            "SELECT 'product' AS kind, p.slug AS name, s.amount FROM services s"
            " JOIN products p ON p.id = s.product_id WHERE s.order_id = $1"
            " UNION ALL SELECT 'domain', d.domain, d.amount FROM domains d WHERE d.order_id = $1",
            order["id"],
        )
    )
    return OrderFacts(
        order_id=order["id"], order_number=order["order_number"], order_ref=order["order_ref"],
        client_id=client["id"], email=client["email"], first_name=client["first_name"],
        last_name=client["last_name"], company=client["company"], country=client["country"],
        ip_address=str(order["ip_address"]) if order["ip_address"] else None,
        total=order["total"], currency=order["currency"], payment_method=order["payment_method"],
        cart=cart, client_is_new=counts["earlier"] == 0,
        orders_from_ip=counts["from_ip"] if order["ip_address"] else 0,
        orders_from_client=counts["from_client"],
    )
