"""The fraud policy (issue 16) through the broker-free harness, on a real database: the review
band, each kind of operator rule, the order of rules and provider, a second order from a
client with a Fraud order, re-screening with every screening kept. (FraudLabs Pro, over
HTTPS, and the CLI are in test_fraudlabspro.py.)"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cli import views
from conftest import order_body
from services.fraud.handlers import Screener
from services.fraud.operator_rules import RulesError, parse, parse_toml
from services.fraud.providers.base import FraudResult, OrderFacts, ProviderError
from services.fraud.rule_store import store
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.worker import worker as provisioning_worker
from services.review.worker import worker as review_worker
from shared.runtime import WorkerSpec, route
from shared.runtime.testing import InMemoryFlow
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TRIAL = [{"type": "product", "product": "trial", "billing_cycle": "monthly",
          "domain": "trial.example"}]


class FixedProvider:
    """A local provider that answers what the test says (a score, REVIEW, an IP country) and
    counts the calls: the rules' order around a provider is what is tested."""

    name = "fixed"
    remote = False

    def __init__(self, score: Decimal = Decimal("1.00"), *, review: bool = False,
                 ip_country: str | None = None) -> None:
        self.answer = score
        self.review = review
        self.ip_country = ip_country
        self.calls = 0

    async def score(self, facts: OrderFacts) -> FraudResult:
        self.calls += 1
        return FraudResult(score=self.answer, raw={"fixed": str(self.answer)},
                           review=self.review, ip_country=self.ip_country)

    async def close(self) -> None:
        return None


def fraud_spec(settings: Settings, provider: FixedProvider) -> WorkerSpec:
    screener = Screener(settings.fraud, provider)
    return WorkerSpec(service="fraud", routes={
        "order.placed": route(screener.on_placed), "order.rescreen": route(screener.on_rescreen)})


def with_band(settings: Settings, review: str | None = "10", threshold: str = "20") -> Settings:
    return Settings.model_validate({**settings.model_dump(), "fraud_review_threshold": review,
                                    "fraud_threshold": threshold})


async def order(flow: InMemoryFlow, ref: str) -> asyncpg.Record:
    return await flow.pool.fetchrow("SELECT * FROM orders WHERE order_ref = $1", ref)


async def latest_check(flow: InMemoryFlow, order_id: int) -> asyncpg.Record:
    return await flow.pool.fetchrow(
        "SELECT * FROM fraud_checks WHERE order_id = $1 ORDER BY id DESC LIMIT 1", order_id)


async def load_rules(flow: InMemoryFlow, toml: str) -> int:
    async with flow.pool.acquire() as conn:
        return await store(conn, parse_toml(toml), source="test.toml", loaded_by="test")


async def place(flow: InMemoryFlow, ref: str, **overrides: Any) -> asyncpg.Record:
    await flow.send("order.place", order_body(ref, **overrides))
    await flow.run()
    return await order(flow, ref)


# -- the review band ------------------------------------------------------------------------

@pytest.mark.parametrize(("score", "screening", "status"), [
    ("9.99", "passed", "Pending"),  # below the band
    ("10.00", "passed", "Pending"),  # at the band's floor: not over it
    ("10.01", "review", "Pending"),  # inside
    ("20.00", "review", "Pending"),  # at FRAUD_THRESHOLD: still not Fraud
    ("20.01", "failed", "Fraud"),  # above: Fraud
])
async def test_the_review_band(flow: InMemoryFlow, score: str, screening: str,
                               status: str) -> None:
    s = with_band(flow.settings)
    flow.add(placement_worker(s), fraud_spec(s, FixedProvider(Decimal(score))),
             provisioning_worker(s))
    row = await place(flow, "band-1", items=TRIAL)
    assert (row["status"], row["screening"]) == (status, screening)
    assert row["needs_review"] is (screening == "review")
    check = await latest_check(flow, row["id"])
    assert (check["result"], check["score"], check["review_threshold"]) == (
        screening, Decimal(score), Decimal("10.00"))
    jobs = await flow.pool.fetchval("SELECT count(*) FROM jobs WHERE order_id = $1", row["id"])
    mails = [m for m in flow.events("email.send") if m["order_ref"] == "band-1"]
    if screening == "review":
        assert [r["code"] for r in check["review_reasons"]] == ["review_band"]
        # The storefront can tell the customer the order is being checked.
        [event] = flow.events("order.screened")
        assert (event["screening"], event["needs_review"], event["review_reasons"]) == (
            "passed", True, ["review_band"])
        # Held like a screening error: the on_order trial is not set up, no mail goes out.
        assert (jobs, mails) == (0, [])
    elif screening == "passed":
        [event] = flow.events("order.screened")
        assert (event["needs_review"], event["review_reasons"]) == (False, [])
        assert jobs == 1 and len(mails) == 2  # the trial set up at once; both mails
    else:
        assert flow.events("order.screened") == [] and flow.events("order.fraud")


