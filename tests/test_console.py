"""The operator console over HTTP (httpx's ASGI transport against the app), on a real
database, its actions carried out by the real review worker: through the broker-free harness
here (the fast tier), and once over RabbitMQ (test_console_broker.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from conftest import ROOT, order_body
from console import accounts, order_list
from console.accounts import Role
from console.app import close_state, create_app, open_state
from console.security import CONTENT_SECURITY_POLICY, COOKIE
from console.testing import FlowPublisher
from console.web import ConsoleState
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.worker import worker as provisioning_worker
from services.review.worker import worker as review_worker
from shared import db
from shared.runtime.testing import InMemoryFlow
from shared.settings import Settings

CONSOLE_USER = "ordermill-console"  # the console's RabbitMQ user: a console user only
PASSWORD = "correct horse battery"
HOSTILE_FIRST = "<script>alert(1)</script>"
HOSTILE_LAST = "{{7*7}}"
HOSTILE_COMPANY = "\x1b[31mRed Ltd"


_hashes: list[str] = []


async def password_hash() -> str:
    if not _hashes:
        _hashes.append(await accounts.hash_password(PASSWORD))
    return _hashes[0]


@dataclass
class Console:
    flow: InMemoryFlow
    state: ConsoleState
    app: Any
    publisher: FlowPublisher

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                 base_url="http://console.test")

    async def place(self, ref: str, **overrides: Any) -> asyncpg.Record:
        await self.flow.send("order.place", order_body(ref, **overrides))
        await self.flow.run()
        return await self.flow.pool.fetchrow("SELECT * FROM orders WHERE order_ref = $1", ref)

    async def order(self, order_id: int) -> asyncpg.Record:
        return await self.flow.pool.fetchrow("SELECT * FROM orders WHERE id = $1", order_id)


@pytest.fixture
async def console(db_settings: Settings) -> AsyncIterator[Console]:
    s = db_settings.model_copy(update={"console_users": [CONSOLE_USER],
                                       "console_signin_max_failures": 5})
    pool = await db.create_pool(s.database_url, max_size=4, attempts=3)
    flow = InMemoryFlow(s, pool).add(placement_worker(s), fraud_worker(s), review_worker(s),
                                     provisioning_worker(s))
    publisher = FlowPublisher(flow, CONSOLE_USER)
    state = await open_state(s, publisher=publisher)
    await pool.executemany(  # one argon2 hash for the run: hashing is slow on purpose
        "INSERT INTO operators (name, role, password_hash) VALUES ($1, $2, $3)",
        [("alice", Role.REVIEWER, await password_hash()), ("victor", Role.VIEWER,
                                                          await password_hash())])
    try:
        yield Console(flow, state, create_app(state), publisher)
    finally:
        await close_state(state)
        await pool.close()


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


async def signed_in(console: Console, name: str = "alice") -> tuple[httpx.AsyncClient, str]:
    client = console.client()
    page = await client.get("/sign-in")
    response = await client.post("/sign-in", data={"name": name, "password": PASSWORD,
                                                   "csrf": csrf_of(page.text), "next": "/"})
    assert response.status_code == 303, response.text
    home = await client.get("/")
    assert home.status_code == 200
    return client, csrf_of(home.text)


# -- pages and roles -------------------------------------------------------------------------------

async def test_every_page_renders_for_a_reviewer_and_a_viewer(console: Console) -> None:
    placed = await console.place("c-pages")
    fraud = await console.place("c-fraud", ip_address="192.0.2.66")
    for name, acts in (("alice", True), ("victor", False)):
        client, _ = await signed_in(console, name)
        async with aclosing(client):
            for path in ("/", "/dashboard/body", "/orders", "/orders/list",
                         "/orders?status=all&q=c-pages", f"/orders/{placed['id']}",
                         f"/orders/{fraud['id']}"):
                response = await client.get(path)
                assert response.status_code == 200, (path, response.text[:200])
                assert response.headers["cache-control"] == "no-store"
            home = (await client.get("/")).text
            assert "Awaiting review" in home and f"/orders/{placed['id']}" in home
            assert "RabbitMQ cannot be asked now" in home  # no broker in this tier
            listing = (await client.get("/orders")).text
            assert "c-pages" in listing and "c-fraud" not in listing  # Fraud: not pending
            assert ("c-fraud" in (await client.get("/orders?status=Fraud")).text)
            page = (await client.get(f"/orders/{placed['id']}")).text
            assert "Fraud Check Results" in page and "rules" in page
            fraud_page = (await client.get(f"/orders/{fraud['id']}")).text
            assert "banned_ip" in fraud_page and "99.00" in fraud_page
            # A viewer sees no action button, no bulk form, no note form.
            for marker in (f"/orders/{placed['id']}/confirm/accept", 'id="bulk"',
                           f"/orders/{placed['id']}/notes"):
                assert (marker in page or marker in listing) == acts, (name, marker)
            if not acts:
                assert (await client.get(
                    f"/orders/{placed['id']}/confirm/accept")).status_code == 403
    async with console.client() as anonymous:
        response = await anonymous.get(f"/orders/{placed['id']}")
        assert response.status_code == 303
        assert response.headers["location"] == f"/sign-in?next=/orders/{placed['id']}"
        htmx = await anonymous.get("/orders/list", headers={
            "HX-Request": "true", "HX-Current-URL": "http://console.test/orders"})
        assert htmx.headers["hx-redirect"] == "/sign-in?next=/orders"  # the page, not /list


async def test_the_pages_show_what_an_order_holds(console: Console) -> None:
    first = await console.place("c-show-1")
    second = await console.place("c-show-2")  # the same client (same email? no: per ref)
    await console.flow.pool.execute(
        "UPDATE orders SET client_id = $1 WHERE id = $2", first["client_id"], second["id"])
    client, _ = await signed_in(console)
    async with aclosing(client):
        page = (await client.get(f"/orders/{first['id']}")).text
    assert "c-show-1.example" in page and "c-show-1.com" in page  # items
    assert "starter" in page and "monthly" in page
    assert "Unpaid" in page and "28.95" in page  # invoice
    assert f'href="/orders/{second["id"]}"' in page  # the client's other orders
    assert "placed" in page and "screening" in page  # history


# -- signing in ------------------------------------------------------------------------------------

def client_at(console: Console, address: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=console.app, client=(address, 4000)),
                             base_url="http://console.test")


async def try_sign_in(console: Console, address: str, name: str, password: str) -> httpx.Response:
    async with client_at(console, address) as client:
        csrf = csrf_of((await client.get("/sign-in")).text)
        return await client.post("/sign-in", data={"name": name, "password": password,
                                                   "csrf": csrf})


async def test_sign_in_refuses_wrong_passwords_alike_and_limits_failures(console: Console) -> None:
    wrong = await try_sign_in(console, "10.0.0.1", "alice", "nope")
    unknown = await try_sign_in(console, "10.0.0.1", "mallory", PASSWORD)
    assert wrong.status_code == unknown.status_code == 401
    assert "Wrong name or password." in wrong.text and "Wrong name or password." in unknown.text
    def page(response: httpx.Response) -> str:
        return re.sub(r'"[A-Za-z0-9_-]{43}"', "TOKEN", response.text.replace("alice", "mallory"))
    assert page(wrong) == page(unknown)  # nothing tells them apart
    # Per account: five failures for alice, from anywhere, and alice is refused everywhere,
    # even with the right password; victor is not.
    for n in range(2, 6):
        await try_sign_in(console, f"10.0.1.{n}", "alice", "nope")
    limited = await try_sign_in(console, "10.0.2.1", "alice", PASSWORD)
    assert limited.status_code == 429 and "Too many failed sign-ins" in limited.text
    assert (await try_sign_in(console, "10.0.2.1", "victor", PASSWORD)).status_code == 303
    # Per address: five failures from one address, whatever the names, and it is refused.
    for n in range(3):
        await try_sign_in(console, "10.0.0.1", f"guess{n}", "nope")
    from_there = await try_sign_in(console, "10.0.0.1", "victor", PASSWORD)
    assert from_there.status_code == 429
    assert (await try_sign_in(console, "10.0.3.1", "victor", PASSWORD)).status_code == 303
    # Refused attempts are not tried, so not counted either.
    assert await console.flow.pool.fetchval("SELECT count(*) FROM sign_in_failures") == 9
    # Once the window has passed, the right password signs in.
    await console.flow.pool.execute("UPDATE sign_in_failures SET at = at - interval '16 minutes'")
    assert (await try_sign_in(console, "10.0.0.1", "alice", PASSWORD)).status_code == 303


async def test_a_tampered_or_signed_out_session_is_refused(console: Console) -> None:
    client, csrf = await signed_in(console)
    async with aclosing(client):
        cookie = client.cookies[COOKIE]
        assert (await client.get("/orders")).status_code == 200
        payload, _, rest = cookie.partition(".")
        for forged in (payload[:-2] + payload[-1] + payload[-2] + "." + rest,
                       payload + "." + rest[::-1], "", "x.y.z"):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=console.app),
                                         base_url="http://console.test",
                                         cookies={COOKIE: forged}) as other:
                assert (await other.get("/orders")).status_code == 303, forged
        out = await client.post("/sign-out", data={"csrf": csrf})
        assert out.status_code == 303
        assert (await client.get("/orders")).status_code == 303
    # A password changed since the session began ends it.
    client, _ = await signed_in(console)
    async with aclosing(client):
        async with console.flow.pool.acquire() as conn:
            await accounts.set_password(conn, "alice", "another long password")
        assert (await client.get("/orders")).status_code == 303


async def test_the_session_cookie_is_httponly_and_samesite(console: Console) -> None:
    async with console.client() as client:
        response = await client.get("/sign-in")
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=console.app),
                                 base_url="https://console.test") as client:
        assert "secure" in (await client.get("/sign-in")).headers["set-cookie"].lower()


async def test_security_headers_on_every_response(console: Console) -> None:
    client, _ = await signed_in(console)
    async with aclosing(client):
        for path in ("/", "/sign-in", "/static/console.css", "/static/htmx.min.js", "/nowhere",
                     "/orders/999999"):
            response = await client.get(path)
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["referrer-policy"] == "same-origin"
            assert response.headers["x-content-type-options"] == "nosniff"
        page = (await client.get("/")).text
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "frame-ancestors 'none'" in \
        CONTENT_SECURITY_POLICY
    # No inline script anywhere: every <script> has a src of this site.
    assert re.findall(r"<script(?![^>]*\bsrc=\"/static/)[^>]*>", page) == []


# -- CSRF and roles ----------------------------------------------------------------------------------

async def test_a_post_without_its_csrf_token_is_refused(console: Console) -> None:
    placed = await console.place("c-csrf")
    client, csrf = await signed_in(console)
    async with aclosing(client):
        for data, headers in (({}, {}), ({"csrf": "forged"}, {}),
                              ({}, {"X-CSRF-Token": "forged"})):
            response = await client.post(f"/orders/{placed['id']}/act/cancel", data=data,
                                         headers=headers)
            assert response.status_code == 403
            assert "security token" in response.text
        assert (await client.post("/orders/bulk", data={"action": "cancel",
                                                        "order_id": placed["id"]})).status_code == 403
        assert (await client.post("/sign-out")).status_code == 403
        assert (await console.order(placed["id"]))["status"] == "Pending"
        assert console.publisher.sent == []
        # htmx sends it as a header: accepted.
        response = await client.post(f"/orders/{placed['id']}/act/cancel",
                                     headers={"X-CSRF-Token": csrf})
        assert response.status_code == 200
    assert (await console.order(placed["id"]))["status"] == "Cancelled"


async def test_an_ended_session_is_sent_to_sign_in_and_back_to_its_page(console: Console) -> None:
    """Signed out under it (its password changed elsewhere): an htmx request (a list refreshing
    itself) is redirected to sign in with `next` the page it came from, not the fragment it
    asked for; a form posted from it goes to sign in too (its CSRF token ended with it), back
    to the form's page, rather than a 403. Only this site's pages are `next`."""
    client, csrf = await signed_in(console)
    async with aclosing(client):
        await console.flow.pool.execute(
            "UPDATE operators SET password_changed_at = now() WHERE name = 'alice'")
        htmx = {"HX-Request": "true"}
        refresh = await client.get("/orders/list?status=all", headers={
            **htmx, "HX-Current-URL": "http://console.test/orders?status=all&flagged=1"})
        assert refresh.status_code == 204
        assert refresh.headers["HX-Redirect"] == "/sign-in?next=/orders%3Fstatus%3Dall%26flagged%3D1"
        elsewhere = await client.get("/orders/list", headers={
            **htmx, "HX-Current-URL": "http://evil.example/orders"})
        assert elsewhere.headers["HX-Redirect"] == "/sign-in"
        posted = await client.post("/orders/1/notes", data={"csrf": csrf, "note": "hi"},
                                   headers={"Referer": "http://console.test/orders/1"})
        assert posted.status_code == 303
        assert posted.headers["location"] == "/sign-in?next=/orders/1"


async def test_a_viewer_cannot_act(console: Console) -> None:
    placed = await console.place("c-viewer")
    client, csrf = await signed_in(console, "victor")
    async with aclosing(client):
        for path, data in ((f"/orders/{placed['id']}/act/accept", {}),
                           (f"/orders/{placed['id']}/notes", {"note": "hi"}),
                           ("/orders/bulk", {"action": "cancel", "order_id": placed["id"],
                                             "confirm": "yes"})):
            response = await client.post(path, data={"csrf": csrf, **data})
            assert response.status_code == 403, path
    assert console.publisher.sent == []
    assert (await console.order(placed["id"]))["status"] == "Pending"


# -- actions ---------------------------------------------------------------------------------------

async def history(console: Console, order_id: int) -> list[tuple[str, str]]:
    return [(r["actor"], r["action"]) for r in await console.flow.pool.fetch(
        "SELECT actor, action FROM order_history WHERE order_id = $1"
        " AND actor IN ('alice', 'victor') ORDER BY id", order_id)]


async def test_each_action_is_a_review_command_naming_the_operator(console: Console) -> None:
    a = await console.place("c-act-a")
    b = await console.place("c-act-b")
    client, csrf = await signed_in(console)
    async with aclosing(client):
        confirm = await client.get(f"/orders/{a['id']}/confirm/accept")
        assert confirm.status_code == 200 and "Run module create" in confirm.text
        assert (await console.order(a["id"]))["status"] == "Pending"  # asking changes nothing
        page = await client.post(f"/orders/{a['id']}/act/accept",
                                 data={"csrf": csrf, "send_welcome_email": "on"})
        assert "the order is now Active" in page.text
        row = await console.order(a["id"])
        assert row["status"] == "Active"
        assert row["accept_options"] == {"run_module_create": False, "send_welcome_email": True,
                                         "register_domains": False}
        # Every other action, each answered, each in history under alice.
        for order_id, action, status in ((a["id"], "cancel", "Cancelled"),
                                         (a["id"], "pending", "Pending"),
                                         (a["id"], "fraud", "Fraud"),
                                         (a["id"], "delete", "Fraud"),
                                         (b["id"], "rescreen", "Pending"),
                                         (b["id"], "deny", "Cancelled")):
            page = await client.post(f"/orders/{order_id}/act/{action}", data={"csrf": csrf})
            assert page.status_code == 200
            assert f"the order is now {status}" in page.text, (action, page.text[:300])
        # Refused by the review service: its reason shown.
        refused = await client.post(f"/orders/{b['id']}/act/accept", data={"csrf": csrf})
        assert f"order {b['id']} is Cancelled; accept needs Pending" in refused.text
    assert await history(console, a["id"]) == [
        ("alice", "accept"), ("alice", "cancel"), ("alice", "pending"), ("alice", "fraud"),
        ("alice", "delete")]
    assert ("alice", "rescreen") in await history(console, b["id"])
    assert [body["operator"] for body in console.publisher.sent] == ["alice"] * 8
    assert (await console.order(a["id"]))["deleted_at"] is not None


async def test_retry_runs_parked_setups_again(console: Console) -> None:
    placed = await console.place("c-retry")
    service = await console.flow.pool.fetchval(
        "SELECT id FROM services WHERE order_id = $1", placed["id"])
    await console.flow.pool.execute(
        "INSERT INTO jobs (order_id, service_id, kind, status, attempts, last_error)"
        " VALUES ($1, $2, 'create', 'parked', 6, 'server said <b>no</b>')", placed["id"], service)
    client, csrf = await signed_in(console)
    async with aclosing(client):
        page = (await client.get(f"/orders/{placed['id']}")).text
        assert "Retry failed setups" in page and "server said &lt;b&gt;no&lt;/b&gt;" in page
        dashboard = (await client.get("/")).text
        assert "server said &lt;b&gt;no&lt;/b&gt;" in dashboard
        done = await client.post(f"/orders/{placed['id']}/act/retry", data={"csrf": csrf})
        assert "Retry failed setups: done" in done.text
    assert await console.flow.pool.fetchval(
        "SELECT status FROM jobs WHERE order_id = $1", placed["id"]) == "pending"


async def test_report_to_maxmind_needs_the_account_and_says_so(console: Console) -> None:
    placed = await console.place("c-report")
    client, csrf = await signed_in(console)
    async with aclosing(client):
        form = (await client.get(f"/orders/{placed['id']}/confirm/report")).text
        assert "Chargeback" in form
        page = await client.post(f"/orders/{placed['id']}/act/report",
                                 data={"csrf": csrf, "tag": "chargeback"})
    assert "needs MAXMIND_ACCOUNT_ID and MAXMIND_LICENSE_KEY" in page.text
    assert await history(console, placed["id"]) == []


async def test_a_note_is_kept_with_the_order_and_shown(console: Console) -> None:
    placed = await console.place("c-note")
    client, csrf = await signed_in(console)
    note = "Called the client: <b>legit</b> {{7*7}}\nsecond line"
    async with aclosing(client):
        page = await client.post(f"/orders/{placed['id']}/notes", data={"csrf": csrf,
                                                                         "note": note})
        assert "Note added." in page.text
        shown = (await client.get(f"/orders/{placed['id']}")).text
        empty = await client.post(f"/orders/{placed['id']}/notes", data={"csrf": csrf,
                                                                          "note": "  "})
        assert empty.status_code == 400
    assert "Called the client: &lt;b&gt;legit&lt;/b&gt; {{7*7}}\nsecond line" in shown
    row = await console.flow.pool.fetchrow("SELECT * FROM order_notes WHERE order_id = $1",
                                           placed["id"])
    assert (row["operator"], row["note"]) == ("alice", note)
    assert await history(console, placed["id"]) == [("alice", "note")]


async def test_bulk_cancel_asks_first_then_cancels_both(console: Console) -> None:
    one, two = await console.place("c-bulk-1"), await console.place("c-bulk-2")
    other = await console.place("c-bulk-3")
    client, csrf = await signed_in(console)
    async with aclosing(client):
        ask = await client.post("/orders/bulk", data={"csrf": csrf, "action": "cancel",
                                                      "order_id": [one["id"], two["id"]]})
        assert ask.status_code == 200 and "Cancel 2 orders" in ask.text
        assert console.publisher.sent == []  # nothing yet
        done = await client.post("/orders/bulk", data={
            "csrf": csrf, "action": "cancel", "confirm": "yes", "order_id": [one["id"], two["id"]]})
        assert done.text.count("now Cancelled") == 2
    assert [(await console.order(o["id"]))["status"] for o in (one, two, other)] == [
        "Cancelled", "Cancelled", "Pending"]


# -- hostile text ------------------------------------------------------------------------------------

async def test_hostile_client_text_is_shown_as_text(console: Console) -> None:
    body = order_body("c-hostile")
    body["client"].update(first_name=HOSTILE_FIRST, last_name=HOSTILE_LAST,
                          company=HOSTILE_COMPANY, address1="<img src=x onerror=alert(2)>")
    await console.flow.send("order.place", body)
    await console.flow.run()
    placed = await console.flow.pool.fetchrow("SELECT * FROM orders WHERE order_ref = 'c-hostile'")
    client, _ = await signed_in(console)
    async with aclosing(client):
        pages = [(await client.get(path)).text for path in (
            f"/orders/{placed['id']}", "/orders", "/orders/list", "/")]
    order_page, listing = pages[0], pages[1]
    for html in (order_page, listing):
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "{{7*7}}" in html  # shown as typed: never evaluated to 49
    for html in pages:
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "\x1b" not in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in order_page
    assert "\\x1b[31mRed Ltd" in order_page  # the terminal escape, made visible


# -- the list's queries ------------------------------------------------------------------------------

async def test_the_list_filters_searches_and_pages(console: Console) -> None:
    refs = [f"c-list-{n}" for n in range(5)]  # from addresses of their own: no velocity rule
    rows = [await console.place(ref, ip_address=f"203.0.113.{n + 20}") for n, ref in enumerate(refs)]
    business = await console.flow.pool.fetchval("SELECT id FROM products WHERE slug = 'business'")
    await console.flow.pool.execute("UPDATE services SET product_id = $1 WHERE order_id = $2",
                                    business, rows[3]["id"])
    async with console.flow.pool.acquire() as conn:
        async def ids(**filters: str) -> list[int]:
            data = await order_list.order_list(conn, order_list.OrderFilters(**filters))
            return [o["id"] for o in data["orders"]]

        all_ids = [r["id"] for r in rows]
        assert await ids() == all_ids  # oldest first
        assert await ids(q=str(rows[2]["order_number"])) == [rows[2]["id"]]
        assert await ids(q="c-list-4") == [rows[4]["id"]]
        assert await ids(q="C-LIST-1.example") == [rows[1]["id"]]  # a domain
        assert await ids(q="c-list-3@shop.example") == [rows[3]["id"]]
        assert await ids(product="business") == [rows[3]["id"]]
        assert await ids(client=str(rows[0]["client_id"])) == [rows[0]["id"]]
        assert await ids(status="Active") == []
        assert await ids(screening="passed") == all_ids
        # An order the fraud policy sends to a person (issue 16): its own screening, flagged.
        await console.flow.pool.execute("UPDATE orders SET screening = 'review' WHERE id = $1",
                                        rows[1]["id"])
        assert await ids(screening="review") == [rows[1]["id"]]
        review_page = await order_list.order_list(conn, order_list.OrderFilters(screening="review"))
        assert review_page["orders"][0]["flagged"] is True
        await console.flow.pool.execute("UPDATE orders SET screening = 'passed' WHERE id = $1",
                                        rows[1]["id"])
        assert await ids(since="2000-01-01", until="2000-01-02") == []
        # Keyset pages of two, forwards and back.
        f = order_list.OrderFilters()
        first = await order_list.order_list(conn, f, limit=2)
        assert [o["id"] for o in first["orders"]] == all_ids[:2]
        assert (first["more_after"], first["more_before"], first["count"]) == (True, False, (5, False))
        second = await order_list.order_list(conn, f, after=first["last_id"], limit=2)
        assert [o["id"] for o in second["orders"]] == all_ids[2:4]
        assert (second["more_after"], second["more_before"]) == (True, True)
        back = await order_list.order_list(conn, f, before=second["first_id"], limit=2)
        assert [o["id"] for o in back["orders"]] == all_ids[:2]
        assert back["more_before"] is False
        with pytest.raises(order_list.FilterError, match="not a date"):
            await order_list.order_list(conn, order_list.OrderFilters(since="yesterday"))


async def test_the_console_reads_on_a_read_only_pool(console: Console) -> None:
    async with console.state.pool.acquire() as conn:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("UPDATE orders SET status = 'Active'")


# -- the CLI's operator accounts --------------------------------------------------------------------

def ordermill(settings: Settings, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", *args], input=stdin,
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={"PYTHONPATH": str(ROOT), "DATABASE_URL": settings.database_url,
             "PATH": "/usr/bin:/bin"})


@pytest.mark.slow  # a process per command
async def test_operator_accounts_from_the_cli(db_settings: Settings) -> None:
    s = db_settings
    added = ordermill(s, "operator", "add", "carol", "--role", "viewer", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert "operator carol added (viewer)" in added.stdout
    short = ordermill(s, "operator", "add", "dave", "--role", "reviewer", stdin="short\n")
    assert short.returncode == 1 and short.stderr.startswith("error: the password needs")
    twice = ordermill(s, "operator", "add", "Carol", "--role", "viewer", stdin=PASSWORD + "\n")
    assert twice.stderr.strip() == "error: operator 'Carol' exists already"
    listed = ordermill(s, "operator", "list", "--json")
    assert '"name": "carol"' in listed.stdout and '"role": "viewer"' in listed.stdout
    conn = await asyncpg.connect(s.database_url)
    try:
        stored = await conn.fetchval("SELECT password_hash FROM operators WHERE name = 'carol'")
        assert stored.startswith("$argon2id$") and PASSWORD not in stored
        assert ordermill(s, "operator", "passwd", "carol",
                         stdin="a new long password\n").returncode == 0
        assert await conn.fetchval("SELECT password_hash FROM operators") != stored
        assert ordermill(s, "operator", "remove", "carol").returncode == 0
        assert await conn.fetchval("SELECT count(*) FROM operators") == 0
        gone = ordermill(s, "operator", "remove", "carol")
        assert gone.stderr.strip() == "error: no operator 'carol'"
    finally:
        await conn.close()
