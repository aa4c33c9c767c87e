"""Outbound webhooks against a real receiver on 127.0.0.1 and a real database: signatures
verified by the spec's algorithm (written here again) and by the `standardwebhooks` package,
retries with one webhook-id, 410, SSRF refusals at add and at delivery, no redirects, a
bounded answer, a timeout; events into deliveries through the broker-free harness."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest
from cryptography.fernet import Fernet
from fakes.receiver import Answer, Receiver
from prometheus_client import REGISTRY
from pydantic import SecretStr
from standardwebhooks import Webhook

from conftest import eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.webhooks import endpoints as ops
from services.webhooks import signing
from services.webhooks.addresses import AddressRefused, Lookup, Policy, kind, system_lookup, vet_url
from services.webhooks.outbound import (
    EVENT_TYPES,
    enqueue_to_endpoint,
    enqueue_to_subscribers,
    webhook_id_for,
)
from services.webhooks.sealing import Sealer
from services.webhooks.sender import WebhookSender
from services.webhooks.worker import worker as webhooks_worker
from shared.metrics import WEBHOOK_DELIVERIES_BY_STATE, DatabaseGauges
from shared.runtime.testing import InMemoryFlow
from shared.settings import Settings
from shared.topology import SERVICE_BINDINGS

LOCAL = ["127.0.0.1/32"]
FAST = {"webhook_allow_networks": LOCAL, "webhook_retry_seconds": (0.2, 0.2, 0.2),
        "job_poll_seconds": 0.2, "webhook_timeout_seconds": 5.0}


def spec_verifies(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The Standard Webhooks algorithm, written from the specification (not signing.py): the
    base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` keyed with the secret's decoded bytes."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = headers["webhook-id"].encode() + b"." + headers["webhook-timestamp"].encode() + b"." + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, s) for s in headers["webhook-signature"].split(" "))


def package_verifies(secret: str, headers: dict[str, str], body: bytes) -> Any:
    return Webhook(secret).verify(body, headers)  # raises WebhookVerificationError


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


@contextlib.asynccontextmanager
async def sending(settings: Settings, pool: asyncpg.Pool, lookup: Lookup = system_lookup,
                  **overrides: Any) -> AsyncIterator[WebhookSender]:
    s = settings.model_copy(update={**FAST, **overrides})
    sender = WebhookSender(s.webhooks, s.database_url, lookup=lookup)
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(pool, stop))
    try:
        yield sender
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def add(pool: asyncpg.Pool, url: str, events: Sequence[str] = ("*",), *,
              networks: Sequence[str] = LOCAL, sealer: Sealer = Sealer(),
              lookup: Lookup = system_lookup, secret: str | None = None) -> tuple[int, str]:
    async with pool.acquire() as conn:
        endpoint, secret = await ops.add(conn, url, list(events), policy=Policy.of(networks),
                                         sealer=sealer, lookup=lookup, secret=secret)
    return endpoint["id"], secret


async def enqueue(pool: asyncpg.Pool, event_id: str = "ev-1", key: str = "order.placed",
                  data: dict[str, Any] | None = None) -> int:
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue_to_subscribers(conn, key, data or {"order_id": 1}, event_id=event_id)


async def delivery(pool: asyncpg.Pool, endpoint_id: int) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM webhook_deliveries WHERE endpoint_id = $1"
                               " ORDER BY id DESC LIMIT 1", endpoint_id)


async def settled(pool: asyncpg.Pool, endpoint_id: int, status: str = "delivered",
                  timeout: float = 20) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        row = await delivery(pool, endpoint_id)
        return row if row is not None and row["status"] == status else None
    return await eventually(check, timeout=timeout)


async def attempts(pool: asyncpg.Pool, delivery_id: int) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM webhook_attempts WHERE delivery_id = $1 ORDER BY id",
                            delivery_id)


# -- signatures ----------------------------------------------------------------------------

def test_signatures_verify_by_the_spec_and_by_the_standardwebhooks_package() -> None:
    secret, previous = signing.new_secret(), signing.new_secret()
    body = json.dumps({"type": "order.placed", "data": {"note": "ünïcode ✓"}},
                      ensure_ascii=False).encode()
    import time
    headers = signing.headers([secret], "msg_1", int(time.time()), body)
    assert headers["webhook-signature"].startswith("v1,")
    assert spec_verifies(secret, headers, body)
    assert package_verifies(secret, headers, body)["data"]["note"] == "ünïcode ✓"
    # A rotation: two signatures, each secret verifies on its own; a stranger's does not.
    both = signing.headers([secret, previous], "msg_1", int(time.time()), body)
    assert len(both["webhook-signature"].split(" ")) == 2
    for s in (secret, previous):
        assert spec_verifies(s, both, body) and package_verifies(s, both, body)
    assert not spec_verifies(signing.new_secret(), both, body)
    assert not spec_verifies(secret, both, body + b" ")


@pytest.mark.parametrize("bad", ["secret", "whsec_", "whsec_!!!", "whsec_" + "QUJD" * 2])
def test_a_secret_not_in_whsec_format_is_refused(bad: str) -> None:
    with pytest.raises(signing.SecretError):
        signing.key_of(bad)


# -- SSRF ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.0.0.1", "private"),
    ("172.16.5.4", "private"), ("192.168.1.1", "private"), ("fd12:3456::1", "private"),
    ("169.254.169.254", "a cloud metadata address"), ("fd00:ec2::254", "a cloud metadata address"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("100.64.0.1", "shared (CGNAT)"), ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"), ("64:ff9b::a9fe:a9fe", "a cloud metadata address"),
    ("2002:7f00:1::", "loopback"), ("240.0.0.1", "reserved"),
])
def test_addresses_that_are_no_place_for_a_webhook(address: str, why: str) -> None:
    import ipaddress
    ip = ipaddress.ip_address(address)
    assert kind(ip) == why
    with pytest.raises(AddressRefused):
        Policy().check(ip, host=address)


def test_public_addresses_pass_and_allowed_networks_let_others_through() -> None:
    import ipaddress
    for public in ("93.184.216.34", "2606:4700:4700::1111"):
        Policy().check(ipaddress.ip_address(public), host=public)
    with pytest.raises(AddressRefused, match="plain http"):
        Policy().check(ipaddress.ip_address("93.184.216.34"), host="x", scheme="http")
    allowed = Policy.of(["127.0.0.1/32", "10.1.0.0/16"])
    for address in ("127.0.0.1", "::ffff:127.0.0.1", "10.1.2.3"):
        allowed.check(ipaddress.ip_address(address), host=address, scheme="http")
    with pytest.raises(AddressRefused):
        allowed.check(ipaddress.ip_address("10.2.0.1"), host="10.2.0.1")


def lookups(*answers: Sequence[str], name: str | None = None) -> tuple[Lookup, list[str]]:
    """A resolver whose answers change from one lookup to the next (the last one stays); only
    for `name`, if given (other names: the system's)."""
    asked: list[str] = []

    async def lookup(host: str, port: int) -> list[str]:
        if name is not None and host != name:
            return await system_lookup(host, port)
        asked.append(host)
        return list(answers[min(len(asked), len(answers)) - 1])
    return lookup, asked


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "https://10.0.0.1/hook", "https://169.254.169.254/latest",
    "https://localhost/hook", "https://[::ffff:127.0.0.1]/hook", "https://[::1]/hook",
    "https://100.64.0.1/", "ftp://93.184.216.34/", "https://user:pw@example.com/",
    "https://example.com/#frag",
])
async def test_endpoints_are_refused_when_added(pool: asyncpg.Pool, url: str) -> None:
    with pytest.raises(ops.WebhookError, match="endpoint refused"):
        await add(pool, url, networks=())
    assert await pool.fetchval("SELECT count(*) FROM webhook_endpoints") == 0