async def test_no_band_unless_set(flow: InMemoryFlow) -> None:
    s = with_band(flow.settings, review=None)
    flow.add(placement_worker(s), fraud_spec(s, FixedProvider(Decimal("19.99"))))
    row = await place(flow, "no-band")
    assert (row["screening"], row["needs_review"]) == ("passed", False)


def test_the_band_must_be_under_the_threshold() -> None:
    with pytest.raises(ValueError, match="must be under FRAUD_THRESHOLD"):
        Settings(fraud_review_threshold="20", fraud_threshold="20")
    assert Settings(fraud_review_threshold="5").fraud.review_threshold == Decimal("5")


async def test_a_provider_review_needs_review_and_accepting_clears_it(flow: InMemoryFlow) -> None:
    s = flow.settings
    flow.add(placement_worker(s), fraud_spec(s, FixedProvider(Decimal("2"), review=True)),
             provisioning_worker(s), review_worker(s))
    row = await place(flow, "prov-review", items=TRIAL)
    assert (row["screening"], row["needs_review"]) == ("review", True)
    async with flow.pool.acquire() as conn:
        listed = await views.pending_orders(conn)
        shown = await views.show_order(conn, row["id"])
    assert [(o["order_ref"], o["needs_review"], o["review_reasons"]) for o in listed["pending"]
            ] == [("prov-review", True, ["provider_review"])]
    assert shown["needs_review"] is True
    assert await flow.pool.fetchval("SELECT count(*) FROM jobs WHERE order_id=$1", row["id"]) == 0
    await flow.send("review.command", {"order_id": row["id"], "action": "accept",
                                       "operator": "alice",
                                       "options": {"run_module_create": False,
                                                   "send_welcome_email": False,
                                                   "register_domains": False}})
    await flow.run()
    row = await order(flow, "prov-review")
    assert (row["status"], row["needs_review"], row["screening_override"]) == (
        "Active", False, True)
    # Cleared by the operator: the on_order trial is set up even without "run module create",
    # and the held mails go out.
    assert await flow.pool.fetchval("SELECT count(*) FROM jobs WHERE order_id=$1", row["id"]) == 1
    assert sorted(m["template"] for m in flow.events("email.send")) == [
        "invoice_created", "order_confirmation"]


class FailingProvider(FixedProvider):
    """A provider that cannot answer (MaxMind down): with FRAUD_ON_ERROR=hold the order waits."""

    async def score(self, facts: OrderFacts) -> FraudResult:
        self.calls += 1
        raise ProviderError("service unavailable")


async def test_accepting_an_order_whose_screening_failed_clears_it_too(flow: InMemoryFlow) -> None:
    """A screening that could not complete holds the order like the review band; the
    operator's accept overrides it the same way, with or without "run module create"."""
    s = flow.settings
    assert s.fraud.on_error == "hold"
    flow.add(placement_worker(s), fraud_spec(s, FailingProvider()), provisioning_worker(s),
             review_worker(s))
    row = await place(flow, "held-error", items=TRIAL)
    assert (row["status"], row["screening"]) == ("Pending", "error")
    assert await flow.pool.fetchval("SELECT count(*) FROM jobs WHERE order_id=$1", row["id"]) == 0
    await flow.send("review.command", {"order_id": row["id"], "action": "accept",
                                       "operator": "alice",
                                       "options": {"run_module_create": False,
                                                   "send_welcome_email": False,
                                                   "register_domains": False}})
    await flow.run()
    row = await order(flow, "held-error")
    assert (row["status"], row["screening"], row["screening_override"]) == (
        "Active", "error", True)
    assert await flow.pool.fetchval("SELECT count(*) FROM jobs WHERE order_id=$1", row["id"]) == 1
    assert sorted(m["template"] for m in flow.events("email.send")) == [
        "invoice_created", "order_confirmation"]


