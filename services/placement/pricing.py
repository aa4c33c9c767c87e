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
    """Catalog prices for every item, in the items' order: one query per kind of item."""
    products = [item for item in items if isinstance(item, ProductItem)]
    domains = [item for item in items if isinstance(item, DomainItem)]
    priced: dict[int, PricedProduct | PricedDomain] = {}
    for item, line in zip(products, await _price_products(conn, products, currency), strict=True):
        priced[id(item)] = line
    for item, line in zip(domains, await _price_domains(conn, domains, currency), strict=True):
        priced[id(item)] = line
    return [priced[id(item)] for item in items]


async def _price_products(
    conn: asyncpg.Connection, items: list[ProductItem], currency: str
) -> list[PricedProduct]:
    if not items:
        return []
    rows = await conn.fetch(
        "SELECT i.n, p.id, p.name, p.require_domain, pp.price, pp.setup_fee"
        " FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS i(slug, cycle, n)"
        " LEFT JOIN products p ON p.slug = i.slug"
        " LEFT JOIN product_prices pp ON pp.product_id = p.id AND pp.currency = $3"
        "  AND pp.billing_cycle = i.cycle ORDER BY i.n",
        [i.product for i in items], [i.billing_cycle for i in items], currency,
    )
    priced = []
    for item, row in zip(items, rows, strict=True):
        if row["id"] is None:
            raise Rejected(f"unknown product {item.product!r}")
        if row["require_domain"] and not item.domain:
            raise Rejected(f"product {item.product!r} needs a domain")
        if row["price"] is None:
            raise Rejected(f"product {item.product!r} has no {item.billing_cycle} price in {currency}")
        priced.append(PricedProduct(item, row["id"], row["name"], row["price"], row["setup_fee"]))
    return priced


_NO_TLD = {"tld": None, "register_price": None, "transfer_price": None}


async def _price_domains(
    conn: asyncpg.Connection, items: list[DomainItem], currency: str
) -> list[PricedDomain]:
    if not items:
        return []
    # Every suffix of each domain (shop.example.co.uk: example.co.uk, co.uk, uk) looked up by
    # equality, the longest sold one wins: co.uk, not uk. (A LIKE over every TLD cost more to
    # plan than to run.)
    numbers, suffixes = [], []
    for n, item in enumerate(items):
        labels = item.domain.split(".")
        for start in range(1, len(labels)):
            numbers.append(n)
            suffixes.append(".".join(labels[start:]))
    found: dict[int, asyncpg.Record] = {}
    for row in await conn.fetch(
        "SELECT c.n, t.tld, p.register_price, p.transfer_price"
        " FROM unnest($1::int[], $2::text[]) AS c(n, tld) JOIN tlds t ON t.tld = c.tld"
        " LEFT JOIN tld_prices p ON p.tld = t.tld AND p.currency = $3",
        numbers, suffixes, currency,
    ):
        if row["n"] not in found or len(row["tld"]) > len(found[row["n"]]["tld"]):
            found[row["n"]] = row
    rows = [found.get(n, _NO_TLD) for n in range(len(items))]
    priced = []
    for item, row in zip(items, rows, strict=True):
        if row["tld"] is None:
            raise Rejected(f"TLD of {item.domain!r} is not sold")
        if row["register_price"] is None:
            raise Rejected(f"TLD .{row['tld']} has no price in {currency}")
        unit = row["register_price"] if item.action == "register" else row["transfer_price"]
        # A transfer adds one year, whatever `years` says (registries' rule).
        years = item.years if item.action == "register" else 1
        priced.append(PricedDomain(item, row["tld"], (unit * years).quantize(CENT)))
    return priced


async def load_promotion(conn: asyncpg.Connection, code: str | None) -> Promotion | None:
    """The promotion, checked. One with max_uses is locked, then its orders counted (after the
    lock, in a new statement, so the count sees an order committed while we waited): orders
    with a limited code take turns; with an unlimited one, they never wait for each other."""
    if not code:
        return None
    row = await conn.fetchrow(
        "SELECT code, kind, value, products, expires_at, max_uses FROM promotions"
        " WHERE upper(code) = upper($1)", code)
    if row is None:
        raise Rejected(f"unknown promotion code {code!r}")
    if row["expires_at"] is not None and row["expires_at"] <= datetime.now(UTC):
        raise Rejected(f"promotion code {row['code']!r} has expired")
    if row["max_uses"] is not None:
        await conn.execute("SELECT 1 FROM promotions WHERE code = $1 FOR NO KEY UPDATE", row["code"])
        uses = await conn.fetchval("SELECT count(*) FROM orders WHERE promo_code = $1", row["code"])
        if uses >= row["max_uses"]:
            raise Rejected(f"promotion code {row['code']!r} has been used up")
    return Promotion(row["code"], row["kind"], row["value"], tuple(row["products"]))
