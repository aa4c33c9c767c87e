"""Issue 11, point 5/6: what an operator's terminal shows, provider secrets in answers, replies
only to the sender's own queue, workers under a DML-only PostgreSQL role, ACCESS_REFUSED."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from fakes.minfraud import ACCOUNT_ID, LICENSE_KEY, FakeMinFraud
from fakes.whm import FakeWhm
from test_cli import cli
from test_maxmind import CLEAN
from test_review import make_order

from conftest import TEST_USER, Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.modules.base import Account
from services.provisioning.modules.cpanel import CpanelModule
from services.review.worker import worker as review_worker
from shared import broker, db
from shared.settings import Settings

WIDE = {"COLUMNS": "400"}  # no table cell wrapped: each text is found whole


def assert_terminal_safe(text: str) -> None:
    """Nothing in it acts on a terminal: no ESC, no C1 control, no bidi override, no BEL."""
    raw = [ch for ch in text if ch in "\x1b\x07\x00\u202e\u2066" or 0x80 <= ord(ch) <= 0x9f]
    assert not raw, f"raw control characters reach the terminal: {raw!r}"


# -- 1. terminal escapes -----------------------------------------------------------------------

async def test_control_characters_and_markup_are_shown_escaped_in_every_view(
    harness: Harness,
) -> None:
    s = harness.settings
    await harness.start([placement_worker(s), fraud_worker(s)])
    client = {"email": "ann\x9b\u202e@shop.example", "first_name": "\x1b[31mAnn",
              "last_name": "Lee\x9b2J [red]x[/red][bold]", "country": "GB", "company": "[red]",
              "city": "\u202eCity [link=https://evil.example]click[/link]"}
    await harness.publish("order.place", order_body("esc-1", client=client))
    order = await harness.screened("esc-1")
    # What `failures` lists, with the words of a provider, a gateway and an actor.
    await harness.pool.execute("UPDATE orders SET screening = 'error' WHERE id = $1", order["id"])
    await harness.pool.execute(
        "INSERT INTO fraud_checks (order_id, provider, result, threshold, error)"
        " VALUES ($1, 'maxmind', 'error', 20, $2)", order["id"], "down \x1b]0;pwned\x07 \x9b2J")
    await harness.pool.execute(
        "INSERT INTO payments (gateway, transaction_id, raw_amount, currency, status, reason,"
        " message_id, order_ref) VALUES ($1, $2, '1.00', 'USD', 'unapplied', $3, $4, 'esc-1')",
        "gw\x1b[2J", "tx\u202e1", "unknown \x9b invoice", "msg\x1b[8m")
    await harness.pool.execute(
        "INSERT INTO order_history (order_id, actor, action) VALUES ($1, $2, 'note')",
        order["id"], "mallory\x1b[1A\x1b[2K")

    code, shown, err = await cli(s, "show", str(order["id"]), **WIDE)
    assert code == 0, err
    assert_terminal_safe(shown)
    for escaped in ("\\x1b[31mAnn", "Lee\\x9b2J", "ann\\x9b\\u202e@shop.example",
                    "\\u202eCity [link=https://evil.example]click[/link]", "gw\\x1b[2J",
                    "tx\\u202e1", "unknown \\x9b invoice", "mallory\\x1b[1A\\x1b[2K",
                    "down \\x1b]0;pwned\\x07 \\x9b2J"):
        assert escaped in shown, escaped
    assert "Lee\\x9b2J [red]x[/red][bold] <" in shown  # markup not interpreted

    for args in (["orders"], ["pending"]):
        code, listed, err = await cli(s, *args, **WIDE)
        assert code == 0, err
        assert_terminal_safe(listed)
        assert "ann\\x9b\\u202e@shop.example" in listed, args

    code, failures, err = await cli(s, "failures", **WIDE)
    assert code == 0, err
    assert_terminal_safe(failures)
    for escaped in ("down \\x1b]0;pwned\\x07 \\x9b2J", "gw\\x1b[2J", "tx\\u202e1",
                    "unknown \\x9b invoice"):
        assert escaped in failures, escaped

    # --json stays the exact text, as JSON escapes it.
    code, out, _ = await cli(s, "show", str(order["id"]), "--json")
    data = json.loads(out)
    assert (data["client"]["first_name"], data["client"]["city"], data["client"]["company"]) == (
        client["first_name"], client["city"], client["company"])


# -- 2. provider secrets -----------------------------------------------------------------------

def _secret_forms() -> list[str]:
    return [LICENSE_KEY, base64.b64encode(f"{ACCOUNT_ID}:{LICENSE_KEY}".encode()).decode()]


def _assert_no_secret(where: str, text: str) -> None:
    for secret in _secret_forms():
        assert secret not in text, f"{where} holds {secret!r}"


async def test_a_minfraud_answer_echoing_the_licence_key_is_stored_logged_and_shown_scrubbed(
    harness: Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeMinFraud() as maxmind:
        maxmind.answer = dict(CLEAN)
        maxmind.echo_credentials = True
        s = Settings.model_validate({**harness.settings.model_dump(), **maxmind.settings,
                                     "maxmind_attempts": 1})
        await harness.start([placement_worker(s), fraud_worker(s)])
        await harness.publish("order.place", order_body("echo-ok"))
        ok = await harness.screened("echo-ok")
        assert ok["screening"] == "passed"
        maxmind.fail_next(400)  # an HTML page, quoted whole in the package's error
        await harness.publish("order.place", order_body("echo-html"))
        html = await harness.screened("echo-html")
        maxmind.fail_next(402)  # MaxMind's JSON error body, its message quoted
        await harness.publish("order.place", order_body("echo-json"))
        json_error = await harness.screened("echo-json")
    assert (html["screening"], json_error["screening"]) == ("error", "error")

    checks = await harness.pool.fetch(
        "SELECT f.*, o.order_ref FROM fraud_checks f JOIN orders o ON o.id = f.order_id"
        " ORDER BY f.id")
    by_ref = {c["order_ref"]: c for c in checks}
    raw = json.dumps(by_ref["echo-ok"]["raw"])
    assert "***" in raw  # the echo was there, and scrubbed
    for check in checks:
        _assert_no_secret(f"fraud check of {check['order_ref']}",
                          json.dumps([check["raw"], check["reasons"], check["error"]]))
    assert "***" in by_ref["echo-html"]["error"] and "***" in by_ref["echo-json"]["error"]
    history = await harness.pool.fetch("SELECT actor, detail FROM order_history")
    _assert_no_secret("history", json.dumps([dict(r) for r in history], default=str))
    for record in caplog.records:
        _assert_no_secret(f"log {record.getMessage()!r}", repr(record.__dict__))
    for order in (ok, html, json_error):
        for args in ([], ["--json"]):
            code, out, err = await cli(harness.settings, "show", str(order["id"]), *args, **WIDE)
            assert code == 0, err
            _assert_no_secret(f"show {order['order_ref']} {args}", out)


async def test_a_whm_answer_echoing_the_token_is_scrubbed() -> None:
    account = Account(service_id=7, username="annlee7", domain="annlee.example",
                      plan="starter", contact_email="ann@lee.example", password="Pa55-w0rd-x")
    async with FakeWhm() as whm:
        token = whm.module_kwargs["token"]
        module = CpanelModule(**whm.module_kwargs, timeout=2.0, long_timeout=2.0)
        try:
            # Not ours: refused, the server's words quoted in the error.
            whm.add_account("annlee7", f"other.example {token}", f"x@{token}.example")
            result = await module.create(account)
        finally:
            await module.close()
    assert not result.ok
    assert token not in (result.error or "") and "***" in (result.error or "")
    assert token not in json.dumps(result.detail)


# -- 3. replies only to the sender's own reply queue -------------------------------------------

async def test_a_review_command_naming_a_work_queue_as_reply_to_puts_nothing_in_it(
    harness: Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    await harness.start([review_worker(harness.settings)])
    order_id = await make_order(harness, "Pending", "reply-hijack")
    target = harness.names.queue("provisioning")
    correlation = str(uuid.uuid4())
    await broker.publish(harness.exchange, "review.command", broker.json_message(
        {"order_id": order_id, "action": "cancel", "operator": "alice"},
        routing_key="review.command", correlation_id=correlation, reply_to=target,
        user_id=TEST_USER))

    async def cancelled() -> bool:
        status = await harness.pool.fetchval("SELECT status FROM orders WHERE id = $1", order_id)
        return status == "Cancelled"
    await eventually(cancelled)  # the command itself is carried out

    async def all_published() -> bool:
        return not await harness.pool.fetchval(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL")
    await eventually(all_published)
    assert not await harness.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = $1", target)
    channel = await harness.connection.channel()
    queue = await channel.declare_queue(target, passive=True)
    seen: list[Any] = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        seen.append(message)
    await channel.close()
    assert [m.routing_key for m in seen] == ["order.cancelled"]  # its own event, no reply
    assert all(m.correlation_id != correlation for m in seen)
    assert any("reply not sent" in r.getMessage() for r in caplog.records)

    # A reply queue the broker named for its sender is answered as before.
    channel = await harness.connection.channel()
    replies = await broker.declare_reply_queue(channel)
    assert replies.name.startswith("amq.gen-")
    await broker.publish(harness.exchange, "review.command", broker.json_message(
        {"order_id": order_id, "action": "cancel", "operator": "alice"},
        routing_key="review.command", correlation_id="c-2", reply_to=replies.name,
        user_id=TEST_USER))
    answer = await eventually(lambda: replies.get(no_ack=True, fail=False))
    assert json.loads(answer.body) == {"ok": True, "order_id": order_id, "status": "Cancelled"}
    await channel.close()


# -- 4. workers under a DML-only PostgreSQL role -----------------------------------------------

def _as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.hostname}:{parts.port or 5432}"))


async def _dml_role(database_url: str) -> str:
    """A role with only what the README's production notes grant a worker."""
    role = f"om_dml_{uuid.uuid4().hex[:10]}"
    name = urlsplit(database_url).path.lstrip("/")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"""
            CREATE ROLE {role} LOGIN;
            REVOKE CREATE ON SCHEMA public FROM PUBLIC;
            GRANT CONNECT ON DATABASE "{name}" TO {role};
            GRANT USAGE ON SCHEMA public TO {role};
            GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
            GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role};
        """)
    finally:
        await conn.close()
    return role


