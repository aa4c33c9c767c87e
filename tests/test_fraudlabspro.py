"""FraudLabs Pro as the fraud provider against a local HTTPS server speaking its v2 API
(tests/fakes/fraudlabspro.py), on the real broker and database; and the fraud policy's
commands (`ordermill fraud rules load`, `rescreen --status`, `pending`, `show`,
`fraud-report`) as an operator runs them."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from fakes.fraudlabspro import API_KEY, FakeFraudLabsPro
from test_cli import cli

from conftest import Harness, eventually, order_body
from services.fraud.providers.fraudlabspro import FraudLabsProProvider, Misconfigured
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.review.worker import worker as review_worker
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def flp() -> AsyncIterator[FakeFraudLabsPro]:
    async with FakeFraudLabsPro() as fake:
        yield fake


def configured(h: Harness, fake: FakeFraudLabsPro, **changes: Any) -> Settings:
    return Settings.model_validate({**h.settings.model_dump(), **fake.settings, **changes})


async def start(h: Harness, settings: Settings, *, review: bool = False) -> None:
    workers = [placement_worker(settings), fraud_worker(settings)]
    await h.start(workers + ([review_worker(settings)] if review else []))


async def check_of(h: Harness, order_id: int) -> asyncpg.Record:
    return await h.pool.fetchrow(
        "SELECT * FROM fraud_checks WHERE order_id = $1 ORDER BY id DESC LIMIT 1", order_id)


async def ordermill(h: Harness, fake: FakeFraudLabsPro, *args: str,
                    **env: str) -> tuple[int, str, str]:
    return await cli(h.settings, *args, **{**fake.environment, **env})


@pytest.mark.parametrize(("status", "score", "screening", "order_status"), [
    ("APPROVE", 12, "passed", "Pending"),
    ("REVIEW", 12, "review", "Pending"),  # REVIEW is the review band
    ("REJECT", 12, "failed", "Fraud"),  # REJECT is Fraud whatever the score
    ("APPROVE", 45, "failed", "Fraud"),  # its score over FRAUD_THRESHOLD is Fraud too
])
async def test_approve_review_reject(harness: Harness, flp: FakeFraudLabsPro, status: str,
                                     score: int, screening: str, order_status: str) -> None:
    flp.status, flp.score, flp.rules = status, score, ["Email domain is new"]
    store = await harness.listen("order.screened", "order.fraud")
    await start(harness, configured(harness, flp))
    client = {"email": "flp@shop.example", "first_name": "Ann", "last_name": "Lee",
              "country": "GB", "address1": "1 High St", "city": "London", "postcode": "EC1A 1BB",
              "phone": "+44 20 7946 0000"}
    await harness.publish("order.place", order_body("flp-1", client=client))
    order = await harness.screened("flp-1")
    assert (order["status"], order["screening"]) == (order_status, screening)
    assert order["needs_review"] is (screening == "review")
    [sent] = flp.screened()
    assert sent.authorized and sent.form["format"] == "json"
    assert {k: sent.form.get(k) for k in ("ip", "email", "email_domain", "first_name",
                                          "bill_country", "bill_city", "bill_zip_code",
                                          "user_order_id", "currency", "amount")} == {
        "ip": "203.0.113.9", "email": "flp@shop.example", "email_domain": "shop.example",
        "first_name": "Ann", "bill_country": "GB", "bill_city": "London",
        "bill_zip_code": "EC1A 1BB", "user_order_id": str(order["order_number"]),
        "currency": "USD", "amount": str(order["total"])}
    check = await check_of(harness, order["id"])
    assert (check["provider"], check["score"]) == ("fraudlabspro", Decimal(score))
    assert check["raw"]["fraudlabspro_status"] == status
    assert check["raw"]["fraudlabspro_id"].startswith("20260101-")
    codes = [r["code"] for r in check["reasons"]]
    assert codes == [f"fraudlabspro_{status.lower()}", "fraudlabspro_rule"]
    if screening == "review":
        assert [r["code"] for r in check["review_reasons"]] == ["provider_review"]
        event = await store.wait_for("order.screened", lambda b: b["order_ref"] == "flp-1")
        assert (event["screening"], event["needs_review"], event["provider"]) == (
            "passed", True, "fraudlabspro")
    if order_status == "Fraud":
        await store.wait_for("order.fraud", lambda b: b["order_ref"] == "flp-1")


@pytest.mark.parametrize(("fault", "words", "calls"), [
    ("key", "invalid API key (check FRAUDLABSPRO_API_KEY): 10001 INVALID API KEY", 1),
    ("credits", "insufficient credit on the FraudLabs Pro account: 10007", 1),
    (503, "server error 503", 2),  # retried, bounded
    ("timeout", "no answer in time", 2),
])
async def test_failures_hold_the_order_and_never_show_the_key(
    harness: Harness, flp: FakeFraudLabsPro, fault: str | int, words: str, calls: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    flp.echo_key = True  # a hostile (or buggy) service repeats the key it was sent
    changes: dict[str, Any] = {"fraudlabspro_attempts": 2, "fraudlabspro_timeout": 0.5}
    if fault == "key":
        changes["fraudlabspro_api_key"] = "wrong-key-" + API_KEY  # holds the right one too
    elif fault == "timeout":
        flp.hang_next(2.0, times=2)
    else:
        flp.fail_next(fault, times=2)
    caplog.set_level(logging.INFO)
    await start(harness, configured(harness, flp, **changes))
    await harness.publish("order.place", order_body("flp-fail"))
    order = await harness.screened("flp-fail", timeout=20)
    assert (order["status"], order["screening"]) == ("Pending", "error")  # FRAUD_ON_ERROR=hold
    assert len(flp.screened()) == calls
    check = await check_of(harness, order["id"])
    assert words in check["error"]
    stored = json.dumps([check["error"], check["raw"], check["reasons"]])
    assert API_KEY not in stored and API_KEY not in caplog.text


async def test_a_slow_answer_is_retried_and_fraud_on_error_applies(
    harness: Harness, flp: FakeFraudLabsPro,
) -> None:
    flp.fail_next(503)
    await start(harness, configured(harness, flp))
    await harness.publish("order.place", order_body("flp-flaky"))
    assert (await harness.screened("flp-flaky", timeout=20))["screening"] == "passed"
    assert len(flp.screened()) == 2
    await harness.stop_all()
    flp.fail_next("credits")
    await start(harness, configured(harness, flp, fraud_on_error="fraud"))
    await harness.publish("order.place", order_body("flp-policy", ip_address="203.0.113.20"))
    order = await harness.screened("flp-policy")
    assert (order["status"], order["screening"]) == ("Fraud", "error")


async def test_an_order_without_an_ip_is_a_screening_error(
    harness: Harness, flp: FakeFraudLabsPro,
) -> None:
    await start(harness, configured(harness, flp))
    await harness.publish("order.place", order_body("flp-no-ip", ip_address=None))
    order = await harness.screened("flp-no-ip")
    assert order["screening"] == "error" and flp.screened() == []
    assert "needs the order's IP address" in (await check_of(harness, order["id"]))["error"]


def test_no_key_refuses_to_start() -> None:
    with pytest.raises(Misconfigured, match="FRAUDLABSPRO_API_KEY"):
        FraudLabsProProvider(Settings(fraud_provider="fraudlabspro").fraudlabspro)
    assert "flp-s3cret" not in repr(Settings(fraudlabspro_api_key="flp-s3cret").fraudlabspro)


async def test_a_deciding_rule_runs_before_the_remote_call(
    harness: Harness, flp: FakeFraudLabsPro, tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rules]]\nname = "throwaway-mail"\naction = "fraud"\n'
        'when = { email_domain = ["throwaway.example"] }\n'
        '[[rules]]\nname = "reseller-review"\naction = "review"\n'
        'when = { product = ["starter"] }\n')
    code, out, err = await ordermill(harness, flp, "fraud", "rules", "load", str(rules))
    assert code == 0, err
    assert "2 rule(s) (1 fraud, 1 review)" in out
    await start(harness, configured(harness, flp))
    await harness.publish("order.place", order_body(
        "flp-rule", client={"email": "x@mail.throwaway.example"}))
    order = await harness.screened("flp-rule")
    assert (order["status"], order["screening"]) == ("Fraud", "failed")
    assert flp.requests == []  # no lookup was paid for
    check = await check_of(harness, order["id"])  # every match is stored, by name
    assert [m["name"] for m in check["rule_matches"]] == ["throwaway-mail", "reseller-review"]
    # A review rule does not decide alone: the provider is asked, and may still say REJECT.
    flp.status = "REJECT"
    await harness.publish("order.place", order_body("flp-rule-2", ip_address="203.0.113.21"))
    order = await harness.screened("flp-rule-2")
    assert (order["status"], len(flp.screened())) == ("Fraud", 1)
    assert [m["name"] for m in (await check_of(harness, order["id"]))["rule_matches"]] == [
        "reseller-review"]


async def test_a_second_order_from_a_client_with_a_fraud_order(
    harness: Harness, flp: FakeFraudLabsPro,
) -> None:
    code, _, err = await ordermill(harness, flp, "fraud", "rules", "load",
                                   str(ROOT / "fraud-rules.example.toml"))
    assert code == 0, err
    flp.status = "REJECT"
    await start(harness, configured(harness, flp))
    client = {"email": "twice@shop.example", "first_name": "Ann", "country": "GB"}
    await harness.publish("order.place", order_body("twice-1", client=client))
    first = await harness.screened("twice-1")
    assert first["status"] == "Fraud" and len(flp.screened()) == 1
    flp.status = "APPROVE"  # it would be let through if asked
    await harness.publish("order.place", order_body("twice-2", client=client,
                                                    ip_address="198.18.0.9"))
    second = await harness.screened("twice-2")
    assert (second["status"], second["client_id"]) == ("Fraud", first["client_id"])
    assert len(flp.screened()) == 1  # decided by the rule, not asked again
    code, out, _ = await ordermill(harness, flp, "show", str(second["id"]))
    assert code == 0
    out = " ".join(out.split())
    assert "rule earlier-fraud (fraud): a client with an earlier Fraud order orders again" in out


async def test_rescreen_after_a_rule_change_through_the_cli(
    harness: Harness, flp: FakeFraudLabsPro, tmp_path: Path,
) -> None:
    await start(harness, configured(harness, flp), review=True)
    for n in range(2):
        await harness.publish("order.place", order_body(f"rs-{n}", ip_address=f"203.0.113.{n}"))
        assert (await harness.screened(f"rs-{n}"))["screening"] == "passed"
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rules]]\nname = "starter-check"\naction = "review"\n'
                     'description = "starter orders are checked by hand this week"\n'
                     'when = { product = ["starter"] }\n')
    code, _, err = await ordermill(harness, flp, "fraud", "rules", "load", str(rules))
    assert code == 0, err
    today = datetime.now(UTC).date().isoformat()
    code, out, err = await ordermill(harness, flp, "rescreen", "--status", "Pending",
                                     "--since", today)
    assert code == 0, err
    assert out.count("screening again") == 2

    async def both_review() -> bool:
        return await harness.pool.fetchval(
            "SELECT count(*) FROM orders WHERE needs_review") == 2
    await eventually(both_review)
    order = await harness.order("rs-0")
    code, out, _ = await ordermill(harness, flp, "show", str(order["id"]), "--json")
    shown = json.loads(out)
    assert shown["needs_review"] is True
    assert [(c["result"], [r["name"] for r in c["rules"]], c["rescreen"])
            for c in shown["screenings"]] == [
        ("review", ["starter-check"], True), ("passed", [], False)]  # the latest first
    code, out, _ = await ordermill(harness, flp, "show", str(order["id"]))
    out = " ".join(out.split())  # as printed, wrapped to the terminal's width
    assert "NEEDS REVIEW" in out and "Screenings (latest first)" in out
    assert "rule starter-check (review): starter orders are checked by hand" in out
    code, out, _ = await ordermill(harness, flp, "pending", "--json")
    assert [(o["order_ref"], o["needs_review"], o["review_reasons"])
            for o in json.loads(out)["pending"]] == [
        ("rs-0", True, ["rule:starter-check"]), ("rs-1", True, ["rule:starter-check"])]
    code, out, _ = await ordermill(harness, flp, "orders", "--json")
    assert all(o["needs_review"] for o in json.loads(out))
    code, out, _ = await ordermill(harness, flp, "fraud", "rules", "show", "--json")
    assert json.loads(out)["rules"][0]["name"] == "starter-check"
    # Mistakes are one line.
    for args, words in ((["rescreen", "--status", "Active"], "only Pending orders"),
                        (["rescreen", "--status", "Pending", "--screening", "odd"],
                         "unknown screening 'odd'"),
                        (["rescreen", "--status", "Pending", "--since", "yesterday"],
                         "--since 'yesterday' is not an ISO date"),
                        (["rescreen"], "give an ORDER_ID, --status or --all-errors"),
                        (["fraud", "rules", "load", str(tmp_path / "none.toml")], "cannot read")):
        code, _, err = await ordermill(harness, flp, *args)
        assert code == 1 and len(err.strip().splitlines()) == 1 and words in err, (args, err)


async def test_fraud_report_gives_fraudlabspro_feedback(
    harness: Harness, flp: FakeFraudLabsPro,
) -> None:
    await start(harness, configured(harness, flp))
    await harness.publish("order.place", order_body("flp-report"))
    order = await harness.screened("flp-report")
    flp_id = (await check_of(harness, order["id"]))["raw"]["fraudlabspro_id"]
    code, out, err = await ordermill(harness, flp, "fraud-report", str(order["id"]),
                                     "--tag", "spam_or_abuse", "--notes", "phishing site")
    assert code == 0, err
    out = " ".join(out.split())
    assert f"reported to FraudLabs Pro as REJECT_BLACKLIST (spam_or_abuse, transaction {flp_id})" \
        in out
    [sent] = [r for r in flp.requests if r.call == "feedback"]
    assert sent.authorized
    assert {k: sent.form.get(k) for k in ("id", "action", "notes")} == {
        "id": flp_id, "action": "REJECT_BLACKLIST", "notes": "phishing site"}
    detail = await harness.pool.fetchval(
        "SELECT detail FROM order_history WHERE order_id = $1 AND action = 'fraud_reported'",
        order["id"])
    assert detail["action"] == "REJECT_BLACKLIST"
    code, _, err = await ordermill(harness, flp, "fraud-report", str(order["id"]), "--tag",
                                   "not_fraud", FRAUDLABSPRO_API_KEY="wrong")
    assert code == 1 and err.strip().splitlines() == [
        "error: FraudLabs Pro invalid API key (check FRAUDLABSPRO_API_KEY): 10001 INVALID API KEY"]
