"""Payments and provisioning end to end (autorelease module, manual registrar)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from conftest import TEST_USER, Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.jobs import JobRunner
from services.provisioning.worker import worker as provisioning_worker
from shared.orders import transition

FAST_JOBS = {"job_backoff_seconds": 0.2, "job_poll_seconds": 0.5}


@pytest.fixture
def fast(harness: Harness):
    harness.settings = harness.settings.model_copy(update=FAST_JOBS)
    return harness


def workers(h: Harness, *names: str):
    make = {"placement": placement_worker, "fraud": fraud_worker,
            "provisioning": provisioning_worker}
    return [make[n](h.settings) for n in names or make]


def starter(ref: str, **overrides: Any) -> dict[str, Any]:
    """One on_payment autorelease product and one .example domain (manual, no auto-register)."""
    items = [{"type": "product", "product": "starter", "billing_cycle": "monthly",
              "domain": f"{ref}.example"},
             {"type": "domain", "domain": f"{ref}.example", "action": "register"}]
    return order_body(ref, items=items, **overrides)


async def pay(h: Harness, amount: str, txn: str, *, invoice_id: int | None = None,
              order_ref: str | None = None, currency: str = "USD", **props: Any) -> str:
    body: dict[str, Any] = {"amount": amount, "currency": currency, "gateway": "stripe",
                            "transaction_id": txn}
    if invoice_id is not None:
        body["invoice_id"] = invoice_id
    if order_ref is not None:
        body["order_ref"] = order_ref
    return await h.publish("payment.received", body, **props)


async def item_statuses(h: Harness, order_id: int) -> dict[str, str]:
    rows = await h.pool.fetch(
        "SELECT 'service' AS t, status FROM services WHERE order_id = $1"
        " UNION ALL SELECT 'domain', status FROM domains WHERE order_id = $1", order_id)
    return {r["t"]: r["status"] for r in rows}


async def service_active(h: Harness, order_id: int) -> bool:
    return await h.pool.fetchval(
        "SELECT bool_and(status = 'Active' AND live) FROM services WHERE order_id = $1",
        order_id) is True


async def invoice_of(h: Harness, order_id: int):
    return await h.pool.fetchrow("SELECT * FROM invoices WHERE order_id = $1", order_id)


async def test_on_payment_product_is_set_up_when_paid_while_the_order_stays_pending(
    fast: Harness,
) -> None:
    store = await fast.listen("invoice.paid", "service.created", "email.send")
    await fast.start(workers(fast))
    await fast.publish("order.place", starter("pay-1"))
    order = await fast.screened("pay-1")
    invoice = await invoice_of(fast, order["id"])
    assert invoice["total"] == Decimal("5.95")
    assert await fast.pool.fetchval("SELECT count(*) FROM jobs") == 0  # not paid yet

    payment = await pay(fast, "5.95", "ch_1", invoice_id=invoice["id"])
    await eventually(lambda: service_active(fast, order["id"]))
    assert (await fast.order("pay-1"))["status"] == "Pending"  # review is still an operator's
    assert (await invoice_of(fast, order["id"]))["status"] == "Paid"
    # .example does not auto-register: it waits for Accept.
    assert (await item_statuses(fast, order["id"]))["domain"] == "Pending"
    paid = await store.wait_for("invoice.paid", lambda b: b["order_ref"] == "pay-1")
    assert (paid["invoice_id"], paid["amount"]) == (invoice["id"], "5.95")
    created = await store.wait_for("service.created", lambda b: b["order_ref"] == "pay-1")
    assert created["order_id"] == order["id"]
    welcome = await store.wait_for("email.send", lambda b: b["template"] == "hosting_welcome")
    assert welcome["recipient"] == "pay-1@shop.example"
    # The setup's events name the payment that caused it (docs/contract.md, section 3).
    assert {m.correlation_id for key, body, m in store.received
            if (body.get("order_ref") == "pay-1" and key != "email.send")
            or body.get("template") == "hosting_welcome"} == {payment}
    username = await fast.pool.fetchval(
        "SELECT username FROM services WHERE order_id = $1", order["id"])
    assert username.startswith("payexam")


async def test_a_payment_waiting_for_its_orders_lock_sees_the_order_cancelled_meanwhile(
    fast: Harness,
) -> None:
    """A payment by invoice id finds and locks its order in one statement (the invoice
    joined to it): when a cancel holds the order's lock, the payment waits for it and then
    reads the order as the cancel left it, Cancelled: kept unapplied for an operator, the
    invoice not paid, no setup queued; its inserted row is used as inserted, not read again."""
    from datetime import UTC, datetime

    from services.provisioning.handlers import reconcile_paid
    from services.provisioning.payments import Payments
    from shared.contracts import PaymentReceived
    from shared.uow import MessageContext, UnitOfWork

    await fast.start(workers(fast, "placement", "fraud"))
    await fast.publish("order.place", starter("race-1"))
    order = await fast.screened("race-1")
    invoice = await invoice_of(fast, order["id"])
    payments = Payments(on_paid=reconcile_paid)
    async with fast.pool.acquire() as cancel, fast.pool.acquire() as paying:
        cancelling = cancel.transaction()
        await cancelling.start()
        await cancel.execute("UPDATE orders SET status = 'Cancelled' WHERE id = $1", order["id"])

        async def pay_it() -> None:
            async with paying.transaction():
                uow = UnitOfWork(paying, MessageContext(
                    consumer="provisioning", message_id="race-payment-1",
                    routing_key="payment.received", received_at=datetime.now(UTC),
                    user_id="gateway"))
                await payments.on_payment(PaymentReceived(
                    amount="5.95", invoice_id=invoice["id"], currency="USD", gateway="stripe",
                    transaction_id="race-1"), uow)

        task = asyncio.create_task(pay_it())
        waiting_pid = paying.get_server_pid()

        async def blocked() -> bool:
            return await fast.pool.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                waiting_pid) is True
        await eventually(blocked)  # waiting for the order's lock, which the cancel holds
        await cancelling.commit()
        await asyncio.wait_for(task, 10)
    row = await fast.pool.fetchrow("SELECT * FROM payments WHERE transaction_id = 'race-1'")
    assert (row["status"], row["waiting_for"], row["invoice_id"]) == ("unapplied", "review", None)
    assert "Cancelled" in row["reason"]
    invoice = await invoice_of(fast, order["id"])
    assert (invoice["status"], invoice["amount_paid"]) == ("Unpaid", Decimal("0.00"))
    assert await fast.pool.fetchval("SELECT count(*) FROM jobs") == 0


async def test_a_payment_is_applied_once_however_many_events_find_it_waiting(
    fast: Harness,
) -> None:
    """A payment that arrived before its order waits; every event about the order looks for
    it. Two such events handled at once (order.screened, order.accepted) both found it and
    both added it: money that was never paid became client credit."""
    from datetime import UTC, datetime

    from services.provisioning.handlers import reconcile_paid
    from services.provisioning.payments import Payments
    from shared.uow import MessageContext, UnitOfWork

    await fast.start(workers(fast))
    await pay(fast, "5.95", "early-1", order_ref="early-1")  # before the order exists
    await fast.publish("order.place", starter("early-1"))
    order = await fast.screened("early-1")

    async def paid() -> Any:
        invoice = await invoice_of(fast, order["id"])
        return invoice if invoice["status"] == "Paid" else None
    await eventually(paid)
    payment_id = await fast.pool.fetchval(
        "SELECT id FROM payments WHERE transaction_id = 'early-1'")
    # The other event's transaction listed it as waiting before the first one committed.
    payments = Payments(on_paid=reconcile_paid)
    async with fast.pool.acquire() as conn, conn.transaction():
        uow = UnitOfWork(conn, MessageContext(
            consumer="provisioning", message_id="order-accepted-1", routing_key="order.accepted",
            received_at=datetime.now(UTC)))
        assert await payments.apply(uow, payment_id) is False
    invoice = await invoice_of(fast, order["id"])
    assert (invoice["amount_paid"], invoice["status"]) == (Decimal("5.95"), "Paid")
    assert await fast.pool.fetchval("SELECT count(*) FROM client_credit") == 0
    assert await fast.pool.fetchval(
        "SELECT count(*) FROM order_history WHERE order_id = $1 AND action = 'payment'",
        order["id"]) == 1


async def test_partial_then_full_payment_overpayment_becomes_credit(fast: Harness) -> None:
    await fast.start(workers(fast))
    await fast.publish("order.place", starter("part-1"))
    order = await fast.screened("part-1")
    invoice = await invoice_of(fast, order["id"])
    await pay(fast, "2.00", "t-part-1", invoice_id=invoice["id"])

    async def paid_so_far() -> Decimal | None:
        row = await invoice_of(fast, order["id"])
        return row["amount_paid"] if row["amount_paid"] > 0 else None
    assert await eventually(paid_so_far) == Decimal("2.00")
    assert (await invoice_of(fast, order["id"]))["status"] == "Unpaid"
    assert await fast.pool.fetchval("SELECT count(*) FROM jobs") == 0
    await pay(fast, "5.00", "t-part-2", invoice_id=invoice["id"])
    await eventually(lambda: service_active(fast, order["id"]))
    final = await invoice_of(fast, order["id"])
    assert (final["status"], final["amount_paid"]) == ("Paid", Decimal("7.00"))
    assert await fast.pool.fetchval(
        "SELECT credit FROM clients WHERE id = $1", order["client_id"]) == Decimal("1.05")
    assert await fast.pool.fetchval(
        "SELECT credit FROM payments WHERE transaction_id = 't-part-2'") == Decimal("1.05")


async def test_the_same_payment_twice_is_one_record(fast: Harness) -> None:
    await fast.start(workers(fast))
    await fast.publish("order.place", starter("twice-1"))
    order = await fast.screened("twice-1")
    invoice = await invoice_of(fast, order["id"])
    await pay(fast, "3.00", "ch_same", invoice_id=invoice["id"])
    await pay(fast, "3.00", "ch_same", invoice_id=invoice["id"])  # a new message, same txn
    await pay(fast, "1.00", "ch_other", invoice_id=invoice["id"])

    async def settled() -> bool:
        return await fast.pool.fetchval("SELECT count(*) FROM payments") == 2 and (
            await invoice_of(fast, order["id"]))["amount_paid"] == Decimal("4.00")
    await eventually(settled)
    assert await fast.pool.fetchval(
        "SELECT count(*) FROM payments WHERE transaction_id = 'ch_same'") == 1


async def test_payment_before_its_order_is_applied_when_the_order_arrives(
    fast: Harness,
) -> None:
    store = await fast.listen("payment.unapplied")
    await fast.start(workers(fast))
    await pay(fast, "5.95", "early-txn", order_ref="early-pay")
    unapplied = await store.wait_for("payment.unapplied", lambda b: b["order_ref"] == "early-pay")
    assert unapplied["reason"] == "order not placed yet: early-pay"
    await fast.publish("order.place", starter("early-pay"))
    order = await fast.screened("early-pay")
    await eventually(lambda: service_active(fast, order["id"]))
    payment = await fast.pool.fetchrow("SELECT * FROM payments WHERE transaction_id = 'early-txn'")
    assert (payment["status"], payment["reason"]) == ("applied", None)


async def test_payment_before_screening_finishes_sets_up_only_after_screening(
    fast: Harness,
) -> None:
    await fast.start(workers(fast, "placement", "provisioning"))  # no fraud worker yet
    await fast.publish("order.place", starter("prescreen-1"))
    order = await eventually(lambda: fast.order("prescreen-1"))
    invoice = await eventually(lambda: invoice_of(fast, order["id"]))
    await pay(fast, "5.95", "pre-1", invoice_id=invoice["id"])

    async def paid() -> bool:
        return (await invoice_of(fast, order["id"]))["status"] == "Paid"
    await eventually(paid)
    assert await fast.pool.fetchval("SELECT count(*) FROM jobs") == 0  # screening not done
    await fast.start(workers(fast, "fraud"), relay=False)
    await eventually(lambda: service_active(fast, order["id"]))


async def test_a_fraud_order_never_touches_a_server_and_its_payment_is_kept(
    fast: Harness,
) -> None:
    store = await fast.listen("payment.unapplied")
    await fast.start(workers(fast))
    await fast.publish("order.place", starter("fraud-pay", ip_address="192.0.2.66"))
    order = await fast.screened("fraud-pay")
    assert order["status"] == "Fraud"
    invoice = await invoice_of(fast, order["id"])
    await pay(fast, "5.95", "fraud-txn", invoice_id=invoice["id"])
    event = await store.wait_for("payment.unapplied", lambda b: b["invoice_id"] == invoice["id"])
    assert event["reason"] == "order fraud-pay is Fraud"
    payment = await fast.pool.fetchrow("SELECT * FROM payments WHERE transaction_id='fraud-txn'")
    assert (payment["status"], payment["amount"]) == ("unapplied", Decimal("5.95"))
    assert await fast.pool.fetchval("SELECT count(*) FROM jobs") == 0
    assert (await invoice_of(fast, order["id"]))["status"] == "Cancelled"


async def test_payments_that_cannot_be_applied_are_stored_with_their_reason(
    fast: Harness,
) -> None:
    await fast.start(workers(fast))
    await fast.publish("order.place", starter("bad-pay"))
    order = await fast.screened("bad-pay")
    invoice = await invoice_of(fast, order["id"])
    cases = {
        "p-cur": ("5.95", {"invoice_id": invoice["id"], "currency": "EUR"},
                  f"currency EUR does not match invoice {invoice['id']} in USD"),
        "p-unknown": ("5.95", {"invoice_id": 999999}, "unknown invoice 999999"),
        "p-ref": ("5.95", {"invoice_id": invoice["id"], "order_ref": "other-ref"},
                  f"invoice {invoice['id']} belongs to order bad-pay, not other-ref"),
        "p-cents": ("5.955", {"invoice_id": invoice["id"]},
                    "amount '5.955' has more than two decimal places"),
        "p-neg": ("-1", {"invoice_id": invoice["id"]}, "amount '-1' is not a positive amount"),
        "p-nan": ("lots", {"invoice_id": invoice["id"]}, "amount 'lots' is not a number"),
        # Once dead-lettered as handler failures (the database or Decimal refused them).
        "p-1e30": ("1e30", {"invoice_id": invoice["id"]}, "amount '1e30' is too large"),
        "p-big": ("10000000000.00", {"invoice_id": invoice["id"]},
                  "amount '10000000000.00' is too large"),
        "p-sup": ("5.95", {"invoice_id": "²"}, "invoice id '²' is not an invoice id"),
        "p-int64": ("5.95", {"invoice_id": 2**64},
                    f"invoice id '{2**64}' is not an invoice id"),
        "p-nul\x00": ("5.95", {"invoice_id": 999998}, "unknown invoice 999998"),
        12345: ("5.95", {"invoice_id": 999997}, "unknown invoice 999997"),
    }
    for txn, (amount, fields, _) in cases.items():
        body = {"amount": amount, "currency": "USD", "gateway": "stripe", "transaction_id": txn,
                **fields}
        await fast.publish("payment.received", body)

    async def all_stored() -> bool:
        return await fast.pool.fetchval("SELECT count(*) FROM payments") == len(cases)
    await eventually(all_stored)
    stored = {r["transaction_id"]: r for r in await fast.pool.fetch("SELECT * FROM payments")}
    for txn, (amount, _, reason) in cases.items():
        kept = str(txn).replace("\x00", "\ufffd")  # as text, with where the NUL was marked
        assert (stored[kept]["status"], stored[kept]["reason"]) == ("unapplied", reason), txn
        assert stored[kept]["raw_amount"] == amount
    assert (await invoice_of(fast, order["id"]))["amount_paid"] == 0
    # Texts longer than an index can hold: stored shortened, two ids sharing a start stay two.
    long_id = "t" * 3000
    for txn, ref in ((long_id + "1", None), (long_id + "2", None), ("p-ref-long", "r" * 3000)):
        body = {"amount": "5.95", "currency": "USD", "gateway": "stripe", "transaction_id": txn,
                "invoice_id": invoice["id"]} | ({"order_ref": ref} if ref else {})
        await fast.publish("payment.received", body)

    async def long_stored() -> list | None:
        rows = await fast.pool.fetch(
            "SELECT transaction_id, order_ref, status, reason FROM payments"
            " WHERE reason LIKE '%kept shortened%' ORDER BY reason DESC, transaction_id")
        return rows if len(rows) == 3 else None
    rows = await eventually(long_stored)
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("unapplied", "transaction_id over 255 characters (kept shortened)")] * 2 + [
        ("unapplied", "order_ref over 100 characters (kept shortened)")]
    assert len({r["transaction_id"] for r in rows[:2]}) == 2
    assert max(len(r["transaction_id"]) for r in rows) <= 255
    # Not a payment at all: dead-lettered with the reason.
    await fast.publish("payment.received", {"currency": "USD", "gateway": "stripe"})
    dead = await eventually(lambda: fast.dead_letters("provisioning"))
    assert dead[0].headers["x-ordermill-reason"] == "schema: amount: Field required"


async def test_a_payment_from_a_publisher_that_is_not_a_gateway_is_not_applied(
    fast: Harness,
) -> None:
    # The test's user is a storefront here, not a gateway nor an operator.
    parties = {"payment_publishers": ["gateway-stripe"], "operator_users": ["desk"]}
    await fast.start(workers(fast), **parties)
    await fast.publish("order.place", starter("pub-1"))
    order = await fast.screened("pub-1")
    invoice = await invoice_of(fast, order["id"])
    # The broker validates user_id against the connection's user (guest here).
    await pay(fast, "5.95", "pub-guest", invoice_id=invoice["id"])
    await pay(fast, "5.95", "pub-anon", invoice_id=invoice["id"], user_id=None)

    async def both() -> list:
        rows = await fast.pool.fetch(
            "SELECT transaction_id, status, reason, publisher FROM payments ORDER BY transaction_id")
        return rows if len(rows) == 2 else None
    rows = await eventually(both)
    assert [(r["transaction_id"], r["status"], r["reason"], r["publisher"]) for r in rows] == [
        ("pub-anon", "unapplied", "publisher '(none)' is not a configured gateway", None),
        ("pub-guest", "unapplied", f"publisher '{TEST_USER}' is not a configured gateway",
         TEST_USER)]
    assert (await invoice_of(fast, order["id"]))["status"] == "Unpaid"
    # The storefront's forged payment did not take the gateway's transaction id: the real
    # payment of that id, from the gateway, is applied.
    await fast.stop_all()
    await fast.start(workers(fast), payment_publishers=[TEST_USER], operator_users=["desk"])
    await pay(fast, "5.95", "pub-guest", invoice_id=invoice["id"])

    async def paid() -> bool:
        return (await invoice_of(fast, order["id"]))["status"] == "Paid"
    await eventually(paid)
    assert await fast.pool.fetchval(
        "SELECT count(*) FROM payments WHERE transaction_id = 'pub-guest'") == 2


async def test_on_order_product_is_set_up_as_soon_as_screening_clears(fast: Harness) -> None:
    await fast.start(workers(fast))
    trial = order_body("trial-2", items=[{"type": "product", "product": "trial",
                                          "billing_cycle": "monthly", "domain": "t2.example"}])
    await fast.publish("order.place", trial)
    order = await fast.screened("trial-2")
    await eventually(lambda: service_active(fast, order["id"]))
    assert (await fast.order("trial-2"))["status"] == "Pending"


async def test_no_invoice_means_nothing_automatic_until_accept(fast: Harness) -> None:
    await fast.start(workers(fast))
    trial = order_body("noinv-2", generate_invoice=False, items=[
        {"type": "product", "product": "trial", "billing_cycle": "monthly",
         "domain": "n2.example"},
        {"type": "product", "product": "dedicated", "billing_cycle": "monthly"},
        {"type": "domain", "domain": "n2.example", "action": "register"}])
    await fast.publish("order.place", trial)
    order = await fast.screened("noinv-2")
    await fast.publish("order.screened", {"order_id": order["id"], "order_ref": "noinv-2"})
    await fast.publish("order.place", order_body("marker-2"))
    await fast.screened("marker-2")
    assert await fast.pool.fetchval("SELECT count(*) FROM jobs") == 0
    # Accept (the review service's effect, done here by hand) with its default options.
    await fast.pool.execute(
        "UPDATE orders SET status = 'Active', accept_options = $2 WHERE id = $1", order["id"],
        {"run_module_create": True, "register_domains": True, "send_welcome_email": False})
    await fast.publish("order.accepted", {"order_id": order["id"], "order_ref": "noinv-2"})
    await eventually(lambda: service_active(fast, order["id"]))  # 'never' included
    statuses = await eventually(lambda: _domain_done(fast, order["id"]))
    assert statuses == "Pending Registration"  # the manual registrar: an operator completes it


async def _domain_done(h: Harness, order_id: int) -> str | None:
    status = await h.pool.fetchval("SELECT status FROM domains WHERE order_id = $1", order_id)
    return None if status == "Pending" else status


async def test_cancel_terminates_a_live_account(fast: Harness) -> None:
    store = await fast.listen("service.terminated")
    await fast.start(workers(fast))
    trial = order_body("cancel-1", items=[{"type": "product", "product": "trial",
                                           "billing_cycle": "monthly", "domain": "c1.example"}])
    await fast.publish("order.place", trial)
    order = await fast.screened("cancel-1")
    await eventually(lambda: service_active(fast, order["id"]))
    async with fast.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT * FROM orders WHERE id = $1 FOR UPDATE", order["id"])
        await transition(conn, row, "Cancelled", actor="alice", action="cancel")
    await fast.publish("order.cancelled", {"order_id": order["id"], "order_ref": "cancel-1"})
    event = await store.wait_for("service.terminated", lambda b: b["order_ref"] == "cancel-1")
    service = await fast.pool.fetchrow("SELECT * FROM services WHERE id = $1", event["service_id"])
    assert (service["status"], service["live"]) == ("Cancelled", False)
    assert service["terminated_at"] is not None


async def test_an_order_set_back_to_pending_keeps_the_account_its_cancel_would_terminate(
    fast: Harness,
) -> None:
    """Cancel queues the live account's termination; set back to Pending before it ran, the
    account is the order's again (Active), and the termination does not run."""
    from services.provisioning.reconcile import reconcile

    await fast.start(workers(fast, "placement", "fraud"))  # no job runner: nothing races
    await fast.publish("order.place", order_body("reinstated", items=[
        {"type": "product", "product": "trial", "billing_cycle": "monthly",
         "domain": "reinstated.example"}]))
    order = await fast.screened("reinstated")
    await fast.pool.execute(  # as the create job leaves it
        "UPDATE services SET status = 'Active', live = true, username = 'reinsta'"
        " WHERE order_id = $1", order["id"])
    for to_status in ("Cancelled", "Pending"):
        async with fast.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM orders WHERE id = $1 FOR UPDATE", order["id"])
            await transition(conn, row, to_status, actor="alice", action=to_status.lower())
            await reconcile(conn, order["id"])
        if to_status == "Cancelled":
            assert await fast.pool.fetchval(
                "SELECT status FROM jobs WHERE order_id = $1 AND kind = 'terminate'",
                order["id"]) == "pending"
    service = await fast.pool.fetchrow("SELECT * FROM services WHERE order_id = $1", order["id"])
    assert (service["status"], service["live"]) == ("Active", True)
    assert await fast.pool.fetchval(
        "SELECT status FROM jobs WHERE order_id = $1 AND kind = 'terminate'",
        order["id"]) == "cancelled"


