"""The catalog file (TOML): products, TLDs, servers and promotions, validated, then upserted."""

from __future__ import annotations

import tomllib
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.contracts import BillingCycle, Currency
from shared.runtime import describe_validation_error

AutoSetup = Literal["on_order", "on_payment", "on_accept", "never"]
Price = Annotated[Decimal, Field(ge=0, max_digits=12, decimal_places=2)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSpec(_Strict):
    name: str
    module: str
    hostname: str | None = None
    username: str | None = None
    token_env: str | None = Field(None, description="environment variable holding the token")
    max_accounts: int | None = None


class ProductSpec(_Strict):
    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    name: str
    type: Literal["hosting", "other"] = "hosting"
    module: str = "autorelease"
    server: str | None = None
    auto_setup: AutoSetup = "on_payment"
    require_domain: bool = False
    prices: dict[Currency, dict[BillingCycle, Price]]
    setup_fee: dict[Currency, Price] = {}


class TldPrices(_Strict):
    register_price: Price = Field(alias="register")
    transfer: Price
    renew: Price


class TldSpec(_Strict):
    tld: str = Field(pattern=r"^[a-z0-9-]+(\.[a-z0-9-]+)*$")
    registrar: str = "manual"
    auto_register: bool = False
    prices: dict[Currency, TldPrices]


class PromotionSpec(_Strict):
    code: str
    kind: Literal["percent", "fixed"]
    value: Price = Field(ge=0)
    products: list[str] = []
    expires_at: datetime | None = None
    max_uses: int | None = None


class Catalog(_Strict):
    default_currency: Currency = "USD"
    servers: list[ServerSpec] = []
    products: list[ProductSpec] = []
    tlds: list[TldSpec] = []
    promotions: list[PromotionSpec] = []


class CatalogError(Exception):
    pass


def read_catalog(path: Path) -> Catalog:
    try:
        data = tomllib.loads(path.read_text(), parse_float=Decimal)
    except OSError as exc:
        raise CatalogError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise CatalogError(f"{path} is not valid TOML: not UTF-8 text") from None
    try:
        catalog = Catalog.model_validate(data)
    except ValidationError as exc:
        raise CatalogError(f"{path}: {describe_validation_error(exc)}") from None
    servers = {s.name for s in catalog.servers}
    slugs = {p.slug for p in catalog.products}
    for product in catalog.products:
        if product.server and product.server not in servers:
            raise CatalogError(f"{path}: product {product.slug!r} names unknown server "
                               f"{product.server!r}")
    for promo in catalog.promotions:
        unknown = set(promo.products) - slugs
        if unknown:
            raise CatalogError(f"{path}: promotion {promo.code!r} names unknown products "
                               f"{sorted(unknown)}")
    return catalog


async def load_catalog(conn: asyncpg.Connection, catalog: Catalog) -> dict[str, int]:
    """Upsert everything in the file; what it does not name is left as it is (orders refer to it)."""
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO catalog_meta (key, value) VALUES ('default_currency', $1)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value", catalog.default_currency,
        )
        server_ids: dict[str, int] = {}
        for s in catalog.servers:
            server_ids[s.name] = await conn.fetchval(
                "INSERT INTO servers (name, module, hostname, username, token_env, max_accounts)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO UPDATE SET"
                " module = excluded.module, hostname = excluded.hostname,"
                " username = excluded.username, token_env = excluded.token_env,"
                " max_accounts = excluded.max_accounts RETURNING id",
                s.name, s.module, s.hostname, s.username, s.token_env, s.max_accounts,
            )
        for p in catalog.products:
            product_id = await conn.fetchval(
                "INSERT INTO products (slug, name, type, module, server_id, auto_setup,"
                " require_domain) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (slug) DO UPDATE SET name = excluded.name, type = excluded.type,"
                " module = excluded.module, server_id = excluded.server_id,"
                " auto_setup = excluded.auto_setup, require_domain = excluded.require_domain"
                " RETURNING id",
                p.slug, p.name, p.type, p.module, server_ids.get(p.server or ""), p.auto_setup,
                p.require_domain,
            )
            await conn.execute("DELETE FROM product_prices WHERE product_id = $1", product_id)
            await conn.executemany(
                "INSERT INTO product_prices (product_id, currency, billing_cycle, price, setup_fee)"
                " VALUES ($1, $2, $3, $4, $5)",
                [(product_id, cur, cycle, price, p.setup_fee.get(cur, Decimal("0")))
                 for cur, cycles in p.prices.items() for cycle, price in cycles.items()],
            )
        for t in catalog.tlds:
            await conn.execute(
                "INSERT INTO tlds (tld, registrar, auto_register) VALUES ($1, $2, $3)"
                " ON CONFLICT (tld) DO UPDATE SET registrar = excluded.registrar,"
                " auto_register = excluded.auto_register",
                t.tld, t.registrar, t.auto_register,
            )
            await conn.execute("DELETE FROM tld_prices WHERE tld = $1", t.tld)
            await conn.executemany(
                "INSERT INTO tld_prices (tld, currency, register_price, transfer_price, renew_price)"
                " VALUES ($1, $2, $3, $4, $5)",
                [(t.tld, cur, pr.register_price, pr.transfer, pr.renew) for cur, pr in t.prices.items()],
            )
        for promo in catalog.promotions:
            await conn.execute(
                "INSERT INTO promotions (code, kind, value, products, expires_at, max_uses)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (code) DO UPDATE SET"
                " kind = excluded.kind, value = excluded.value, products = excluded.products,"
                " expires_at = excluded.expires_at, max_uses = excluded.max_uses",
                promo.code, promo.kind, promo.value, promo.products, promo.expires_at,
                promo.max_uses,
            )
    return {"servers": len(catalog.servers), "products": len(catalog.products),
            "tlds": len(catalog.tlds), "promotions": len(catalog.promotions)}


