"""order.place: store the client, the order, its items and its invoice; emit order.placed.

Statements are few and set-based (one per table, not one per item): on a 2-core
machine the worker's CPU per database round trip is what limits throughput.
"""

from __future__ import annotations

import logging
import random
from decimal import Decimal

import asyncpg

from services.placement.pricing import (
    PricedDomain,
    PricedProduct,
    Promotion,
    default_currency,
    load_promotion,
    price_items,
)
from shared.contracts import ExistingClient, ItemRef, OrderPlaced, PlaceOrder
from shared.errors import Rejected
from shared.uow import UnitOfWork

log = logging.getLogger("ordermill.placement")

ZERO = Decimal("0.00")


async def place_order(cmd: PlaceOrder, uow: UnitOfWork) -> None:
    conn = uow.conn
    existing, client_id = await _order_and_client(conn, cmd)
    if existing is not None:
        log.info("order already placed", extra={"order_ref": cmd.order_ref, "order_id": existing})
        return
    currency = cmd.currency or await default_currency(conn)
    lines = await price_items(conn, cmd.items, currency)
    promotion = await load_promotion(conn, cmd.promo_code)
    products = [line for line in lines if isinstance(line, PricedProduct)]
    domains = [line for line in lines if isinstance(line, PricedDomain)]
    discount = sum((promotion.discount(p) for p in products), ZERO) if promotion else ZERO
    subtotal = sum((p.price + p.setup_fee for p in products), ZERO) + sum(
        (d.price for d in domains), ZERO)
    total = subtotal - discount

    order_id, number = await _insert_order(conn, cmd, uow, client_id, currency, total, promotion)
    if order_id is None:  # a concurrent delivery of the same order_ref won
        log.info("order already placed", extra={"order_ref": cmd.order_ref})
        return
    service_ids = await _insert_services(conn, order_id, products)
    domain_ids = await _insert_domains(conn, order_id, domains)
    invoice_id = None
    if cmd.generate_invoice:
        invoice_id = await _insert_invoice(
            conn, order_id, client_id, currency, subtotal, discount, total,
            list(zip(products, service_ids, strict=True)),
            list(zip(domains, domain_ids, strict=True)), promotion,
        )
    if promotion:
        await conn.execute("UPDATE promotions SET uses = uses + 1 WHERE code = $1", promotion.code)
    uow.emit("order.placed", OrderPlaced(
        order_id=order_id, order_number=number, order_ref=cmd.order_ref, client_id=client_id,
        invoice_id=invoice_id, total=total, currency=currency,
        items=[ItemRef(type="product", id=i) for i in service_ids]
        + [ItemRef(type="domain", id=i) for i in domain_ids],
    ))
    log.info("order placed", extra={"order_id": order_id, "order_ref": cmd.order_ref,
                                    "total": str(total), "currency": currency,
                                    "invoice_id": invoice_id})


async def _order_and_client(conn: asyncpg.Connection, cmd: PlaceOrder) -> tuple[int | None, int]:
    """The order already placed under this ref, if any, and the client (found or created)."""
    client = cmd.client
    if isinstance(client, ExistingClient):
        row = await conn.fetchrow(
            "SELECT (SELECT id FROM orders WHERE order_ref = $1) AS existing,"
            " (SELECT id FROM clients WHERE id = $2) AS client_id", cmd.order_ref, client.id)
        if row["existing"] is None and row["client_id"] is None:
            raise Rejected(f"unknown client {client.id}")
        return row["existing"], row["client_id"]
    # Insert-or-reuse in one statement, so two orders from one new client race safely;
    # nothing is inserted for an order already placed.
    row = await conn.fetchrow(
        "WITH existing AS (SELECT id FROM orders WHERE order_ref = $6),"
        " ins AS (INSERT INTO clients (email, first_name, last_name, company, country)"
        "  SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM existing)"
        "  ON CONFLICT (lower(email)) DO NOTHING RETURNING id)"
        " SELECT (SELECT id FROM existing) AS existing,"
        " COALESCE((SELECT id FROM ins),"
        "  (SELECT id FROM clients WHERE lower(email) = lower($1))) AS client_id",
        client.email, client.first_name, client.last_name, client.company, client.country,
        cmd.order_ref,
    )
    client_id = row["client_id"]
    if client_id is None and row["existing"] is None:
        # The client was created by a transaction that committed after this statement began.
        client_id = await conn.fetchval(
            "SELECT id FROM clients WHERE lower(email) = lower($1)", client.email)
    return row["existing"], client_id


