"""MaxMind minFraud as the fraud provider, against a local HTTPS server speaking minFraud v2.0
(MaxMind's own response bodies; the package reaches it through the test CA in SSL_CERT_FILE)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from fakes.minfraud import FakeMinFraud, merge
from test_cli import ORDERMILL, cli

from conftest import Harness, eventually, order_body
from services.fraud.providers.maxmind import MaxMindProvider, Misconfigured
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.worker import worker as provisioning_worker
from services.review.worker import worker as review_worker
from shared.settings import Settings
from test_processes import worker_env

# An answer with nothing alarming in it: MaxMind's published bodies flag everything.
CLEAN: dict[str, Any] = {
    "risk_score": 0.49,
    "disposition": {"action": "accept", "reason": "default"},
    "ip_address": {
        "risk": 0.5, "risk_reasons": [],
        "country": {"iso_code": "GB"},
        "traits": {"is_anonymous": False, "is_anonymous_vpn": False, "is_public_proxy": False,
                   "is_tor_exit_node": False, "is_residential_proxy": False,
                   "is_hosting_provider": False},
    },
    "email": {"is_free": False, "is_disposable": False, "is_high_risk": False},
    "billing_address": {"is_in_ip_country": True},
    "risk_score_reasons": [],
    "warnings": [],
}


@pytest.fixture
async def maxmind() -> AsyncIterator[FakeMinFraud]:
    async with FakeMinFraud() as fake:
        fake.answer = dict(CLEAN)
        yield fake


def configured(h: Harness, fake: FakeMinFraud, **changes: Any) -> Settings:
    """The test's settings with MaxMind pointed at the fake, validated as from the environment."""
    return Settings.model_validate({**h.settings.model_dump(), **fake.settings, **changes})


async def start(h: Harness, settings: Settings) -> None:
    await h.start([placement_worker(settings), fraud_worker(settings)])


async def check_of(h: Harness, order_id: int) -> asyncpg.Record:
    return await h.pool.fetchrow(
        "SELECT * FROM fraud_checks WHERE order_id = $1 ORDER BY id DESC LIMIT 1", order_id)


def codes(check: asyncpg.Record) -> list[str]:
    return [r["code"] for r in check["reasons"]]


@pytest.mark.parametrize("service", ["score", "insights", "factors"])
async def test_below_and_above_the_threshold(
    harness: Harness, maxmind: FakeMinFraud, service: str,
) -> None:
    await start(harness, configured(harness, maxmind, maxmind_service=service))
    await harness.publish("order.place", order_body("mm-low"))
    low = await harness.screened("mm-low")
    assert (low["status"], low["screening"]) == ("Pending", "passed")
    maxmind.answer = {**CLEAN, "risk_score": 45.2}
    await harness.publish("order.place", order_body("mm-high"))
    high = await harness.screened("mm-high")
    assert (high["status"], high["screening"]) == ("Fraud", "failed")
    items = await harness.pool.fetch(
        "SELECT status FROM services WHERE order_id = $1 UNION ALL"
        " SELECT status FROM domains WHERE order_id = $1", high["id"])
    assert {r["status"] for r in items} == {"Fraud"}
    assert [r.service for r in maxmind.requests] == [service, service]
    check = await check_of(harness, high["id"])
    assert (check["provider"], check["score"], check["threshold"]) == (
        "maxmind", Decimal("45.20"), Decimal("20"))
    # The full answer is kept: the minFraud transaction id, the IP risk, the service used.
    assert check["raw"]["id"] == maxmind.fixtures[service]["id"]
    assert check["raw"]["service"] == service
    assert check["raw"]["ip_address"]["risk"] == 0.5


