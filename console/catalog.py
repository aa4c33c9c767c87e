"""What Add New Order offers, read from the catalog tables (as `ordermill catalog` and
placement read them): products with their prices per cycle, TLDs, currencies, promotions."""

from __future__ import annotations

from typing import Any

import asyncpg

CYCLES = ("monthly", "quarterly", "semiannually", "annually", "biennially", "triennially",
          "onetime")


async def offer(conn: asyncpg.Connection) -> dict[str, Any]:
    currency = await conn.fetchval(
        "SELECT value FROM catalog_meta WHERE key = 'default_currency'")
    products = [dict(r) for r in await conn.fetch(
        "SELECT p.slug, p.name, p.require_domain, coalesce(jsonb_object_agg(pp.billing_cycle,"
        "  pp.price::text) FILTER (WHERE pp.billing_cycle IS NOT NULL), '{}') AS prices"
        " FROM products p LEFT JOIN product_prices pp ON pp.product_id = p.id"
        "  AND pp.currency = $1 GROUP BY p.id ORDER BY p.name", currency)]
    for p in products:
        p["cycles"] = [c for c in CYCLES if c in p["prices"]]
    tlds = [dict(r) for r in await conn.fetch(
        "SELECT t.tld, tp.register_price, tp.transfer_price FROM tlds t"
        " LEFT JOIN tld_prices tp ON tp.tld = t.tld AND tp.currency = $1 ORDER BY t.tld",
        currency)]
    currencies = [r["currency"] for r in await conn.fetch(
        "SELECT DISTINCT currency FROM product_prices ORDER BY currency")]
    promotions = [r["code"] for r in await conn.fetch(
        "SELECT code FROM promotions WHERE (expires_at IS NULL OR expires_at > now())"
        " AND (max_uses IS NULL OR uses < max_uses) ORDER BY code LIMIT 50")]
    return {"currency": currency, "products": products, "tlds": tlds,
            "currencies": currencies, "promotions": promotions, "cycles": CYCLES}
