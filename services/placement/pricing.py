"""Catalog prices for an order's items, and the promotion: prices never come from the message.

The catalog rows an order needs (its products' prices, its domains' TLDs, its promotion, the
default currency) are read in one statement, `read_catalog`, for every order of a batch at
once: placement's route loads them with the batch's transaction (`uow.loaded`), and a lone
order reads its own. Every decision (an unknown product, a TLD not sold, a price missing, an
expired code) is made per order from those rows, as before."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from shared import db
from shared.contracts import DomainItem, OrderItem, PlaceOrder, ProductItem
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


# One round trip for the catalog rows of any number of orders, a row each: the default
# currency; each product asked for, with its prices in the currencies asked (and the default)
# for the cycles asked; each TLD asked for (every suffix of every domain), with its prices
# likewise; each promotion code asked for, matched as placement always matched it (upper() on
# both sides, PostgreSQL's, not Python's). Rows of built-in types only (an array of records
# would make asyncpg introspect `record[]` on every new connection). Amounts stay numeric.
# The arrays through `db.planned_once`: the statement keeps a generic plan. Given the arrays
# themselves, its custom plans looked cheaper than the generic one wherever the catalog's
# tables had no statistics (never analyzed: autovacuum analyzes a table after 50 rows
# changed), so every batch was planned again (0.35 ms of backend CPU against 0.10).
_CATALOG = """
WITH cur AS (SELECT value FROM catalog_meta WHERE key = 'default_currency')
SELECT 'currency' AS kind, value AS key, NULL::bigint AS id, NULL AS name, NULL::bool AS flag,
  NULL AS currency, NULL AS cycle, NULL::numeric AS a, NULL::numeric AS b,
  NULL::timestamptz AS expires_at, NULL::int AS max_uses, NULL::text[] AS products
FROM cur
UNION ALL
SELECT 'product', p.slug, p.id, p.name, p.require_domain, pp.currency, pp.billing_cycle,
  pp.price, pp.setup_fee, NULL, NULL, NULL
FROM products p LEFT JOIN product_prices pp ON pp.product_id = p.id
  AND pp.currency = ANY({p2} || ARRAY(SELECT value FROM cur))
  AND pp.billing_cycle = ANY({p3})
WHERE p.slug = ANY({p1})
UNION ALL
SELECT 'tld', t.tld, NULL, NULL, NULL, p.currency, NULL, p.register_price, p.transfer_price,
  NULL, NULL, NULL
FROM tlds t LEFT JOIN tld_prices p ON p.tld = t.tld
  AND p.currency = ANY({p2} || ARRAY(SELECT value FROM cur))
WHERE t.tld = ANY({p4})
UNION ALL
SELECT 'promotion', asked.code, NULL, p.code, NULL, p.kind, NULL, p.value, NULL, p.expires_at,
  p.max_uses, p.products
FROM unnest({p5}) AS asked(code) JOIN promotions p ON upper(p.code) = upper(asked.code)
""".format(**{f"p{n}": db.planned_once(f"${n}", "text[]") for n in range(1, 6)})


def _suffixes(domain: str) -> list[str]:
    """Every suffix a TLD could be: shop.example.co.uk -> example.co.uk, co.uk, uk."""
    labels = domain.split(".")
    return [".".join(labels[start:]) for start in range(1, len(labels))]


@dataclass(frozen=True)
class Catalog:
    """The catalog rows read for some orders (`read_catalog`): enough to price each of them."""

    default_currency: str | None
    # slug -> (id, name, require_domain); (slug, currency, cycle) -> (price, setup_fee)
    products: dict[str, tuple[int, str, bool]]
    product_prices: dict[tuple[str, str, str], tuple[Decimal, Decimal]]
    # tld -> {currency: (register, transfer)}
    tlds: dict[str, dict[str, tuple[Decimal, Decimal]]]
    # code as asked -> (code, kind, value, products, expires_at, max_uses)
    promotions: dict[str, tuple[Any, ...]]

    def currency(self, cmd: PlaceOrder) -> str:
        currency = cmd.currency or self.default_currency
        if currency is None:
            raise Rejected("the catalog is empty: load one with `ordermill catalog load`")
        return currency

    def price(self, items: list[OrderItem], currency: str) -> list[PricedProduct | PricedDomain]:
        """Catalog prices for every item, in the items' order."""
        return [self._product(item, currency) if isinstance(item, ProductItem)
                else self._domain(item, currency) for item in items]

    def _product(self, item: ProductItem, currency: str) -> PricedProduct:
        product = self.products.get(item.product)
        if product is None:
            raise Rejected(f"unknown product {item.product!r}")
        product_id, name, require_domain = product
        if require_domain and not item.domain:
            raise Rejected(f"product {item.product!r} needs a domain")
        prices = self.product_prices.get((item.product, currency, item.billing_cycle))
        if prices is None:
            raise Rejected(f"product {item.product!r} has no {item.billing_cycle} price in {currency}")
        return PricedProduct(item, product_id, name, *prices)

    def _domain(self, item: DomainItem, currency: str) -> PricedDomain:
        # The longest suffix sold wins: co.uk, not uk.
        tld = next((s for s in _suffixes(item.domain) if s in self.tlds), None)
        if tld is None:
            raise Rejected(f"TLD of {item.domain!r} is not sold")
        prices = self.tlds[tld].get(currency)
        if prices is None:
            raise Rejected(f"TLD .{tld} has no price in {currency}")
        register, transfer = prices
        unit = register if item.action == "register" else transfer
        # A transfer adds one year, whatever `years` says (registries' rule).
        years = item.years if item.action == "register" else 1
        return PricedDomain(item, tld, (unit * years).quantize(CENT))