async def test_every_address_a_name_resolves_to_is_checked(pool: asyncpg.Pool) -> None:
    lookup, _ = lookups(["93.184.216.34", "10.0.0.7"])
    with pytest.raises(AddressRefused, match=r"10\.0\.0\.7"):
        await vet_url("https://mixed.example/", Policy(), lookup)
    lookup, _ = lookups(["93.184.216.34"])
    with pytest.raises(ops.WebhookError, match="plain http"):
        await add(pool, "http://public.example/", networks=(), lookup=lookup)
    assert (await add(pool, "https://public.example/", networks=(), lookup=lookup))[0] > 0


# -- deliveries ------------------------------------------------------------------------------

async def test_a_delivery_is_signed_enveloped_and_verified(
    db_settings: Settings, pool: asyncpg.Pool, receiver: Receiver,
) -> None:
    endpoint, secret = await add(pool, receiver.url(), ["order.placed"])
    assert await enqueue(pool, "ev-sig", data={"order_id": 7, "total": "12.95"}) == 1
    async with sending(db_settings, pool):
        row = await settled(pool, endpoint)
    [request] = receiver.received
    assert spec_verifies(secret, request.headers, request.body)
    envelope = package_verifies(secret, request.headers, request.body)
    assert envelope["type"] == "order.placed" and envelope["data"] == {"order_id": 7, "total": "12.95"}
    assert envelope["timestamp"].endswith("Z")
    assert request.headers["webhook-id"] == row["webhook_id"] == webhook_id_for("ev-sig", endpoint)
    assert request.headers["Content-Type"] == "application/json"
    [attempt] = await attempts(pool, row["id"])
    assert (attempt["outcome"], attempt["status_code"], attempt["response"]) == (
        "delivered", 200, '{"ok":true}')