async def test_the_pending_list_shows_orders_needing_review_first(flow: InMemoryFlow) -> None:
    s = with_band(flow.settings)
    provider = FixedProvider(Decimal("1"))
    flow.add(placement_worker(s), fraud_spec(s, provider))
    for n, score in enumerate(["1", "15", "2", "12"]):
        provider.answer = Decimal(score)
        await place(flow, f"list-{n}", ip_address=f"203.0.113.{n + 1}")
    async with flow.pool.acquire() as conn:
        pending = (await views.pending_orders(conn))["pending"]
        listed = await views.list_orders(conn)
    assert [(o["order_ref"], o["needs_review"]) for o in pending] == [
        ("list-1", True), ("list-3", True), ("list-0", False), ("list-2", False)]
    assert {o["order_ref"]: o["needs_review"] for o in listed} == {
        "list-0": False, "list-1": True, "list-2": False, "list-3": True}


# -- operator rules -------------------------------------------------------------------------

def rule(when: str, action: str = "review", name: str = "r1", extra: str = "") -> str:
    return f'[[rules]]\nname = "{name}"\naction = "{action}"\n{extra}when = {{ {when} }}\n'


CLIENT = {"email": "rk@shop.example", "first_name": "Ann", "last_name": "Lee", "country": "GB",
          "company": "Lee Hosting Ltd"}

# (kind, the rule's conditions, the order that matches, the order that does not)
RULE_KINDS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("client_country", 'client_country = ["gb", "IE"]',
     {}, {"client": {"country": "FR"}}),
    ("email_domain", 'email_domain = ["shop.example"]',
     {"client": {"email": "x@mail.SHOP.example"}},
     {"client": {"email": "x@othershop.example"}}),
    ("ip", 'ip = ["203.0.113.0/28"]', {"ip_address": "::ffff:203.0.113.9"},
     {"ip_address": "203.0.113.99"}),
    ("words in name", 'words = ["tester"], words_in = ["name"]',
     {"client": {"last_name": "TESTER"}}, {"client": {"company": "tester"}}),
    ("words in company", 'words = ["bank"], words_in = ["company"]',
     {"client": {"company": "First Bank Co"}}, {}),
    ("words in email", 'words = ["abuse"], words_in = ["email"]',
     {"client": {"email": "abuse1@shop.example"}}, {}),
    ("words in domains", 'words = ["paypal"], words_in = ["domains"]',
     {"items": [{"type": "domain", "domain": "secure-paypal.com", "action": "register",
                 "years": 1}]}, {}),
    ("total", 'total_at_least = "100.00", currency = "USD"',
     {"items": [{"type": "product", "product": "reseller", "billing_cycle": "annually",
                 "domain": "big.example"}]}, {}),
    ("total in another currency", 'total_at_least = "1.00", currency = "EUR"', None, {}),
    ("product", 'product = ["TRIAL"]', {"items": TRIAL}, {}),
    ("new client", "new_client = true", {}, None),
]


@pytest.mark.parametrize(("kind", "when", "matching", "other"), RULE_KINDS,
                         ids=[k[0] for k in RULE_KINDS])
async def test_each_rule_kind(flow: InMemoryFlow, kind: str, when: str,
                              matching: dict[str, Any] | None,
                              other: dict[str, Any] | None) -> None:
    s = flow.settings
    flow.add(placement_worker(s), fraud_spec(s, FixedProvider()))
    await load_rules(flow, rule(when, name="the-rule"))
    for ref, overrides, matched in (("rk-match", matching, True), ("rk-other", other, False)):
        if overrides is None:
            continue
        client = CLIENT | {"email": f"{ref}@rk.example"} | overrides.get("client", {})
        body = overrides | {"client": client}
        row = await place(flow, ref, **body)
        check = await latest_check(flow, row["id"])
        names = [m["name"] for m in check["rule_matches"]]
        assert (names, row["screening"]) == (
            (["the-rule"], "review") if matched else ([], "passed")), (kind, ref)
        if matched:
            assert [r["code"] for r in check["review_reasons"]] == ["rule:the-rule"]