async def test_banned_clients_are_fraud_without_asking_maxmind(
    harness: Harness, maxmind: FakeMinFraud,
) -> None:
    """The provider's banned lists hold whatever MaxMind would say, and cost no lookup; a
    look-alike spelling of a banned domain (its mail reaches the banned one) or an IPv4
    address written as IPv6 is the same client."""
    await start(harness, configured(harness, maxmind))
    look_alike = "x@\uff22\uff21\uff2e\uff2e\uff25\uff24.example."  # full-width, final dot
    banned = {
        "mm-banned-ip": (order_body("mm-banned-ip", ip_address="::ffff:198.51.100.7"),
                         ["banned_ip"]),
        "mm-banned-mail": (order_body("mm-banned-mail", client={"email": look_alike}),
                           ["banned_email_domain"]),
        "mm-soft-hyphen": (order_body("mm-soft-hyphen",
                                      client={"email": "y@banned.example\u00ad"}),
                           ["banned_email_domain"]),
    }
    for body, _ in banned.values():
        await harness.publish("order.place", body)
    await harness.publish("order.place", order_body("mm-clean"))
    for ref, (_, reasons) in banned.items():
        order = await harness.screened(ref)
        assert (order["status"], order["screening"]) == ("Fraud", "failed"), ref
        check = await check_of(harness, order["id"])
        assert (check["provider"], check["score"], codes(check)) == (
            "rules", Decimal("99.00"), reasons), ref
    assert (await harness.screened("mm-clean"))["screening"] == "passed"
    assert len(maxmind.requests) == 1  # the clean order's only


async def test_the_request_for_a_new_and_then_an_existing_client(
    harness: Harness, maxmind: FakeMinFraud,
) -> None:
    await start(harness, configured(harness, maxmind))
    client = {"email": "mm-new@shop.example", "first_name": "Ann", "last_name": "Lee",
              "country": "US", "company": "Lee Hosting", "address1": "1 Main St",
              "city": "Springfield", "state": "IL", "postcode": "62701", "phone": "+1 217 555 0100"}
    await harness.publish("order.place", order_body("mm-new", payment_method="PayPal",
                                                    client=client))
    first = await harness.screened("mm-new")
    sent = maxmind.requests[0]
    assert sent.authorized
    body = sent.body
    assert body["device"] == {"ip_address": "203.0.113.9"}
    assert body["email"] == {"address": "mm-new@shop.example", "domain": "shop.example"}
    assert body["billing"] == {
        "first_name": "Ann", "last_name": "Lee", "company": "Lee Hosting", "address": "1 Main St",
        "city": "Springfield", "region": "IL", "postal": "62701", "country": "US",
        "phone_number": "+1 217 555 0100"}
    assert body["event"]["transaction_id"] == str(first["order_number"])
    assert body["event"]["type"] == "purchase"
    assert body["account"] == {"user_id": str(first["client_id"])}
    assert body["payment"] == {"processor": "paypal"}
    assert body["order"] == {"amount": float(first["total"]), "currency": "USD"}
    assert {(line["category"], line["item_id"]) for line in body["shopping_cart"]} == {
        ("hosting", "starter"), ("domain", "mm-new.com")}
    # An existing client named by id: what is stored about them, nothing made up.
    await harness.publish("order.place", order_body(
        "mm-existing", client={"id": first["client_id"]}, ip_address=None,
        payment_method="banktransfer"))
    await harness.screened("mm-existing")
    body = maxmind.requests[1].body
    assert "device" not in body  # the storefront sent no IP
    assert body["email"]["address"] == "mm-new@shop.example"
    assert body["billing"] == maxmind.requests[0].body["billing"]
    assert body["payment"] == {"processor": "other"}
    # A client with no address: only what is known is sent; a region given as a name
    # (minFraud takes ISO codes only) is left out rather than failing the request.
    await harness.publish("order.place", order_body("mm-sparse", client={
        "email": "mm-sparse@shop.example", "state": "Greater London", "city": "London"}))
    assert (await harness.screened("mm-sparse"))["screening"] == "passed"
    assert maxmind.requests[2].body["billing"] == {"city": "London"}


async def test_fields_the_package_refuses_are_left_out_not_fatal(
    harness: Harness, maxmind: FakeMinFraud,
) -> None:
    """minfraud checks each field before sending and would refuse the whole request."""
    await start(harness, configured(harness, maxmind))
    await harness.publish("order.place", order_body(
        "mm-odd", payment_method="Square", client={"email": "ann..lee@bücher.example"}))
    order = await harness.screened("mm-odd")
    assert (order["status"], order["screening"]) == ("Pending", "passed")
    body = maxmind.requests[0].body
    assert body["payment"] == {"processor": "other"}  # not a processor minFraud lists
    assert body["email"] == {"domain": "xn--bcher-kva.example"}  # the address it refuses: out
    check = await check_of(harness, order["id"])
    assert check["raw"]["ordermill_left_out"] == ["/email/address"]