async def test_a_receiver_that_fails_twice_gets_one_webhook_id_until_it_recovers(
    db_settings: Settings, pool: asyncpg.Pool, receiver: Receiver,
) -> None:
    endpoint, secret = await add(pool, receiver.url())
    receiver.then(Answer(500, b"database down"), Answer(503, b"\x1b[31mbusy"), 200)
    counted = {o: attempts_counted(o) for o in ("failed", "delivered")}
    await enqueue(pool, "ev-retry")
    async with sending(db_settings, pool):
        row = await settled(pool, endpoint)
    assert {o: attempts_counted(o) - n for o, n in counted.items()} == {"failed": 2, "delivered": 1}
    assert len(receiver.received) == 3 and len(set(receiver.ids())) == 1
    assert receiver.ids()[0] == row["webhook_id"]
    for request in receiver.received:  # each attempt signed afresh (its own timestamp)
        assert spec_verifies(secret, request.headers, request.body)
        package_verifies(secret, request.headers, request.body)
    assert len({r.body for r in receiver.received}) == 1  # the same bytes every time
    log = await attempts(pool, row["id"])
    assert [(a["attempt"], a["outcome"], a["status_code"]) for a in log] == [
        (1, "failed", 500), (2, "failed", 503), (3, "delivered", 200)]
    assert log[0]["response"] == "database down" and log[1]["error"] == "HTTP 503"
    assert row["attempts"] == 3


def attempts_counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("ordermill_webhook_attempts_total", {"outcome": outcome}) or 0


async def test_spent_retries_park_the_delivery_and_flag_the_endpoint_until_a_replay(
    db_settings: Settings, pool: asyncpg.Pool, receiver: Receiver,
) -> None:
    endpoint, _ = await add(pool, receiver.url())
    receiver.default = Answer(500)
    await enqueue(pool, "ev-park")
    async with sending(db_settings, pool, webhook_retry_seconds=(0.1, 0.1)):
        row = await settled(pool, endpoint, "parked")
        assert row["attempts"] == 3 and len(receiver.received) == 3
        status = await pool.fetchrow("SELECT status, status_reason FROM webhook_endpoints")
        assert status["status"] == "failing" and "HTTP 500" in status["status_reason"]
        gauges = DatabaseGauges(pool, [WEBHOOK_DELIVERIES_BY_STATE], ttl=0)
        await gauges.refresh()
        [family] = gauges.collect()
        assert {s.labels["state"]: s.value for s in family.samples} == {
            "parked": 1, "pending": 0, "sending": 0}
        receiver.default = Answer(200)
        async with pool.acquire() as conn:
            await ops.replay(conn, row["id"])
        await settled(pool, endpoint)
    assert len(set(receiver.ids())) == 1 and len(receiver.received) == 4
    assert await pool.fetchval("SELECT status FROM webhook_endpoints") == "active"


