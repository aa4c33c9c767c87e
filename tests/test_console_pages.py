"""The console's Add New Order, client page, module queue, payments and dead letters over
HTTP (httpx's ASGI transport), on a real database, acting through the real review and
placement workers in the broker-free harness (the fast tier)."""

from __future__ import annotations

import logging
import re
from contextlib import aclosing
from typing import Any

import httpx
import pytest
from test_console import CONSOLE_USER, Console, console, csrf_of, signed_in  # noqa: F401

from shared.parties import Party, Publishers

EPP = "s3cr3t-EPP-9f2"


def new_order_form(csrf: str, ref: str, **overrides: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "csrf": csrf, "ref": ref, "client_mode": "new", "email": f"{ref}@new.example",
        "first_name": "Nora", "last_name": "Quinn", "company": "Quinn & Co",
        "address1": "1 High St", "city": "Leeds", "postcode": "LS1 1AA", "country": "gb",
        "phone": "+44 113 000 0000",
        "product": ["starter", "", ""], "cycle": ["annually", "monthly", "monthly"],
        "product_domain": [f"{ref}.example", "", ""],
        "domain": [f"{ref}.com", f"{ref}.net", ""],
        "domain_action": ["register", "transfer", "register"],
        "years": ["2", "1", "1"], "epp_code": ["", EPP, ""],
        "promo_code": "WELCOME10", "payment_method": "banktransfer",
        "send_confirmation": "on",
    }
    form.update(overrides)
    return form


async def test_add_new_order_for_a_new_client_opens_the_order(
    console: Console, caplog: pytest.LogCaptureFixture,  # noqa: F811
) -> None:
    caplog.set_level(logging.DEBUG)
    client, csrf = await signed_in(console)
    async with aclosing(client):
        form_page = await client.get("/orders/new")
        assert form_page.status_code == 200 and "Add New Order" in form_page.text
        assert "starter" in form_page.text and ".co.uk" in form_page.text  # the catalog
        ref = re.search(r'name="ref" value="([^"]+)"', form_page.text).group(1)
        placed = await client.post("/orders/new", data=new_order_form(csrf, ref))
        assert placed.status_code == 303, placed.text[:500]
        order_id = int(re.fullmatch(r"/orders/(\d+)\?placed=1", placed.headers["location"])[1])
        page = (await client.get(placed.headers["location"])).text
        assert "Order placed" in page and f"{ref}.net" in page and "Quinn" in page
        # The same form again (a double click): the same order, not a second one.
        again = await client.post("/orders/new", data=new_order_form(csrf, ref))
        assert again.headers["location"] == placed.headers["location"]
    pool = console.flow.pool
    order = await pool.fetchrow("SELECT * FROM orders WHERE id = $1", order_id)
    assert order["order_ref"] == ref and order["promo_code"] == "WELCOME10"
    assert order["storefront"] == CONSOLE_USER and order["screening"] != "queued"  # screened
    assert await pool.fetchval("SELECT count(*) FROM orders WHERE order_ref = $1", ref) == 1
    c = await pool.fetchrow("SELECT * FROM clients WHERE id = $1", order["client_id"])
    assert (c["email"], c["company"], c["city"], c["country"]) == (
        f"{ref}@new.example", "Quinn & Co", "Leeds", "GB")
    items = await pool.fetch("SELECT domain, action, years, epp_code FROM domains"
                             " WHERE order_id = $1 ORDER BY id", order_id)
    assert [(i["domain"], i["action"], i["years"]) for i in items] == [
        (f"{ref}.com", "register", 2), (f"{ref}.net", "transfer", 1)]
    assert items[1]["epp_code"].endswith(EPP)  # handed to placement (sealed with EPP_CODE_KEY)
    assert await pool.fetchval("SELECT billing_cycle FROM services WHERE order_id = $1",
                               order_id) == "annually"
    # "Generate invoice" unticked: the console is an operator, so none is made.
    assert await pool.fetchval("SELECT count(*) FROM invoices WHERE order_id = $1",
                               order_id) == 0
    assert EPP not in caplog.text


