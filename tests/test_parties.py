"""Who may publish what: every route checks the broker-validated publisher (shared/parties.py).

The attacks of issue 11 run with a second, real RabbitMQ user (a storefront) made by the test.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from test_cli import cli

from conftest import TEST_USER, Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.notify.worker import worker as notify_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.worker import worker as provisioning_worker
from services.review.worker import worker as review_worker
from shared import broker
from shared.parties import (
    INTERNAL,
    OPERATORS,
    PLACERS,
    REPLAY_OF_HEADER,
    Party,
    Publishers,
    UnknownPublishers,
)
from shared.runtime import Runtime
from shared.settings import Settings

# -- the rules, without servers ---------------------------------------------------------------

PUBLISHERS = Publishers({Party.STOREFRONT: frozenset({"shop"}), Party.GATEWAY: frozenset({"pay"}),
                         Party.OPERATOR: frozenset({"alice"}), Party.CONSOLE: frozenset(),
                         Party.SERVICE: frozenset({"om"})})


def test_a_route_takes_only_its_parties() -> None:
    assert PUBLISHERS.check("shop", PLACERS).allowed
    assert PUBLISHERS.check("om", INTERNAL).allowed
    refused = PUBLISHERS.check("shop", INTERNAL)
    assert not refused.allowed
    assert refused.reason == "publisher 'shop' may not send this: it needs a service user"
    assert PUBLISHERS.check("shop", OPERATORS).reason == (
        "publisher 'shop' may not send this: it needs a console or operator user")
    assert PUBLISHERS.check(None, PLACERS).reason.startswith("publisher unknown")
    assert Publishers(PUBLISHERS.users, trust_any=True).check(None, INTERNAL).allowed


def test_only_an_operator_replays_for_someone_else() -> None:
    replayed = PUBLISHERS.check("alice", PLACERS, replay_of="shop")
    assert (replayed.allowed, replayed.user, replayed.replayed_by) == (True, "shop", "alice")
    assert replayed.parties == {Party.STOREFRONT}  # the storefront's rights, not alice's
    # A storefront naming a service as the first publisher is still itself.
    forged = PUBLISHERS.check("shop", INTERNAL, replay_of="om")
    assert (forged.allowed, forged.user, forged.replayed_by) == (False, "shop", None)


def test_closed_by_default_names_the_settings() -> None:
    empty = Publishers({party: frozenset() for party in Party})
    with pytest.raises(UnknownPublishers) as refused:
        empty.require("placement", [("order.place", PLACERS)])
    assert str(refused.value) == (
        "placement: no user may publish order.place: set CONSOLE_USERS, OPERATOR_USERS,"
        " STOREFRONT_USERS (comma-separated RabbitMQ users), or TRUST_ANY_PUBLISHER=true for"
        " development")
    Publishers(empty.users, trust_any=True).require("placement", [("order.place", PLACERS)])


# -- with the broker ----------------------------------------------------------------------------

def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
async def storefront(harness: Harness) -> AsyncIterator[tuple[str, aio_pika.abc.AbstractExchange]]:
    """A RabbitMQ user of its own with full rights on the vhost, as a storefront given the
    namespace-wide rights the README used to lead to: only Ordermill's checks stop it."""
    name, password = f"shop-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rabbitmqctl("add_user", name, password)
    try:
        rabbitmqctl("set_permissions", "-p", "/", name, ".*", ".*", ".*")
        parts = urlsplit(harness.settings.amqp_url)
        url = urlunsplit(parts._replace(netloc=f"{name}:{password}@{parts.hostname}:{parts.port or 5672}"))
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await broker.open_publisher(connection)
            yield name, await channel.get_exchange(harness.names.exchange)
    finally:
        rabbitmqctl("delete_user", name)


async def send(exchange: aio_pika.abc.AbstractExchange, user: str | None, key: str,
               body: dict[str, Any], **props: Any) -> str:
    message = broker.json_message(body, routing_key=key, user_id=user, **props)
    await broker.publish(exchange, key, message)
    return message.message_id


async def reasons(harness: Harness, service: str, count: int) -> dict[str, str]:
    found: dict[str, str] = {}

    async def all_there() -> dict[str, str] | None:
        for letter in await harness.dead_letters(service):
            found[letter.message_id or ""] = letter.headers["x-ordermill-reason"]
        return found if len(found) >= count else None
    return await eventually(all_there)


