"""Staff alerts (issue 14, part 1) on a real database: a staff alert for each trigger, once
even when the event is redelivered; the new-order conditions matching and not; the Slack
message (Block Kit, escaped) received by a local HTTP server on 127.0.0.1, a 5xx retried then
delivered, the URL never logged; an email alert through the mail queue to a local SMTP
server; rule-file mistakes as one line; the dead-letter sweep against real RabbitMQ queues."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest
from fakes.receiver import Receiver
from test_notify import Inbox, serving

from conftest import eventually, order_body
from services.alerts.raising import Cause, Delivery, raise_alert
from services.alerts.rules import AlertRules, RulesError, parse_toml
from services.alerts.sender import SlackSender
from services.alerts.slack import escape
from services.alerts.store import RuleStore, latest, store
from services.alerts.sweeper import Sweeper
from services.alerts.triggers import TRIGGER_OF, may_alert
from services.alerts.worker import KEYS
from services.alerts.worker import worker as alerts_worker
from services.fraud.worker import worker as fraud_worker
from services.notify.sender import MailSender
from services.placement.worker import worker as placement_worker
from services.review.worker import worker as review_worker
from services.webhooks.sealing import Sealer
from shared import db
from shared.housekeeping import Housekeeper
from shared.runtime.testing import InMemoryFlow
from shared.settings import Settings
from shared.states import AlertTrigger
from shared.topology import SERVICE_BINDINGS, Names, declare_topology

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "<!channel> & <https://evil.example|click>"
FAST = {"webhook_allow_networks": ["127.0.0.1/32"], "webhook_retry_seconds": (0.2, 0.2, 0.2),
        "job_poll_seconds": 0.2, "webhook_timeout_seconds": 5.0,
        "console_url": "https://console.example/"}

EVERY_TRIGGER = """
[channels.team]
type = "email"
to = ["ops@provider.example"]

[[rules]]
name = "new"
trigger = "new_order"
channels = ["team"]

[[rules]]
name = "fraud"
trigger = "fraud"
channels = ["team"]

[[rules]]
name = "screening"
trigger = "screening_error"
channels = ["team"]

[[rules]]
name = "parked"
trigger = "setup_parked"
channels = ["team"]

[[rules]]
name = "unapplied"
trigger = "payment_unapplied"
channels = ["team"]

[[rules]]
name = "dead"
trigger = "dead_letter"
channels = ["team"]