def history_rows(html: str) -> list[tuple[str, str]]:
    """(who, what) of each row of the order page's History table, as shown."""
    table = html.split("<h2>History</h2>", 1)[1].split("</table>", 1)[0]
    return [(who, what) for who, what in re.findall(
        r"<tr><td>[^<]*</td><td>([^<]*)</td><td>([^<]*)</td>", table)]


async def test_add_new_order_history_names_the_operator_who_placed_it(
    console: Console,  # noqa: F811
) -> None:
    """The console publishes as its own broker user, naming the operator signed in: the
    placement history row names the operator (as review commands do), not the console."""
    client, csrf = await signed_in(console)
    async with aclosing(client):
        ref = re.search(r'name="ref" value="([^"]+)"',
                        (await client.get("/orders/new")).text).group(1)
        placed = await client.post("/orders/new", data=new_order_form(csrf, ref))
        assert placed.status_code == 303, placed.text[:500]
        page = (await client.get(placed.headers["location"])).text
    rows = history_rows(page)
    assert ("alice", "placed") in rows, rows
    assert all(who != CONSOLE_USER for who, _ in rows), rows
    order_id = int(re.fullmatch(r"/orders/(\d+)\?placed=1", placed.headers["location"])[1])
    row = await console.flow.pool.fetchrow(
        "SELECT actor, detail FROM order_history WHERE order_id = $1 AND action = 'placed'",
        order_id)
    assert row["actor"] == "alice"
    assert row["detail"]["publisher"] == CONSOLE_USER  # who vouched for her, kept for audit
    # The order's publisher is still the console's broker user (its storefront, its ref).
    assert await console.flow.pool.fetchval(
        "SELECT placed_by FROM orders WHERE id = $1", order_id) == CONSOLE_USER
    # Anyone else naming an operator is not believed: the history names the publisher (here
    # the harness's user, a storefront and operator user, not a console user).
    other = await console.place("c-named", operator="mallory")
    assert await console.flow.pool.fetchval(
        "SELECT actor FROM order_history WHERE order_id = $1 AND action = 'placed'",
        other["id"]) == console.flow.user


async def test_add_new_order_mistakes_are_one_line_with_the_values_kept(
    console: Console,  # noqa: F811
) -> None:
    client, csrf = await signed_in(console)
    async with aclosing(client):
        # Refused on the form: a bad domain (the EPP code of another row not echoed back).
        bad = await client.post("/orders/new", data=new_order_form(
            csrf, "console-bad1", domain=["not a domain", "bad1.net", ""]))
        assert bad.status_code == 400
        errors = re.findall(r'<p class="alert bad" role="alert">([^<]*)</p>', bad.text)
        assert len(errors) == 1 and "\n" not in errors[0] and "domain" in errors[0]
        assert "Nora" in bad.text and "1 High St" in bad.text and "bad1.net" in bad.text
        assert EPP not in bad.text
        nothing = await client.post("/orders/new", data=new_order_form(
            csrf, "console-bad2", product=["", "", ""], product_domain=["", "", ""],
            domain=["", "", ""]))
        assert "Add at least one product or domain." in nothing.text
        # Refused by placement (its PlaceReply): a product not in the catalog.
        unknown = await client.post("/orders/new", data=new_order_form(
            csrf, "console-bad3", product=["gold-plated", "", ""]))
        assert unknown.status_code == 422, unknown.text[:300]
        assert "Refused:" in unknown.text and "gold-plated" in unknown.text
        assert EPP not in unknown.text
    assert await console.flow.pool.fetchval(
        "SELECT count(*) FROM orders WHERE order_ref LIKE 'console-bad%'") == 0


