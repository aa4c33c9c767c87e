"""order.place: store the client, the order, its items and its invoice; emit order.placed."""

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
from shared.contracts import ExistingClient, NewClient, PlaceOrder
from shared.errors import Rejected
from shared.orders import add_history, order_placed_event
from shared.uow import UnitOfWork

log = logging.getLogger("ordermill.placement")


async def place_order(cmd: PlaceOrder, uow: UnitOfWork) -> None:
    conn = uow.conn
    if await conn.fetchval("SELECT 1 FROM orders WHERE order_ref = $1", cmd.order_ref):
        log.info("order already placed", extra={"order_ref": cmd.order_ref})
        return
    client_id = await _client(conn, cmd.client)
    currency = cmd.currency or await default_currency(conn)
    lines = await price_items(conn, cmd.items, currency)
    promotion = await load_promotion(conn, cmd.promo_code)
    discount = sum(
        (promotion.discount(line) for line in lines if isinstance(line, PricedProduct)),
        Decimal("0.00"),
    ) if promotion else Decimal("0.00")
    subtotal = sum(
        (line.price + line.setup_fee if isinstance(line, PricedProduct) else line.price
         for line in lines),
        Decimal("0.00"),
    )
    total = subtotal - discount

    order_id = await _insert_order(conn, cmd, uow, client_id=client_id, currency=currency,
                                   total=total, promo=promotion)
    if order_id is None:  # a concurrent delivery of the same order_ref won
        log.info("order already placed", extra={"order_ref": cmd.order_ref})
        return
    items = await _insert_items(conn, order_id, lines)
    invoice_id = None
    if cmd.generate_invoice:
        invoice_id = await _insert_invoice(
            conn, order_id, client_id, currency, subtotal, discount, total, items, promotion
        )
    if promotion:
        await conn.execute("UPDATE promotions SET uses = uses + 1 WHERE code = $1", promotion.code)
    await add_history(conn, order_id, actor=uow.actor, action="placed", to_status="Pending",
                      detail={"total": str(total), "currency": currency,
                              "invoice_id": invoice_id, "message_id": uow.context.message_id})
    uow.emit("order.placed", await order_placed_event(conn, order_id))
    log.info("order placed", extra={"order_id": order_id, "order_ref": cmd.order_ref,
                                    "total": str(total), "currency": currency,
                                    "invoice_id": invoice_id})


async def _client(conn: asyncpg.Connection, client: ExistingClient | NewClient) -> int:
    if isinstance(client, ExistingClient):
        if not await conn.fetchval("SELECT 1 FROM clients WHERE id = $1", client.id):
            raise Rejected(f"unknown client {client.id}")
        return client.id
    # Insert-or-reuse in one statement, so two orders from one new client race safely.
    client_id = await conn.fetchval(
        "INSERT INTO clients (email, first_name, last_name, company, country)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (lower(email)) DO NOTHING RETURNING id",
        client.email, client.first_name, client.last_name, client.company, client.country,
    )
    if client_id is None:
        client_id = await conn.fetchval(
            "SELECT id FROM clients WHERE lower(email) = lower($1)", client.email
        )
    return client_id


async def _insert_order(
    conn: asyncpg.Connection, cmd: PlaceOrder, uow: UnitOfWork, *, client_id: int,
    currency: str, total: Decimal, promo: Promotion | None,
) -> int | None:
    # WHMCS-style random 10-digit order numbers: not guessable, not a count of sales.
    # ON CONFLICT without a target covers both the ref and the number: no savepoint needed.
    for _ in range(5):
        order_id = await conn.fetchval(
            "INSERT INTO orders (order_ref, order_number, client_id, client_named_by_id,"
            " currency, payment_method, promo_code, ip_address, send_confirmation,"
            " generate_invoice, total, placed_by, placed_message_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
            " ON CONFLICT DO NOTHING RETURNING id",
            cmd.order_ref, random.randint(1_000_000_000, 9_999_999_999), client_id,
            isinstance(cmd.client, ExistingClient), currency, cmd.payment_method,
            promo.code if promo else None, str(cmd.ip_address) if cmd.ip_address else None,
            cmd.send_confirmation, cmd.generate_invoice, total, uow.context.user_id,
            uow.context.message_id,
        )
        if order_id is not None:
            return order_id
        if await conn.fetchval("SELECT 1 FROM orders WHERE order_ref = $1", cmd.order_ref):
            return None  # a concurrent delivery of the same order_ref won
    raise RuntimeError("could not draw a free order number")


async def _insert_items(
    conn: asyncpg.Connection, order_id: int, lines: list[PricedProduct | PricedDomain]
) -> list[tuple[PricedProduct | PricedDomain, int]]:
    stored = []
    for line in lines:
        if isinstance(line, PricedProduct):
            item_id = await conn.fetchval(
                "INSERT INTO services (order_id, product_id, billing_cycle, domain, amount)"
                " VALUES ($1, $2, $3, $4, $5) RETURNING id",
                order_id, line.product_id, line.item.billing_cycle, line.item.domain, line.price,
            )
        else:
            epp = line.item.epp_code.get_secret_value() if line.item.epp_code else None
            item_id = await conn.fetchval(
                "INSERT INTO domains (order_id, domain, tld, action, years, epp_code, amount)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                order_id, line.item.domain, line.tld, line.item.action, line.item.years, epp,
                line.price,
            )
        stored.append((line, item_id))
    return stored


async def _insert_invoice(
    conn: asyncpg.Connection, order_id: int, client_id: int, currency: str,
    subtotal: Decimal, discount: Decimal, total: Decimal,
    items: list[tuple[PricedProduct | PricedDomain, int]], promotion: Promotion | None,
) -> int:
    status = "Paid" if total == 0 else "Unpaid"
    invoice_id = await conn.fetchval(
        "INSERT INTO invoices (order_id, client_id, status, currency, subtotal, discount, total,"
        " paid_at) VALUES ($1, $2, $3, $4, $5, $6, $7,"
        " CASE WHEN $3 = 'Paid' THEN now() END) RETURNING id",
        order_id, client_id, status, currency, subtotal, discount, total,
    )
    rows: list[tuple[object, ...]] = []
    for line, item_id in items:
        if isinstance(line, PricedProduct):
            label = f"{line.name} ({line.item.billing_cycle})"
            if line.item.domain:
                label += f" - {line.item.domain}"
            rows.append((invoice_id, "service", item_id, None, label, line.price))
            if line.setup_fee:
                rows.append((invoice_id, "setup", item_id, None, f"{line.name} setup fee",
                             line.setup_fee))
        else:
            label = f"Domain {line.item.action} - {line.item.domain}"
            if line.item.action == "register":
                label += f" - {line.item.years} year(s)"
            rows.append((invoice_id, "domain", None, item_id, label, line.price))
    if promotion and discount:
        rows.append((invoice_id, "promotion", None, None, f"Promotion {promotion.code}", -discount))
    await conn.executemany(
        "INSERT INTO invoice_items (invoice_id, kind, service_id, domain_id, description, amount)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        rows,
    )
    return invoice_id