async def test_410_gone_disables_the_endpoint(
    db_settings: Settings, pool: asyncpg.Pool, receiver: Receiver,
) -> None:
    endpoint, _ = await add(pool, receiver.url())
    receiver.then(Answer(410, b"gone"))
    await enqueue(pool, "ev-gone")
    async with sending(db_settings, pool):
        row = await settled(pool, endpoint, "parked")
        assert await pool.fetchval("SELECT status FROM webhook_endpoints") == "disabled"
        assert await enqueue(pool, "ev-after") == 0  # no longer subscribed
        async with pool.acquire() as conn:
            assert await enqueue_to_endpoint(conn, endpoint, "alert.x", {}, event_id="a") == 0
            with pytest.raises(ops.WebhookError, match="disabled"):
                await ops.replay(conn, row["id"])
    assert len(receiver.received) == 1
    assert [a["outcome"] for a in await attempts(pool, row["id"])] == ["gone"]


async def test_a_redirect_is_not_followed(
    db_settings: Settings, pool: asyncpg.Pool, receiver: Receiver,
) -> None:
    endpoint, _ = await add(pool, receiver.url("/hook"))
    receiver.default = Answer(302, headers={"Location": "http://127.0.0.1:1/elsewhere"})
    receiver.then(Answer(307, headers={"Location": "/elsewhere"}))
    await enqueue(pool, "ev-redirect")
    async with sending(db_settings, pool, webhook_retry_seconds=(30,)):
        await eventually(lambda: attempts_of(pool, endpoint))
    assert [r.path for r in receiver.received] == ["/hook"]
    [attempt] = await attempts_of(pool, endpoint)
    assert (attempt["outcome"], attempt["status_code"]) == ("failed", 307)
    assert attempt["error"] == "HTTP 307 (redirects are not followed)"


async def attempts_of(pool: asyncpg.Pool, endpoint: int) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT a.* FROM webhook_attempts a JOIN webhook_deliveries d"
                            " ON d.id = a.delivery_id WHERE d.endpoint_id = $1", endpoint)


async def test_a_huge_answer_is_read_only_up_to_the_limit(
    db_settings: Settings, pool: asyncpg.Pool, receiver: Receiver,
) -> None:
    endpoint, _ = await add(pool, receiver.url())
    receiver.then(Answer(200, endless=True))
    await enqueue(pool, "ev-huge")
    async with sending(db_settings, pool, webhook_response_limit_bytes=4096):
        row = await settled(pool, endpoint)
    [attempt] = await attempts(pool, row["id"])
    assert attempt["response"] == "x" * 500
    await asyncio.sleep(0.2)
    assert receiver.sent_bytes < 50 * 1024 * 1024  # the client went away, far short of 6.5 GB


async def test_a_receiver_slower_than_the_timeout_is_a_failed_attempt(
    db_settings: Settings, pool: asyncpg.Pool, receiver: Receiver,
) -> None:
    endpoint, _ = await add(pool, receiver.url())
    receiver.then(Answer(200, hang=3.0))
    await enqueue(pool, "ev-slow")
    async with sending(db_settings, pool, webhook_timeout_seconds=0.5):
        row = await settled(pool, endpoint)  # the retry is answered at once
    log = await attempts(pool, row["id"])
    assert [(a["outcome"], a["error"]) for a in log] == [
        ("failed", "timed out after 0.5 s"), ("delivered", None)]
    assert 400 <= log[0]["duration_ms"] < 2500


async def test_addresses_are_checked_again_at_delivery(
    db_settings: Settings, pool: asyncpg.Pool, receiver: Receiver,
) -> None:
    """A name that resolved to a public address when added and to 127.0.0.1 now (DNS
    rebinding), `localhost`, and IPv4-mapped loopback written in before the allow-list
    changed: none is connected to; the receiver hears nothing."""
    rebinding, asked = lookups(["93.184.216.34"], ["127.0.0.1"], name="rebind.example")
    rebound, _ = await add(pool, f"https://rebind.example:{receiver.port}/", networks=(),
                           lookup=rebinding)
    local, _ = await add(pool, receiver.url(host="localhost"))
    mapped, _ = await add(pool, receiver.url(host="[::ffff:127.0.0.1]"))
    await enqueue(pool, "ev-ssrf")
    async with sending(db_settings, pool, lookup=rebinding, webhook_allow_networks=[],
                       webhook_retry_seconds=(30,)):
        for endpoint in (rebound, local, mapped):
            await eventually(lambda e=endpoint: attempts_of(pool, e))
    assert receiver.received == []
    assert asked == ["rebind.example", "rebind.example"]  # at add, and at the connection
    for endpoint, text in ((rebound, "rebind.example (127.0.0.1) is loopback"),
                           (local, "localhost ("),
                           (mapped, "::ffff:127.0.0.1 (::ffff:7f00:1) is loopback")):
        [attempt] = await attempts_of(pool, endpoint)
        assert attempt["outcome"] == "refused" and text in attempt["error"], attempt["error"]