async def test_a_client_is_found_and_ordered_for_from_their_page(
    console: Console,  # noqa: F811
) -> None:
    first = await console.place("c-client-1")
    client, csrf = await signed_in(console)
    async with aclosing(client):
        for query in ("ann", "lee", "Ann Lee", "c-client-1@shop", str(first["client_id"])):
            found = (await client.get(f"/clients/search?q={query}")).text
            assert f"/orders/new?client={first['client_id']}" in found, query
        assert "No client starts with" in (await client.get("/clients/search?q=zz%25")).text
        page = (await client.get(f"/clients/{first['client_id']}")).text
        assert "c-client-1@shop.example" in page and f"/orders/{first['id']}" in page
        link = f"/orders/new?client={first['client_id']}"
        assert link in page
        chosen = (await client.get(link)).text
        assert "Choose another client" in chosen and "c-client-1@shop.example" in chosen
        ref = re.search(r'name="ref" value="([^"]+)"', chosen).group(1)
        placed = await client.post("/orders/new", data={
            "csrf": csrf, "ref": ref, "client_mode": "existing",
            "client_id": str(first["client_id"]), "product": ["business"],
            "cycle": ["monthly"], "product_domain": ["second.example"],
            "generate_invoice": "on"})
        assert placed.status_code == 303, placed.text[:300]
    second = await console.flow.pool.fetchrow("SELECT * FROM orders WHERE order_ref = $1", ref)
    assert second["client_id"] == first["client_id"]
    assert await console.flow.pool.fetchval(
        "SELECT count(*) FROM invoices WHERE order_id = $1", second["id"]) == 1
    viewer, _ = await signed_in(console, "victor")
    async with aclosing(viewer):
        page = (await viewer.get(f"/clients/{first['client_id']}")).text
        assert "c-client-1@shop.example" in page and "/orders/new" not in page
        assert (await viewer.get("/orders/new")).status_code == 403


async def _parked(console: Console, ref: str) -> tuple[dict[str, Any], list[int]]:  # noqa: F811
    placed = await console.place(ref)
    pool = console.flow.pool
    service = await pool.fetchval("SELECT id FROM services WHERE order_id = $1", placed["id"])
    domain = await pool.fetchval("SELECT id FROM domains WHERE order_id = $1", placed["id"])
    jobs = [await pool.fetchval(
        "INSERT INTO jobs (order_id, service_id, domain_id, kind, lane, status, attempts,"
        " last_error) VALUES ($1, $2, $3, $4, 'x', 'parked', 6, $5) RETURNING id",
        placed["id"], s, d, kind, error) for s, d, kind, error in (
            (service, None, "create", "WHM said <b>no</b>"),
            (None, domain, "register", "registry timeout"))]
    return dict(placed), jobs


async def test_the_module_queue_retries_one_retries_all_and_resolves(
    console: Console,  # noqa: F811
) -> None:
    order, (create, register) = await _parked(console, "c-mq-1")
    other, (other_create, other_register) = await _parked(console, "c-mq-2")
    pool = console.flow.pool
    status = "SELECT status FROM jobs WHERE id = $1"
    client, csrf = await signed_in(console)
    async with aclosing(client):
        page = (await client.get("/module-queue")).text
        assert "WHM said &lt;b&gt;no&lt;/b&gt;" in page and "registry timeout" in page
        assert f"/module-queue/{create}/resolve" in page and "Retry all" in page
        # Retry one job: only it runs again.
        done = await client.post(f"/module-queue/{create}/retry", data={"csrf": csrf})
        assert "Retry · order" in done.text and "done" in done.text
        assert await pool.fetchval(status, create) == "pending"
        assert await pool.fetchval(status, register) == "parked"
        # Again: it is not parked now, and the review service says so.
        again = await client.post(f"/module-queue/{create}/retry", data={"csrf": csrf})
        assert f"job {create} is pending; retry needs it parked" in again.text
        # Mark resolved: confirmed first, then the domain is active and the job resolved.
        confirm = await client.get(f"/module-queue/{register}/resolve")
        assert "Mark job" in confirm.text and "registry timeout" in confirm.text
        resolved = await client.post(f"/module-queue/{register}/resolve", data={"csrf": csrf})
        assert "Mark resolved · order" in resolved.text and "refused" not in resolved.text
        assert await pool.fetchval(status, register) == "resolved"
        assert await pool.fetchval("SELECT d.status FROM domains d JOIN jobs j ON"
                                   " j.domain_id = d.id WHERE j.id = $1", register) == "Active"
        # Retry all: every parked job of every order.
        everything = await client.post("/module-queue/retry-all", data={"csrf": csrf})
        assert f"#{other['id']}" in everything.text
        assert {await pool.fetchval(status, j) for j in (other_create, other_register)} == {
            "pending"}
        assert "Nothing parked" in (await client.get("/module-queue")).text
    history = await pool.fetch(
        "SELECT actor, action, detail FROM order_history WHERE order_id = $1"
        " AND action IN ('retry', 'resolve') ORDER BY id", order["id"])
    assert [(h["actor"], h["action"], h["detail"].get("job_id")) for h in history] == [
        ("alice", "retry", create), ("alice", "resolve", register)]
    viewer, viewer_csrf = await signed_in(console, "victor")
    async with aclosing(viewer):
        assert "Retry all" not in (await viewer.get("/module-queue")).text
        refused = await viewer.post(f"/module-queue/{create}/retry", data={"csrf": viewer_csrf})
        assert refused.status_code == 403


