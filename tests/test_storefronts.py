"""Storefronts are separate (docs/contract.md, section 8; issue 11): order_ref and clients per storefront,
payments by an ambiguous ref kept unapplied, and EPP codes at rest. Real broker and database;
each storefront publishes as its own RabbitMQ user (made here, removed after), which the broker
checks the message's user_id against."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
from cryptography.fernet import Fernet
from test_cli import cli

from conftest import RUN_ID, Harness, _with_db, eventually, order_body
from services.fraud.handlers import Screener
from services.fraud.providers.rules import RulesProvider
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.registrars.base import DomainRequest, RegistrarResult
from services.provisioning.registrars.manual import ManualRegistrar
from services.provisioning.worker import worker as provisioning_worker
from shared import broker, db
from shared.epp_codes import EppCodes
from shared.settings import Settings
from shared.topology import Names, declare_topology

FAST_JOBS = {"job_backoff_seconds": 0.2, "job_poll_seconds": 0.5}


# -- storefronts as RabbitMQ users -------------------------------------------------------------

@dataclass(frozen=True)
class User:
    name: str
    password: str


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[User, User]]:
    """Two storefront users, named for this run, with rights on the default virtual host."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("needs rabbitmqctl to make the storefronts' RabbitMQ users")
    made = [User(f"om-shop-{RUN_ID}-{n}", uuid.uuid4().hex) for n in ("a", "b")]
    try:
        for user in made:
            _rabbitmqctl("add_user", user.name, user.password)
            _rabbitmqctl("set_permissions", "-p", "/", user.name, ".*", ".*", ".*")
        yield made[0], made[1]
    finally:
        for user in made:
            subprocess.run(["rabbitmqctl", "delete_user", user.name], capture_output=True,
                           timeout=60)


@pytest.fixture
def settings(settings: Settings, users: tuple[User, User]) -> Settings:
    """The run's settings, with the two storefront users named as storefronts: a worker
    takes orders only from the users it is told are storefronts."""
    return settings.model_copy(update={"storefront_users": [
        *settings.storefront_users, *(user.name for user in users)]})


@dataclass
class Storefront:
    user: str
    exchange: aio_pika.abc.AbstractExchange

    async def place(self, body: dict[str, Any]) -> str:
        message = broker.json_message(body, routing_key="order.place", user_id=self.user)
        await broker.publish(self.exchange, "order.place", message)
        return message.message_id


@asynccontextmanager
async def storefront(h: Harness, user: User) -> AsyncIterator[Storefront]:
    parts = urlsplit(h.settings.amqp_url)
    netloc = f"{quote(user.name, safe='')}:{user.password}@{parts.hostname}:{parts.port or 5672}"
    connection = await aio_pika.connect(urlunsplit(parts._replace(netloc=netloc)))
    async with connection:
        channel = await broker.open_publisher(connection)
        yield Storefront(user.name, await channel.get_exchange(h.names.exchange))


def workers(settings: Settings, *names: str) -> list[Any]:
    make = {"placement": placement_worker, "fraud": fraud_worker,
            "provisioning": provisioning_worker}
    return [make[n](settings) for n in names or make]


async def orders_of(h: Harness, ref: str) -> list[asyncpg.Record]:
    return await h.pool.fetch("SELECT * FROM orders WHERE order_ref = $1 ORDER BY id", ref)


async def handled(h: Harness, message_id: str) -> bool:
    return await h.pool.fetchval(
        "SELECT true FROM inbox WHERE consumer = 'placement' AND message_id = $1", message_id
    ) is True


async def payment(h: Harness, transaction_id: str) -> asyncpg.Record | None:
    return await h.pool.fetchrow("SELECT * FROM payments WHERE transaction_id = $1",
                                 transaction_id)


async def pay(h: Harness, txn: str, amount: str, **target: Any) -> None:
    await h.publish("payment.received", {"amount": amount, "currency": "USD",
                                         "gateway": "stripe", "transaction_id": txn, **target})


async def settled(h: Harness, txn: str, status: str) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        row = await payment(h, txn)
        return row if row is not None and row["status"] == status and (
            status == "applied" or row["reason"]) else None
    return await eventually(check)