async def test_rotation_signs_with_both_secrets_until_the_old_one_expires(
    db_settings: Settings, pool: asyncpg.Pool, receiver: Receiver,
) -> None:
    key = SecretStr(Fernet.generate_key().decode())
    sealer = Sealer.from_key(key)
    endpoint, old = await add(pool, receiver.url(), sealer=sealer)
    stored = await pool.fetchval("SELECT secret FROM webhook_endpoints")
    assert stored.startswith("fernet:") and old not in stored  # encrypted at rest
    async with pool.acquire() as conn:
        new, _ = await ops.rotate(conn, endpoint, sealer=sealer, hours=1)
        listed = json.dumps(await ops.endpoints(conn), default=str)
    assert old not in listed and new not in listed and "fernet:" not in listed
    await enqueue(pool, "ev-rotate")
    async with sending(db_settings, pool, webhook_secret_key=key):
        await settled(pool, endpoint)
        [request] = receiver.received
        assert len(request.headers["webhook-signature"].split(" ")) == 2
        for secret in (new, old):
            assert spec_verifies(secret, request.headers, request.body)
            package_verifies(secret, request.headers, request.body)
        # The old secret's time is up: the next delivery carries the new signature only.
        await pool.execute("UPDATE webhook_endpoints SET previous_secret_until = now()")
        await asyncio.sleep(2.1)  # the sender's endpoint cache
        await enqueue(pool, "ev-rotated")
        await eventually(lambda: asyncio.sleep(0, len(receiver.received) == 2))
    later = receiver.received[1]
    assert len(later.headers["webhook-signature"].split(" ")) == 1
    assert spec_verifies(new, later.headers, later.body)
    assert not spec_verifies(old, later.headers, later.body)


# -- events into deliveries ------------------------------------------------------------------

def test_the_webhooks_queue_takes_every_subscribable_event() -> None:
    assert tuple(sorted(SERVICE_BINDINGS["webhooks"])) == EVENT_TYPES
    assert "order.fraud" in EVENT_TYPES and "fraud.redrive" not in EVENT_TYPES


async def test_events_become_one_delivery_per_subscribed_endpoint(
    flow: InMemoryFlow, pool: asyncpg.Pool,
) -> None:
    s = flow.settings
    flow.add(placement_worker(s), fraud_worker(s), webhooks_worker(s))
    everything, _ = await add(pool, "http://127.0.0.1:9/all", ["*"])
    placed, _ = await add(pool, "http://127.0.0.1:9/placed", ["order.placed", "order.fraud"])
    elsewhere, _ = await add(pool, "http://127.0.0.1:9/paid", ["invoice.paid"])
    off, _ = await add(pool, "http://127.0.0.1:9/off", ["*"])
    await pool.execute("UPDATE webhook_endpoints SET status = 'disabled' WHERE id = $1", off)

    await flow.send("order.place", order_body("wh-ok"))
    await flow.send("order.place", order_body("wh-fraud", ip_address="192.0.2.66"))
    events = await flow.run()
    rows = await pool.fetch("SELECT endpoint_id, event_type, webhook_id, event_id, body"
                            " FROM webhook_deliveries ORDER BY id")
    got = sorted((r["endpoint_id"], r["event_type"]) for r in rows)
    assert got == sorted([(everything, "order.placed"), (everything, "order.placed"),
                          (everything, "order.screened"), (everything, "order.fraud"),
                          (placed, "order.placed"), (placed, "order.placed"),
                          (placed, "order.fraud")])
    assert elsewhere not in {r["endpoint_id"] for r in rows}
    by_id = {e.message_id: e for e in events}
    for r in rows:
        event = by_id[r["event_id"]]
        assert r["webhook_id"] == webhook_id_for(event.message_id, r["endpoint_id"])
        body = json.loads(r["body"])
        assert (body["type"], body["data"]) == (event.routing_key, event.body)

    # The same event delivered again (a broker redelivery): nothing new.
    again = next(e for e in events if e.routing_key == "order.placed")
    await flow.deliver([flow.as_delivery(again)], to="webhooks")
    # And enqueued again by a re-run handler (past the inbox): the webhook-ids hold.
    async with pool.acquire() as conn, conn.transaction():
        assert await enqueue_to_subscribers(conn, again.routing_key, again.body,
                                            event_id=again.message_id) == 0
    assert await pool.fetchval("SELECT count(*) FROM webhook_deliveries") == len(rows)