async def test_the_email_sent_as_md5(harness: Harness, maxmind: FakeMinFraud) -> None:
    await start(harness, configured(harness, maxmind, maxmind_hash_email=True))
    await harness.publish("order.place", order_body("mm-md5"))
    await harness.screened("mm-md5")
    email = maxmind.requests[0].body["email"]
    assert email == {"address": hashlib.md5(b"mm-md5@shop.example").hexdigest(),
                     "domain": "shop.example"}


REJECTIONS = [
    ("maxmind_reject_free_email", True, {"email": {"is_free": True}}, "free_email"),
    ("maxmind_reject_country_mismatch", True,
     {"ip_address": {"country": {"iso_code": "US"}}, "billing_address": {"is_in_ip_country": False}},
     "country_mismatch"),
    ("maxmind_reject_anonymous_proxy", True,
     {"ip_address": {"traits": {"is_anonymous": True, "is_public_proxy": True}}}, "anonymous_proxy"),
    ("maxmind_high_risk_countries", ["NG", "GB"], {}, "high_risk_country"),
]


@pytest.mark.parametrize(("option", "value", "answer", "code"), REJECTIONS,
                         ids=[r[3] for r in REJECTIONS])
async def test_each_rejection_option(
    harness: Harness, maxmind: FakeMinFraud, option: str, value: Any, answer: dict, code: str,
) -> None:
    maxmind.answer = merge(CLEAN, answer)  # a low score: only the option makes it Fraud
    await start(harness, configured(harness, maxmind, maxmind_service="insights",
                                    **{option: value}))
    await harness.publish("order.place", order_body("mm-reject"))
    order = await harness.screened("mm-reject")
    assert (order["status"], order["screening"]) == ("Fraud", "failed")
    check = await check_of(harness, order["id"])
    assert check["score"] == Decimal("0.49")
    assert codes(check) == [code]
    await harness.stop_all()
    # The same answer with the option off leaves the order Pending.
    await start(harness, configured(harness, maxmind, maxmind_service="insights"))
    await harness.publish("order.place", order_body("mm-option-off"))
    assert (await harness.screened("mm-option-off"))["status"] == "Pending"


async def test_disposition_reject_is_fraud_whatever_the_score(
    harness: Harness, maxmind: FakeMinFraud,
) -> None:
    maxmind.answer = {**CLEAN, "disposition": {"action": "reject", "reason": "custom_rule",
                                               "rule_label": "Too many cards"}}
    await start(harness, configured(harness, maxmind))
    await harness.publish("order.place", order_body("mm-disposition"))
    order = await harness.screened("mm-disposition")
    assert (order["status"], order["screening"]) == ("Fraud", "failed")
    check = await check_of(harness, order["id"])
    assert codes(check) == ["disposition_reject"]
    assert "Too many cards" in check["reasons"][0]["description"]


async def test_factors_reasons_are_stored(harness: Harness, maxmind: FakeMinFraud) -> None:
    maxmind.answer = {key: value for key, value in CLEAN.items() if key != "risk_score_reasons"}
    maxmind.answer["risk_score"] = 67.5
    await start(harness, configured(harness, maxmind, maxmind_service="factors"))
    await harness.publish("order.place", order_body("mm-factors"))
    order = await harness.screened("mm-factors")
    check = await check_of(harness, order["id"])
    assert codes(check)[:4] == ["ANONYMOUS_IP", "TIME_OF_DAY", "EMAIL_DOMAIN_NEW",
                                "EMAIL_ADDRESS_NEW"]
    assert check["reasons"][0]["points"] == "45.0"


@pytest.mark.parametrize(("status", "words"), [
    (401, "authentication failed"), (402, "insufficient funds"), (403, "permission required")])