# -- order_ref ---------------------------------------------------------------------------------

async def test_two_storefronts_may_use_one_ref_and_a_payment_by_it_pays_neither(
    harness: Harness, users: tuple[User, User],
) -> None:
    listener = await harness.listen("order.placed", "order.rejected")
    harness.settings = harness.settings.model_copy(update=FAST_JOBS)
    await harness.start(workers(harness.settings))
    a, b = users
    ref = "shop-000123"
    async with storefront(harness, a) as shop_a, storefront(harness, b) as shop_b:
        await shop_a.place(order_body(ref, client={"email": "ann@a.example"}))
        first = await eventually(lambda: orders_of(harness, ref))
        # The squatter's order under the same ref is an order of its own, not dropped.
        await shop_b.place(order_body(ref, client={"email": "eve@b.example"}))
        both = await eventually(
            lambda: _at_least(orders_of(harness, ref), 2))
        # The same storefront placing its ref again is still one order.
        again = await shop_a.place(order_body(ref, client={"email": "ann@a.example"}))
        await eventually(lambda: handled(harness, again))
    assert len(await orders_of(harness, ref)) == 2
    assert {(o["storefront"], o["id"] == first[0]["id"]) for o in both} == {
        (a.name, True), (b.name, False)}
    # order.placed names the storefront, so each storefront's listener can keep its own.
    placed = await listener.wait_for("order.placed", lambda e: e["storefront"] == b.name)
    assert placed["order_ref"] == ref
    assert not listener.bodies("order.rejected")
    squat = next(o for o in both if o["storefront"] == b.name)
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM order_history WHERE order_id = $1"
        " AND action = 'order_ref shared with another storefront'", squat["id"]) == 1

    # A gateway's payment naming only the ref cannot say whose order it pays: kept, unapplied.
    await pay(harness, "ch_ambiguous", "28.95", order_ref=ref)
    kept = await settled(harness, "ch_ambiguous", "unapplied")
    assert "more than one storefront" in kept["reason"]
    assert kept["invoice_id"] is None
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM invoices i JOIN orders o ON o.id = i.order_id"
        " WHERE o.order_ref = $1 AND i.amount_paid > 0", ref) == 0
    # By invoice id it is the victim's, and it is applied.
    invoice = await harness.pool.fetchval(
        "SELECT id FROM invoices WHERE order_id = $1", first[0]["id"])
    await pay(harness, "ch_by_invoice", "28.95", invoice_id=invoice)
    assert (await settled(harness, "ch_by_invoice", "applied"))["invoice_id"] == invoice


async def _at_least(rows_coro: Any, n: int) -> list[asyncpg.Record] | None:
    rows = await rows_coro
    return rows if len(rows) >= n else None


# -- clients -----------------------------------------------------------------------------------

async def test_a_storefront_naming_anothers_client_by_email_gets_a_client_of_its_own(
    harness: Harness, users: tuple[User, User],
) -> None:
    store = await harness.listen("email.send")
    await harness.start(workers(harness.settings, "placement", "fraud"))
    a, b = users
    async with storefront(harness, a) as shop_a, storefront(harness, b) as shop_b:
        await shop_a.place(order_body("a-1", client={"email": "ann@victim.example",
                                                     "first_name": "Ann"}))
        victim = await harness.screened("a-1")
        await shop_b.place(order_body("b-1", client={"email": "ANN@victim.example",
                                                     "first_name": "Mallory"}))
        squat = await harness.screened("b-1")
        await shop_a.place(order_body("a-2", client={"email": "Ann@Victim.example"}))
        again = await harness.screened("a-2")
    assert squat["client_id"] != victim["client_id"]
    assert again["client_id"] == victim["client_id"]  # the storefront's own client is reused
    clients = {r["id"]: r for r in await harness.pool.fetch("SELECT * FROM clients")}
    assert (clients[victim["client_id"]]["storefront"],
            clients[victim["client_id"]]["first_name"]) == (a.name, "Ann")
    assert clients[squat["client_id"]]["storefront"] == b.name
    # The victim's client has only its own order: the squatter's mails are about its client.
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM orders WHERE client_id = $1", victim["client_id"]) == 2
    await eventually(lambda: _mails_for(store, squat["id"]))