async def catalog_view(conn: asyncpg.Connection) -> dict[str, object]:
    products = []
    for p in await conn.fetch(
        "SELECT p.id, p.slug, p.name, p.type, p.module, p.auto_setup, s.name AS server"
        " FROM products p LEFT JOIN servers s ON s.id = p.server_id ORDER BY p.slug"
    ):
        prices = await conn.fetch(
            "SELECT currency, billing_cycle, price, setup_fee FROM product_prices"
            " WHERE product_id = $1 ORDER BY currency, price", p["id"],
        )
        products.append({
            "slug": p["slug"], "name": p["name"], "type": p["type"], "module": p["module"],
            "server": p["server"], "auto_setup": p["auto_setup"],
            "prices": [{"currency": r["currency"], "billing_cycle": r["billing_cycle"],
                        "price": str(r["price"]), "setup_fee": str(r["setup_fee"])}
                       for r in prices],
        })
    tlds = [
        {"tld": r["tld"], "registrar": r["registrar"], "auto_register": r["auto_register"],
         "currency": r["currency"], "register": str(r["register_price"]),
         "transfer": str(r["transfer_price"]), "renew": str(r["renew_price"])}
        for r in await conn.fetch(
            "SELECT t.tld, t.registrar, t.auto_register, p.currency, p.register_price,"
            " p.transfer_price, p.renew_price FROM tlds t"
            " LEFT JOIN tld_prices p ON p.tld = t.tld ORDER BY t.tld, p.currency"
        )
    ]
    promotions = [
        {"code": r["code"], "kind": r["kind"], "value": str(r["value"]),
         "products": list(r["products"]), "uses": r["uses"], "max_uses": r["max_uses"],
         "expires_at": r["expires_at"].isoformat() if r["expires_at"] else None}
        for r in await conn.fetch(
            "SELECT p.code, p.kind, p.value, p.products, p.max_uses, p.expires_at,"
            " (SELECT count(*) FROM orders o WHERE o.promo_code = p.code) AS uses"
            " FROM promotions p ORDER BY code")
    ]
    currency = await conn.fetchval("SELECT value FROM catalog_meta WHERE key='default_currency'")
    return {"default_currency": currency, "products": products, "tlds": tlds,
            "promotions": promotions}