async def test_cli_pay_show_and_failures(fast: Harness) -> None:
    from test_cli import cli

    # Payments count only from the gateways' RabbitMQ users: the operator's `pay` is one.
    gateways = fast.settings.model_copy(update={"payment_publishers": ["guest"]})
    await fast.start([placement_worker(gateways), fraud_worker(gateways),
                      provisioning_worker(gateways)])
    await fast.publish("order.place", starter("cli-pay"))
    order = await fast.screened("cli-pay")
    invoice = await invoice_of(fast, order["id"])
    code, out, err = await cli(fast.settings, "pay", str(invoice["id"]), "--amount", "5.95",
                               "--transaction-id", "cli-t1", "--gateway", "bank")
    assert code == 0, err
    await eventually(lambda: service_active(fast, order["id"]))
    code, out, err = await cli(fast.settings, "show", str(order["id"]), "--json")
    shown = json.loads(out)
    assert [(p["amount"], p["currency"], p["gateway"], p["transaction_id"], p["status"])
            for p in shown["payments"]] == [("5.95", "USD", "bank", "cli-t1", "applied")]
    product = next(i for i in shown["items"] if i["type"] == "product")
    assert product["status"] == "Active" and product["live"] is True
    assert product["setup"] == {"job": "create", "status": "done", "attempts": 1,
                                "last_error": None}
    assert shown["invoice"]["status"] == "Paid"

    code, out, err = await cli(fast.settings, "pay", "999999", "--amount", "10",
                               "--transaction-id", "cli-t2")
    assert code == 0, err

    async def flagged() -> list | None:
        _, out, _ = await cli(fast.settings, "failures", "--json")
        rows = json.loads(out)["unapplied_payments"]
        return rows or None
    rows = await eventually(flagged, timeout=30)
    assert [(r["transaction_id"], r["reason"], r["amount"]) for r in rows] == [
        ("cli-t2", "unknown invoice 999999", "10.00")]

    code, out, err = await cli(fast.settings, "pay", "1", "--amount", "ten",
                               "--transaction-id", "x")
    assert (code, err.strip()) == (1, "error: amount 'ten' is not a number")