async def test_a_worker_without_publishers_refuses_to_start(settings: Settings) -> None:
    closed = settings.model_copy(update={"storefront_users": [], "operator_users": []})
    runtime = Runtime(closed)
    with pytest.raises(UnknownPublishers, match=r"placement: no user may publish order\.place"):
        await runtime.serve([placement_worker(closed)])
    code, _out, err = await cli(closed, "run", "placement", STOREFRONT_USERS="", OPERATOR_USERS="")
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1:] == [
        "error: placement: no user may publish order.place: set CONSOLE_USERS, OPERATOR_USERS,"
        " STOREFRONT_USERS (comma-separated RabbitMQ users), or TRUST_ANY_PUBLISHER=true for"
        " development"]


async def test_a_storefront_cannot_send_what_only_operators_and_services_may(
    harness: Harness, storefront: tuple[str, aio_pika.abc.AbstractExchange],
) -> None:
    shop, as_shop = storefront
    s = harness.settings
    await harness.start([placement_worker(s), fraud_worker(s), provisioning_worker(s),
                         review_worker(s), notify_worker(s)], storefront_users=[shop])
    await send(as_shop, shop, "order.place", order_body("victim-1"))
    victim = await harness.screened("victim-1")
    assert (victim["status"], victim["screening"]) == ("Pending", "passed")

    forged = {
        # An operator's action: an unpaid order accepted (its account created).
        "review": await send(as_shop, shop, "review.command",
                             {"order_id": victim["id"], "action": "accept", "operator": "alice"}),
        # Internal commands and events: a mail to itself, a re-screen, a setup retried.
        "notify": await send(as_shop, shop, "email.send", {
            "template": "order_confirmation", "recipient": "thief@evil.example",
            "order_id": victim["id"], "order_ref": "victim-1",
            "dedupe_key": f"order_confirmation:{victim['id']}"}),
        "fraud": await send(as_shop, shop, "order.rescreen", {
            "order_id": victim["id"], "order_ref": "victim-1", "operator": "alice"}),
        "provisioning": await send(as_shop, shop, "order.accepted", {
            "order_id": victim["id"], "order_ref": "victim-1", "operator": "alice",
            "options": {"run_module_create": True}}),
    }
    for service, message_id in forged.items():
        found = await reasons(harness, service, 1)
        assert found[message_id].startswith(f"publisher '{shop}' may not send this: it needs a"), (
            service, found)
    order = await harness.pool.fetchrow("SELECT * FROM orders WHERE id = $1", victim["id"])
    assert (order["status"], order["accept_options"]) == ("Pending", None)
    assert await harness.pool.fetchval("SELECT count(*) FROM emails WHERE recipient LIKE"
                                       " 'thief%'") == 0
    assert await harness.pool.fetchval("SELECT count(*) FROM jobs") == 0
    # Claiming to be replayed for the operator changes nothing: only an operator replays.
    await send(as_shop, shop, "order.place", order_body("noinv-forged", generate_invoice=False),
               headers={REPLAY_OF_HEADER: TEST_USER})
    placed = await harness.screened("noinv-forged")
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM invoices WHERE order_id = $1", placed["id"]) == 1


async def test_a_replayed_order_keeps_its_first_publisher(
    harness: Harness, storefront: tuple[str, aio_pika.abc.AbstractExchange],
) -> None:
    """The operator's replay of a storefront's dead letter is the storefront's order still:
    invoiced although it asked for none, which only an operator may."""
    shop, as_shop = storefront
    s = harness.settings
    await harness.start([placement_worker(s)], relay=False, storefront_users=[shop])
    bad = order_body("replayed-1", currency="EUR", generate_invoice=False)
    bad["items"] = [{"type": "product", "product": "business", "billing_cycle": "monthly",
                     "domain": "replayed-1.example"}]  # no EUR price for business yet
    dead_id = await send(as_shop, shop, "order.place", bad)

    async def listed() -> bool:
        _code, out, _ = await cli(s, "dead-letters", "placement", "--json")
        return dead_id in out
    await eventually(listed, timeout=20)
    await harness.pool.execute(
        "INSERT INTO product_prices (product_id, currency, billing_cycle, price)"
        " SELECT id, 'EUR', 'monthly', 11.00 FROM products WHERE slug = 'business'")
    code, _out, err = await cli(s, "dead-letters", "--replay", "--json")  # as the operator
    assert code == 0, err
    replayed = await eventually(lambda: harness.order("replayed-1"))
    assert replayed["generate_invoice"] is True
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM invoices WHERE order_id = $1", replayed["id"]) == 1


# -- the whole pipeline under least-privilege users -----------------------------------------------

