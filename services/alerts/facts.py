"""What an alert says about an order: one query for its number, client, total, products and
whether it is the client's first order. Outside text (names, emails, refs) is returned as
stored; each channel escapes it for where it is shown (services/alerts/slack.py, the mail
templates' autoescape)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

_ORDER = """
SELECT o.id, o.order_number, o.order_ref, o.status, o.screening, o.total, o.currency,
  o.storefront, o.created_at, c.first_name, c.last_name, c.email, c.company,
  NOT EXISTS (SELECT 1 FROM orders e WHERE e.client_id = o.client_id AND e.id < o.id) AS first,
  coalesce((SELECT array_agg(DISTINCT p.slug ORDER BY p.slug) FROM services s
            JOIN products p ON p.id = s.product_id WHERE s.order_id = o.id), '{}') AS products,
  coalesce((SELECT array_agg(d.domain ORDER BY d.id) FROM domains d WHERE d.order_id = o.id),
           '{}') AS domains
FROM orders o JOIN clients c ON c.id = o.client_id WHERE o.id = $1
"""


@dataclass(frozen=True)
class OrderFacts:
    id: int
    number: int
    ref: str
    status: str
    screening: str
    total: Decimal
    currency: str
    storefront: str | None
    created_at: datetime
    client: str  # "First Last" (and the company), as the client wrote it
    email: str
    first_order: bool
    products: tuple[str, ...]
    domains: tuple[str, ...]

    def lines(self) -> dict[str, str]:
        """The facts every channel shows, label -> value (plain text, not escaped)."""
        out = {"Order": f"#{self.number} ({self.ref})", "Client": f"{self.client} <{self.email}>",
               "Total": f"{self.total} {self.currency}", "Status": self.status,
               "Screening": self.screening}
        if self.products:
            out["Products"] = ", ".join(self.products)
        if self.domains:
            out["Domains"] = ", ".join(self.domains[:10]) + (" ..." if len(self.domains) > 10 else "")
        if self.first_order:
            out["First order"] = "yes"
        if self.storefront:
            out["Storefront"] = self.storefront
        return out


async def order_facts(conn: asyncpg.Connection, order_id: int) -> OrderFacts | None:
    row = await conn.fetchrow(_ORDER, order_id)
    if row is None:
        return None
    name = " ".join(p for p in (row["first_name"], row["last_name"]) if p) or "(no name)"
    if row["company"]:
        name += f", {row['company']}"
    return OrderFacts(row["id"], row["order_number"], row["order_ref"], row["status"],
                      row["screening"], row["total"], row["currency"], row["storefront"],
                      row["created_at"], name, row["email"], row["first"],
                      tuple(row["products"]), tuple(row["domains"]))