async def _insert_order(
    conn: asyncpg.Connection, cmd: PlaceOrder, uow: UnitOfWork, client_id: int,
    currency: str, total: Decimal, promo: Promotion | None,
) -> tuple[int | None, int]:
    # WHMCS-style random 10-digit order numbers: not guessable, not a count of sales.
    # ON CONFLICT without a target covers both the ref and the number: no savepoint needed.
    for _ in range(5):
        number = random.randint(1_000_000_000, 9_999_999_999)
        order_id = await conn.fetchval(
            "WITH o AS (INSERT INTO orders (order_ref, order_number, client_id,"
            "  client_named_by_id, currency, payment_method, promo_code, ip_address,"
            "  send_confirmation, generate_invoice, total, placed_by, placed_message_id)"
            "  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
            "  ON CONFLICT DO NOTHING RETURNING id),"
            " h AS (INSERT INTO order_history (order_id, actor, action, to_status, detail)"
            "  SELECT id, $14, 'placed', 'Pending', $15 FROM o)"
            " SELECT id FROM o",
            cmd.order_ref, number, client_id, isinstance(cmd.client, ExistingClient), currency,
            cmd.payment_method, promo.code if promo else None,
            str(cmd.ip_address) if cmd.ip_address else None, cmd.send_confirmation,
            cmd.generate_invoice, total, uow.context.user_id, uow.context.message_id,
            uow.actor, {"total": str(total), "currency": currency,
                        "message_id": uow.context.message_id},
        )
        if order_id is not None:
            return order_id, number
        if await conn.fetchval("SELECT 1 FROM orders WHERE order_ref = $1", cmd.order_ref):
            return None, 0
    raise RuntimeError("could not draw a free order number")


async def _insert_services(
    conn: asyncpg.Connection, order_id: int, products: list[PricedProduct]
) -> list[int]:
    if not products:
        return []
    rows = await conn.fetch(
        "INSERT INTO services (order_id, product_id, billing_cycle, domain, amount)"
        " SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::numeric[])"
        " RETURNING id",
        order_id, [p.product_id for p in products], [p.item.billing_cycle for p in products],
        [p.item.domain for p in products], [p.price for p in products],
    )
    # Ids come from a sequence in row order: sorted, they match the items' order.
    return sorted(r["id"] for r in rows)


async def _insert_domains(
    conn: asyncpg.Connection, order_id: int, domains: list[PricedDomain]
) -> list[int]:
    if not domains:
        return []
    rows = await conn.fetch(
        "INSERT INTO domains (order_id, domain, tld, action, years, epp_code, amount)"
        " SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::int[], $6::text[],"
        "  $7::numeric[]) RETURNING id",
        order_id, [d.item.domain for d in domains], [d.tld for d in domains],
        [d.item.action for d in domains], [d.item.years for d in domains],
        [d.item.epp_code.get_secret_value() if d.item.epp_code else None for d in domains],
        [d.price for d in domains],
    )
    return sorted(r["id"] for r in rows)


async def _insert_invoice(
    conn: asyncpg.Connection, order_id: int, client_id: int, currency: str,
    subtotal: Decimal, discount: Decimal, total: Decimal,
    products: list[tuple[PricedProduct, int]], domains: list[tuple[PricedDomain, int]],
    promotion: Promotion | None,
) -> int:
    lines: list[tuple[str, int | None, int | None, str, Decimal]] = []
    for line, service_id in products:
        label = f"{line.name} ({line.item.billing_cycle})"
        if line.item.domain:
            label += f" - {line.item.domain}"
        lines.append(("service", service_id, None, label, line.price))
        if line.setup_fee:
            lines.append(("setup", service_id, None, f"{line.name} setup fee", line.setup_fee))
    for line, domain_id in domains:
        label = f"Domain {line.item.action} - {line.item.domain}"
        if line.item.action == "register":
            label += f" - {line.item.years} year(s)"
        lines.append(("domain", None, domain_id, label, line.price))
    if promotion and discount:
        lines.append(("promotion", None, None, f"Promotion {promotion.code}", -discount))
    kinds, service_ids, domain_ids, labels, amounts = (list(col) for col in zip(*lines, strict=True))
    # An invoice of 0.00 is Paid at once.
    return await conn.fetchval(
        "WITH inv AS (INSERT INTO invoices (order_id, client_id, status, currency, subtotal,"
        "  discount, total, paid_at) VALUES ($1, $2, CASE WHEN $6::numeric = 0 THEN 'Paid' ELSE 'Unpaid' END,"
        "  $3, $4, $5, $6, CASE WHEN $6::numeric = 0 THEN now() END) RETURNING id)"
        " INSERT INTO invoice_items (invoice_id, kind, service_id, domain_id, description, amount)"
        " SELECT inv.id, l.* FROM inv, unnest($7::text[], $8::bigint[], $9::bigint[], $10::text[],"
        "  $11::numeric[]) AS l RETURNING invoice_id",
        order_id, client_id, currency, subtotal, discount, total,
        kinds, service_ids, domain_ids, labels, amounts,
    )
