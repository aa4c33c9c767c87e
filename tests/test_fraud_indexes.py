"""The fraud policy's queries at scale (issue 16): on a seeded orders table, each query the
screening and the operator's commands run — the order's facts with its client's earlier Fraud
and Cancelled orders, the rules' velocity windows, the re-screen selection, the pending list
and the order listing — is planned on an index, never a sequential scan of `orders`.
(How fast they run is measured in bench/, not here.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from cli import views
from cli.fraud import orders_to_rescreen
from services.fraud.facts import read_facts, velocity
from shared import db
from shared.settings import Settings

ORDERS = 100_000
CLIENTS = 10_000


class Explaining:
    """A connection that plans every query it runs (EXPLAIN, same parameters) and keeps the
    plans, then runs it: the code under test is called as it is, with its own SQL."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.plans: list[tuple[str, dict[str, Any]]] = []

    async def _plan(self, sql: str, args: tuple[Any, ...]) -> None:
        plan = await self.conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
        self.plans.append((sql, (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]))

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        await self._plan(sql, args)
        return await self.conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        await self._plan(sql, args)
        return await self.conn.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        await self._plan(sql, args)
        return await self.conn.fetchval(sql, *args)


def scans(plan: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    """Every node that reads a relation: (node type, relation, index)."""
    found = []
    if "Relation Name" in plan or "Index Name" in plan:
        found.append((plan["Node Type"], plan.get("Relation Name"), plan.get("Index Name")))
    for child in plan.get("Plans", []):
        found += scans(child)
    return found


@pytest.fixture
async def seeded(db_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(db_settings.database_url, max_size=2, attempts=3)
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO clients (email, storefront, country)"
            " SELECT 'c' || g || '@seed.example', '', 'GB' FROM generate_series(1, $1) g",
            CLIENTS)
        # Mostly Active, a few Pending (1 %), Cancelled (3 %) and Fraud (0.5 %) ones, an IP
        # shared by about ten orders, one order a minute going back.
        await conn.execute(
            "INSERT INTO orders (order_ref, order_number, client_id, status, screening, currency,"
            " send_confirmation, generate_invoice, total, ip_address, storefront, created_at)"
            " SELECT 'seed-' || g, 1000000000 + g, 1 + g % $2,"
            "  CASE WHEN g % 200 = 0 THEN 'Fraud' WHEN g % 100 = 0 THEN 'Pending'"
            "       WHEN g % 33 = 0 THEN 'Cancelled' ELSE 'Active' END,"
            "  CASE WHEN g % 100 = 0 AND g % 300 = 0 THEN 'review' ELSE 'passed' END,"
            "  'USD', true, true, 10, ('10.' || (g / 2560) % 256 || '.' || (g / 10) % 256"
            "  || '.1')::inet, '', now() - make_interval(mins => $1 - g)"
            " FROM generate_series(1, $1) g", ORDERS, CLIENTS)
        # The latest order's client (client 1) has earlier Cancelled orders too.
        await conn.execute("UPDATE orders SET status = 'Cancelled' WHERE id IN (10000, 20000)")
        await conn.execute("ANALYZE clients; ANALYZE orders")
    try:
        yield pool
    finally:
        await pool.close()


async def test_the_fraud_policys_queries_use_indexes_not_a_scan_of_orders(
    seeded: asyncpg.Pool,
) -> None:
    async with seeded.acquire() as conn:
        explaining = Explaining(conn)
        latest = await conn.fetchval("SELECT max(id) FROM orders")
        found = await read_facts(explaining, latest, timedelta(minutes=60))
        assert found is not None
        _, facts = found
        assert facts.earlier_fraud_orders > 0 and facts.earlier_cancelled_orders > 0
        per_client, per_ip = await velocity(explaining, latest, [10, 1440])
        assert per_ip[1440] >= per_ip[10] >= 1 and per_client[1440] >= per_client[10] >= 1
        since = datetime.now(UTC) - timedelta(days=7)
        assert await orders_to_rescreen(explaining, status="Pending", screening=None,
                                        since=since, until=None)
        assert await orders_to_rescreen(explaining, status="Pending", screening="review",
                                        since=None, until=None)
        pending = await views.pending_orders(explaining, limit=50)
        assert pending["pending"][0]["needs_review"] is True
        await views.list_orders(explaining, status="Pending", limit=50)
    assert len(explaining.plans) == 6
    for sql, plan in explaining.plans:
        read = scans(plan)
        on_orders = [(node, index) for node, relation, index in read
                     if relation == "orders" or (index or "").startswith("orders_")]
        assert ("Seq Scan", None) not in on_orders, (sql, read)
        assert any(index for _, index in on_orders), (sql, read)  # orders read by an index