async def read_catalog(conn: asyncpg.Connection, cmds: Iterable[PlaceOrder]) -> Catalog:
    """The catalog rows these orders need, in one statement."""
    return await _read(conn, [(cmd.items, cmd.currency, cmd.promo_code) for cmd in cmds])


async def load_catalog(cmds: Sequence[PlaceOrder], conn: asyncpg.Connection) -> list[Catalog]:
    """Placement's load step (`route(load=...)`): one read for the batch, shared by its orders.
    Catalog rows change only by `ordermill catalog load`: read in the batch's transaction, they
    are as new as each order's own read would have been."""
    catalog = await read_catalog(conn, cmds)
    await lock_promotions(conn, catalog)
    return [catalog] * len(cmds)


async def lock_promotions(conn: asyncpg.Connection, catalog: Catalog) -> None:
    """Lock the limited codes the catalog read found, in the order of their codes, before
    any client's row is written: every placing transaction, a batch (its load step) or an
    order alone (`place_order`), takes its codes first, then writes clients. An order that
    locked its code as it came held another's client insert, or code, while waiting for its
    own: two batches naming two codes in opposite orders, or a batch and a lone order of the
    same new client, each waited for the other (a deadlock, broken after 1 s). None limited:
    no statement."""
    limited = sorted({row[0] for row in catalog.promotions.values() if row[5] is not None})
    if limited:
        await conn.execute(_LOCK_PROMOTIONS, limited)


_LOCK_PROMOTIONS = ("SELECT 1 FROM promotions WHERE code = ANY("
                    f"{db.planned_once('$1', 'text[]')}) ORDER BY code FOR NO KEY UPDATE")


async def _read(conn: asyncpg.Connection,
                orders: list[tuple[list[OrderItem], str | None, str | None]]) -> Catalog:
    slugs: set[str] = set()
    cycles: set[str] = set()
    suffixes: set[str] = set()
    currencies: set[str] = set()
    codes: set[str] = set()
    for items, currency, code in orders:
        if currency:
            currencies.add(currency)
        if code:
            codes.add(code)
        for item in items:
            if isinstance(item, ProductItem):
                slugs.add(item.product)
                cycles.add(item.billing_cycle)
            else:
                suffixes.update(_suffixes(item.domain))
    rows = await conn.fetch(_CATALOG, list(slugs), list(currencies), list(cycles),
                            list(suffixes), list(codes))
    default: str | None = None
    products: dict[str, tuple[int, str, bool]] = {}
    product_prices: dict[tuple[str, str, str], tuple[Decimal, Decimal]] = {}
    tlds: dict[str, dict[str, tuple[Decimal, Decimal]]] = {}
    promotions: dict[str, tuple[Any, ...]] = {}
    for kind, key, id_, name, flag, currency, cycle, a, b, expires_at, max_uses, slugs_ in rows:
        if kind == "product":
            products[key] = (id_, name, flag)
            if currency is not None:
                product_prices[key, currency, cycle] = (a, b)
        elif kind == "tld":
            prices = tlds.setdefault(key, {})
            if currency is not None:
                prices[currency] = (a, b)
        elif kind == "promotion":
            promotions.setdefault(key, (name, currency, a, slugs_, expires_at, max_uses))
        else:
            default = key
    return Catalog(default, products, product_prices, tlds, promotions)


async def price_items(
    conn: asyncpg.Connection, items: list[OrderItem], currency: str
) -> list[PricedProduct | PricedDomain]:
    """Catalog prices for every item, in the items' order: one query for all of them."""
    return (await _read(conn, [(items, currency, None)])).price(items, currency)


async def load_promotion(conn: asyncpg.Connection, code: str | None,
                         catalog: Catalog | None = None) -> Promotion | None:
    """The promotion, checked. One with max_uses has been locked (`lock_promotions`), and its
    orders are counted after the lock, in a new statement, so the count sees an order
    committed while we waited: orders with a limited code take turns; with an unlimited one,
    they never wait for each other."""
    if not code:
        return None
    if catalog is None:
        catalog = await _read(conn, [([], None, code)])
        await lock_promotions(conn, catalog)
    row = catalog.promotions.get(code)
    if row is None:
        raise Rejected(f"unknown promotion code {code!r}")
    found, kind, value, products, expires_at, max_uses = row
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise Rejected(f"promotion code {found!r} has expired")
    if max_uses is not None:
        uses = await conn.fetchval("SELECT count(*) FROM orders WHERE promo_code = $1", found)
        if uses >= max_uses:
            raise Rejected(f"promotion code {found!r} has been used up")
    return Promotion(found, kind, value, tuple(products))