async def test_the_pipeline_runs_with_a_user_per_party(harness: Harness, tmp_path: Path) -> None:
    """`ordermill broker users` makes the users; RabbitMQ enforces their rights; every worker
    runs under its own user and takes messages only from the parties it trusts."""
    s = harness.settings
    tag = uuid.uuid4().hex[:6]
    shop, gateway, operator, prefix = f"shop-{tag}", f"pay-{tag}", f"ops-{tag}", f"om-{tag}"
    definitions, secrets = tmp_path / "definitions.json", tmp_path / "secrets"
    code, out, err = await cli(s, "broker", "users", "--storefront", shop, "--gateway", gateway,
                               "--operator", operator, "--prefix", prefix, "--out",
                               str(definitions), "--secrets-dir", str(secrets), "--json")
    assert code == 0, err
    made = json.loads(out)
    users = [u["name"] for u in made["users"]]
    assert all(password not in out for password in _passwords(secrets).values())
    # The broker reads the file itself, as its own system user: not from pytest's 0700 folder.
    shared_dir = Path(tempfile.mkdtemp(prefix="om-defs-"))
    shared_dir.chmod(0o755)
    readable = shared_dir / "definitions.json"
    readable.write_text(definitions.read_text())
    readable.chmod(0o644)
    rabbitmqctl("import_definitions", str(readable))
    try:
        await eventually(lambda: _all_exist(users), timeout=30, interval=0.5)
        passwords = _passwords(secrets)
        env = made["settings"]
        parties = {"storefront_users": [shop], "payment_publishers": [gateway],
                   "operator_users": [operator], "console_users": [],
                   "service_users": env["SERVICE_USERS"].split(",")}
        for service, factory in (("placement", placement_worker), ("fraud", fraud_worker),
                                 ("provisioning", provisioning_worker),
                                 ("review", review_worker), ("notify", notify_worker)):
            url = _as(s.amqp_url, f"{prefix}-{service}", passwords[f"{prefix}-{service}"])
            own = s.model_copy(update={**parties, "amqp_url": url})
            await harness.start([factory(own)], amqp_url=url, **parties)

        shop_url = _as(s.amqp_url, shop, passwords[shop])
        async with await aio_pika.connect(shop_url) as connection:
            exchange = await (await broker.open_publisher(connection)).get_exchange(s.namespace)
            await send(exchange, shop, "order.place", order_body("least-1"))
            # RabbitMQ itself refuses what the storefront may not publish at all.
            with pytest.raises(Exception, match="ACCESS_REFUSED"):
                await send(exchange, shop, "review.command", {"order_id": 1, "action": "accept"})
        order = await harness.screened("least-1")
        assert (order["status"], order["screening"]) == ("Pending", "passed")
        invoice = await harness.pool.fetchrow("SELECT * FROM invoices WHERE order_id = $1",
                                              order["id"])
        async with await aio_pika.connect(_as(s.amqp_url, gateway, passwords[gateway])) as conn:
            exchange = await (await broker.open_publisher(conn)).get_exchange(s.namespace)
            await send(exchange, gateway, "payment.received", {
                "invoice_id": invoice["id"], "amount": str(invoice["total"]), "currency": "USD",
                "gateway": "stripe", "transaction_id": f"least-{tag}"})

        async def paid() -> bool:
            return await harness.pool.fetchval(
                "SELECT status FROM invoices WHERE id = $1", invoice["id"]) == "Paid"
        await eventually(paid)
        ops = s.model_copy(update={**parties,
                                   "amqp_url": _as(s.amqp_url, operator, passwords[operator])})
        code, out, err = await cli(ops, "accept", str(order["id"]), OPERATOR_USERS=operator)
        assert (code, out.strip()) == (0, f"order {order['id']}: Active"), err
        assert await harness.pool.fetchval(
            "SELECT actor FROM order_history WHERE order_id = $1 AND action = 'accept'",
            order["id"]) == operator
        # The mail worker took the confirmation from the placement service's user.
        await eventually(lambda: harness.pool.fetchval(
            "SELECT count(*) FROM emails WHERE order_id = $1", order["id"]))
        await harness.stop_all()
    finally:
        forget(users)


async def _all_exist(users: list[str]) -> bool:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", "list_users", stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    listed = {line.split("\t")[0] for line in out.decode().splitlines()}
    return set(users) <= listed


def forget(users: list[str]) -> None:
    for name in users:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True,
                       timeout=60, check=False)


def _passwords(folder: Path) -> dict[str, str]:
    return {p.stem: p.read_text().strip() for p in folder.glob("*.password")}


def _as(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port or 5672}"))