async def test_payments_show_their_reason_and_dead_letters_their_body_redacted(
    console: Console,  # noqa: F811
) -> None:
    pool = console.flow.pool
    await pool.execute(
        "INSERT INTO payments (gateway, transaction_id, amount, raw_amount, currency, order_ref,"
        " publisher, status, reason, waiting_for, trusted, message_id, dead_letter) VALUES"
        " ('stripe', 'ch_1', 12.95, '12.95', 'USD', 'c-pay-none', 'gw', 'unapplied',"
        "  'order not placed yet', 'order', true, 'm1', NULL),"
        " (NULL, NULL, NULL, 'lots', NULL, NULL, 'mallory', 'unapplied',"
        "  'not a payment: <script>x</script>', NULL, false, 'm2', $1)",
        '{"amount": "lots", "epp_code": "' + EPP + '", "password": "hunter2"}')
    client, _ = await signed_in(console, "victor")
    async with aclosing(client):
        page = (await client.get("/payments")).text
        assert "order not placed yet" in page and "its order (applied when it is placed)" in page
        assert "untrusted" in page and "&lt;script&gt;x&lt;/script&gt;" in page
        assert EPP not in page and "hunter2" not in page and "lots" in page
        dead = await client.get("/dead-letters")
        assert dead.status_code == 200 and "RabbitMQ cannot be asked now" in dead.text


def test_the_console_replays_only_what_it_may_send_itself() -> None:
    publishers = Publishers({Party.CONSOLE: frozenset({"console"}),
                             Party.STOREFRONT: frozenset({"shop"}),
                             Party.GATEWAY: frozenset({"gw"}),
                             Party.OPERATOR: frozenset({"op"})})
    placers = frozenset({Party.STOREFRONT, Party.OPERATOR, Party.CONSOLE})
    payers = frozenset({Party.GATEWAY, Party.OPERATOR})
    # A storefront's order replayed by the console is still the storefront's.
    verdict = publishers.check("console", placers, replay_of="shop")
    assert verdict.allowed and verdict.user == "shop" and verdict.replayed_by == "console"
    # A gateway's payment: the console's replay header is not believed, and the console may
    # not send a payment itself.
    verdict = publishers.check("console", payers, replay_of="gw")
    assert not verdict.allowed and verdict.user == "console"
    assert publishers.check("op", payers, replay_of="gw").allowed  # an operator's is


async def test_the_pages_need_signing_in(console: Console) -> None:  # noqa: F811
    async with console.client() as anonymous:
        for path in ("/orders/new", "/clients/1", "/module-queue", "/payments",
                     "/dead-letters", "/clients/search?q=ann"):
            response = await anonymous.get(path)
            assert response.status_code == 303, path
        # A POST unsigned-in is not done: to sign in (no session, so no CSRF token either).
        refused = await anonymous.post("/module-queue/retry-all", data={})
        assert refused.status_code == 303 and refused.headers["location"] == "/sign-in"


_ = httpx  # the client type the helpers return