async def test_account_errors_are_not_retried(
    harness: Harness, maxmind: FakeMinFraud, status: int, words: str,
) -> None:
    maxmind.fail_next(status, times=5)
    await start(harness, configured(harness, maxmind))
    await harness.publish("order.place", order_body("mm-account"))
    order = await harness.screened("mm-account")
    assert (order["status"], order["screening"]) == ("Pending", "error")
    assert len(maxmind.scored()) == 1
    check = await check_of(harness, order["id"])
    assert check["result"] == "error" and words in check["error"]


async def test_a_wrong_licence_key_is_an_authentication_error(
    harness: Harness, maxmind: FakeMinFraud,
) -> None:
    await start(harness, configured(harness, maxmind, maxmind_license_key="wrong"))
    await harness.publish("order.place", order_body("mm-key"))
    order = await harness.screened("mm-key")
    assert order["screening"] == "error"
    assert not maxmind.requests[0].authorized
    assert "authentication failed" in (await check_of(harness, order["id"]))["error"]


async def test_server_errors_and_slow_answers_are_retried(
    harness: Harness, maxmind: FakeMinFraud,
) -> None:
    maxmind.fail_next(503)
    maxmind.hang_next(2.0)
    await start(harness, configured(harness, maxmind, maxmind_timeout=0.5))
    await harness.publish("order.place", order_body("mm-flaky"))
    order = await harness.screened("mm-flaky", timeout=20)
    assert (order["status"], order["screening"]) == ("Pending", "passed")
    assert len(maxmind.scored()) == 3


async def test_retries_are_bounded(harness: Harness, maxmind: FakeMinFraud) -> None:
    maxmind.fail_next(500, times=10)
    await start(harness, configured(harness, maxmind, maxmind_attempts=2))
    await harness.publish("order.place", order_body("mm-down"))
    order = await harness.screened("mm-down", timeout=20)
    assert order["screening"] == "error"
    assert len(maxmind.scored()) == 2
    assert "server error 500" in (await check_of(harness, order["id"]))["error"]


async def test_unreachable_maxmind_holds_the_order_for_review(
    harness: Harness, maxmind: FakeMinFraud,
) -> None:
    closed = configured(harness, maxmind, maxmind_host="127.0.0.1:9", maxmind_attempts=2)
    store = await harness.listen("order.screened", "email.send")
    await start(harness, closed)
    await harness.publish("order.place", order_body("mm-unreachable"))
    order = await harness.screened("mm-unreachable", timeout=20)
    assert (order["status"], order["screening"]) == ("Pending", "error")
    assert "unreachable" in (await check_of(harness, order["id"]))["error"]
    event = await store.wait_for("order.screened", lambda b: b["order_ref"] == "mm-unreachable")
    assert event["screening"] == "error"
    assert not [b for b in store.bodies("email.send") if b["order_ref"] == "mm-unreachable"]


async def test_an_answer_the_package_cannot_read_is_a_screening_error(
    harness: Harness, maxmind: FakeMinFraud,
) -> None:
    maxmind.answer = {**CLEAN, "id": None, "risk_score": None}  # required fields missing
    await start(harness, configured(harness, maxmind))
    await harness.publish("order.place", order_body("mm-garbled"))
    order = await harness.screened("mm-garbled")
    assert (order["status"], order["screening"]) == ("Pending", "error")
    assert "not understood" in (await check_of(harness, order["id"]))["error"]
    assert await harness.dead_letters("fraud") == []


@pytest.mark.parametrize(("policy", "status", "screening"), [
    ("hold", "Pending", "error"), ("fraud", "Fraud", "error"), ("pass", "Pending", "skipped")])
async def test_fraud_on_error_policies(
    harness: Harness, maxmind: FakeMinFraud, policy: str, status: str, screening: str,
) -> None:
    maxmind.fail_next(402)
    store = await harness.listen("order.screened", "order.fraud", "email.send")
    await start(harness, configured(harness, maxmind, fraud_on_error=policy))
    await harness.publish("order.place", order_body("mm-policy"))
    order = await harness.screened("mm-policy")
    assert (order["status"], order["screening"]) == (status, screening)
    check = await check_of(harness, order["id"])
    assert "insufficient funds" in check["error"]  # recorded whatever the policy
    assert codes(check) == ["screening_error"]
    if policy == "fraud":
        await store.wait_for("order.fraud", lambda b: b["order_ref"] == "mm-policy")
    else:
        event = await store.wait_for("order.screened", lambda b: b["order_ref"] == "mm-policy")
        assert event["screening"] == screening
    # Only a cleared order gets its confirmation and invoice mails.
    if policy == "pass":
        await store.wait_for("email.send", lambda b: b["order_ref"] == "mm-policy")
    else:
        await asyncio.sleep(0.5)
        assert not [b for b in store.bodies("email.send") if b["order_ref"] == "mm-policy"]


