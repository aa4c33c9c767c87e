"""Fraud screening: the rules scorer, provider errors, and the sweeper for stuck orders."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from conftest import Harness, eventually, order_body
from services.fraud.handlers import Screener
from services.fraud.providers.base import CartLine, FraudResult, OrderFacts, ProviderError
from services.fraud.providers.rules import RulesProvider
from services.fraud.sweeper import QueuedOrderSweeper
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from shared.runtime import WorkerSpec, route
from shared.settings import Settings

FACTS = OrderFacts(
    order_id=1, order_number=1234567890, order_ref="r1", client_id=1, email="ann@lee.example",
    first_name="Ann", last_name="Lee", company=None, country="GB", ip_address="203.0.113.9",
    total=Decimal("28.95"), currency="USD", payment_method="stripe",
    cart=(CartLine("product", "starter", Decimal("4.95")),), client_is_new=True,
    orders_from_ip=1, orders_from_client=1, default_currency="USD",
)


@pytest.fixture
def rules() -> RulesProvider:
    return RulesProvider(Settings(fraud_banned_email_domains="spam.example, Bad.Example",
                                  fraud_banned_ips="192.0.2.1,2001:db8::/32",
                                  fraud_large_first_order="500,JPY:75000").rules)


@pytest.mark.parametrize(("change", "codes", "score"), [
    ({}, [], "0.10"),
    ({"email": "x@mail.spam.example"}, ["banned_email_domain"], "99.00"),
    ({"email": "x@bad.example"}, ["banned_email_domain"], "99.00"),
    ({"ip_address": "192.0.2.1"}, ["banned_ip"], "99.00"),
    ({"ip_address": "2001:db8::5"}, ["banned_ip"], "99.00"),
    ({"ip_address": "::ffff:192.0.2.1"}, ["banned_ip"], "99.00"),  # IPv4 written as IPv6
    ({"email": "x@spam.example."}, ["banned_email_domain"], "99.00"),  # a final dot
    ({"email": "x@spam.exam\u00adple"}, ["banned_email_domain"], "99.00"),  # a soft hyphen
    ({"email": "ann@gmail.com\u00ad"}, ["free_email_new_client"], "10.10"),
    ({"email": "ann@gmail.com"}, ["free_email_new_client"], "10.10"),
    ({"email": "ann@gmail.com", "client_is_new": False}, [], "0.10"),
    ({"orders_from_ip": 4}, ["ip_velocity"], "15.10"),
    ({"orders_from_ip": 5, "email": "a@gmail.com"}, ["free_email_new_client", "ip_velocity"],
     "30.10"),
    ({"orders_from_client": 6}, ["client_velocity"], "25.10"),
    ({"total": Decimal("500.00")}, ["large_first_order"], "15.10"),
    ({"total": Decimal("500.00"), "client_is_new": False}, [], "0.10"),
    # A bare amount is in the catalog's default currency: 6,600 yen is no large order.
    ({"total": Decimal("6600"), "currency": "JPY"}, [], "0.10"),
    ({"total": Decimal("75000"), "currency": "JPY"}, ["large_first_order"], "15.10"),
    ({"total": Decimal("600"), "currency": "EUR"}, [], "0.10"),
    ({"earlier_fraud_orders": 1, "client_is_new": False}, ["earlier_fraud"], "30.10"),
    ({"email": "x@spam.example", "ip_address": "192.0.2.1"}, ["banned_email_domain", "banned_ip"],
     "99.00"),
])
async def test_rules_scorer(rules: RulesProvider, change: dict, codes: list[str],
                            score: str) -> None:
    result = await rules.score(replace(FACTS, **change))
    assert [r.code for r in result.reasons] == codes
    assert result.score == Decimal(score)
    assert result.raw["risk_score"] == score


def test_settings_split_comma_lists() -> None:
    s = Settings(fraud_banned_email_domains=" a.example,,B.example ", fraud_banned_ips="")
    assert s.fraud_banned_email_domains == ["a.example", "b.example"]
    assert s.fraud_banned_ips == []


class Unavailable:
    name = "unavailable"
    remote = False

    async def score(self, facts: OrderFacts) -> FraudResult:
        raise ProviderError("provider timed out after 3 s")

    async def close(self) -> None:
        return None


async def test_a_provider_that_cannot_score_leaves_the_order_pending_flagged(
    harness: Harness,
) -> None:
    screener = Screener(harness.settings.fraud, Unavailable())
    fraud = WorkerSpec(service="fraud", routes={"order.placed": route(screener.on_placed)})
    store = await harness.listen("order.screened", "email.send")
    await harness.start([placement_worker(harness.settings), fraud])
    await harness.publish("order.place", order_body("err-1"))
    order = await harness.screened("err-1")
    assert (order["status"], order["screening"]) == ("Pending", "error")
    check = await harness.pool.fetchrow("SELECT * FROM fraud_checks WHERE order_id=$1",
                                        order["id"])
    assert (check["provider"], check["result"], check["score"]) == ("unavailable", "error", None)
    assert check["error"] == "provider timed out after 3 s"
    event = await store.wait_for("order.screened", lambda b: b["order_ref"] == "err-1")
    assert event["screening"] == "error"
    # Not cleared: no confirmation or invoice mail.
    assert not [b for b in store.bodies("email.send") if b["order_ref"] == "err-1"]


async def test_velocity_from_one_ip_turns_the_burst_into_fraud(harness: Harness) -> None:
    await harness.start([placement_worker(harness.settings), fraud_worker(harness.settings)])
    for n in range(6):
        await harness.publish("order.place", order_body(f"burst-{n}", ip_address="203.0.113.77"))
        await harness.screened(f"burst-{n}")
    statuses = [(await harness.order(f"burst-{n}"))["status"] for n in range(6)]
    # Over 3 orders in the window: the 4th scores 15.10, the 5th 20.10 (over 20), the 6th 25.10.
    assert statuses == ["Pending"] * 4 + ["Fraud"] * 2


async def test_a_client_refused_as_fraud_is_not_known_the_next_time(harness: Harness) -> None:
    """An earlier order refused as Fraud, or a free one, does not make a client known: ordering
    again, or after a free trial, scores like the first time (and more)."""
    await harness.start([placement_worker(harness.settings), fraud_worker(harness.settings)])
    big = [{"type": "product", "product": "reseller", "billing_cycle": "annually",
            "domain": "big-reseller.example"},
           {"type": "product", "product": "business", "billing_cycle": "biennially",
            "domain": "big-business.example"}]
    trial = [{"type": "product", "product": "trial", "billing_cycle": "monthly",
              "domain": "trial-first.example"}]
    cases = (("fraud-first", "fraudster@gmail.com", "198.18.0.1", big),
             ("fraud-again", "fraudster@gmail.com", "198.18.0.2", big),
             ("trial-first", "trialist@gmail.com", "198.18.0.3", trial),
             ("after-trial", "trialist@gmail.com", "198.18.0.4", big))
    for ref, email, ip, items in cases:
        await harness.publish("order.place", order_body(ref, client={"email": email},
                                                        ip_address=ip, items=items))
        await harness.screened(ref)
    reasons = {ref: await harness.pool.fetchval(
        "SELECT array_agg(r->>'code') FROM fraud_checks f JOIN orders o ON o.id = f.order_id,"
        " jsonb_array_elements(f.reasons) r WHERE o.order_ref = $1", ref)
        for ref, *_ in cases}
    assert reasons == {
        "fraud-first": ["free_email_new_client", "large_first_order"],
        "fraud-again": ["free_email_new_client", "earlier_fraud", "large_first_order"],
        "trial-first": ["free_email_new_client"],
        "after-trial": ["free_email_new_client", "large_first_order"],
    }
    assert [(await harness.order(ref))["status"] for ref, *_ in cases] == [
        "Fraud", "Fraud", "Pending", "Fraud"]


async def test_sweeper_redrives_an_order_stuck_in_queued(harness: Harness) -> None:
    await harness.start([placement_worker(harness.settings)])  # no fraud worker: stays queued
    await harness.publish("order.place", order_body("stuck-1"))
    order = await eventually(lambda: harness.order("stuck-1"))
    assert order["screening"] == "queued"
    # Lose the original order.placed, as if a broker had dropped it.
    async def published() -> bool:
        return await harness.pool.fetchval(
            "SELECT published_at IS NOT NULL FROM outbox WHERE routing_key = 'order.placed'")
    await eventually(published)
    channel = await harness.connection.channel()
    purged = await (await channel.get_queue(harness.names.queue("fraud"))).purge()
    assert purged.message_count == 1
    sweeper = QueuedOrderSweeper(
        Settings(screening_stuck_seconds=60, screening_max_redrives=2).screening_sweep)
    assert await sweeper.sweep(harness.pool) == 0  # not stuck long enough yet
    await harness.pool.execute(
        "UPDATE orders SET screening_driven_at = now() - interval '2 minutes' WHERE id=$1",
        order["id"])
    assert await sweeper.sweep(harness.pool) == 1
    assert await sweeper.sweep(harness.pool) == 0  # just re-driven: not again at once
    events = await harness.pool.fetch(
        "SELECT routing_key, message_id::text, correlation_id FROM outbox"
        " WHERE routing_key IN ('order.placed', 'fraud.redrive') ORDER BY id")
    # Storefronts bound to order.placed hear of the order once; the re-drive goes to fraud.
    assert [e["routing_key"] for e in events] == ["order.placed", "fraud.redrive"]
    assert len({e["message_id"] for e in events}) == 2  # a new id: the first may be dead-lettered
    assert [e["correlation_id"] for e in events] == [order["placed_message_id"]] * 2
    await harness.start([fraud_worker(harness.settings)], relay=False)
    assert (await harness.screened("stuck-1"))["screening"] == "passed"
    assert (await harness.order("stuck-1"))["screening_redrives"] == 1