async def test_accept_options_off_and_set_pending_applies_a_refused_payment(
    fast: Harness,
) -> None:
    from test_review import command

    from services.review.worker import worker as review_worker

    store = await fast.listen("email.send")
    await fast.start([*workers(fast), review_worker(fast.settings)])
    trial = order_body("opts-1", generate_invoice=False, items=[
        {"type": "product", "product": "dedicated", "billing_cycle": "monthly"},
        {"type": "domain", "domain": "opts-1.example", "action": "register"}])
    await fast.publish("order.place", trial)
    order = await fast.screened("opts-1")
    reply = await command(fast, order["id"], "accept", options={
        "run_module_create": True, "send_welcome_email": False, "register_domains": False})
    assert reply["status"] == "Active"
    await eventually(lambda: service_active(fast, order["id"]))
    await asyncio.sleep(0.5)
    assert (await item_statuses(fast, order["id"]))["domain"] == "Pending"  # not registered
    assert not [b for b in store.bodies("email.send") if b["template"] == "hosting_welcome"]

    # A payment refused while the order was Cancelled is applied once it is Pending again.
    await fast.publish("order.place", starter("revive-1"))
    revived = await fast.screened("revive-1")
    assert (await command(fast, revived["id"], "cancel"))["status"] == "Cancelled"
    invoice = await invoice_of(fast, revived["id"])
    await pay(fast, "5.95", "revive-txn", invoice_id=invoice["id"])

    async def refused() -> bool:
        return await fast.pool.fetchval(
            "SELECT reason FROM payments WHERE transaction_id = 'revive-txn'") == (
            "order revive-1 is Cancelled")
    await eventually(refused)
    assert (await command(fast, revived["id"], "pending"))["status"] == "Pending"
    await eventually(lambda: service_active(fast, revived["id"]))
    assert (await invoice_of(fast, revived["id"]))["status"] == "Paid"


