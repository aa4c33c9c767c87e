"""Workers through the broker-free harness (shared/runtime/testing.py): the pipeline the
Runtime runs, on a real database, joined by the outbox instead of RabbitMQ. The fast tier's
share of what test_pipeline, test_runtime and test_provisioning check on the real broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from conftest import order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.worker import worker as provisioning_worker
from services.review.worker import worker as review_worker
from shared.contracts import OrderRejected
from shared.runtime import REASON_HEADER, WorkerSpec, route
from shared.runtime.testing import InMemoryFlow
from shared.uow import UnitOfWork

ORDERMILL_HEADERS = {"x-ordermill-reason", "x-ordermill-routing-key", "x-ordermill-queue",
                     "x-ordermill-user-id", "x-ordermill-dead-at"}


@pytest.fixture
def shop(flow: InMemoryFlow) -> InMemoryFlow:
    return flow.add(placement_worker(flow.settings), fraud_worker(flow.settings))


async def order(flow: InMemoryFlow, ref: str) -> asyncpg.Record | None:
    return await flow.pool.fetchrow("SELECT * FROM orders WHERE order_ref = $1", ref)


async def test_an_order_is_placed_priced_screened_and_its_mails_asked_for(
    shop: InMemoryFlow,
) -> None:
    sent = await shop.send("order.place", order_body("flow-1", promo_code="welcome10"))
    assert sent.outcome == "acked"
    events = await shop.run()
    row = await order(shop, "flow-1")
    assert (row["status"], row["screening"], row["total"]) == ("Pending", "passed",
                                                              Decimal("28.45"))
    assert [e.routing_key for e in events if e.routing_key != "email.send"] == [
        "order.placed", "order.screened"]
    placed, screened = shop.events("order.placed")[0], shop.events("order.screened")[0]
    assert (placed["order_id"], placed["total"]) == (row["id"], "28.45")
    assert (screened["screening"], screened["provider"]) == ("passed", "rules")
    # The events carry their cause, as the relay publishes them.
    by_key = {e.routing_key: e for e in events}
    assert by_key["order.placed"].correlation_id == sent.message_id
    assert by_key["order.screened"].correlation_id == by_key["order.placed"].message_id
    # Mails only once screening cleared the order.
    assert sorted(m["template"] for m in shop.events("email.send")) == [
        "invoice_created", "order_confirmation"]


async def test_a_banned_client_is_fraud_and_gets_no_mail(shop: InMemoryFlow) -> None:
    await shop.send("order.place", order_body("flow-fraud", ip_address="198.51.100.7"))
    await shop.run()
    row = await order(shop, "flow-fraud")
    assert (row["status"], row["screening"]) == ("Fraud", "failed")
    assert shop.events("order.fraud")[0]["source"] == "screening"
    assert shop.events("email.send") == [] and shop.events("order.screened") == []


async def test_bad_input_is_dead_lettered_with_its_reason_and_the_storefront_told(
    shop: InMemoryFlow,
) -> None:
    not_json = await shop.send("order.place", raw=b"{not json")
    schema_bad = await shop.send("order.place", order_body("flow-schema", items=[]))
    secret = order_body("flow-secret", currency="usd")
    secret["items"][1] |= {"action": "transfer", "epp_code": "s3cret-EPP"}
    secret_bad = await shop.send("order.place", secret)
    unknown = order_body("flow-unknown")
    unknown["items"][0]["product"] = "platinum-unicorn"
    unknown_product = await shop.send("order.place", unknown)
    good = await shop.send("order.place", order_body("flow-good"))

    assert [m.outcome for m in (not_json, schema_bad, secret_bad, unknown_product, good)] == [
        "dead", "dead", "dead", "dead", "acked"]
    assert not_json.dead.reason.startswith("body is not JSON")
    assert not_json.dead.body == b"{not json"
    assert schema_bad.dead.reason.startswith("schema: items: List should have at least 1 item")
    assert b"s3cret-EPP" not in secret_bad.dead.body
    assert json.loads(secret_bad.dead.body)["items"][1]["epp_code"] == "[redacted]"
    assert unknown_product.dead.reason == "unknown product 'platinum-unicorn'"
    await shop.run()
    rejected = {b["order_ref"]: b["reason"] for b in shop.events("order.rejected")}
    assert set(rejected) == {"flow-schema", "flow-secret", "flow-unknown"}
    assert rejected["flow-unknown"] == "unknown product 'platinum-unicorn'"
    assert await shop.pool.fetchval("SELECT count(*) FROM orders") == 1


async def test_a_dead_letter_carries_only_ordermills_headers_under_the_workers_user(
    shop: InMemoryFlow,
) -> None:
    forged = await shop.send("order.place", raw=b"[]", headers={
        REASON_HEADER: "forged", "x-ordermill-routing-key": "review.command", "x-other": "1",
        "x-ordermill-replays": 3})
    copy = forged.dead.copy
    assert set(copy.headers) == ORDERMILL_HEADERS | {"x-ordermill-replays"}
    assert copy.headers["x-ordermill-routing-key"] == "order.place"
    assert copy.headers[REASON_HEADER] != "forged"
    assert copy.headers["x-ordermill-queue"] == shop.names.queue("placement")
    assert copy.user_id == shop.user  # the worker's, which a replay believes
    assert forged.dead.queue == shop.names.queue("placement")


async def test_hostile_bodies_get_a_short_reason_at_once(shop: InMemoryFlow) -> None:
    huge_domain = order_body("flow-huge")
    huge_domain["items"][0]["domain"] = "\x7f" * 5_000
    nul_name = order_body("flow-nul")
    nul_name["client"]["first_name"] = "Ann\x00"
    cases = [
        (huge_domain, None, "schema: items.0.product.domain: '"),
        (None, b"[" * 100_000 + b"]" * 100_000, "body is not JSON we take: nested too deeply"),
        (None, b'{"order_ref": "d", "x": ' + b"1" * 5000 + b"}", "body is not JSON: Exceeds"),
        (nul_name, None, "a text value holds a NUL character"),
        (order_body("flow-ip", ip_address="999.1.1.1"), None,
         "schema: ip_address: Input is not a valid IPv4 address"),
        (None, b"{}" + b" " * 2_000_000, "body of 2000002 bytes is over MAX_MESSAGE_BYTES"),
    ]
    for body, raw, reason in cases:
        sent = await shop.send("order.place", body, raw=raw)
        assert sent.outcome == "dead"
        assert sent.dead.reason.startswith(reason), sent.dead.reason
        assert len(sent.dead.reason) <= 1003


async def test_a_redelivery_changes_nothing_and_a_reused_id_is_refused(
    shop: InMemoryFlow,
) -> None:
    first = order_body("flow-redelivered")
    await shop.send("order.place", first, message_id="shop-1")
    await shop.run()
    again = await shop.send("order.place", first, message_id="shop-1")
    reformatted = await shop.send("order.place", message_id="shop-1",
                                  raw=json.dumps(first | {"sent_at": "now"}, indent=1).encode())
    reused = await shop.send("order.place", order_body("flow-other"), message_id="shop-1")
    assert (again.outcome, reformatted.outcome, reused.outcome) == ("acked", "acked", "dead")
    assert reused.dead.reason.startswith("message_id 'shop-1' was used before")
    # An event delivered twice is handled once too.
    placed = next(e for e in shop.published if e.routing_key == "order.placed")
    await shop.deliver([shop.as_delivery(placed)])
    await shop.run()
    row = await order(shop, "flow-redelivered")
    assert await shop.pool.fetchval(
        "SELECT count(*) FROM fraud_checks WHERE order_id = $1", row["id"]) == 1
    assert len(shop.events("order.placed")) == 1
    assert shop.events("order.rejected") == []  # the id's first order exists
    assert await shop.pool.fetchval("SELECT count(*) FROM orders") == 1


async def test_the_same_order_ref_twice_is_one_order(shop: InMemoryFlow) -> None:
    await shop.send("order.place", order_body("flow-dup"))
    await shop.send("order.place", order_body("flow-dup", currency="EUR"))
    await shop.run()
    assert await shop.pool.fetchval("SELECT count(*) FROM orders") == 1
    assert len(shop.events("order.placed")) == 1


async def test_a_batch_with_a_bad_message_falls_back_to_one_by_one(shop: InMemoryFlow) -> None:
    bad = order_body("flow-batch-bad")
    bad["items"][0]["product"] = "platinum-unicorn"  # refused by the handler, in the batch
    batch = [shop.message("order.place", order_body(f"flow-batch-{n}")) for n in range(3)]
    batch.insert(1, shop.message("order.place", bad))
    batch.append(shop.message("order.place", raw=b"{not json"))  # refused before the batch
    await shop.deliver(batch)
    assert [m.outcome for m in batch] == ["acked", "dead", "acked", "acked", "dead"]
    await shop.run()
    assert await shop.pool.fetchval("SELECT count(*) FROM orders") == 3
    assert len(shop.events("order.screened")) == 3


async def test_a_batch_is_one_transaction_when_it_can_be(flow: InMemoryFlow) -> None:
    calls: list[str] = []

    async def note(event: OrderRejected, uow: UnitOfWork) -> None:
        calls.append(event.order_ref)
        uow.emit("order.noted", {"order_ref": event.order_ref})

    flow.add(WorkerSpec(service="placement", routes={"order.place": route(note)}))
    batch = [flow.message("order.place", {"order_ref": f"b{n}", "reason": "x"}) for n in range(4)]
    batch.append(flow.message("order.place", {"order_ref": "b0", "reason": "x"},
                              message_id=batch[0].message_id))  # twice in one batch
    await flow.deliver(batch)
    assert [m.outcome for m in batch] == ["acked"] * 5
    assert calls == ["b0", "b1", "b2", "b3"]
    assert [e["order_ref"] for e in await _bodies(flow)] == ["b0", "b1", "b2", "b3"]


async def _bodies(flow: InMemoryFlow) -> list[dict]:
    return [e.body for e in await flow.drain()]


async def test_who_may_send_what_is_checked_before_the_body_is_read(flow: InMemoryFlow) -> None:
    settings = flow.settings.model_copy(update={"operator_users": ["desk-operator"],
                                                "storefront_users": ["shop-a"]})
    shop = InMemoryFlow(settings, flow.pool).add(placement_worker(settings),
                                                 review_worker(settings))
    anonymous = await shop.send("order.place", order_body("flow-anon"), user_id=None)
    assert anonymous.dead.reason.startswith("publisher unknown: the message has no user_id")
    forged = await shop.send("review.command", raw=b"not even json", user_id="shop-a")
    assert forged.dead.reason == ("publisher 'shop-a' may not send this: it needs a console"
                                  " or operator user")
    assert forged.dead.body == b"not even json"  # unread
    ok = await shop.send("order.place", order_body("flow-shop", generate_invoice=False),
                         user_id="shop-a")
    assert ok.outcome == "acked"
    row = await order(shop, "flow-shop")
    assert row["generate_invoice"] is True  # a storefront's order is always invoiced
    assert await shop.pool.fetchval("SELECT count(*) FROM orders") == 1


async def test_an_unknown_routing_key_is_dead_lettered(shop: InMemoryFlow) -> None:
    sent = await shop.send("order.misrouted", {"order_ref": "x"}, to="placement")
    assert sent.dead.reason == "no handler for routing key 'order.misrouted' in placement"


async def test_transient_errors_are_retried_then_dead_lettered(flow: InMemoryFlow) -> None:
    calls: dict[str, int] = {}

    async def flaky(event: OrderRejected, uow: UnitOfWork) -> None:
        calls[event.order_ref] = calls.get(event.order_ref, 0) + 1
        await uow.conn.execute(
            "INSERT INTO catalog_meta (key, value) VALUES ($1, 'x')", f"probe:{event.order_ref}")
        if event.order_ref == "always" or calls[event.order_ref] == 1:
            raise asyncpg.DeadlockDetectedError("deadlock detected (test)")
        if event.order_ref == "bug":
            raise KeyError("missing")

    flow.add(WorkerSpec(service="placement", routes={"order.place": route(flaky)}))
    once = await flow.send("order.place", {"order_ref": "once", "reason": "x"})
    always = await flow.send("order.place", {"order_ref": "always", "reason": "x"})
    bug = await flow.send("order.place", {"order_ref": "bug", "reason": "x"})
    assert once.outcome == "acked"
    assert always.dead.reason.startswith(
        "transient error persisted after retries: DeadlockDetectedError")
    assert bug.dead.reason == "handler failed: KeyError: 'missing'"
    assert calls == {"once": 2, "always": flow.settings.transient_attempts, "bug": 2}
    assert await flow.pool.fetchval(
        "SELECT count(*) FROM catalog_meta WHERE key LIKE 'probe:%'") == 1


async def test_a_prepared_result_reaches_the_handler_once_per_delivery(
    flow: InMemoryFlow,
) -> None:
    prepared: list[str] = []
    tries: list[str] = []

    async def look_up(event: OrderRejected, pool: asyncpg.Pool) -> str:
        prepared.append(event.order_ref)
        return event.order_ref.upper()

    async def handle(event: OrderRejected, uow: UnitOfWork) -> None:
        tries.append(event.order_ref)
        if len(tries) == 1:
            raise asyncpg.DeadlockDetectedError("deadlock detected (test)")
        uow.emit("order.checked", {"order_ref": event.order_ref, "looked_up": uow.prepared})

    flow.add(WorkerSpec(service="placement",
                        routes={"order.place": route(handle, prepare=look_up)}))
    sent = await flow.send("order.place", {"order_ref": "p", "reason": "x"})
    again = await flow.send("order.place", {"order_ref": "p", "reason": "x"},
                            message_id=sent.message_id)
    assert (sent.outcome, again.outcome) == ("acked", "acked")
    assert prepared == ["p"] and tries == ["p", "p"]  # retried, prepared once; redelivery: none
    assert await _bodies(flow) == [{"order_ref": "p", "looked_up": "P"}]


def test_a_handler_takes_message_and_uow_only() -> None:
    async def three(event: OrderRejected, uow: UnitOfWork, prepared: str) -> None: ...

    with pytest.raises(TypeError, match=r"takes \(message, uow\)"):
        route(three)


async def test_paid_orders_are_set_up_and_review_commands_answered(flow: InMemoryFlow) -> None:
    """Placement, fraud, provisioning and review: a payment makes the invoice Paid and queues
    the on_payment setup while the order stays Pending; an operator's accept is answered."""
    s = flow.settings
    flow.add(placement_worker(s), fraud_worker(s), provisioning_worker(s), review_worker(s))
    items = [{"type": "product", "product": "starter", "billing_cycle": "monthly",
              "domain": "flow-pay.example"}]
    await flow.send("order.place", order_body("flow-pay", items=items))
    await flow.run()
    row = await order(flow, "flow-pay")
    invoice = await flow.pool.fetchrow("SELECT * FROM invoices WHERE order_id = $1", row["id"])
    assert await flow.pool.fetchval("SELECT count(*) FROM jobs") == 0  # not paid yet
    payment = await flow.send("payment.received", {
        "invoice_id": invoice["id"], "amount": str(invoice["total"]), "currency": "USD",
        "gateway": "stripe", "transaction_id": "ch_flow"})
    await flow.run()
    assert flow.events("invoice.paid") == [{"invoice_id": invoice["id"], "order_id": row["id"],
                                            "order_ref": "flow-pay", "amount": "4.95"}]
    jobs = await flow.pool.fetch("SELECT kind, status FROM jobs WHERE order_id = $1", row["id"])
    assert [(j["kind"], j["status"]) for j in jobs] == [("create", "pending")]
    assert (await order(flow, "flow-pay"))["status"] == "Pending"
    paid = next(e for e in flow.published if e.routing_key == "invoice.paid")
    assert paid.correlation_id == payment.message_id

    await flow.send("review.command", {"order_id": row["id"], "action": "accept"},
                    reply_to="amq.gen-operator", correlation_id="ask-1")
    expired = datetime.now(UTC) - timedelta(seconds=30)
    await flow.send("review.command", {"order_id": row["id"], "action": "cancel"},
                    reply_to="amq.gen-operator", correlation_id="ask-2", expiration=5,
                    timestamp=expired)
    await flow.run()
    answers = {r.correlation_id: r.body for r in flow.replies}
    assert answers["ask-1"] == {"ok": True, "order_id": row["id"], "status": "Active"}
    assert answers["ask-2"]["ok"] is False and "expired" in answers["ask-2"]["error"]
    assert {r.routing_key for r in flow.replies} == {"amq.gen-operator"}
    assert (await order(flow, "flow-pay"))["status"] == "Active"


async def test_a_payment_from_an_unknown_publisher_is_kept_unapplied(flow: InMemoryFlow) -> None:
    s = flow.settings
    flow.add(placement_worker(s), fraud_worker(s), provisioning_worker(s))
    await flow.send("order.place", order_body("flow-forged-pay"))
    await flow.run()
    row = await order(flow, "flow-forged-pay")
    sent = await flow.send("payment.received", {
        "order_ref": "flow-forged-pay", "amount": "28.95", "currency": "USD",
        "gateway": "stripe", "transaction_id": "ch_forged"}, user_id="someone")
    assert sent.outcome == "acked"  # never dropped
    await flow.run()
    assert await flow.pool.fetchval(
        "SELECT status FROM payments WHERE transaction_id = 'ch_forged'") == "unapplied"
    assert await flow.pool.fetchval(
        "SELECT status FROM invoices WHERE order_id = $1", row["id"]) == "Unpaid"
    assert flow.events("payment.unapplied")