async def test_a_slow_maxmind_holds_no_lock_on_the_order(
    harness: Harness, maxmind: FakeMinFraud,
) -> None:
    maxmind.hang_next(3.0)
    await start(harness, configured(harness, maxmind))
    await harness.publish("order.place", order_body("mm-slow"))

    async def asked() -> bool:
        return len(maxmind.requests) == 1
    await eventually(asked)
    order = await harness.order("mm-slow")
    # An operator's command or a payment takes the order's row lock: it is free meanwhile.
    async with harness.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '200ms'")
        await conn.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", order["id"])
    assert (await harness.screened("mm-slow", timeout=20))["screening"] == "passed"


async def test_an_order_handled_meanwhile_is_not_overwritten(
    harness: Harness, maxmind: FakeMinFraud,
) -> None:
    """MaxMind answers after an operator cancelled the order: the answer changes nothing."""
    maxmind.hang_next(2.0)
    await start(harness, configured(harness, maxmind))
    await harness.publish("order.place", order_body("mm-race"))

    async def asked() -> bool:
        return len(maxmind.requests) == 1
    await eventually(asked)
    order = await harness.order("mm-race")
    await harness.pool.execute("UPDATE orders SET status = 'Cancelled' WHERE id = $1", order["id"])
    await asyncio.sleep(3)
    after = await harness.order("mm-race")
    assert (after["status"], after["screening"]) == ("Cancelled", "queued")
    assert await check_of(harness, order["id"]) is None


async def test_ordermill_run_refuses_settings_that_cannot_work_in_one_line(
    harness: Harness, maxmind: FakeMinFraud,
) -> None:
    code, _, err = await ordermill(harness.settings, maxmind, "run", "fraud",
                                   MAXMIND_SERVICE="score", MAXMIND_REJECT_ANONYMOUS_PROXY="true")
    assert code == 1
    assert err.strip().splitlines() == [
        "error: MAXMIND_REJECT_COUNTRY_MISMATCH and MAXMIND_REJECT_ANONYMOUS_PROXY need"
        " MAXMIND_SERVICE=insights or factors (Score has no IP location)"]


def test_settings_that_cannot_work_refuse_to_start() -> None:
    with pytest.raises(Misconfigured, match="MAXMIND_ACCOUNT_ID"):
        MaxMindProvider(Settings(fraud_provider="maxmind").maxmind)
    with pytest.raises(Misconfigured, match="insights or factors"):
        MaxMindProvider(Settings(fraud_provider="maxmind", maxmind_account_id=1,
                                 maxmind_license_key="k", maxmind_reject_anonymous_proxy=True
                                 ).maxmind)


async def ordermill(settings: Settings, fake: FakeMinFraud, *args: str,
                    **env: str) -> tuple[int, str, str]:
    return await cli(settings, *args, **{**fake.environment, **env})


