"""The console over RabbitMQ: its one connection publishes review commands and Add New Order's
`order.place` as its own user and waits on its reply queue; the review and placement services
record the signed-in operator only when that user is a console user (CONSOLE_USERS), and the
broker user otherwise."""

from __future__ import annotations

from contextlib import aclosing

import httpx
import pytest
from test_console import csrf_of, password_hash
from test_console_pages import history_rows, new_order_form
from test_review import make_order

from conftest import TEST_USER, Harness
from console.app import close_state, create_app, open_state
from services.placement.worker import worker as placement_worker
from services.review.worker import worker as review_worker


async def sign_in(app: object) -> tuple[httpx.AsyncClient, str]:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c.test")
    page = await client.get("/sign-in")
    response = await client.post("/sign-in", data={
        "name": "alice", "password": "correct horse battery", "csrf": csrf_of(page.text)})
    assert response.status_code == 303
    return client, csrf_of((await client.get("/")).text)


@pytest.mark.parametrize(("console_user", "recorded"), [(True, "alice"), (False, TEST_USER)])
async def test_actions_go_over_the_broker_as_the_console_user(
    harness: Harness, console_user: bool, recorded: str,
) -> None:
    parties = ({"console_users": [TEST_USER], "operator_users": []} if console_user
               else {"console_users": [], "operator_users": [TEST_USER]})
    s = harness.settings.model_copy(update=parties)
    await harness.start([review_worker(s), placement_worker(s)], **parties)
    await harness.pool.execute(
        "INSERT INTO operators (name, role, password_hash) VALUES ('alice', 'reviewer', $1)",
        await password_hash())
    one, two = (await make_order(harness, "Pending", "cb-1"),
                await make_order(harness, "Pending", "cb-2"))
    state = await open_state(s)
    try:
        client, csrf = await sign_in(create_app(state))
        async with aclosing(client):
            dashboard = (await client.get("/")).text
            # The queues, read with passive declares on the console's connection.
            assert harness.names.queue("review") in dashboard
            assert "RabbitMQ cannot be asked" not in dashboard
            page = await client.post(f"/orders/{one}/act/accept", data={
                "csrf": csrf, "run_module_create": "on", "send_welcome_email": "on",
                "register_domains": "on"})
            assert "the order is now Active" in page.text
            page = await client.post(f"/orders/{two}/act/deny", data={"csrf": csrf})
            assert "the order is now Cancelled" in page.text
            page = await client.post(f"/orders/{two}/notes", data={"csrf": csrf,
                                                                   "note": "denied: chargeback"})
            assert "Note added." in page.text and "denied: chargeback" in page.text
            # Add New Order: placement answers on the reply queue; the order page's history
            # names who placed it.
            placed = await client.post("/orders/new", data=new_order_form(
                csrf, f"console-cb-{console_user}", promo_code=""))
            assert placed.status_code == 303, placed.text[:500]
            shown = (await client.get(placed.headers["location"])).text
            assert (recorded, "placed") in history_rows(shown), history_rows(shown)
    finally:
        await close_state(state)
    rows = await harness.pool.fetch(
        "SELECT order_id, actor, action FROM order_history WHERE order_id = ANY($1::bigint[])"
        " ORDER BY id", [one, two])
    assert [(r["order_id"], r["actor"], r["action"]) for r in rows] == [
        (one, recorded, "accept"), (two, recorded, "deny"), (two, recorded, "note")]
    assert await harness.pool.fetchval(
        "SELECT operator FROM order_notes WHERE order_id = $1", two) == recorded


async def test_an_unanswered_command_is_said_to_have_expired(harness: Harness) -> None:
    """No review worker runs: the console waits its timeout, says so, and the command expires
    in its queue rather than surprising anyone later."""
    s = harness.settings.model_copy(update={"console_review_timeout": 0.5})
    await harness.pool.execute(
        "INSERT INTO operators (name, role, password_hash) VALUES ('alice', 'reviewer', $1)",
        await password_hash())
    order = await make_order(harness, "Pending", "cb-none")
    state = await open_state(s)
    try:
        client, csrf = await sign_in(create_app(state))
        async with aclosing(client):
            page = await client.post(f"/orders/{order}/act/cancel", data={"csrf": csrf})
    finally:
        await close_state(state)
    assert "no answer from the review service within 0.5 s" in page.text
    assert await harness.pool.fetchval("SELECT status FROM orders WHERE id = $1", order) == "Pending"