# -- the CLI ---------------------------------------------------------------------------------

@pytest.mark.slow  # runs `ordermill` a dozen times: about 10 s
async def test_the_cli_adds_lists_tests_shows_replays_rotates_and_removes(
    db_settings: Settings, pool: asyncpg.Pool, receiver: Receiver,
) -> None:
    from test_cli import cli

    s, env = db_settings, {"WEBHOOK_ALLOW_NETWORKS": "127.0.0.1/32"}
    code, out, _ = await cli(s, "webhooks", "add", receiver.url(), "--events",
                             "order.placed,order.fraud", "--json", **env)
    assert code == 0
    added = json.loads(out)
    endpoint, secret = added["id"], added["secret"]
    assert added["events"] == ["order.fraud", "order.placed"] and secret.startswith("whsec_")
    code, out, _ = await cli(s, "webhooks", "add", receiver.url("/2"), "--events", "*", **env)
    assert code == 0 and "signing secret: whsec_" in out and "shown once" in out

    for args, error in [
        (("add", "http://10.0.0.1/", "--events", "*"), "endpoint refused: 10.0.0.1 is private"),
        (("add", "https://169.254.169.254/", "--events", "*"), "a cloud metadata address"),
        (("add", receiver.url(), "--events", "order.nope"), "unknown event type 'order.nope'"),
        (("add", receiver.url(), "--events", "*", "--secret", "hunter2"), "starts with whsec_"),
        (("remove", "999"), "no webhook endpoint 999"),
        (("replay",), "name a DELIVERY_ID or --endpoint ID"),
        (("rotate", str(endpoint)), "WEBHOOK_SECRET_KEY is not a Fernet key"),
    ]:
        if args[0] == "rotate":
            env = {**env, "WEBHOOK_SECRET_KEY": "not-a-key"}
        code, out, err = await cli(s, "webhooks", *args, **env)
        assert code == 1 and err.count("\n") == 1 and error in err, (args, err)
        assert "Traceback" not in err
    env = {"WEBHOOK_ALLOW_NETWORKS": "127.0.0.1/32"}
    code, _, err = await cli(s, "run", "webhooks", WEBHOOK_SECRET_KEY="not-a-key")
    assert code == 1 and err.count("\n") == 1 and "WEBHOOK_SECRET_KEY is not a Fernet key" in err

    code, out, _ = await cli(s, "webhooks", "list", "--json", **env)
    listed = json.loads(out)
    assert [e["id"] for e in listed] == [endpoint, endpoint + 1]
    assert secret not in out and "secret" not in listed[0]
    code, out, _ = await cli(s, "webhooks", "list", **env)
    assert code == 0 and secret not in out

    receiver.then(Answer(200, b"\x1b[31mred\x1b[0m"))
    async with sending(s, pool):
        code, out, err = await cli(s, "webhooks", "test", str(endpoint), **env)
        assert code == 0, err
        assert "delivered, HTTP 200" in out and "\x1b[31m" not in out and "\\x1b[31mred" in out
        code, out, _ = await cli(s, "webhooks", "deliveries", str(endpoint), "--json", **env)
        [shown] = json.loads(out)
        assert shown["event_type"] == "webhook.test" and shown["status"] == "delivered"
        assert shown["log"][0]["response"] == "\x1b[31mred\x1b[0m"  # exact in JSON
        code, out, _ = await cli(s, "webhooks", "deliveries", str(endpoint), COLUMNS="200", **env)
        assert "\x1b[31m" not in out and "\\x1b[31mred" in out and "webhook.test" in out
        code, out, _ = await cli(s, "webhooks", "replay", str(shown["id"]), **env)
        assert code == 0 and shown["webhook_id"] in out
        await eventually(lambda: asyncio.sleep(0, len(receiver.received) == 2))
    assert receiver.ids() == [shown["webhook_id"]] * 2
    package_verifies(secret, receiver.received[0].headers, receiver.received[0].body)

    code, out, _ = await cli(s, "webhooks", "rotate", str(endpoint), "--json", **env)
    rotated = json.loads(out)
    assert rotated["secret"] != secret and rotated["secret"].startswith("whsec_")
    code, out, _ = await cli(s, "webhooks", "remove", str(endpoint), **env)
    assert code == 0
    assert await pool.fetchval("SELECT count(*) FROM webhook_deliveries") == 0