async def test_show_has_the_full_minfraud_result(harness: Harness, maxmind: FakeMinFraud) -> None:
    maxmind.answer = merge(CLEAN, {"risk_score": 33.3, "warnings": None,
                                   "risk_score_reasons": None})  # the published ones
    maxmind.fixtures["factors"]["warnings"].append(  # a server's words are not markup
        {"code": "INPUT_UNKNOWN", "warning": "Unknown [/b] input", "input_pointer": "/x"})
    await start(harness, configured(harness, maxmind, maxmind_service="factors"))
    await harness.publish("order.place", order_body("mm-show"))
    order = await harness.screened("mm-show")
    code, out, _ = await ordermill(harness.settings, maxmind, "show", str(order["id"]), "--json")
    assert code == 0
    fraud = json.loads(out)["fraud"]
    mm = fraud["maxmind"]
    assert fraud["score"] == "33.30" and fraud["result"] == "failed"
    assert mm["transaction_id"] == maxmind.fixtures["factors"]["id"]
    assert (mm["risk_score"], mm["ip_risk"], mm["service"]) == (33.3, 0.5, "factors")
    assert mm["disposition"] == {"action": "accept", "reason": "default"}
    assert [w["input"] for w in mm["warnings"]] == ["/account/user_id", "/account/username_md5",
                                                     "/x"]
    assert mm["risk_reasons"][0] == {"code": "ANONYMOUS_IP", "multiplier": 45.0,
                                     "reason": "Risk due to IP being an Anonymous IP"}
    code, out, _ = await ordermill(harness.settings, maxmind, "show", str(order["id"]))
    assert code == 0
    assert "risk score 33.3, IP risk 0.5 (GB), disposition accept" in out
    assert maxmind.fixtures["factors"]["id"] in out
    assert "ANONYMOUS_IP" in out and "/account/user_id" in out
    assert "Unknown [/b] input" in out


async def test_orders_that_could_not_be_screened_are_listed(
    harness: Harness, maxmind: FakeMinFraud,
) -> None:
    maxmind.fail_next(403, times=2)
    await start(harness, configured(harness, maxmind, fraud_on_error="pass"))
    await harness.publish("order.place", order_body("mm-let-through"))
    await harness.screened("mm-let-through")
    await harness.stop_all()
    await start(harness, configured(harness, maxmind))
    await harness.publish("order.place", order_body("mm-held"))
    await harness.screened("mm-held")
    await harness.publish("order.place", order_body("mm-fine"))
    await harness.screened("mm-fine")
    code, out, _ = await ordermill(harness.settings, maxmind, "failures", "--json")
    assert code == 0
    listed = {f["order_ref"]: (f["status"], f["screening"])
              for f in json.loads(out)["screening_errors"]}
    assert listed == {"mm-let-through": ("Pending", "skipped"), "mm-held": ("Pending", "error")}


async def test_fraud_report(harness: Harness, maxmind: FakeMinFraud) -> None:
    await start(harness, configured(harness, maxmind))
    await harness.publish("order.place", order_body("mm-report"))
    order = await harness.screened("mm-report")
    code, out, err = await ordermill(harness.settings, maxmind, "fraud-report", str(order["id"]),
                                     "--tag", "chargeback", "--notes", "disputed by the bank")
    assert code == 0, err
    minfraud_id = maxmind.fixtures["score"]["id"]
    assert minfraud_id in out
    sent = [r for r in maxmind.requests if r.service == "report"]
    assert [r.body for r in sent] == [{
        "tag": "chargeback", "transaction_id": str(order["order_number"]),
        "ip_address": "203.0.113.9", "minfraud_id": minfraud_id,
        "notes": "disputed by the bank"}]
    history = await harness.pool.fetchrow(
        "SELECT actor, detail FROM order_history WHERE order_id = $1 AND action = 'fraud_reported'",
        order["id"])
    assert history["actor"] == "guest" and history["detail"]["tag"] == "chargeback"


async def test_fraud_report_mistakes_are_one_line(harness: Harness, maxmind: FakeMinFraud) -> None:
    await start(harness, configured(harness, maxmind))
    await harness.publish("order.place", order_body("mm-report-bad"))
    order = await harness.screened("mm-report-bad")
    maxmind.fail_next(401)
    code, _, err = await ordermill(harness.settings, maxmind, "fraud-report", str(order["id"]),
                                   "--tag", "not_fraud")
    assert code == 1
    assert err.strip().splitlines() == [
        "error: minFraud authentication failed (check MAXMIND_ACCOUNT_ID and MAXMIND_LICENSE_KEY):"
        " You have supplied an invalid MaxMind account ID and/or license key in the"
        " Authorization header."]
    code, _, err = await ordermill(harness.settings, maxmind, "fraud-report", "999999",
                                   "--tag", "not_fraud")
    assert (code, err.strip()) == (1, "error: order 999999 does not exist")
    code, _, err = await ordermill(harness.settings, maxmind, "fraud-report", str(order["id"]),
                                   "--tag", "maybe")
    assert code != 0 and "Traceback" not in err and "maybe" in err
    code, _, err = await ordermill(harness.settings, maxmind, "fraud-report", str(order["id"]),
                                   "--tag", "spam_or_abuse", MAXMIND_ACCOUNT_ID="")
    assert code == 1 and "MAXMIND_ACCOUNT_ID" in err and "Traceback" not in err
    assert [r.body["tag"] for r in maxmind.requests if r.service == "report"] == ["not_fraud"]