async def _mails_for(store: Any, order_id: int) -> list[dict[str, Any]] | None:
    return [m for m in store.bodies("email.send") if m["order_id"] == order_id] or None


async def test_a_storefront_names_by_id_only_its_own_or_a_linked_client(
    harness: Harness, users: tuple[User, User],
) -> None:
    listener = await harness.listen("order.rejected")
    # guest (the harness's own connection) is the operator.
    operator = harness.settings.model_copy(update={"operator_users": ["guest"]})
    await harness.start(workers(operator, "placement", "fraud"))
    a, b = users
    async with storefront(harness, a) as shop_a, storefront(harness, b) as shop_b:
        await shop_a.place(order_body("own-1"))
        victim = await harness.screened("own-1")
        client_id = victim["client_id"]
        await shop_a.place(order_body("own-2", client={"id": client_id}))
        assert (await harness.screened("own-2"))["client_id"] == client_id

        await shop_b.place(order_body("steal-1", client={"id": client_id}))
        refused = await listener.wait_for("order.rejected", lambda e: e["order_ref"] == "steal-1")
        assert refused["reason"] == f"unknown client {client_id}"
        assert await orders_of(harness, "steal-1") == []
        # The same answer as for a client that does not exist at all.
        await shop_b.place(order_body("steal-2", client={"id": client_id + 1000}))
        missing = await listener.wait_for("order.rejected", lambda e: e["order_ref"] == "steal-2")
        assert missing["reason"] == f"unknown client {client_id + 1000}"

        # An operator may name any client.
        await harness.publish("order.place", order_body("op-1", client={"id": client_id}),
                              user_id="guest")
        assert (await harness.screened("op-1"))["client_id"] == client_id

        # Once an operator links the client to storefront B, B may use it, by id and by email.
        code, out, err = await cli(harness.settings, "clients", "link", str(client_id), b.name)
        assert code == 0, err
        assert "linked" in out
        await shop_b.place(order_body("linked-1", client={"id": client_id}))
        assert (await harness.screened("linked-1"))["client_id"] == client_id
        await shop_b.place(order_body("linked-2", client={"email": "own-1@shop.example"}))
        assert (await harness.screened("linked-2"))["client_id"] == client_id
        assert await harness.pool.fetchval(
            "SELECT linked_by FROM client_storefronts WHERE storefront = $1 AND client_id = $2",
            b.name, client_id) == "guest"
        # Unlinked again: refused again; the creator's link cannot be removed.
        code, _, _ = await cli(harness.settings, "clients", "unlink", str(client_id), b.name)
        assert code == 0
        code, _, err = await cli(harness.settings, "clients", "unlink", str(client_id), a.name)
        assert code == 1 and "created by storefront" in err
        await shop_b.place(order_body("steal-3", client={"id": client_id}))
        await listener.wait_for("order.rejected", lambda e: e["order_ref"] == "steal-3")


async def test_skipping_screening_for_existing_clients_is_only_for_own_clients(
    harness: Harness, users: tuple[User, User],
) -> None:
    settings = harness.settings.model_copy(update={"fraud_skip_existing_clients": True})
    listener = await harness.listen("order.rejected")
    await harness.start(workers(settings, "placement", "fraud"))
    a, b = users
    async with storefront(harness, a) as shop_a, storefront(harness, b) as shop_b:
        await shop_a.place(order_body("vip-1"))
        vip = await harness.screened("vip-1")
        await harness.pool.execute("UPDATE orders SET status = 'Active' WHERE id = $1", vip["id"])
        # Someone else's client id, from a banned address: not skipped (refused outright).
        await shop_b.place(order_body("vip-steal", client={"id": vip["client_id"]},
                                      ip_address="192.0.2.66"))
        await listener.wait_for("order.rejected", lambda e: e["order_ref"] == "vip-steal")
        assert await orders_of(harness, "vip-steal") == []
        # The storefront's own client with an Active order still skips.
        await shop_a.place(order_body("vip-2", client={"id": vip["client_id"]}))
        assert (await harness.screened("vip-2"))["screening"] == "skipped"