async def test_ip_country_is_the_providers_and_checked_after_it(flow: InMemoryFlow) -> None:
    s = flow.settings
    provider = FixedProvider(ip_country="NG")
    flow.add(placement_worker(s), fraud_spec(s, provider))
    await load_rules(flow, rule('ip_country = ["NG"]', action="fraud", name="ng-ip"))
    row = await place(flow, "ipc-1")
    assert (row["status"], provider.calls) == ("Fraud", 1)  # asked first: it tells the country
    assert [m["name"] for m in (await latest_check(flow, row["id"]))["rule_matches"]] == ["ng-ip"]
    provider.ip_country = "GB"
    assert (await place(flow, "ipc-2", ip_address="203.0.113.50"))["status"] == "Pending"


async def test_earlier_fraud_and_cancelled_orders(flow: InMemoryFlow) -> None:
    """Blesta CORE-2056: a second order does not get round a Fraud verdict."""
    s = flow.settings
    provider = FixedProvider()
    flow.add(placement_worker(s), fraud_spec(s, provider))
    await load_rules(flow, rule("earlier_fraud_orders = 1", action="fraud", name="fraud-before")
                     + rule("earlier_cancelled_orders = 2", action="score", name="cancelled-2",
                            extra="points = 7\n"))
    client = {"email": "again@shop.example"}
    first = await place(flow, "again-1", client=client, ip_address="192.0.2.66")  # banned IP
    assert first["status"] == "Fraud"
    calls = provider.calls
    second = await place(flow, "again-2", client=client, ip_address="203.0.113.60")
    assert (second["status"], second["client_id"]) == ("Fraud", first["client_id"])
    check = await latest_check(flow, second["id"])
    assert (check["provider"], check["score"]) == ("rules", Decimal("99.00"))
    assert [m["name"] for m in check["rule_matches"]] == ["fraud-before"]
    assert "1 earlier Fraud order" in check["rule_matches"][0]["detail"]
    assert provider.calls == calls  # decided before the provider was asked
    # Cancelled ones: two of them add the rule's points to the provider's score.
    other = {"email": "cancel@shop.example"}
    for n in range(2):
        row = await place(flow, f"cancel-{n}", client=other, ip_address=f"203.0.113.{70 + n}")
        await flow.pool.execute("UPDATE orders SET status = 'Cancelled' WHERE id = $1", row["id"])
    third = await place(flow, "cancel-2", client=other, ip_address="203.0.113.72")
    check = await latest_check(flow, third["id"])
    assert [m["name"] for m in check["rule_matches"]] == ["cancelled-2"]
    assert check["score"] == Decimal("8.00")  # the provider's 1.00 and the rule's 7


async def test_velocity_per_client_and_per_ip_in_a_window(flow: InMemoryFlow) -> None:
    s = flow.settings
    flow.add(placement_worker(s), fraud_spec(s, FixedProvider()))
    await load_rules(flow, rule("orders_per_ip = 3, window_minutes = 10", name="ip-burst")
                     + rule("orders_per_client = 2, window_minutes = 1440", action="score",
                            name="client-burst", extra="points = 4\n"))
    results = []
    for n in range(3):
        row = await place(flow, f"vel-{n}", client={"email": f"vel{n % 2}@shop.example"},
                          ip_address="203.0.113.80")
        check = await latest_check(flow, row["id"])
        results.append((row["screening"], [m["name"] for m in check["rule_matches"]]))
    assert results == [("passed", []), ("passed", []),
                       ("review", ["ip-burst", "client-burst"])]
    # Out of the window, the same orders do not count.
    await flow.pool.execute("UPDATE orders SET created_at = created_at - interval '2 days'")
    row = await place(flow, "vel-3", client={"email": "vel1@shop.example"},
                      ip_address="203.0.113.80")
    assert row["screening"] == "passed"