async def paid(h: Harness, refs: list[str], first_ip: int) -> list[int]:
    """Orders placed, screened and paid, their setup jobs queued (not run: the test runs the
    runner's passes); their ids. It returns once the provisioning worker has also handled
    every event of these orders it takes (their order.screened): `h.screened` sees the fraud
    worker's commit, not the relay's publish, so the payment may overtake the event, whose
    reconcile step then runs after the job is queued, while the test runs its pass. That
    step saves the service's identity again (undoing a test's `username = NULL`) and holds
    the order's lock (a shared outcome write gives way at its lock_timeout)."""
    ids = []
    for n, ref in enumerate(refs):
        await h.publish("order.place", starter(ref, ip_address=f"203.0.113.{first_ip + n}"))
        order = await h.screened(ref)
        invoice = await invoice_of(h, order["id"])
        await pay(h, "5.95", f"ch_{ref}", invoice_id=invoice["id"])
        ids.append(order["id"])
    provisioning = provisioning_worker(h.settings)
    keys = list(provisioning.routes)

    async def queued() -> bool:
        return await h.pool.fetchval(
            "SELECT count(*) FROM jobs WHERE order_id = ANY($1) AND status = 'pending'",
            ids) == len(ids)

    async def handled() -> bool:  # in its inbox: its transaction committed
        events, done = await h.pool.fetchrow(
            "SELECT count(*), count(i.message_id) FROM outbox o LEFT JOIN inbox i"
            " ON i.consumer = $3 AND i.message_id = o.message_id::text"
            " WHERE (o.body->>'order_id')::bigint = ANY($1) AND o.routing_key = ANY($2::text[])",
            ids, keys, provisioning.service)
        return events >= len(ids) and done == events  # at least each order's order.screened
    await eventually(queued)
    await eventually(handled)
    return ids