async def test_the_deployed_worker_reads_maxmind_from_its_environment(
    harness: Harness, maxmind: FakeMinFraud, tmp_path,
) -> None:
    """`ordermill run` as deployed: settings and the CA from the environment, nothing patched."""
    maxmind.answer = {**CLEAN, "risk_score": 77.7}
    log = tmp_path / "worker.log"
    with log.open("ab") as handle:
        process = await asyncio.create_subprocess_exec(
            ORDERMILL, "run", "placement", "fraud", stdout=handle, stderr=handle,
            env=worker_env(harness.settings, **maxmind.environment, MAXMIND_SERVICE="insights"))
    try:
        await harness.publish("order.place", order_body("mm-deployed"))
        order = await harness.screened("mm-deployed", timeout=30)
        assert (order["status"], order["screening"]) == ("Fraud", "failed")
        assert [r.service for r in maxmind.requests] == ["insights"]
    finally:
        process.terminate()
        await process.wait()
    assert maxmind.environment["MAXMIND_LICENSE_KEY"] not in log.read_text()


async def test_orders_held_during_an_outage_are_rescreened_in_one_command(
    harness: Harness, maxmind: FakeMinFraud,
) -> None:
    s = configured(harness, maxmind)
    await harness.start([placement_worker(s), fraud_worker(s), review_worker(s)])
    maxmind.fail_next(402, times=3)  # the account ran out of funds for three orders
    for n in range(3):
        await harness.publish("order.place", order_body(f"mm-held-{n}",
                                                        ip_address=f"203.0.113.{40 + n}"))
        assert (await harness.screened(f"mm-held-{n}"))["screening"] == "error"
    # Funds topped up: one command screens them all again.
    code, out, err = await ordermill(harness.settings, maxmind, "rescreen", "--all-errors")
    assert code == 0, err
    assert out.count("screening again") == 3

    async def all_passed() -> bool:
        return await harness.pool.fetchval(
            "SELECT count(*) FROM orders WHERE screening = 'passed'") == 3
    await eventually(all_passed)
    assert len(maxmind.scored()) == 6
    code, out, _ = await ordermill(harness.settings, maxmind, "rescreen", "--all-errors")
    assert (code, out.strip()) == (0, "no Pending order has a screening error")
    code, _, err = await ordermill(harness.settings, maxmind, "rescreen")
    assert (code, err.strip()) == (1, "error: give an ORDER_ID, --status or --all-errors")


async def _is(value: Awaitable[str], expected: str) -> bool:
    return await value == expected


@pytest.mark.parametrize("policy", ["hold", "pass"])
async def test_an_order_that_could_not_be_screened_is_set_up_only_if_let_through(
    harness: Harness, maxmind: FakeMinFraud, policy: str,
) -> None:
    """`trial` sets itself up as soon as screening clears the order (on_order)."""
    maxmind.fail_next(503, times=3)
    s = configured(harness, maxmind, fraud_on_error=policy)
    await harness.start([placement_worker(s), fraud_worker(s), provisioning_worker(s)],
                        job_poll_seconds=0.2)
    await harness.publish("order.place", order_body("mm-setup", items=[
        {"type": "product", "product": "trial", "billing_cycle": "monthly",
         "domain": "mm-setup.example"}]))
    order = await harness.screened("mm-setup", timeout=20)
    assert order["screening"] == ("error" if policy == "hold" else "skipped")

    async def service() -> str:
        return await harness.pool.fetchval(
            "SELECT status FROM services WHERE order_id = $1", order["id"])

    if policy == "hold":
        await asyncio.sleep(1.5)  # time enough for a setup that must not happen
        assert await service() == "Pending"
    else:
        await eventually(lambda: _is(service(), "Active"))
    assert (await harness.order("mm-setup"))["status"] == "Pending"  # still for review