# -- with the broker -------------------------------------------------------------------------

async def test_events_are_delivered_through_the_broker(harness: Any, receiver: Receiver) -> None:
    s = harness.settings.model_copy(update=FAST)
    _, secret = await add(harness.pool, receiver.url(), ["order.placed", "order.screened"])
    await harness.start([placement_worker(s), fraud_worker(s), webhooks_worker(s)])
    await harness.publish("order.place", order_body("wh-broker"))
    await eventually(lambda: asyncio.sleep(0, len(receiver.received) == 2), timeout=30)
    types = set()
    for request in receiver.received:
        envelope = package_verifies(secret, request.headers, request.body)
        assert spec_verifies(secret, request.headers, request.body)
        assert envelope["data"]["order_ref"] == "wh-broker"
        types.add(envelope["type"])
    assert types == {"order.placed", "order.screened"}
    await eventually(lambda: harness.pool.fetchval(  # recorded just after the answers
        "SELECT count(*) = 2 FROM webhook_deliveries WHERE status = 'delivered'"))


@pytest.mark.slow
async def test_a_sender_killed_while_delivering_is_taken_over_and_nothing_is_lost(
    harness: Any, receiver: Receiver, tmp_path: Any,
) -> None:
    """Two `ordermill run webhooks` processes; the one whose POST is under way is SIGKILLed.
    Its lease (3 s) runs out and the other delivers: the same webhook-id, delivered once."""
    from test_processes import ORDERMILL, worker_env

    endpoint, secret = await add(harness.pool, receiver.url())
    receiver.then(Answer(200, hang=60))  # the first sender's request: never answered in time
    env = worker_env(harness.settings, WEBHOOK_ALLOW_NETWORKS="127.0.0.1/32",
                     JOB_LEASE_SECONDS="3", JOB_POLL_SECONDS="0.5",
                     WEBHOOK_RETRY_SECONDS="0.2", WEBHOOK_TIMEOUT_SECONDS="60")
    log = (tmp_path / "senders.log").open("ab")

    async def spawn() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(ORDERMILL, "run", "webhooks", env=env,
                                                    stdout=log, stderr=log)

    first, second = await spawn(), None
    try:
        await enqueue(harness.pool, "ev-kill")
        await asyncio.wait_for(receiver.arrived.wait(), 60)
        second = await spawn()
        first.kill()  # SIGKILL mid-request: nothing released, nothing recorded
        await first.wait()
        row = await delivery(harness.pool, endpoint)
        assert (row["status"], row["attempts"]) == ("sending", 1)
        row = await settled(harness.pool, endpoint, timeout=60)
    finally:
        for process in (first, second):
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                await process.wait()
    assert row["attempts"] == 2 and len(receiver.received) == 2
    assert set(receiver.ids()) == {row["webhook_id"]}
    package_verifies(secret, receiver.received[1].headers, receiver.received[1].body)
    log_rows = await attempts(harness.pool, row["id"])
    assert [(a["attempt"], a["outcome"]) for a in log_rows] == [(2, "delivered")]