async def _runner_of_its_own(h: Harness) -> JobRunner:
    provisioning = provisioning_worker(h.settings)
    runner: JobRunner = provisioning.background[0].__self__
    provisioning.background = ()  # the test runs the runner's passes itself
    await h.start([*workers(h, "placement", "fraud"), provisioning])
    return runner


async def _recorded_once(h: Harness, order_ids: list[int]) -> None:
    for order_id in order_ids:
        await eventually(lambda order_id=order_id: service_active(h, order_id))
    row = await h.pool.fetchrow(
        "SELECT (SELECT count(*) FROM order_history WHERE order_id = ANY($1)"
        "   AND action = 'service created') AS history,"
        " (SELECT count(*) FROM outbox WHERE routing_key = 'service.created'"
        "   AND (body->>'order_id')::bigint = ANY($1)) AS events,"
        " (SELECT count(*) FROM jobs WHERE order_id = ANY($1) AND status = 'done'"
        "   AND attempts = 1) AS done", order_ids)
    assert dict(row) == dict.fromkeys(("history", "events", "done"), len(order_ids))


async def test_job_outcomes_that_come_during_a_write_share_the_next_one(fast: Harness) -> None:
    """Group commit of successes: the first is written at once, the two that finished while
    it was being written share one transaction; each is recorded once."""
    runner = await _runner_of_its_own(fast)
    ids = await paid(fast, ["group-0", "group-1", "group-2"], first_ip=80)
    writes: list[int] = []
    record = runner._record_outcomes

    async def first_held(conn, batch) -> None:
        writes.append(len(batch))
        if len(writes) == 1 and len(batch) < 3:  # the others finish meanwhile
            await eventually(lambda: asyncio.sleep(0, len(runner._outcomes) == 3 - len(batch)))
        await record(conn, batch)

    runner._record_outcomes = first_held  # type: ignore[method-assign]
    await runner.runner._start_due(fast.pool)
    await _recorded_once(fast, ids)
    assert sum(writes) == 3 and len(writes) < 3