async def test_score_rules_add_up_into_the_band_and_over_the_threshold(
    flow: InMemoryFlow,
) -> None:
    s = with_band(flow.settings)
    flow.add(placement_worker(s), fraud_spec(s, FixedProvider(Decimal("5"))))
    await load_rules(flow, rule('client_country = ["GB"]', action="score", name="gb",
                                extra="points = 6\n")
                     + rule('words = ["lee"]', action="score", name="lee", extra="points = 10\n"))
    row = await place(flow, "sum-1", client={"email": "a@shop.example", "last_name": "Smith",
                                             "country": "GB"})
    assert (row["screening"], (await latest_check(flow, row["id"]))["score"]) == (
        "review", Decimal("11.00"))
    row = await place(flow, "sum-2", client={"email": "b@shop.example", "last_name": "Lee",
                                             "country": "GB"}, ip_address="203.0.113.3")
    assert (row["status"], (await latest_check(flow, row["id"]))["score"]) == (
        "Fraud", Decimal("21.00"))


async def test_todays_list_settings_keep_working_with_rules_loaded(flow: InMemoryFlow) -> None:
    s = flow.settings  # FRAUD_BANNED_EMAIL_DOMAINS=banned.example, FRAUD_BANNED_IPS=...
    flow.add(placement_worker(s), fraud_worker(s))
    await load_rules(flow, rule('client_country = ["FR"]', name="fr"))
    row = await place(flow, "list-banned", client={"email": "x@banned.example"})
    assert row["status"] == "Fraud"
    check = await latest_check(flow, row["id"])
    assert [r["code"] for r in check["reasons"]] == ["banned_email_domain"]


async def test_rescreen_after_a_rule_change_keeps_both_results(flow: InMemoryFlow) -> None:
    s = flow.settings
    flow.add(placement_worker(s), fraud_spec(s, FixedProvider()), review_worker(s))
    row = await place(flow, "rs-1", items=TRIAL)
    assert row["screening"] == "passed"
    first_set = await load_rules(flow, rule('product = ["trial"]', name="trial-review"))
    await flow.send("review.command", {"order_id": row["id"], "action": "rescreen",
                                       "operator": "alice"})
    await flow.run()
    row = await order(flow, "rs-1")
    assert (row["screening"], row["needs_review"]) == ("review", True)
    async with flow.pool.acquire() as conn:
        shown = await views.show_order(conn, row["id"])
    assert [(c["result"], [m["name"] for m in c["rules"]], c["rescreen"], c["rule_set_id"])
            for c in shown["screenings"]] == [
        ("review", ["trial-review"], True, first_set), ("passed", [], False, None)]
    assert shown["fraud"]["result"] == "review"  # the latest first
    assert [h["action"] for h in shown["history"]][-2:] == ["rescreen", "rescreened"]


# -- the rules file -------------------------------------------------------------------------

def test_the_shipped_example_loads() -> None:
    rules = parse_toml((ROOT / "fraud-rules.example.toml").read_text())
    assert len(rules.rules) >= 8
    assert {r.action for r in rules.rules} == {"score", "review", "fraud"}
    assert [r.name for r in rules.rules if r.after_provider] == ["ip-abroad-high-risk"]
    assert parse({"rules": rules.as_json()}).rules == rules.rules  # stored and read back


@pytest.mark.parametrize(("text", "words"), [
    ("[[rules]]\nname = 'x'\naction = 'review'\nwhen = {}\n", "at least one condition"),
    ("[[rules]]\nname = 'x'\naction = 'score'\nwhen = { new_client = true }\n", "needs points"),
    ("[[rules]]\nname = 'x'\naction = 'block'\nwhen = { new_client = true }\n", "action"),
    ("[[rules]]\nname = 'x'\naction = 'review'\nwhen = { colour = 'red' }\n", "colour"),
    ("[[rules]]\nname = 'x'\naction = 'review'\nwhen = { ip = ['300.1.1.1'] }\n",
     "not an IP address"),
    ("[[rules]]\nname = 'x'\naction = 'review'\nwhen = { client_country = ['GBR'] }\n",
     "two-letter"),
    ("[[rules]]\nname = 'x'\naction = 'review'\nwhen = { total_at_least = '5' }\n",
     "needs its `currency`"),
    (rule("new_client = true") * 2, "two rules are named 'r1'"),
    ("[[rules]\n", "not TOML"),
])
def test_a_bad_rules_file_is_one_readable_line(text: str, words: str) -> None:
    with pytest.raises(RulesError) as caught:
        parse_toml(text)
    assert words in str(caught.value) and "\n" not in str(caught.value)
