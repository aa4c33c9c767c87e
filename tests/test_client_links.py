"""A client is its creator's by `clients.storefront` alone: an order for a new client writes
the client and no `client_storefronts` row (that table holds the storefronts an operator
linked; older databases also hold creators' rows, which change nothing). The creator still
reuses its client by email and by id, fraud counts it as the storefront's own, the console's
client page lists it, and `ordermill clients link` to the creator has nothing to do. (The row
per new client was 0.7 of the rows placement + fraud wrote per order more than 520e86b: issue
12's Keep, docs/performance.md.)"""

from __future__ import annotations

from datetime import timedelta

from cli.clients import link
from conftest import order_body
from console.clients import page
from services.fraud.facts import read_facts
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from shared.runtime.testing import InMemoryFlow


async def test_a_new_clients_order_writes_no_link_row_and_its_storefront_keeps_it(
    flow: InMemoryFlow,
) -> None:
    shop = flow.add(placement_worker(flow.settings), fraud_worker(flow.settings))
    await shop.send("order.place", order_body("link-1"))
    await shop.run()
    first = await shop.pool.fetchrow(
        "SELECT o.id, o.client_id, c.storefront FROM orders o JOIN clients c ON c.id = o.client_id"
        " WHERE o.order_ref = 'link-1'")
    client_id, creator = first["client_id"], first["storefront"]
    assert await shop.pool.fetchval("SELECT count(*) FROM client_storefronts") == 0

    # Reused by its creator by email (any case) and by id: no second client, still no link row.
    await shop.send("order.place", order_body("link-2", client={"email": "LINK-1@shop.example"}))
    await shop.send("order.place", order_body("link-3", client={"id": client_id}))
    await shop.run()
    rows = await shop.pool.fetch("SELECT client_id, screening FROM orders ORDER BY id")
    assert [(r["client_id"], r["screening"]) for r in rows] == [(client_id, "passed")] * 3
    assert await shop.pool.fetchval("SELECT count(*) FROM clients") == 1
    assert await shop.pool.fetchval("SELECT count(*) FROM client_storefronts") == 0
    found = await read_facts(shop.pool, first["id"], timedelta(hours=1))
    assert found is not None and found[0]["own_client"] is True

    # Another storefront's order for this client (stored otherwise: placement refuses one)
    # is not its own until an operator links the client to it.
    other = await shop.pool.fetchval(
        "INSERT INTO orders (order_ref, order_number, client_id, currency, send_confirmation,"
        " generate_invoice, total, storefront) VALUES ('link-other', 99, $1, 'USD', false, false,"
        " 0, 'other-shop') RETURNING id", client_id)
    found = await read_facts(shop.pool, other, timedelta(hours=1))
    assert found is not None and found[0]["own_client"] is False
    async with shop.pool.acquire() as conn:
        assert await link(conn, client_id, creator, "desk") is False  # it always could
        assert await link(conn, client_id, "other-shop", "desk") is True
        shown = await page(conn, client_id)
    found = await read_facts(shop.pool, other, timedelta(hours=1))
    assert found is not None and found[0]["own_client"] is True
    assert shown is not None and shown["storefronts"] == sorted([creator, "other-shop"])
    assert [tuple(r) for r in await shop.pool.fetch(
        "SELECT storefront, linked_by FROM client_storefronts")] == [("other-shop", "desk")]