# What asyncpg sends of its own the first time a connection meets a type (not counted).
ASYNCPG_OWN = ("typeinfo_tree", "set_config('jit'")


async def test_a_shared_outcome_write_takes_as_many_statements_for_three_jobs_as_for_one(
        fast: Harness) -> None:
    """A setup's outcome (job finished, service Active, history, events) is written by
    statements that carry the whole shared write, not a few statements a job: at a steady
    rate a batch of 20 took 60 round trips on the busy worker, and the jobs that finished
    meanwhile waited for all of them (docs/performance.md, "Where payment->Active waited")."""
    runner = await _runner_of_its_own(fast)
    writes: list[tuple[int, int]] = []  # (outcomes, statements) per write
    record = runner._record_outcomes

    async def counted(conn, batch) -> None:
        statements: list[str] = []

        def logged(query: Any) -> None:
            if not any(own in query.query for own in ASYNCPG_OWN):
                statements.append(query.query)

        conn.add_query_logger(logged)
        try:
            await record(conn, batch)
        finally:
            conn.remove_query_logger(logged)
        writes.append((len(batch), len(statements)))

    runner._record_outcomes = counted  # type: ignore[method-assign]
    ids = await paid(fast, ["stmts-0"], first_ip=120)
    await runner.runner._start_due(fast.pool)  # one job: a write of its own
    await _recorded_once(fast, ids)
    more = await paid(fast, ["stmts-1", "stmts-2", "stmts-3"], first_ip=121)
    await runner.runner._start_due(fast.pool)  # three at once: one write for them
    await _recorded_once(fast, more)
    assert [n for n, _ in writes] == [1, 3]
    assert len({statements for _, statements in writes}) == 1, writes


async def test_the_outcome_writer_keeps_its_connection_while_outcomes_keep_coming(
        fast: Harness) -> None:
    """Writes that follow one another (outcomes came while one was written) take one
    connection of the pool for all of them: taken again for each, the next write queued
    behind the consumers' transactions for one while its jobs, done, waited."""
    runner = await _runner_of_its_own(fast)
    writes: list[int] = []
    record = runner._record_outcomes

    async def first_held(conn, batch) -> None:
        writes.append(len(batch))
        taken.append(conn)  # a proxy the pool makes for each time a connection is taken
        if len(writes) == 1:  # held until the next pass's two are done and waiting
            await eventually(lambda: asyncio.sleep(0, len(runner._outcomes) == 2), timeout=30)
        await record(conn, batch)

    taken: list[Any] = []
    runner._record_outcomes = first_held  # type: ignore[method-assign]
    first = await paid(fast, ["keep-0"], first_ip=130)
    await runner.runner._start_due(fast.pool)
    more = await paid(fast, ["keep-1", "keep-2"], first_ip=131)
    await runner.runner._start_due(fast.pool)
    await _recorded_once(fast, first + more)
    assert writes == [1, 2]
    assert taken[0] is taken[1]  # taken from the pool once for both