def test_screening_skips_only_when_the_orders_storefront_may_use_its_client(
    settings: Settings,
) -> None:
    """Fraud checks it again, whatever stored the order: an order whose client is not its
    storefront's own is screened, unless an operator placed it."""
    s = settings.model_copy(update={"fraud_skip_existing_clients": True,
                                    "operator_users": ["desk"]})
    screener = Screener(s.fraud, RulesProvider(s.rules))
    order = {"client_named_by_id": True, "active_orders": 1, "own_client": False,
             "placed_by": "shop-b"}
    assert screener._skip(order) is None
    assert screener._skip({**order, "own_client": True}) is not None
    assert screener._skip({**order, "placed_by": "desk"}) is not None
    assert screener._skip({**order, "placed_by": None}) is None


# -- EPP codes at rest -------------------------------------------------------------------------

async def test_epp_codes_are_encrypted_at_rest_and_dropped_once_transferred(
    harness: Harness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("EPP_CODE_KEY", key)
    code = "Sup3r-Secret-EPP"
    seen: list[str | None] = []

    async def transfer(self: ManualRegistrar, request: DomainRequest) -> RegistrarResult:
        seen.append(request.epp_code)
        assert code not in repr(request)
        return RegistrarResult.success("Pending Transfer")  # as a registry would answer

    monkeypatch.setattr(ManualRegistrar, "transfer", transfer)
    # .com transfers automatically once paid; here through the (recording) manual registrar.
    await harness.pool.execute("UPDATE tlds SET registrar = 'manual' WHERE tld = 'com'")
    harness.settings = harness.settings.model_copy(update=FAST_JOBS)
    await harness.start(workers(harness.settings))
    body = order_body("epp-1", items=[
        {"type": "domain", "domain": "epp-1.com", "action": "transfer", "epp_code": code}])
    await harness.publish("order.place", body)
    order = await harness.screened("epp-1")
    stored = await harness.pool.fetchval(
        "SELECT epp_code FROM domains WHERE order_id = $1", order["id"])
    assert code not in stored
    assert stored.startswith("fernet:")
    assert EppCodes.from_environ({"EPP_CODE_KEY": key}).unseal(stored) == code
    # Never shown either.
    _, shown, _ = await cli(harness.settings, "show", str(order["id"]), "--json")
    assert code not in shown and stored not in shown

    invoice = await harness.pool.fetchrow("SELECT * FROM invoices WHERE order_id = $1",
                                          order["id"])
    await pay(harness, "ch_epp", str(invoice["total"]), invoice_id=invoice["id"])

    async def transferred() -> bool:
        return await harness.pool.fetchval(
            "SELECT status = 'Pending Transfer' AND epp_code IS NULL FROM domains"
            " WHERE order_id = $1", order["id"])
    await eventually(transferred)
    assert seen == [code]  # the registrar got the code itself, once


def test_an_epp_code_key_that_is_not_a_fernet_key_stops_the_worker(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EPP_CODE_KEY", "not-a-key")
    with pytest.raises(ValueError, match="EPP_CODE_KEY is not a Fernet key"):
        placement_worker(settings)
    with pytest.raises(ValueError, match="EPP_CODE_KEY is not a Fernet key"):
        provisioning_worker(settings)


# -- the migration of existing data ------------------------------------------------------------

async def _migrate_until(pool: asyncpg.Pool, version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    every = db._migration_files()
    with monkeypatch.context() as m:
        m.setattr(db, "_migration_files", lambda: [f for f in every if f[0] < version])
        await db.migrate(pool)


@pytest.fixture
async def legacy(settings: Settings, users: tuple[User, User],
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    """The test's database as the previous release left it, with an order and a client of
    storefront A's (and one placed without a user_id), then migrated to this release."""
    from cli.catalog import load_catalog, read_catalog
    from conftest import ROOT

    name = urlsplit(settings.database_url).path.lstrip("/")
    admin = await asyncpg.connect(_with_db(settings.database_url, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    pool = await db.create_pool(settings.database_url, max_size=4, attempts=3)
    await _migrate_until(pool, "0011", monkeypatch)
    async with pool.acquire() as conn:
        await load_catalog(conn, read_catalog(ROOT / "catalog.example.toml"))
        await conn.execute(
            "INSERT INTO clients (id, email, first_name) VALUES (9001, 'old@a.example', 'Old'),"
            " (9002, 'anon@x.example', 'Anon');"
            "INSERT INTO orders (id, order_ref, order_number, client_id, currency,"
            " send_confirmation, generate_invoice, total, placed_by, screening) VALUES"
            f" (7001, 'legacy-1', 1000000001, 9001, 'USD', true, true, 12.00,"
            f"  '{users[0].name}', 'passed'),"
            " (7002, 'legacy-anon', 1000000002, 9002, 'USD', true, true, 12.00, NULL, 'passed');"
            "INSERT INTO domains (order_id, domain, tld, action, years, epp_code, amount) VALUES"
            " (7001, 'legacy-1.com', 'com', 'transfer', 1, 'old-code', 12.00);"
            "INSERT INTO invoices (id, order_id, client_id, status, currency, subtotal, total)"
            " VALUES (8001, 7001, 9001, 'Unpaid', 'USD', 12.00, 12.00);"
            "SELECT setval('clients_id_seq', 9100); SELECT setval('orders_id_seq', 7100);"
            "SELECT setval('invoices_id_seq', 8100);")
    await db.migrate(pool)  # this release's migrations
    connection = await broker.connect(settings.amqp_url, attempts=3)
    channel = await broker.open_publisher(connection)
    await declare_topology(connection, Names(settings.namespace),
                           delivery_limit=settings.queue_delivery_limit)
    exchange = await channel.get_exchange(Names(settings.namespace).exchange)
    h = Harness(settings.model_copy(update=FAST_JOBS), Names(settings.namespace), pool,
                connection, exchange)
    try:
        yield h
    finally:
        await h.stop_all()
        await connection.close()
        await pool.close()


async def test_the_migration_keeps_existing_orders_and_clients_usable(
    legacy: Harness, users: tuple[User, User],
) -> None:
    h = legacy
    a, b = users
    rows = {r["id"]: r for r in await h.pool.fetch("SELECT * FROM orders")}
    assert (rows[7001]["storefront"], rows[7002]["storefront"]) == (a.name, "")
    assert await h.pool.fetchval("SELECT storefront FROM clients WHERE id = 9001") == a.name
    assert await h.pool.fetchval(
        "SELECT epp_code FROM domains WHERE order_id = 7001") == "plain:old-code"
    assert EppCodes().unseal("plain:old-code") == "old-code"

    listener = await h.listen("order.rejected")
    await h.start(workers(h.settings))
    async with storefront(h, a) as shop_a, storefront(h, b) as shop_b:
        # Re-sent after the upgrade, the old order is still the same order.
        again = await shop_a.place(order_body("legacy-1", client={"email": "old@a.example"}))
        await eventually(lambda: handled(h, again))
        assert [o["id"] for o in await orders_of(h, "legacy-1")] == [7001]
        # Its client is still storefront A's, by id and by email.
        await shop_a.place(order_body("new-1", client={"id": 9001}))
        await shop_a.place(order_body("new-2", client={"email": "OLD@a.example"}))
        assert (await h.screened("new-1"))["client_id"] == 9001
        assert (await h.screened("new-2"))["client_id"] == 9001
        # ...and not storefront B's.
        await shop_b.place(order_body("new-3", client={"id": 9001}))
        await listener.wait_for("order.rejected", lambda e: e["order_ref"] == "new-3")
    # The anonymous storefront's order and client are the anonymous storefront's.
    await h.publish("order.place", order_body("anon-2", client={"id": 9002}))
    assert (await h.screened("anon-2"))["client_id"] == 9002
    # A payment by the old ref is applied to the old order.
    await pay(h, "ch_legacy", "12.00", order_ref="legacy-1")
    assert (await settled(h, "ch_legacy", "applied"))["invoice_id"] == 8001
