"""Catalog prices of domain items: the longest TLD sold wins, an unsold one is refused."""

from __future__ import annotations

from decimal import Decimal

import pytest

from conftest import Harness
from services.placement.pricing import price_items
from shared.contracts import DomainItem
from shared.errors import Rejected


async def test_the_longest_tld_sold_prices_a_domain(harness: Harness) -> None:
    await harness.pool.execute(
        "INSERT INTO tlds (tld, registrar, auto_register) VALUES ('uk', 'manual', false)")
    await harness.pool.execute(
        "INSERT INTO tld_prices (tld, currency, register_price, transfer_price, renew_price)"
        " VALUES ('uk', 'USD', 5.00, 4.00, 5.00)")
    items = [DomainItem(type="domain", domain="shop.co.uk", years=1),
             DomainItem(type="domain", domain="www.shop.uk", years=2),
             DomainItem(type="domain", domain="move.co.uk", action="transfer", years=3)]
    async with harness.pool.acquire() as conn:
        priced = await price_items(conn, items, "USD")
    assert [(p.item.domain, p.tld, p.price) for p in priced] == [
        ("shop.co.uk", "co.uk", Decimal("9.00")),  # co.uk, not uk
        ("www.shop.uk", "uk", Decimal("10.00")),  # two years
        ("move.co.uk", "co.uk", Decimal("0.00")),  # a transfer: one year at the transfer price
    ]


async def test_a_domain_whose_tld_is_not_sold_or_not_priced_is_refused(harness: Harness) -> None:
    async with harness.pool.acquire() as conn:
        with pytest.raises(Rejected, match=r"TLD of 'shop\.org' is not sold"):
            await price_items(conn, [DomainItem(type="domain", domain="shop.org")], "USD")
        with pytest.raises(Rejected, match=r"TLD \.com has no price in JPY"):
            await price_items(conn, [DomainItem(type="domain", domain="shop.com")], "JPY")