[[rules]]
name = "waiting"
trigger = "review_waiting"
channels = ["team"]
when = { waiting_hours = 2 }
"""


async def load(pool: asyncpg.Pool, text: str, sealer: Sealer = Sealer()) -> AlertRules:
    rules = parse_toml(text)
    async with pool.acquire() as conn:
        rule_set_id = await store(conn, rules, source="test.toml", loaded_by="test", sealer=sealer)
    return await RuleStore(ttl=0).current(pool) if rule_set_id else rules


async def test_a_slower_refresh_never_takes_the_rule_store_back_to_an_older_set(
        pool: asyncpg.Pool) -> None:
    """Refreshes overlap (a worker's batchers, the sweep): one that read before `notify load`
    committed and answers last must not put the old set back, or the next event's handler,
    within the TTL, alerts under it after `wanted` chose the event under the new one."""
    rules = RuleStore()
    asked, answer = asyncio.Event(), asyncio.Event()

    class Late:  # the database's answer, read at once, handed over once told
        async def fetchval(self, query: str, *args: object) -> object:
            async with pool.acquire() as conn:
                value = await conn.fetchval(query, *args)
            asked.set()
            await answer.wait()
            return value

        async def fetchrow(self, query: str, *args: object) -> object:
            return await pool.fetchrow(query, *args)

    slow = asyncio.create_task(rules.refresh(Late()))  # type: ignore[arg-type]
    await asyncio.wait_for(asked.wait(), 10)  # it read: no set loaded yet
    loaded = await load(pool, EVERY_TRIGGER)
    assert (await rules.refresh(pool)).id == loaded.id
    answer.set()
    await slow
    assert (await rules.current(pool)).id == loaded.id
    older = await load(pool, EVERY_TRIGGER)  # and a newer one still replaces it
    assert (await rules.refresh(pool)).id == older.id > loaded.id


def test_every_event_the_alerts_worker_takes_has_its_trigger() -> None:
    """An event whose key has no trigger is left to its handler, never acked unhandled; and
    every key the worker is bound to has one (else `wanted` could not skip any of them)."""
    assert all(key in TRIGGER_OF for key in KEYS)
    assert may_alert(set(), "order.unknown", object())


def fast(settings: Settings) -> Settings:
    return settings.model_copy(update=FAST)


async def alerts(pool: asyncpg.Pool) -> list[tuple[str, str]]:
    return [(r["rule"], r["trigger"]) for r in await pool.fetch(
        "SELECT rule, trigger FROM alerts ORDER BY id")]


async def order(pool: asyncpg.Pool, ref: str) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM orders WHERE order_ref = $1", ref)


# -- the rules file ---------------------------------------------------------------------------

def test_the_shipped_example_loads_and_every_trigger_is_explained() -> None:
    text = (ROOT / "alerts.example.toml").read_text()
    rules = parse_toml(text)
    assert rules.triggers == set(AlertTrigger)
    for trigger in AlertTrigger:
        assert trigger.value in text


@pytest.mark.parametrize(("text", "says"), [
    ("rules = [", "not TOML"),
    ('[[rules]]\nname = "a"\ntrigger = "new_order"\nchannels = ["nowhere"]',
     "rule 'a' names the channel 'nowhere'"),
    ('[channels.m]\ntype = "email"\nto = ["x@y.example"]\n[[rules]]\nname = "big"\n'
     'trigger = "fraud"\nchannels = ["m"]\nwhen = { total_over = "5" }',
     "rules.0 (big): total_over does not apply to fraud"),
    ('[channels.m]\ntype = "email"\nto = ["x@y.example"]\n[[rules]]\nname = "w"\n'
     'trigger = "review_waiting"\nchannels = ["m"]', "needs `waiting_hours`"),
    ('[channels.m]\ntype = "email"\nto = ["x@y.example"]\n[[rules]]\nname = "w"\n'
     'trigger = "new_order"\nchannels = ["m"]\nwhen = { total_over = "lots" }', "total_over"),
    ('[channels.m]\ntype = "email"\nto = ["ops@x.example\\r\\nBcc: all@x.example"]',
     "is not an email address"),
    ('[channels.m]\ntype = "pager"', "does not match any of the expected tags"),
    ('[channels.s]\ntype = "slack"\nurl = "ftp://hooks.slack.com/services/T1/B1/SECRETPART"',
     "the Slack URL is not usable"),
    ('[channels.m]\ntype = "email"\nto = ["x@y.example"]\n[[rules]]\nname = "a"\n'
     'trigger = "fraud"\nchannels = ["m"]\n[[rules]]\nname = "a"\ntrigger = "fraud"\n'
     'channels = ["m"]', "two rules are named 'a'"),
    ('[[rules]]\nname = "a"\ntrigger = "someday"\nchannels = ["m"]', "trigger"),
])
def test_a_mistake_in_the_rules_file_is_one_line(text: str, says: str) -> None:
    with pytest.raises(RulesError) as caught:
        parse_toml(text)
    message = str(caught.value)
    assert says in message
    assert "\n" not in message and "SECRETPART" not in message


def test_a_slack_url_on_a_private_address_is_refused_unless_allowed() -> None:
    from services.webhooks.addresses import Policy
    rules = parse_toml('[channels.s]\ntype = "slack"\nurl = "http://10.0.0.7/services/x"')
    with pytest.raises(RulesError, match="private"):
        rules.check_addresses(Policy())
    rules.check_addresses(Policy.of(["10.0.0.0/8"]))
    plain = parse_toml('[channels.s]\ntype = "slack"\nurl = "http://hooks.slack.com/services/x"')
    with pytest.raises(RulesError, match="plain http"):
        plain.check_addresses(Policy())


async def test_a_load_replaces_the_rules_whole_and_show_never_holds_the_slack_url(
    pool: asyncpg.Pool,
) -> None:
    secret = "https://hooks.slack.com/services/T0/B0/s3cr3tTOKEN"
    first = await load(pool, f'[channels.s]\ntype = "slack"\nurl = "{secret}"\n'
                             '[[rules]]\nname = "a"\ntrigger = "fraud"\nchannels = ["s"]')
    assert [r.name for r in first.rules] == ["a"]
    from cryptography.fernet import Fernet
    sealer = Sealer.from_key(__import__("pydantic").SecretStr(Fernet.generate_key().decode()))
    second = await load(pool, f'[channels.s]\ntype = "slack"\nurl = "{secret}"\n'
                              '[[rules]]\nname = "b"\ntrigger = "new_order"\nchannels = ["s"]',
                        sealer)
    assert [r.name for r in second.rules] == ["b"] and second.id != first.id
    async with pool.acquire() as conn:
        shown = await latest(conn)
    assert shown["rules"] == [{"name": "b", "trigger": "new_order", "channels": ["s"]}]
    assert shown["channels"] == {"s": {"type": "slack", "host": "hooks.slack.com"}}
    assert "s3cr3t" not in json.dumps(shown)
    # Stored sealed with the key; only the channels' hosts in the clear.
    row = await pool.fetchrow("SELECT channels::text, secrets FROM alert_rule_sets WHERE id = $1",
                              second.id)
    assert "s3cr3t" not in row["channels"] and "s3cr3t" not in json.dumps(row["secrets"])
    assert sealer.unseal(row["secrets"]["s"]) == secret


# -- a staff alert for each trigger, once -----------------------------------------------------

async def test_a_staff_alert_for_each_trigger_once_even_when_redelivered(
    flow: InMemoryFlow, pool: asyncpg.Pool,
) -> None:
    s = fast(flow.settings)
    await load(pool, EVERY_TRIGGER)
    flow.add(placement_worker(s), fraud_worker(s), review_worker(s), alerts_worker(s))

    await flow.send("order.place", order_body("al-ok"))
    await flow.send("order.place", order_body("al-fraud", ip_address="192.0.2.66"))
    events = await flow.run()
    ok, fraud = await order(pool, "al-ok"), await order(pool, "al-fraud")
    assert (ok["status"], fraud["status"]) == ("Pending", "Fraud")
    # An operator sets the good order to Fraud as well.
    await flow.send("review.command", {"order_id": ok["id"], "action": "fraud",
                                       "operator": "alice"})
    events += await flow.run()
    # Events no flow here produces: a screening that could not complete, parked setups, a
    # payment kept unapplied.
    service_id = await pool.fetchval("SELECT id FROM services WHERE order_id = $1", ok["id"])
    domain_id = await pool.fetchval("SELECT id FROM domains WHERE order_id = $1", ok["id"])
    payment_id = await pool.fetchval(
        "INSERT INTO payments (gateway, transaction_id, amount, raw_amount, currency, status,"
        " reason, message_id) VALUES ('stripe', 'ch_1', 5, '5.00', 'USD', 'unapplied',"
        " 'unknown invoice 999', 'm-pay') RETURNING id")
    direct = [
        ("order.screened", {"order_id": ok["id"], "order_ref": "al-ok", "screening": "error",
                            "score": None, "threshold": "20", "provider": "maxmind"}),
        ("service.failed", {"service_id": service_id, "order_id": ok["id"], "order_ref": "al-ok",
                            "job_id": 7, "detail": {"error": "WHM said no"}}),
        ("domain.failed", {"domain_id": domain_id, "order_id": ok["id"], "order_ref": "al-ok",
                           "job_id": 8, "detail": {"error": "registry timeout"}}),
        ("payment.unapplied", {"payment_id": payment_id, "reason": "unknown invoice 999",
                               "invoice_id": 999}),
    ]
    for key, body in direct:
        await flow.send(key, body, to="alerts", message_id=f"direct-{key}")
    # Waiting for review: the good order's twin, placed "three hours ago".
    await flow.send("order.place", order_body("al-wait"))
    await flow.run()
    await pool.execute("UPDATE orders SET created_at = now() - interval '3 hours'"
                       " WHERE order_ref = 'al-wait'")
    sweeper = Sweeper(RuleStore(ttl=0), Delivery(), amqp_url="", names=Names("x"), every_seconds=60)
    rules = await RuleStore(ttl=0).current(pool)
    assert await sweeper.review_waiting(pool, rules) == 1
    assert await sweeper.dead_letters(pool, rules, {"x.placement.dead": 2}) == 1

    got = await alerts(pool)
    assert sorted(got) == sorted([
        ("new", "new_order"), ("new", "new_order"), ("new", "new_order"),
        ("fraud", "fraud"), ("fraud", "fraud"),  # by screening, then by the operator
        ("screening", "screening_error"), ("parked", "setup_parked"), ("parked", "setup_parked"),
        ("unapplied", "payment_unapplied"), ("waiting", "review_waiting"),
        ("dead", "dead_letter")])
    titles = {r["trigger"] + ":" + r["title"] for r in await pool.fetch("SELECT * FROM alerts")}
    assert any("by screening" in t for t in titles) and any("by operator " in t for t in titles)

    # Everything again: the broker redelivers every event, the sweeps run twice more.
    for event in events:
        if event.routing_key in KEYS:
            await flow.deliver([flow.as_delivery(event)], to="alerts")
    for key, body in direct:
        await flow.send(key, body, to="alerts", message_id=f"direct-{key}")
    assert await sweeper.review_waiting(pool, rules) == 0
    assert await sweeper.dead_letters(pool, rules, {"x.placement.dead": 3}) == 0
    # A handler re-run past the inbox (a crash after the send, before the ack) changes nothing.
    alert = await pool.fetchrow("SELECT * FROM alerts WHERE rule = 'new' ORDER BY id LIMIT 1")
    async with pool.acquire() as conn, conn.transaction():
        assert await raise_alert(conn, rules, rules.rules[0], Cause(
            AlertTrigger.NEW_ORDER, alert["cause"], "again"), Delivery()) is None
    assert sorted(await alerts(pool)) == sorted(got)
    # One mail per alert, to the staff address, on the mail queue.
    mails = await pool.fetch("SELECT * FROM emails WHERE template = 'staff_alert'")
    assert len(mails) == len(got)
    assert {m["recipient"] for m in mails} == {"ops@provider.example"}


async def test_a_backlog_of_waiting_orders_is_one_summary_alert_then_one_by_one(
    flow: InMemoryFlow, pool: asyncpg.Pool,
) -> None:
    """A rule loaded over many old Pending orders sends one message, not one per order; none
    of them alerts again; an order crossing the line later alerts on its own."""
    await load(pool, '[channels.m]\ntype = "email"\nto = ["ops@x.example"]\n'
                     '[[rules]]\nname = "waiting"\ntrigger = "review_waiting"\n'
                     'channels = ["m"]\nwhen = { waiting_hours = 2 }')
    s = flow.settings
    flow.add(placement_worker(s), fraud_worker(s))
    for i in range(6):
        await flow.send("order.place", order_body(f"bl-{i}", ip_address=f"203.0.113.{20 + i}"))
    await flow.run()
    await pool.execute("UPDATE orders SET created_at = now() - make_interval(hours => 30 - id::int)"
                       " WHERE order_ref <> 'bl-5'")
    oldest = await pool.fetchval("SELECT order_number FROM orders ORDER BY created_at LIMIT 1")
    rules = await RuleStore(ttl=0).current(pool)
    sweeper = Sweeper(RuleStore(ttl=0), Delivery(), amqp_url="", names=Names("x"),
                      every_seconds=60, summary_over=3)

    assert await sweeper.review_waiting(pool, rules) == 1
    rows = await pool.fetch("SELECT * FROM alerts ORDER BY id")
    summary = [r for r in rows if r["summary_id"] is None]
    assert len(summary) == 1 and summary[0]["title"] == "5 orders have waited over 2 h for review"
    assert summary[0]["facts"]["Oldest"].startswith(f"#{oldest}, waiting ")
    covered = [r for r in rows if r["summary_id"] is not None]
    assert {r["summary_id"] for r in covered} == {summary[0]["id"]}
    assert len(covered) == 5 and len({r["order_id"] for r in covered}) == 5
    mails = await pool.fetch("SELECT * FROM emails WHERE template = 'staff_alert'")
    assert len(mails) == 1  # one message for the five
    # Again: nothing new. Then the sixth order crosses the line alone: its own alert.
    assert await sweeper.review_waiting(pool, rules) == 0
    await pool.execute("UPDATE orders SET created_at = now() - interval '3 hours'"
                       " WHERE order_ref = 'bl-5'")
    assert await sweeper.review_waiting(pool, rules) == 1
    last = await pool.fetchrow("SELECT * FROM alerts ORDER BY id DESC LIMIT 1")
    assert last["summary_id"] is None and last["title"].startswith("Order #")
    assert await pool.fetchval("SELECT count(*) FROM emails WHERE template = 'staff_alert'") == 2


async def test_dead_letters_alert_once_per_episode(pool: asyncpg.Pool) -> None:
    rules = await load(pool, EVERY_TRIGGER)
    sweeper = Sweeper(RuleStore(ttl=0), Delivery(), amqp_url="", names=Names("ns"), every_seconds=60,
                      quiet_seconds=0)
    passes = [{"ns.fraud.dead": 0}, {"ns.fraud.dead": 1}, {"ns.fraud.dead": 4},
              {"ns.fraud.dead": 0}, {"ns.fraud.dead": 2}]
    raised = [await sweeper.dead_letters(pool, rules, depths) for depths in passes]
    assert raised == [0, 1, 0, 0, 1]
    causes = [r["cause"] for r in await pool.fetch("SELECT cause FROM alerts ORDER BY id")]
    assert causes == ["dead:ns.fraud.dead:1", "dead:ns.fraud.dead:2"]


async def test_an_episode_ends_only_after_the_queue_stayed_empty(pool: asyncpg.Pool) -> None:
    """An operator listing the dead letters holds them unacknowledged: the queue reads empty
    for a moment, which must not end the episode and alert the same dead letters again."""
    rules = await load(pool, EVERY_TRIGGER)
    sweeper = Sweeper(RuleStore(ttl=0), Delivery(), amqp_url="", names=Names("ns"), every_seconds=60,
                      quiet_seconds=300)
    q = {"ns.fraud.dead": 3}
    empty = {"ns.fraud.dead": 0}
    assert await sweeper.dead_letters(pool, rules, q) == 1
    assert await sweeper.dead_letters(pool, rules, empty) == 0  # being listed
    assert await sweeper.dead_letters(pool, rules, q) == 0  # back: the same episode
    assert await sweeper.dead_letters(pool, rules, empty) == 0  # replayed
    await pool.execute("UPDATE alert_watches SET empty_since = now() - interval '301 seconds'")
    assert await sweeper.dead_letters(pool, rules, empty) == 0  # quiet long enough: ended
    assert await sweeper.dead_letters(pool, rules, {"ns.fraud.dead": 1}) == 1  # a new one
    causes = [r["cause"] for r in await pool.fetch("SELECT cause FROM alerts ORDER BY id")]
    assert causes == ["dead:ns.fraud.dead:1", "dead:ns.fraud.dead:2"]


@pytest.mark.parametrize(("when", "alerted"), [
    ('total_over = "0.00"', ["a1", "a2"]),
    ('total_over = "100000"', []),
    ('total_over = "0.00", currency = "EUR"', []),  # the orders are in USD
    ('total_over = "0.00", currency = "USD"', ["a1", "a2"]),
    ('product = ["starter"]', ["a1", "a2"]),
    ('product = ["dedicated", "reseller"]', []),
    ("first_order = true", ["a1"]),
    ("first_order = false", ["a2"]),
    ('first_order = true, product = ["starter"], total_over = "0.01"', ["a1"]),
])
async def test_new_order_conditions_match_and_do_not(
    flow: InMemoryFlow, pool: asyncpg.Pool, when: str, alerted: list[str],
) -> None:
    await load(pool, '[channels.m]\ntype = "email"\nto = ["ops@x.example"]\n'
                     f'[[rules]]\nname = "r"\ntrigger = "new_order"\nchannels = ["m"]\nwhen = {{ {when} }}')
    s = flow.settings
    flow.add(placement_worker(s), fraud_worker(s), alerts_worker(s))
    client = {"email": "same@shop.example", "first_name": "Ann", "last_name": "Lee",
              "country": "GB", "company": None}
    for ref in ("a1", "a2"):  # the same client twice: only a1 is a first order
        await flow.send("order.place", order_body(ref, client=client))
        await flow.run()
    refs = [r["order_ref"] for r in await pool.fetch(
        "SELECT o.order_ref FROM alerts a JOIN orders o ON o.id = a.order_id ORDER BY a.id")]
    assert refs == alerted


async def test_fraud_rules_narrowed_by_source(flow: InMemoryFlow, pool: asyncpg.Pool) -> None:
    await load(pool, '[channels.m]\ntype = "email"\nto = ["ops@x.example"]\n'
                     '[[rules]]\nname = "by-operator"\ntrigger = "fraud"\nchannels = ["m"]\n'
                     'when = { source = "operator" }')
    s = flow.settings
    flow.add(placement_worker(s), fraud_worker(s), alerts_worker(s))
    await flow.send("order.place", order_body("src-fraud", ip_address="192.0.2.66"))
    await flow.run()
    assert (await order(pool, "src-fraud"))["status"] == "Fraud"
    assert await alerts(pool) == []


async def test_a_rule_loaded_while_running_alerts_on_the_very_next_event(
    flow: InMemoryFlow, pool: asyncpg.Pool,
) -> None:
    """The worker has taken events with no rule loaded (and cached that); a rule loaded now
    alerts on the very next event, and one loaded over it (no longer about new orders) stops
    the next: the set in force is read once a batch, not trusted for seconds."""
    s = flow.settings
    flow.add(placement_worker(s), fraud_worker(s), alerts_worker(s))
    await flow.send("order.place", order_body("before-rule"))
    await flow.run()
    await load(pool, '[channels.m]\ntype = "email"\nto = ["ops@x.example"]\n'
                     '[[rules]]\nname = "n"\ntrigger = "new_order"\nchannels = ["m"]')
    await flow.send("order.place", order_body("after-rule"))
    await flow.run()
    await load(pool, '[channels.m]\ntype = "email"\nto = ["ops@x.example"]\n'
                     '[[rules]]\nname = "f"\ntrigger = "fraud"\nchannels = ["m"]')
    await flow.send("order.place", order_body("after-another"))
    await flow.run()
    refs = [r["order_ref"] for r in await pool.fetch(
        "SELECT o.order_ref FROM alerts a JOIN orders o ON o.id = a.order_id ORDER BY a.id")]
    assert refs == ["after-rule"]


async def test_events_no_rule_is_about_cost_one_read_and_no_transaction(
    flow: InMemoryFlow, pool: asyncpg.Pool,
) -> None:
    """No rule about an event (no rule set, or rules about other triggers, or a screening
    that ended well): a batch costs the alerts worker one read of the set in force, no
    transaction and no inbox row; its events are acked."""
    s = flow.settings
    flow.add(placement_worker(s), fraud_worker(s))
    for n in range(2):
        await flow.send("order.place", order_body(f"quiet-{n}"))
    events = [e for e in await flow.run() if e.routing_key in KEYS]
    assert {e.routing_key for e in events} == {"order.placed", "order.screened"}
    flow.add(alerts_worker(s))
    seen: list[str] = []
    held = [await pool.acquire() for _ in range(pool.get_max_size())]
    for conn in held:
        conn.add_query_logger(lambda q: seen.append(" ".join(q.query.split())))
    for conn in held:
        await pool.release(conn)
    for rules in (None, '[channels.m]\ntype = "email"\nto = ["ops@x.example"]\n'
                        '[[rules]]\nname = "s"\ntrigger = "screening_error"\nchannels = ["m"]'):
        if rules:
            await load(pool, rules)
        seen.clear()
        batch = [flow.as_delivery(e) for e in events]
        await flow.deliver(batch, to="alerts")
        assert [m.outcome for m in batch] == ["acked"] * len(batch)
        assert [q for q in seen if "alert_rule_sets" not in q] == [], seen
    assert await pool.fetchval("SELECT count(*) FROM inbox WHERE consumer = 'alerts'") == 0
    assert await alerts(pool) == []


# -- Slack ------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def slack_sending(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[SlackSender]:
    sender = SlackSender(settings.webhooks, settings.database_url)
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(pool, stop))
    try:
        yield sender
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def slack_delivery(pool: asyncpg.Pool, status: str) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        row = await pool.fetchrow("SELECT * FROM alert_deliveries ORDER BY id DESC LIMIT 1")
        return row if row is not None and row["status"] == status else None
    return await eventually(check, timeout=20)


async def test_slack_gets_block_kit_escaped_with_a_console_link_and_a_5xx_is_retried(
    flow: InMemoryFlow, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture,
) -> None:
    s = fast(flow.settings)
    async with Receiver() as receiver:
        receiver.then(503, 502)  # Slack having a bad moment, twice
        url = receiver.url("/services/T0/B0/s3cr3tTOKEN")
        await load(pool, f'[channels.slack]\ntype = "slack"\nurl = "{url}"\n'
                         '[[rules]]\nname = "new"\ntrigger = "new_order"\nchannels = ["slack"]')
        flow.add(placement_worker(s), fraud_worker(s), alerts_worker(s))
        client = {"email": "evil@shop.example", "first_name": HOSTILE, "last_name": "*bold* `x`",
                  "country": "GB", "company": "A&B <Ltd>"}
        await flow.send("order.place", order_body("sl-1", client=client))
        await flow.run()
        placed = await order(pool, "sl-1")
        with caplog.at_level(logging.INFO):
            async with slack_sending(s, pool):
                row = await slack_delivery(pool, "delivered")
    assert row["attempts"] == 3 and row["status_code"] == 200
    assert [r.path for r in receiver.received] == ["/services/T0/B0/s3cr3tTOKEN"] * 3
    assert len({r.body for r in receiver.received}) == 1  # the same message every attempt
    assert receiver.received[0].headers["Content-Type"] == "application/json"
    message = json.loads(receiver.received[0].body)
    # Block Kit: sections of mrkdwn, the facts as fields, the link; and a text fallback.
    assert isinstance(message["text"], str) and message["text"]
    types = [b["type"] for b in message["blocks"]]
    assert types == ["section", "section", "section", "context"]
    title, facts, link = message["blocks"][:3]
    assert title["text"]["type"] == "mrkdwn" and f"#{placed['order_number']}" in title["text"]["text"]
    assert all(f["type"] == "mrkdwn" for f in facts["fields"])
    assert link["text"]["text"] == (f"<https://console.example/orders/{placed['id']}"
                                    "|Open in the Ordermill console>")
    # The hostile name arrives escaped everywhere, never as a mention or a link.
    everything = json.dumps(message)
    assert "<!channel>" not in everything and "<https://evil" not in everything
    assert escape(HOSTILE) in message["text"]
    client_field = next(f["text"] for f in facts["fields"] if f["text"].startswith("*Client*"))
    assert "&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;" in client_field
    assert "A&amp;B &lt;Ltd&gt;" in client_field
    # The URL is a secret: in no log line of Ordermill's (the fake Slack's access log aside),
    # no stored error.
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records
                       if r.name.startswith("ordermill"))
    assert "s3cr3t" not in logged and "slack alert delivered" in logged
    errors = await pool.fetchval("SELECT string_agg(coalesce(last_error, ''), ' ')"
                                 " FROM alert_deliveries")
    assert "s3cr3t" not in errors


async def test_slack_refusals_park_and_private_addresses_are_not_reached(
    pool: asyncpg.Pool, db_settings: Settings,
) -> None:
    async with Receiver() as receiver:
        receiver.default.status = 404  # Slack: no_service (the hook was removed)
        rules = await load(pool, f'[channels.slack]\ntype = "slack"\nurl = "{receiver.url()}"\n'
                                 '[[rules]]\nname = "d"\ntrigger = "dead_letter"\n'
                                 'channels = ["slack"]')
        async with pool.acquire() as conn, conn.transaction():
            await raise_alert(conn, rules, rules.rules[0],
                              Cause(AlertTrigger.DEAD_LETTER, "c1", "dead letters"), Delivery())
        async with slack_sending(fast(db_settings), pool):
            row = await slack_delivery(pool, "parked")
        assert row["attempts"] == 1 and row["status_code"] == 404
        # Without WEBHOOK_ALLOW_NETWORKS the same URL (loopback) is never connected to.
        receiver.received.clear()
        async with pool.acquire() as conn, conn.transaction():
            await raise_alert(conn, rules, rules.rules[0],
                              Cause(AlertTrigger.DEAD_LETTER, "c2", "dead letters"), Delivery())
        closed = fast(db_settings).model_copy(update={"webhook_allow_networks": []})
        async with slack_sending(closed, pool):
            row = await slack_delivery(pool, "parked")
        assert "loopback" in row["last_error"] and receiver.received == []


# -- email ------------------------------------------------------------------------------------

async def test_an_email_alert_goes_through_the_mail_queue_to_staff(
    flow: InMemoryFlow, pool: asyncpg.Pool,
) -> None:
    s = fast(flow.settings)
    await load(pool, '[channels.staff]\ntype = "email"\nto = ["ops@provider.example",'
                     ' "boss@provider.example"]\n[[rules]]\nname = "big"\ntrigger = "new_order"\n'
                     'description = "Look at it"\nchannels = ["staff"]\n'
                     'when = { total_over = "0.00", currency = "USD" }')
    flow.add(placement_worker(s), fraud_worker(s), alerts_worker(s))
    client = {"email": "c@shop.example", "first_name": "<b>Eve</b>", "last_name": "Lee",
              "country": "GB", "company": None}
    await flow.send("order.place", order_body("em-1", client=client, send_confirmation=False))
    await flow.run()
    rows = await pool.fetch("SELECT * FROM emails WHERE template = 'staff_alert' ORDER BY id")
    assert [r["recipient"] for r in rows] == ["ops@provider.example", "boss@provider.example"]
    assert all(r["status"] == "pending" and r["order_id"] is None for r in rows)
    inbox = Inbox()
    with serving(inbox) as port:
        mail_settings = s.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port,
                                             "mail_from": "Ordermill <alerts@provider.example>"})
        sender = MailSender(mail_settings.mail, None)
        assert await sender.send_due(pool) == 2
        await sender.close()
    placed = await order(pool, "em-1")
    message = next(m for m in inbox.messages if m["To"] == "ops@provider.example")
    assert message["Subject"].startswith(f"[Ordermill] New order #{placed['order_number']}")
    parts = {p.get_content_type(): p.get_payload(decode=True).decode()
             for p in message.walk() if not p.is_multipart()}
    assert "Look at it" in parts["text/plain"] and "<b>Eve</b>" in parts["text/plain"]
    assert "&lt;b&gt;Eve&lt;/b&gt;" in parts["text/html"] and "<b>Eve</b>" not in parts["text/html"]
    assert f"https://console.example/orders/{placed['id']}" in parts["text/html"]
    assert await pool.fetchval("SELECT count(*) FROM emails WHERE template = 'staff_alert'"
                               " AND status = 'sent'") == 2


async def test_a_webhook_channel_gets_an_alert_delivery(pool: asyncpg.Pool) -> None:
    from test_webhooks import add
    endpoint, _ = await add(pool, "http://127.0.0.1:9/alerts", ["invoice.paid"])
    rules = await load(pool, f'[channels.hook]\ntype = "webhook"\nendpoint = {endpoint}\n'
                             '[[rules]]\nname = "p"\ntrigger = "setup_parked"\nchannels = ["hook"]')
    for _ in range(2):
        async with pool.acquire() as conn, conn.transaction():
            await raise_alert(conn, rules, rules.rules[0], Cause(
                AlertTrigger.SETUP_PARKED, "job:1:m1", "Setup parked", {"Setup": "x"}), Delivery())
    rows = await pool.fetch("SELECT * FROM webhook_deliveries")
    assert len(rows) == 1 and rows[0]["event_type"] == "alert.setup_parked"
    body = json.loads(rows[0]["body"])
    assert body["data"]["rule"] == "p" and body["data"]["facts"] == {"Setup": "x"}


# -- retention ----------------------------------------------------------------------------

async def test_housekeeping_trims_old_alerts_but_keeps_one_still_to_deliver(
    pool: asyncpg.Pool, db_settings: Settings,
) -> None:
    rules = await load(pool, '[channels.s]\ntype = "slack"\nurl = "https://hooks.slack.com/x"\n'
                             '[[rules]]\nname = "d"\ntrigger = "dead_letter"\nchannels = ["s"]')
    async with pool.acquire() as conn, conn.transaction():
        for cause in ("old-sent", "old-waiting", "new"):
            await raise_alert(conn, rules, rules.rules[0],
                              Cause(AlertTrigger.DEAD_LETTER, cause, cause), Delivery())
    await pool.execute("UPDATE alerts SET created_at = now() - interval '100 days'"
                       " WHERE cause LIKE 'old-%'")
    await pool.execute("UPDATE alert_deliveries d SET status = 'delivered' FROM alerts a"
                       " WHERE a.id = d.alert_id AND a.cause IN ('old-sent', 'new')")
    deleted = await Housekeeper(db_settings.housekeeping).once(pool)
    assert deleted["alerts"] == 1
    assert sorted(r["cause"] for r in await pool.fetch("SELECT cause FROM alerts")) == [
        "new", "old-waiting"]
    assert await pool.fetchval("SELECT count(*) FROM alert_deliveries") == 2


# -- topology and the real broker ---------------------------------------------------------

def test_the_alerts_queue_takes_the_keys_its_worker_routes() -> None:
    assert set(SERVICE_BINDINGS["alerts"]) == set(KEYS)


async def test_the_sweep_reads_real_dead_letter_queues(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    names = Names(settings.namespace)
    pool = await db.create_pool(settings.database_url, max_size=4, attempts=3)
    try:
        await declare_topology(connection, names, delivery_limit=20)
        rules = await load(pool, EVERY_TRIGGER)
        assert rules.for_trigger(AlertTrigger.DEAD_LETTER)
        sweeper = Sweeper(RuleStore(ttl=0), Delivery(), amqp_url=settings.amqp_url, names=names,
                          every_seconds=60)
        assert await sweeper.once(pool) == 0  # every dead-letter queue empty
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"order_ref": "x"}'), routing_key=names.dead_queue("placement"))
        assert await eventually(lambda: sweeper.once(pool)) == 1
        assert await sweeper.once(pool) == 0
        row = await pool.fetchrow("SELECT * FROM alerts")
        assert row["cause"] == f"dead:{names.dead_queue('placement')}:1"
        assert row["facts"]["Look"] == "ordermill dead-letters placement"
        await sweeper.close()
    finally:
        await pool.close()
        await connection.close()


# -- the CLI ----------------------------------------------------------------------------------

@pytest.mark.slow  # runs `ordermill` a few times
async def test_notify_load_and_show_through_the_cli(
    db_settings: Settings, pool: asyncpg.Pool, tmp_path: Path,
) -> None:
    from test_cli import cli

    s = db_settings
    good = tmp_path / "alerts.toml"
    good.write_text((ROOT / "alerts.example.toml").read_text().replace(
        "XXXXXXXXXXXXXXXXXXXXXXXX", "s3cr3tTOKEN"))
    code, out, err = await cli(s, "notify", "load", str(good))
    assert code == 0, err
    assert "loaded from alerts.toml: 9 rule(s)" in out and "s3cr3t" not in out + err
    for args in (("notify", "show"), ("notify", "show", "--json")):
        code, out, err = await cli(s, *args)
        assert code == 0 and "hooks.slack.com" in out and "s3cr3t" not in out + err
    shown = json.loads(out)
    assert {r["name"] for r in shown["rules"]} >= {"big-order", "review-waiting", "dead-letters"}

    bad = tmp_path / "bad.toml"
    bad.write_text('[channels.m]\ntype = "email"\nto = ["ops@x.example"]\n[[rules]]\n'
                   'name = "big"\ntrigger = "fraud"\nchannels = ["m"]\nwhen = { total_over = "5" }\n')
    missing = tmp_path / "hook.toml"
    missing.write_text('[channels.h]\ntype = "webhook"\nendpoint = 4242\n')
    typo = tmp_path / "typo.toml"
    typo.write_text('[channels.m]\ntype = "email"\nto = ["ops@x.example"]\n[[rules]]\n'
                    'name = "ded"\ntrigger = "new_order"\nchannels = ["m"]\n'
                    'when = { product = ["starter", "dedicatd"] }\n')
    for path, says in ((bad, "rules.0 (big): total_over does not apply to fraud"),
                       (missing, "webhook endpoint 4242 does not exist"),
                       (typo, "rule 'ded': no product 'dedicatd' in the catalog"),
                       (tmp_path / "none.toml", "cannot read")):
        code, out, err = await cli(s, "notify", "load", str(path))
        assert code != 0 and says in err, err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:")
    # Nothing changed: the first set is still in force.
    assert await pool.fetchval("SELECT count(*) FROM alert_rule_sets") == 1