class _WriterPool:
    """The pool as the outcome writer sees it, with the test's hooks on the writer's own
    acquire and release; every other caller (claims, calls, consumers) gets the pool itself."""

    def __init__(self, pool: asyncpg.Pool, runner: JobRunner) -> None:
        self._pool, self._runner = pool, runner
        self.before_release: Any = None  # an async callable, once, before the writer's release
        self.refusals = 0  # the writer's next acquires refused (a server restarting)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def _in_writer(self) -> bool:
        return asyncio.current_task() is self._runner._writer

    def acquire(self, **kwargs: Any) -> Any:
        if self._in_writer() and self.refusals:
            self.refusals -= 1

            async def refused() -> None:
                raise ConnectionRefusedError("server restarting")
            return refused()
        return self._pool.acquire(**kwargs)

    async def release(self, conn: Any, **kwargs: Any) -> None:
        if self._in_writer() and self.before_release is not None:
            hook, self.before_release = self.before_release, None
            await hook()
        await self._pool.release(conn, **kwargs)


async def test_an_outcome_that_comes_while_the_writer_gives_its_connection_back_is_written(
        fast: Harness) -> None:
    """The writer's release awaits; an outcome that comes meanwhile starts no writer (one is
    still running), so the writer looks again after giving its connection back. Looking only
    before, it ended with that outcome unwritten, its job's lease renewed for ever."""
    runner = await _runner_of_its_own(fast)
    pool = _WriterPool(fast.pool, runner)
    later: list[int] = []
    came = asyncio.Event()

    async def another_finishes() -> None:
        later.extend(await paid(fast, ["gap-1"], first_ip=141))
        await runner.runner._start_due(pool)
        await eventually(lambda: asyncio.sleep(0, len(runner._outcomes) == 1), timeout=30)
        came.set()  # its outcome waits, and the writer (still running) is giving back

    pool.before_release = another_finishes
    first = await paid(fast, ["gap-0"], first_ip=140)
    await runner.runner._start_due(pool)
    await _recorded_once(fast, first)
    await asyncio.wait_for(came.wait(), timeout=60)
    await _recorded_once(fast, later)


async def test_an_outcome_whose_writer_cannot_get_a_connection_is_written_alone(
        fast: Harness) -> None:
    """The writer's connection refused (a server restarting, a standby after a failover):
    the outcomes it took are written alone with their retries, never left unresolved (their
    jobs would wait, their leases renewed, until the worker stopped)."""
    runner = await _runner_of_its_own(fast)
    pool = _WriterPool(fast.pool, runner)
    pool.refusals = 1
    ids = await paid(fast, ["refused-0"], first_ip=150)
    await runner.runner._start_due(pool)
    await _recorded_once(fast, ids)
    assert pool.refusals == 0  # it was refused once


async def test_job_outcomes_whose_shared_write_fails_are_written_alone(fast: Harness) -> None:
    """A shared write that fails is rolled back and each outcome is written again alone, all
    at once (not one after another, each with its own retries). Their claims stay on the
    heartbeat until their own commit: the rollback lets no lease lapse. The shared write
    finishes its jobs in id order (as the heartbeat renews them), whatever order they came in."""
    runner = await _runner_of_its_own(fast)
    ids = await paid(fast, ["alone-0", "alone-1", "alone-2"], first_ip=90)
    writes: list[int] = []
    shared: list[int] = []  # the shared write's jobs, in the order it finished them
    alone: list[int] = []  # the jobs written alone since, in flight together
    held: list[set[int]] = []  # the claims the heartbeat renews, as each is written alone
    record = runner._record_outcomes

    async def shared_fails(conn, batch) -> None:
        writes.append(len(batch))
        if len(writes) == 1 and len(batch) == 1:  # hold the first: the others come together
            await eventually(lambda: asyncio.sleep(0, len(runner._outcomes) == 2))
            runner._outcomes.sort(key=lambda item: item[0]["id"], reverse=True)  # came so
        if len(batch) > 1:
            await record(conn, batch)  # written, then rolled back
            shared.extend(job["id"] for job, *_ in batch)
            raise asyncpg.exceptions.UniqueViolationError("one of them is at fault")
        if shared:
            held.append({key[0] for key in runner.queue._held})
            alone.append(batch[0][0]["id"])
            # Each waits for the others: written one after another, the first would wait alone.
            await eventually(lambda: asyncio.sleep(0, len(alone) == len(shared)), timeout=10)
        await record(conn, batch)

    runner._record_outcomes = shared_fails  # type: ignore[method-assign]
    await runner.runner._start_due(fast.pool)
    await _recorded_once(fast, ids)
    assert len(shared) > 1 and shared == sorted(shared)  # in id order, however they came
    assert writes[-len(shared):] == [1] * len(shared)  # the shared one, then each alone
    assert sorted(alone) == shared
    assert all(set(shared) <= claims for claims in held)