async def _drop_role(database_url: str, role: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
    finally:
        await conn.close()


async def test_a_worker_with_a_dml_only_role_serves_orders_on_a_current_schema(
    harness: Harness,
) -> None:
    role = await _dml_role(harness.settings.database_url)
    try:
        url = _as_user(harness.settings.database_url, role)
        worker = harness.settings.model_copy(update={"database_url": url})
        # MIGRATE_ON_START at its default: nothing to apply, so nothing a DML role may not do.
        await harness.start([placement_worker(worker), fraud_worker(worker)],
                            database_url=url)
        await harness.publish("order.place", order_body("dml-1"))
        order = await harness.screened("dml-1")
        assert (order["status"], order["screening"]) == ("Pending", "passed")
        placed_by = await harness.pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role)
        assert placed_by >= 1  # the worker's own connections, under the role
        await harness.stop_all()
    finally:
        await harness.stop_all()
        await _drop_role(harness.settings.database_url, role)


async def test_a_worker_with_a_dml_only_role_refuses_a_schema_missing_a_migration(
    harness: Harness,
) -> None:
    last = await harness.pool.fetchval("SELECT max(version) FROM schema_migrations")
    await harness.pool.execute("DELETE FROM schema_migrations WHERE version = $1", last)
    role = await _dml_role(harness.settings.database_url)
    try:
        url = _as_user(harness.settings.database_url, role)
        worker = harness.settings.model_copy(update={"database_url": url})
        with pytest.raises(db.SchemaNotReady) as refused:
            await harness.start([placement_worker(worker)], database_url=url)
        line = str(refused.value)
        assert line == (f"database {urlsplit(url).path.lstrip('/')} lacks migration(s) {last}"
                        f" and user {role} may not apply them: run `ordermill migrate` as the"
                        " database owner")
        # Told not to migrate, even the owner only checks.
        with pytest.raises(db.SchemaNotReady, match="MIGRATE_ON_START is off"):
            await harness.start([placement_worker(harness.settings)], migrate_on_start=False)
        # `ordermill run` says it in one line.
        code, out, err = await cli(harness.settings, "run", "placement", DATABASE_URL=url)
        assert code == 1
        assert "Traceback" not in out + err
        assert err.strip().splitlines()[-1] == f"error: {line}"
    finally:
        await harness.stop_all()
        await _drop_role(harness.settings.database_url, role)


