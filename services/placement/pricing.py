"""Catalog prices for an order's items, and the promotion: prices never come from the message."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from shared.contracts import DomainItem, OrderItem, ProductItem
from shared.errors import Rejected

CENT = Decimal("0.01")


@dataclass(frozen=True)
class PricedProduct:
    item: ProductItem
    product_id: int
    name: str
    price: Decimal
    setup_fee: Decimal


@dataclass(frozen=True)
class PricedDomain:
    item: DomainItem
    tld: str
    price: Decimal


@dataclass(frozen=True)
class Promotion:
    code: str
    kind: str
    value: Decimal
    products: tuple[str, ...]

    def discount(self, line: PricedProduct) -> Decimal:
        if self.products and line.item.product not in self.products:
            return Decimal("0.00")
        if self.kind == "percent":
            off = (line.price * self.value / 100).quantize(CENT)
        else:
            off = self.value
        return min(off, line.price)


async def default_currency(conn: asyncpg.Connection) -> str:
    currency = await conn.fetchval("SELECT value FROM catalog_meta WHERE key = 'default_currency'")
    if currency is None:
        raise Rejected("the catalog is empty: load one with `ordermill catalog load`")
    return currency


async def price_items(
    conn: asyncpg.Connection, items: list[OrderItem], currency: str
) -> list[PricedProduct | PricedDomain]:
    priced: list[PricedProduct | PricedDomain] = []
    for item in items:
        if isinstance(item, ProductItem):
            priced.append(await _price_product(conn, item, currency))
        else:
            priced.append(await _price_domain(conn, item, currency))
    return priced


async def _price_product(conn: asyncpg.Connection, item: ProductItem, currency: str) -> PricedProduct:
    row = await conn.fetchrow(
        "SELECT p.id, p.name, p.require_domain, pp.price, pp.setup_fee FROM products p"
        " LEFT JOIN product_prices pp ON pp.product_id = p.id AND pp.currency = $2"
        "  AND pp.billing_cycle = $3 WHERE p.slug = $1",
        item.product, currency, item.billing_cycle,
    )
    if row is None:
        raise Rejected(f"unknown product {item.product!r}")
    if row["require_domain"] and not item.domain:
        raise Rejected(f"product {item.product!r} needs a domain")
    if row["price"] is None:
        raise Rejected(f"product {item.product!r} has no {item.billing_cycle} price in {currency}")
    return PricedProduct(item, row["id"], row["name"], row["price"], row["setup_fee"])


async def _price_domain(conn: asyncpg.Connection, item: DomainItem, currency: str) -> PricedDomain:
    # The longest matching suffix wins: example.co.uk is 'co.uk', not 'uk'.
    labels = item.domain.split(".")
    candidates = [".".join(labels[i:]) for i in range(1, len(labels))]
    row = await conn.fetchrow(
        "SELECT t.tld, p.register_price, p.transfer_price FROM tlds t"
        " LEFT JOIN tld_prices p ON p.tld = t.tld AND p.currency = $2"
        " WHERE t.tld = ANY($1::text[]) ORDER BY length(t.tld) DESC LIMIT 1",
        candidates, currency,
    )
    if row is None:
        raise Rejected(f"TLD of {item.domain!r} is not sold")
    if row["register_price"] is None:
        raise Rejected(f"TLD .{row['tld']} has no price in {currency}")
    unit = row["register_price"] if item.action == "register" else row["transfer_price"]
    # A transfer adds one year, whatever `years` says (registries' rule).
    years = item.years if item.action == "register" else 1
    return PricedDomain(item, row["tld"], (unit * years).quantize(CENT))


async def load_promotion(conn: asyncpg.Connection, code: str | None) -> Promotion | None:
    if not code:
        return None
    row = await conn.fetchrow(
        "SELECT code, kind, value, products, expires_at, max_uses, uses FROM promotions"
        " WHERE upper(code) = upper($1) FOR UPDATE",
        code,
    )
    if row is None:
        raise Rejected(f"unknown promotion code {code!r}")
    if row["expires_at"] is not None and row["expires_at"] <= datetime.now(UTC):
        raise Rejected(f"promotion code {row['code']!r} has expired")
    if row["max_uses"] is not None and row["uses"] >= row["max_uses"]:
        raise Rejected(f"promotion code {row['code']!r} has been used up")
    return Promotion(row["code"], row["kind"], row["value"], tuple(row["products"]))