async def test_a_shared_outcome_write_gives_way_to_a_held_order_lock(fast: Harness) -> None:
    """A shared write locks several orders, which a consumer's batch may hold in another
    order: it waits for none of them (lock_timeout, not PostgreSQL's 1 s deadlock check),
    and each outcome is written alone, waiting only for its own order."""
    runner = await _runner_of_its_own(fast)
    ids = await paid(fast, ["lockwait-0", "lockwait-1", "lockwait-2"], first_ip=110)
    record = runner._record_outcomes
    holder = await asyncpg.connect(fast.settings.database_url)
    locked: asyncio.Event = asyncio.Event()
    failures: list[type[BaseException]] = []
    gave_up = asyncio.Event()
    writes: list[int] = []

    async def first_held(conn, batch) -> None:
        writes.append(len(batch))
        if len(writes) == 1:  # hold one order of the shared write (the others come together)
            shared = batch
            if len(batch) == 1:
                await eventually(lambda: asyncio.sleep(0, len(runner._outcomes) == 2))
                shared = runner._outcomes
            await holder.execute("BEGIN")
            await holder.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE",
                                 max(job["order_id"] for job, *_ in shared))
            locked.set()
        if len(batch) > 1:
            try:
                await record(conn, batch)
            except BaseException as exc:
                failures.append(type(exc))
                gave_up.set()
                raise
        else:
            await record(conn, batch)

    runner._record_outcomes = first_held  # type: ignore[method-assign]
    try:
        await runner.runner._start_due(fast.pool)
        await asyncio.wait_for(locked.wait(), 15)
        await asyncio.wait_for(gave_up.wait(), 10)  # without the timeout: waits for the lock
    finally:
        with contextlib.suppress(Exception):
            await holder.execute("ROLLBACK")
        await holder.close()
    await _recorded_once(fast, ids)
    assert failures == [asyncpg.LockNotAvailableError]
    assert [n for n in writes if n > 1] in ([2], [3]) and writes[-2:] == [1, 1]


async def test_a_stopping_job_runner_awaits_its_outcome_writer(fast: Harness) -> None:
    """On stop, `run` returns only once the outcome being written is committed: the caller
    closes the pool next, and must not close it under the write."""
    runner = await _runner_of_its_own(fast)
    [order_id] = await paid(fast, ["stop-0"], first_ip=100)
    writing, let_go = asyncio.Event(), asyncio.Event()
    record = runner._record_outcomes
    recorded: list[int] = []

    async def held(conn, batch) -> None:
        writing.set()
        await let_go.wait()
        await record(conn, batch)
        recorded.append(len(batch))

    runner._record_outcomes = held  # type: ignore[method-assign]
    runner.runner.stop_timeout = 3.0  # the job's own task is cancelled; its write goes on
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(fast.pool, stop))
    await asyncio.wait_for(writing.wait(), 15)
    stop.set()
    await eventually(lambda: asyncio.sleep(0, not runner.runner._running), timeout=15)
    await asyncio.sleep(0.3)
    assert not running.done()  # its job's task is gone, but the write is still awaited
    let_go.set()
    await asyncio.wait_for(running, 15)
    assert recorded == [1]
    assert await service_active(fast, order_id)


class _ServiceReads:
    """The harness's pool, counting the reads of one job's service; with
    `fail_first_username_save`, the first username save fails as a dropped connection would."""

    def __init__(self, pool: asyncpg.Pool, *, fail_first_username_save: bool = False) -> None:
        self.pool, self.fail = pool, fail_first_username_save
        self.reads: list[str] = []
        self.failed: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if query.startswith("SELECT s.*, o.status AS order_status"):
            self.reads.append(query)
        return await self.pool.fetchrow(query, *args, **kwargs)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if query.startswith("SELECT s.*, o.status AS order_status"):
            self.reads.append(query)
        return await self.pool.fetch(query, *args, **kwargs)

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if self.fail and query.startswith("UPDATE services SET username") and not self.failed:
            self.failed.append(query)
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
        return await self.pool.execute(query, *args, **kwargs)


async def test_a_pass_of_jobs_reads_their_services_with_their_claim_lone_or_not(
    fast: Harness,
) -> None:
    """The runner's pass claims the setups of three paid orders, and the claim's statement
    reads their services too (no read a job, nor one for the pass); each is set up once. A
    lone job's claim reads its service as well (at a moderate rate most passes carry one job,
    whose read was a transaction of its own)."""
    runner = await _runner_of_its_own(fast)
    pool = _ServiceReads(fast.pool)
    service_reads = pool.reads

    together = await paid(fast, ["ahead-0", "ahead-1", "ahead-2"], first_ip=60)
    await runner.runner._start_due(pool)
    await _recorded_once(fast, together)
    assert service_reads == []  # read with their claim
    assert not runner._read  # nothing left behind

    [alone] = await paid(fast, ["ahead-3"], first_ip=70)
    await runner.runner._start_due(pool)
    await eventually(lambda: service_active(fast, alone))
    assert service_reads == []  # read with its claim too
    assert await fast.pool.fetchval(
        "SELECT count(*) FROM order_history WHERE action = 'service created'") == 4


async def test_a_job_tried_again_after_a_transient_error_before_its_call_reads_its_service_anew(
    fast: Harness,
) -> None:
    """What the claim read is used once: when the step before the call fails on a transient
    database error (here saving an older job's username), the next try reads the service
    again, and the account is set up once, with the username saved."""
    runner = await _runner_of_its_own(fast)
    [order_id] = await paid(fast, ["again-0"], first_ip=80)
    await fast.pool.execute("UPDATE services SET username = NULL WHERE order_id = $1", order_id)
    pool = _ServiceReads(fast.pool, fail_first_username_save=True)
    service_reads, failed = pool.reads, pool.failed
    await runner.runner._start_due(pool)
    await _recorded_once(fast, [order_id])
    assert len(failed) == 1 and len(service_reads) == 1  # the claim's read, then its own
    assert not runner._read
    assert await fast.pool.fetchval(
        "SELECT username FROM services WHERE order_id = $1", order_id) is not None
