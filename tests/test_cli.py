"""The `ordermill` CLI against a real database and broker: read commands, --json, errors."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aio_pika

from conftest import ROOT, Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from shared.settings import Settings
from test_processes import worker_env

ORDERMILL = str(Path(sys.executable).with_name("ordermill"))


async def cli(settings: Settings, *args: str, **env: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        ORDERMILL, *args, env=worker_env(settings, **env), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode, out.decode(), err.decode()


async def test_read_commands_print_the_contract_json(harness: Harness) -> None:
    await harness.start([placement_worker(harness.settings), fraud_worker(harness.settings)])
    await harness.publish("order.place", order_body("cli-ok"))
    await harness.publish("order.place", order_body("cli-fraud", ip_address="192.0.2.66"))
    ok = await harness.screened("cli-ok")
    fraud = await harness.screened("cli-fraud")
    s = harness.settings

    code, out, _ = await cli(s, "show", str(fraud["id"]), "--json")
    assert code == 0
    shown = json.loads(out)
    assert {"id", "order_ref", "status", "screening", "fraud", "items", "invoice", "payments",
            "history"} <= shown.keys()
    assert (shown["status"], shown["screening"]) == ("Fraud", "failed")
    assert shown["fraud"]["provider"] == "rules"
    assert shown["fraud"]["score"] == "99.00"
    assert shown["fraud"]["threshold"] == "20.00"
    assert [r["code"] for r in shown["fraud"]["reasons"]] == ["banned_ip"]
    assert [(i["type"], i["status"]) for i in shown["items"]] == [
        ("product", "Fraud"), ("domain", "Fraud")]
    assert shown["items"][0]["product"] == "starter"
    assert shown["items"][1]["domain"] == "cli-fraud.com"
    assert (shown["invoice"]["status"], shown["invoice"]["total"]) == ("Cancelled", "28.95")
    assert [h["action"] for h in shown["history"]] == ["placed", "screening"]

    code, out, _ = await cli(s, "orders", "--json")
    listed = json.loads(out)
    assert [o["id"] for o in listed] == sorted([ok["id"], fraud["id"]], reverse=True)  # newest first
    assert sorted((o["order_ref"], o["status"], o["screening"]) for o in listed) == [
        ("cli-fraud", "Fraud", "failed"), ("cli-ok", "Pending", "passed")]
    code, out, _ = await cli(s, "orders", "--status", "fraud", "--json")
    assert [o["id"] for o in json.loads(out)] == [fraud["id"]]

    code, out, _ = await cli(s, "pending", "--json")
    pending = json.loads(out)
    assert [o["id"] for o in pending["pending"]] == [ok["id"]]
    assert pending["pending"][0]["total"] == "28.95"  # the order's, not a count of the page
    assert (pending["queued"], pending["more"]) == ([], 0)
    await harness.publish("order.place", order_body("cli-ok2", ip_address="203.0.113.90"))
    ok2 = await harness.screened("cli-ok2")
    pages = [json.loads((await cli(s, "pending", "--limit", "1", "--page", n, "--json"))[1])
             for n in ("1", "2")]
    assert [([o["id"] for o in p["pending"]], p["more"]) for p in pages] == [
        ([ok["id"]], 1), ([ok2["id"]], 0)]
    code, out, _ = await cli(s, "pending", "--limit", "1")
    assert "1 more pending order(s): --page 2" in out

    code, out, _ = await cli(s, "queues", "--json")
    depths = {q["queue"]: q for q in json.loads(out)}
    assert set(depths) == {f"{s.namespace}.{n}" for n in
                           ("placement", "placement.dead", "fraud", "fraud.dead",
                            "provisioning", "provisioning.dead", "review", "review.dead",
                            "notify", "notify.dead", "webhooks", "webhooks.dead",
                            "alerts", "alerts.dead")}
    assert depths[f"{s.namespace}.placement"]["consumers"] == 1
    assert depths[f"{s.namespace}.placement.dead"]["messages"] == 0

    code, out, _ = await cli(s, "catalog", "show", "--json")
    catalog = json.loads(out)
    assert {p["slug"]: p["auto_setup"] for p in catalog["products"]} == {
        "starter": "on_payment", "business": "on_payment", "trial": "on_order",
        "reseller": "on_accept", "managed": "never", "dedicated": "never"}

    code, out, _ = await cli(s, "failures", "--json")
    assert json.loads(out) == {"screening_errors": [], "stuck_in_screening": [],
                               "parked_setups": [], "unapplied_payments": [], "parked_emails": []}


async def test_dead_letters_are_listed_with_reasons_and_replayed(harness: Harness) -> None:
    s = harness.settings
    bad = order_body("cli-replay", currency="EUR")
    bad["items"] = [{"type": "product", "product": "business", "billing_cycle": "monthly",
                     "domain": "cli-replay.example"}]  # no EUR price for business
    message_id = await harness.publish("order.place", bad)
    await harness.start([placement_worker(s)], relay=False)

    async def listed():
        _code, out, _ = await cli(s, "dead-letters", "placement", "--json")
        rows = json.loads(out)
        return rows if rows else None
    rows = await eventually(listed, timeout=20)
    assert [(r["message_id"], r["routing_key"], r["reason"]) for r in rows] == [
        (message_id, "order.place", "product 'business' has no monthly price in EUR")]
    # Looking does not take: the dead letter is still there.
    code, out, _ = await cli(s, "dead-letters", "--json")
    assert [r["message_id"] for r in json.loads(out)] == [message_id]

    # The operator fixes the catalog, then replays: the order is placed under the same id.
    await harness.pool.execute(
        "INSERT INTO product_prices (product_id, currency, billing_cycle, price)"
        " SELECT id, 'EUR', 'monthly', 11.00 FROM products WHERE slug = 'business'")
    code, out, _ = await cli(s, "dead-letters", "--replay", "--json")
    assert (code, json.loads(out)) == (0, {"replayed": 1, "discarded": [], "failed": []})
    order = await eventually(lambda: harness.order("cli-replay"))
    assert order["total"] == 11
    assert order["placed_message_id"] == message_id
    code, out, _ = await cli(s, "dead-letters", "--json")
    assert json.loads(out) == []


async def test_a_replay_takes_each_dead_letter_once_though_the_worker_refuses_it_again(
    harness: Harness,
) -> None:
    s = harness.settings
    await harness.start([placement_worker(s)], relay=False)
    ids = [await harness.publish("order.place", order_body(f"again-{n}", currency="XXX"))
           for n in range(20)]

    async def dead(count: int) -> list | None:
        _code, out, _ = await cli(s, "dead-letters", "placement", "--json")
        rows = json.loads(out)
        return rows if len(rows) == count else None
    await eventually(lambda: dead(20), timeout=20)
    # Still bad: each comes straight back while the replay runs, and is not taken again.
    code, out, _ = await cli(s, "dead-letters", "--replay", "--json")
    assert (code, json.loads(out)) == (0, {"replayed": 20, "discarded": [], "failed": []})
    rows = await eventually(lambda: dead(20), timeout=20)
    assert sorted(r["message_id"] for r in rows) == sorted(ids)
    letters = await harness.dead_letters("placement")
    assert {m.headers["x-ordermill-replays"] for m in letters} == {1}


async def test_the_brokers_own_dead_letters_replay_under_their_first_key_and_expired_ones_go(
    harness: Harness,
) -> None:
    s = harness.settings
    # No review worker: the command expires in its queue and the broker dead-letters it.
    code, _out, err = await cli(s, "accept", "999999", "--timeout", "1")
    assert code != 0, err

    async def expired():
        _code, out, _ = await cli(s, "dead-letters", "review", "--json")
        rows = json.loads(out)
        return rows if rows else None
    rows = await eventually(expired, timeout=20)
    assert [(r["routing_key"], r["reason"]) for r in rows] == [("review.command", "expired")]
    # And one whose key no queue takes any more: it stays, the others go, the exit says so.
    channel = await harness.connection.channel()
    dlx = await channel.get_exchange(harness.names.dead_letter_exchange)
    await dlx.publish(aio_pika.Message(b'{"order_id": 1}', message_id="orphan", headers={
        "x-ordermill-routing-key": "review.retired", "x-ordermill-reason": "test"}),
        routing_key=harness.names.queue("review"))
    # And one the delivery limit dead-lettered: replayed under its first key.
    await channel.close()
    channel = await harness.connection.channel()
    queue = await channel.get_queue(harness.names.queue("review"))
    limited = await harness.publish("review.command", {"order_id": 1, "action": "accept"})
    for _ in range(harness.settings.queue_delivery_limit + 1):
        message = await eventually(lambda: queue.get(fail=False), timeout=10)
        await message.nack(requeue=True)
    await channel.close()
    code, out, err = await cli(s, "dead-letters", "review", "--replay", "--json")
    result = json.loads(out)
    assert code == 1 and result["replayed"] == 1
    # The expired command is not carried out late: `accept` said it expired unapplied.
    assert len(result["discarded"]) == 1
    assert [f["message_id"] for f in result["failed"]] == ["orphan"]
    code, out, _ = await cli(s, "dead-letters", "review", "--json")
    assert [r["message_id"] for r in json.loads(out)] == ["orphan"]
    channel = await harness.connection.channel()
    queue = await channel.get_queue(harness.names.queue("review"))
    back = await eventually(lambda: queue.get(fail=False), timeout=10)
    assert (back.message_id, back.routing_key) == (limited, "review.command")
    await back.ack()
    assert await queue.get(fail=False) is None


async def test_a_dead_letter_whose_secrets_were_redacted_is_not_replayed(harness: Harness) -> None:
    s = harness.settings
    body = order_body("cli-secret", currency="usd")  # refused: not a currency code
    body["items"][1] |= {"action": "transfer", "epp_code": "s3cret-EPP"}
    message_id = await harness.publish("order.place", body)
    await harness.start([placement_worker(s)], relay=False)

    async def listed():
        _code, out, _ = await cli(s, "dead-letters", "placement", "--json")
        return json.loads(out) or None
    await eventually(listed, timeout=20)
    code, out, _ = await cli(s, "dead-letters", "placement", "--replay", "--json")
    result = json.loads(out)
    assert (code, result["replayed"]) == (1, 0)
    assert [f["message_id"] for f in result["failed"]] == [message_id]
    assert "redacted" in result["failed"][0]["error"]
    assert [r["message_id"] for r in await listed()] == [message_id]  # still there


async def test_settings_and_services_mistakes_print_one_line(settings: Settings) -> None:
    closed = settings.amqp_url.replace(":5672/", ":1/")
    cases = [
        ({"FRAUD_BANNED_IPS": "notanip"}, "error: invalid setting FRAUD_BANNED_IPS: 'notanip' is not"),
        ({"AMQP_URL": "notaurl"}, "error: invalid setting AMQP_URL: 'notaurl' is not an amqp://"),
        ({"DATABASE_URL": "mysql://x"}, "error: invalid setting DATABASE_URL: 'mysql' is not"),
        ({"DATABASE_URL": settings.database_url.replace("postgres@", "nobody@")},
         "error: PostgreSQL refused the login"),
        ({"AMQP_URL": closed}, "error: cannot reach RabbitMQ at"),
        ({"AMQP_URL": settings.amqp_url.rstrip("/") + "/no-such-vhost"},
         "error: RabbitMQ at amqp://guest:***@127.0.0.1:5672/no-such-vhost refused to open"
         " virtual host 'no-such-vhost'"),
    ]
    for env, start in cases:
        command = ("queues",) if "AMQP_URL" in env else ("orders",)
        code, _out, err = await cli(settings, *command, **env)
        assert code == 1, env
        assert err.startswith(start), (env, err)
        assert len(err.strip().splitlines()) == 1, (env, err)


async def test_mistakes_print_one_line_and_exit_non_zero(settings: Settings, tmp_path) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('[[products]]\nslug = "x"\nname = "X"\nauto_setup = "sometimes"\n'
                        'prices.USD = { monthly = 1 }\n')
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes(b"\xff\xfe garbage")
    negative = tmp_path / "negative.toml"
    negative.write_text('[[products]]\nslug = "x"\nname = "X"\nprices.USD = { monthly = -1 }\n')
    cases = [
        (("show", "999999"), "error: order 999999 does not exist"),
        (("show", "99999999999999999999"),
         "error: Invalid value for 'order_id': Input should be less than or equal to 9223372"),
        (("accept", "99999999999999999999"),
         "error: Invalid value for 'order_id': Input should be less than or equal to 9223372"),
        (("pay", "1", "--amount", "1e30", "--transaction-id", "x"),
         "error: amount '1e30' is too large"),
        (("catalog", "load", str(not_utf8)), f"error: {not_utf8} is not valid TOML: not UTF-8"),
        (("catalog", "load", str(negative)),
         f"error: {negative}: schema: products.0.prices.USD.monthly: Input should be greater"),
        (("orders", "--status", "bogus"), "error: unknown status 'Bogus'"),
        (("run", "nosuch"), "error: unknown service 'nosuch'"),
        (("run", "--processes", "placement/nosuch"), "error: unknown service 'nosuch' in layout"),
        (("run", "placement", "--processes", "fraud"),
         "error: layout 'fraud' places no placement: name every service run in one of its groups"
         " (--processes, WORKER_PROCESSES)"),
        (("dead-letters", "nosuch"), "error: unknown queue 'nosuch'"),
        (("catalog", "load", str(tmp_path / "missing.toml")), "error: cannot read"),
        (("catalog", "load", str(bad_toml)),
         f"error: {bad_toml}: schema: products.0.auto_setup: Input should be"),
        # Usage mistakes too: one line, not click's usage block.
        (("show",), "error: Missing argument 'order_id'. (see `ordermill show --help`)"),
        (("show", "x"), "error: Invalid value for 'order_id'"),
        (("nosuch",), "error: No such command 'nosuch'."),
        (("accept", "1", "--no-such-option"), "error: No such option: --no-such-option"),
        (("fraud-report", "1"), "error: Missing option '--tag'. Choose from: chargeback,"),
    ]
    for args, start in cases:
        code, _out, err = await cli(settings, *args)
        assert code != 0, args
        assert err.startswith(start), (args, err)
        assert len(err.strip().splitlines()) == 1, (args, err)
        assert "Traceback" not in err


async def test_a_namespace_never_migrated_is_named_in_one_line(settings: Settings) -> None:
    namespace = settings.namespace + "-never"
    for args in (("dead-letters",), ("pay", "1", "--amount", "5", "--transaction-id", "t",
                                      "--currency", "USD")):
        code, _out, err = await cli(settings, *args, ORDERMILL_NAMESPACE=namespace)
        assert code == 1, args
        assert err.startswith("error: RabbitMQ has no "), (args, err)
        assert err.strip().endswith(f"(namespace '{namespace}'): run `ordermill migrate`"), err
        assert len(err.strip().splitlines()) == 1, (args, err)


async def test_queues_watch_json_prints_one_json_document_per_refresh(harness: Harness) -> None:
    process = await asyncio.create_subprocess_exec(
        ORDERMILL, "queues", "--watch", "--json", env=worker_env(harness.settings), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        lines = [await asyncio.wait_for(process.stdout.readline(), timeout=30) for _ in range(2)]
    finally:
        process.terminate()
        await process.wait()
    for line in lines:
        snapshot = json.loads(line)
        depths = {q["queue"]: q["messages"] for q in snapshot["queues"]}
        assert depths[f"{harness.settings.namespace}.placement"] == 0
    assert json.loads(lines[0])["at"] < json.loads(lines[1])["at"]
    # A reader that stops after one line ends the watch quietly, with success.
    piped = await asyncio.create_subprocess_exec(
        "bash", "-o", "pipefail", "-c", f"'{ORDERMILL}' queues --watch --json | head -1",
        env=worker_env(harness.settings), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(piped.communicate(), timeout=30)
    assert (piped.returncode, err.decode()) == (0, "")
    assert json.loads(out)["queues"]


def test_the_cli_names_its_rabbitmq_user_as_the_broker_checks_it(settings: Settings) -> None:
    from cli.main import _amqp_user

    # The broker compares a message's user_id with the decoded login name.
    encoded = settings.model_copy(update={"amqp_url": "amqp://ops%40example.com:pw@mq:5672/"})
    assert _amqp_user(encoded) == "ops@example.com"
    assert _amqp_user(settings.model_copy(update={"amqp_url": "amqp://mq:5672/"})) is None


async def test_help_still_prints_and_exits_zero(settings: Settings) -> None:
    for args in ((), ("--help",), ("catalog",), ("show", "--help")):
        code, out, err = await cli(settings, *args)
        assert (code, err) == (0, ""), args
        assert out.startswith("Usage: ordermill"), args


async def test_migrate_and_catalog_load_on_a_new_database(settings: Settings) -> None:
    fresh = settings.model_copy(update={"database_url": settings.database_url + "_new"})
    try:
        migrations = len(list((ROOT / "shared" / "migrations").glob("*.sql")))
        code, out, err = await cli(fresh, "migrate")
        assert code == 0, err
        assert f"created, {migrations} migration(s) applied" in " ".join(out.split())
        code, out, err = await cli(fresh, "migrate")
        assert "0 migration(s) applied" in out
        code, out, err = await cli(fresh, "catalog", "load", "catalog.example.toml")
        assert (code, out.strip()) == (
            0, "catalog loaded: 1 servers, 6 products, 4 tlds, 1 promotions")
    finally:
        import asyncpg

        admin = await asyncpg.connect(settings.database_url.rsplit("/", 1)[0] + "/postgres")
        await admin.execute(
            f'DROP DATABASE IF EXISTS "{fresh.database_url.rsplit("/", 1)[1]}" WITH (FORCE)')
        await admin.close()
