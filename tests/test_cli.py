"""The `ordermill` CLI against a real database and broker: read commands, --json, errors."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

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
    assert pending["queued"] == []

    code, out, _ = await cli(s, "queues", "--json")
    depths = {q["queue"]: q for q in json.loads(out)}
    assert set(depths) == {f"{s.namespace}.{n}" for n in
                           ("placement", "placement.dead", "fraud", "fraud.dead",
                            "provisioning", "provisioning.dead", "review", "review.dead",
                            "notify", "notify.dead")}
    assert depths[f"{s.namespace}.placement"]["consumers"] == 1
    assert depths[f"{s.namespace}.placement.dead"]["messages"] == 0

    code, out, _ = await cli(s, "catalog", "show", "--json")
    catalog = json.loads(out)
    assert {p["slug"]: p["auto_setup"] for p in catalog["products"]} == {
        "starter": "on_payment", "business": "on_payment", "trial": "on_order",
        "reseller": "on_accept", "dedicated": "never"}

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
    assert (code, json.loads(out)) == (0, {"replayed": 1})
    order = await eventually(lambda: harness.order("cli-replay"))
    assert order["total"] == 11
    assert order["placed_message_id"] == message_id
    code, out, _ = await cli(s, "dead-letters", "--json")
    assert json.loads(out) == []


async def test_mistakes_print_one_line_and_exit_non_zero(settings: Settings, tmp_path) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('[[products]]\nslug = "x"\nname = "X"\nauto_setup = "sometimes"\n'
                        'prices.USD = { monthly = 1 }\n')
    cases = [
        (("show", "999999"), "error: order 999999 does not exist"),
        (("orders", "--status", "bogus"), "error: unknown status 'Bogus'"),
        (("run", "nosuch"), "error: unknown service 'nosuch'"),
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
            0, "catalog loaded: 1 servers, 5 products, 4 tlds, 1 promotions")
    finally:
        import asyncpg

        admin = await asyncpg.connect(settings.database_url.rsplit("/", 1)[0] + "/postgres")
        await admin.execute(
            f'DROP DATABASE IF EXISTS "{fresh.database_url.rsplit("/", 1)[1]}" WITH (FORCE)')
        await admin.close()