# -- 5. ACCESS_REFUSED as one line -------------------------------------------------------------

async def _rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl")
async def test_access_refused_by_rabbitmq_is_one_line_naming_the_user(harness: Harness) -> None:
    user, password = f"om_refused_{uuid.uuid4().hex[:10]}", f"pw-{uuid.uuid4().hex}"
    await _rabbitmqctl("add_user", user, password)
    try:
        parts = urlsplit(harness.settings.amqp_url)
        url = urlunsplit(parts._replace(
            netloc=f"{user}:{password}@{parts.hostname}:{parts.port or 5672}"))
        wrong = url.replace(password, "not-the-password")

        async def refused(*args: str, amqp_url: str = url) -> str:
            code, out, err = await cli(harness.settings, *args, AMQP_URL=amqp_url)
            assert code != 0, (args, out, err)
            assert "Traceback" not in out + err, err
            assert password not in out + err
            lines = err.strip().splitlines()
            assert len(lines) == 1, err
            assert user in lines[0], lines[0]
            return lines[0]

        # No permission at all: not even the virtual host.
        assert "refused to open virtual host" in await refused("queues")
        assert "refused to open virtual host" in await refused("accept", "1")
        # The virtual host, and no permission on any exchange or queue in it.
        await _rabbitmqctl("set_permissions", "-p", parts.path.lstrip("/") or "/", user,
                           "^$", "^$", "^$")
        line = await refused("accept", "1", "--timeout", "2")
        assert line.startswith(f"error: RabbitMQ refused user '{user}': access to queue 'amq.gen-")
        line = await refused("pay", "1", "--amount", "1.00", "--transaction-id", "t-1")
        assert line.startswith(f"error: RabbitMQ refused user '{user}': access to exchange "
                               f"'{harness.names.exchange}'")
        line = await refused("queues", amqp_url=wrong)
        assert f"refused the login of user '{user}'" in line
    finally:
        await _rabbitmqctl("delete_user", user)
