"""Operator review: every action from every status, as docs/contract.md's table (section 1) says."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aio_pika
import pytest

from conftest import TEST_USER, Harness, eventually
from services.review.worker import worker as review_worker
from shared import broker

STATUSES = ("Pending", "Active", "Cancelled", "Fraud")
# action -> (statuses it is allowed from, the status it leads to or None for unchanged)
TABLE: dict[str, tuple[set[str], str | None]] = {
    "accept": ({"Pending"}, "Active"),
    "deny": ({"Pending"}, "Cancelled"),
    "cancel": ({"Pending", "Active"}, "Cancelled"),
    "fraud": ({"Pending", "Active", "Cancelled"}, "Fraud"),
    "pending": ({"Cancelled", "Fraud"}, "Pending"),
    "delete": ({"Cancelled", "Fraud"}, None),
    "rescreen": ({"Pending"}, None),
}
EVENTS = {"accept": "order.accepted", "deny": "order.cancelled", "cancel": "order.cancelled",
          "fraud": "order.fraud", "pending": "order.pending", "delete": "order.deleted",
          "rescreen": "order.rescreen"}


async def make_order(h: Harness, status: str, ref: str) -> int:
    """An order as placement and screening leave it, then moved to `status` by hand."""
    ended = status in ("Cancelled", "Fraud")
    return await h.pool.fetchval(
        "WITH c AS (INSERT INTO clients (email) VALUES ($1) RETURNING id),"
        " o AS (INSERT INTO orders (order_ref, order_number, client_id, status, screening,"
        "  currency, send_confirmation, generate_invoice, total)"
        "  SELECT $2, (random() * 1e9)::bigint + 1000000000, id, $3,"
        "  CASE WHEN $3 = 'Fraud' THEN 'failed' ELSE 'passed' END, 'USD', true, true, 4.95"
        "  FROM c RETURNING id, client_id),"
        " s AS (INSERT INTO services (order_id, product_id, billing_cycle, domain, amount, status)"
        "  SELECT o.id, p.id, 'monthly', $2 || '.example', 4.95,"
        "  CASE WHEN $4 THEN $3 ELSE 'Pending' END FROM o, products p WHERE p.slug = 'starter'),"
        " i AS (INSERT INTO invoices (order_id, client_id, status, currency, subtotal, total)"
        "  SELECT id, client_id, CASE WHEN $4 THEN 'Cancelled' ELSE 'Unpaid' END, 'USD', 4.95, 4.95"
        "  FROM o)"
        " SELECT id FROM o", f"{ref}@shop.example", ref, status, ended)


async def command(h: Harness, order_id: int, action: str, *, timeout: float = 15,
                  **extra: Any) -> dict[str, Any]:
    """Publish a review command and wait for its reply, as the CLI does."""
    channel = await h.connection.channel()
    replies = await broker.declare_reply_queue(channel)
    correlation = str(uuid.uuid4())
    body = {"order_id": order_id, "action": action, "operator": "alice", **extra}
    await broker.publish(h.exchange, "review.command", broker.json_message(
        body, routing_key="review.command", correlation_id=correlation, reply_to=replies.name,
        user_id=TEST_USER))
    async with replies.iterator(timeout=timeout) as messages:
        async for message in messages:
            await message.ack()
            if message.correlation_id == correlation:
                await channel.close()
                return json.loads(message.body)
    raise AssertionError("no reply")


@pytest.mark.parametrize("start", STATUSES)
@pytest.mark.parametrize("action", list(TABLE))
async def test_every_action_from_every_status(harness: Harness, action: str, start: str) -> None:
    store = await harness.listen(EVENTS[action])
    # As the web console would send it: its user vouches for the operator signed in (alice).
    await harness.start([review_worker(harness.settings)], console_users=[TEST_USER],
                        operator_users=[])
    order_id = await make_order(harness, start, f"r-{action}-{start}")
    allowed, result = TABLE[action]
    reply = await command(harness, order_id, action)
    row = await harness.pool.fetchrow("SELECT * FROM orders WHERE id = $1", order_id)
    if start in allowed or start == result:
        expected = result or start
        assert reply == {"ok": True, "order_id": order_id, "status": expected}
        assert row["status"] == expected
        if start != result:
            event = await store.wait_for(EVENTS[action], lambda b: b["order_id"] == order_id)
            assert event["operator"] == "alice"
            history = await harness.pool.fetch(
                "SELECT actor, action FROM order_history WHERE order_id = $1", order_id)
            assert [(r["actor"], r["action"]) for r in history] == [("alice", action)]
    else:
        needs = " or ".join(sorted(allowed))
        assert reply == {"ok": False, "order_id": order_id,
                         "error": f"order {order_id} is {start}; {action} needs {needs}"}
        assert row["status"] == start  # nothing changed
        assert await harness.pool.fetchval(
            "SELECT count(*) FROM order_history WHERE order_id = $1", order_id) == 0


async def test_cancel_and_fraud_move_items_and_invoice_and_pending_brings_them_back(
    harness: Harness,
) -> None:
    await harness.start([review_worker(harness.settings)])
    order_id = await make_order(harness, "Pending", "r-cycle")
    assert (await command(harness, order_id, "fraud"))["status"] == "Fraud"
    states = await harness.pool.fetchrow(
        "SELECT (SELECT status FROM services WHERE order_id = $1) AS service,"
        " (SELECT status FROM invoices WHERE order_id = $1) AS invoice", order_id)
    assert (states["service"], states["invoice"]) == ("Fraud", "Cancelled")
    assert (await command(harness, order_id, "pending"))["status"] == "Pending"
    states = await harness.pool.fetchrow(
        "SELECT (SELECT status FROM services WHERE order_id = $1) AS service,"
        " (SELECT status FROM invoices WHERE order_id = $1) AS invoice,"
        " (SELECT screening_override FROM orders WHERE id = $1) AS override", order_id)
    assert (states["service"], states["invoice"], states["override"]) == (
        "Pending", "Unpaid", True)


async def test_an_order_cleared_by_an_operator_gets_the_emails_screening_held_back(
    harness: Harness,
) -> None:
    """Screening sends the confirmation and invoice emails only when it clears the order; an
    operator who sets a Fraud order back to Pending, or accepts one that could not be screened,
    clears it, and the customer gets them (the mail worker sends each at most once)."""
    store = await harness.listen("email.send")
    await harness.start([review_worker(harness.settings)])
    fraud = await make_order(harness, "Fraud", "r-overridden")
    # Marked Fraud by an operator before screening's turn came, then set back to Pending.
    early = await make_order(harness, "Fraud", "r-early")
    await harness.pool.execute("UPDATE orders SET screening = 'queued' WHERE id = $1", early)
    assert (await command(harness, early, "pending"))["status"] == "Pending"
    overridden = await harness.pool.fetchrow("SELECT * FROM orders WHERE id = $1", early)
    # Not screened later (screening would undo the operator), and it may be accepted.
    assert (overridden["screening"], overridden["screening_override"]) == ("skipped", True)
    assert (await command(harness, early, "accept"))["status"] == "Active"
    unscreened = await make_order(harness, "Pending", "r-unscreened")
    await harness.pool.execute("UPDATE orders SET screening = 'error' WHERE id = $1", unscreened)
    screened = await make_order(harness, "Pending", "r-screened")  # emails sent by screening
    assert (await command(harness, fraud, "pending"))["status"] == "Pending"
    assert (await command(harness, unscreened, "accept"))["status"] == "Active"
    assert (await command(harness, screened, "accept"))["status"] == "Active"
    for ref in ("r-overridden", "r-unscreened"):
        for template in ("order_confirmation", "invoice_created"):
            mail = await store.wait_for("email.send", lambda b, ref=ref, template=template:
                                        (b["order_ref"], b["template"]) == (ref, template))
            assert mail["recipient"] == f"{ref}@shop.example"
    assert not [b for b in store.bodies("email.send") if b["order_ref"] == "r-screened"]


async def test_accept_stores_its_options_and_refuses_while_screening(harness: Harness) -> None:
    store = await harness.listen("order.accepted")
    await harness.start([review_worker(harness.settings)])
    queued = await make_order(harness, "Pending", "r-queued")
    await harness.pool.execute("UPDATE orders SET screening = 'queued' WHERE id = $1", queued)
    reply = await command(harness, queued, "accept")
    assert reply["ok"] is False and "still being screened" in reply["error"]
    order_id = await make_order(harness, "Pending", "r-opts")
    options = {"run_module_create": False, "send_welcome_email": True, "register_domains": False}
    assert (await command(harness, order_id, "accept", options=options))["ok"] is True
    assert await harness.pool.fetchval(
        "SELECT accept_options FROM orders WHERE id = $1", order_id) == options
    event = await store.wait_for("order.accepted", lambda b: b["order_id"] == order_id)
    assert event["options"] == options


async def test_retry_needs_a_parked_setup_and_unknown_orders_are_refused(
    harness: Harness,
) -> None:
    await harness.start([review_worker(harness.settings)])
    order_id = await make_order(harness, "Active", "r-retry")
    reply = await command(harness, order_id, "retry")
    assert reply == {"ok": False, "order_id": order_id,
                     "error": f"order {order_id} has no parked setup; retry needs one"}
    assert await command(harness, 987654, "accept") == {
        "ok": False, "order_id": 987654, "error": "order 987654 does not exist"}


async def test_two_operators_racing_leave_one_consistent_state(harness: Harness) -> None:
    await harness.start([review_worker(harness.settings)])
    order_id = await make_order(harness, "Pending", "r-race")
    accept, cancel = await asyncio.gather(command(harness, order_id, "accept"),
                                          command(harness, order_id, "cancel"))
    final = await harness.pool.fetchval("SELECT status FROM orders WHERE id = $1", order_id)
    # Accept then cancel: both succeed and it ends Cancelled. Cancel then accept: accept is
    # refused. Either way each answer is true to what happened.
    assert cancel == {"ok": True, "order_id": order_id, "status": "Cancelled"}
    assert final == "Cancelled"
    assert accept["ok"] is True or accept["error"] == (
        f"order {order_id} is Cancelled; accept needs Pending")
    history = [r["action"] for r in await harness.pool.fetch(
        "SELECT action FROM order_history WHERE order_id = $1 ORDER BY id", order_id)]
    assert history in (["accept", "cancel"], ["cancel"])


async def test_a_command_sent_twice_is_applied_once(harness: Harness) -> None:
    await harness.start([review_worker(harness.settings)])
    order_id = await make_order(harness, "Pending", "r-twice")
    channel = await harness.connection.channel()
    replies = await broker.declare_reply_queue(channel)
    body = {"order_id": order_id, "action": "cancel", "operator": "bob"}
    for _ in range(2):
        message = broker.json_message(body, routing_key="review.command", message_id="cmd-1",
                                      correlation_id="c-1", reply_to=replies.name,
                                      user_id=TEST_USER)
        await broker.publish(harness.exchange, "review.command", message)

    async def one_reply() -> aio_pika.abc.AbstractIncomingMessage | None:
        return await replies.get(no_ack=True, fail=False)
    first = await eventually(one_reply)
    assert json.loads(first.body)["status"] == "Cancelled"
    await asyncio.sleep(0.5)
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM order_history WHERE order_id = $1", order_id) == 1


async def test_a_command_held_past_its_expiry_is_not_carried_out_late(harness: Harness) -> None:
    """The CLI stops waiting and says the command expired unapplied; the broker drops it only
    while it is queued. One the worker already holds (here: waiting for the order's lock)
    must not be carried out after that either."""
    from test_cli import cli

    s = harness.settings
    await harness.start([review_worker(s)])
    order_id = await make_order(harness, "Pending", "r-late")
    async with harness.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", order_id)
        code, _out, err = await cli(s, "cancel", str(order_id), "--timeout", "2")
    assert code == 1 and err.strip().endswith("the command expired unapplied"), err

    async def answered() -> bool:
        return await harness.pool.fetchval(
            "SELECT count(*) FROM outbox WHERE direct AND body->>'order_id' = $1",
            str(order_id)) == 1
    await eventually(answered)  # its (unread) refusal: the command was handled, not applied
    assert await harness.pool.fetchval(
        "SELECT status FROM orders WHERE id = $1", order_id) == "Pending"


async def test_cli_actions_against_a_review_worker_and_without_one(harness: Harness) -> None:
    from test_cli import cli

    s = harness.settings
    pending = await make_order(harness, "Pending", "r-cli")
    code, out, err = await cli(s, "accept", str(pending), "--timeout", "2")
    assert code == 1
    assert err.strip() == ("error: no answer from the review service within 2 s (is "
                           "`ordermill run` running?); the command expired unapplied")
    await harness.start([review_worker(s)])
    await asyncio.sleep(2.5)  # the unanswered command expired in the queue: not applied late
    assert await harness.pool.fetchval("SELECT status FROM orders WHERE id = $1", pending) == (
        "Pending")
    code, out, err = await cli(s, "accept", str(pending), "--no-welcome-email")
    assert (code, out.strip()) == (0, f"order {pending}: Active"), err
    assert (await harness.pool.fetchval(
        "SELECT accept_options FROM orders WHERE id = $1", pending))["send_welcome_email"] is False
    # History names the broker-validated user of the connection.
    assert await harness.pool.fetchval(
        "SELECT actor FROM order_history WHERE order_id = $1", pending) == "guest"
    code, out, err = await cli(s, "set-pending", str(pending))
    assert (code, err.strip()) == (
        1, f"error: order {pending} is Active; pending needs Cancelled or Fraud")
    for name, status in (("cancel", "Cancelled"), ("fraud", "Fraud"), ("set-pending", "Pending"),
                         ("deny", "Cancelled"), ("delete", "Cancelled")):
        code, out, err = await cli(s, name, str(pending))
        assert (code, out.strip()) == (0, f"order {pending}: {status}"), (name, err)
    code, out, _ = await cli(s, "orders", "--json")
    assert pending not in [o["id"] for o in json.loads(out)]  # deleted: hidden, kept


async def test_cli_place_an_order_for_a_client_and_filter_orders(harness: Harness) -> None:
    from test_cli import cli

    from services.fraud.worker import worker as fraud_worker
    from services.placement.worker import worker as placement_worker

    s = harness.settings
    await harness.start([placement_worker(s), fraud_worker(s)])
    code, out, err = await cli(
        s, "place", "--email", "op@client.example", "--first-name", "Op",
        "--product", "starter:annually@op.example", "--domain", "op-new.com:register:2",
        "--no-confirmation", "--ref", "desk-1")
    assert code == 0, err
    order = await harness.order("desk-1")
    assert out.strip().startswith(f"order {order['id']} placed: ref desk-1")
    assert "total 73.50 USD" in out  # 49.50 + 2 years of .com at 12.00
    assert (order["send_confirmation"], order["placed_by"]) == (False, "guest")
    code, out, err = await cli(s, "place", "--client-id", str(order["client_id"]),
                               "--product", "platinum", "--ref", "desk-2")
    assert (code, err.strip()) == (1, "error: order desk-2 refused: unknown product 'platinum'")
    code, out, err = await cli(s, "place", "--email", "x@y.example")
    assert (code, err.strip()) == (1, "error: items: List should have at least 1 item after "
                                      "validation, not 0")
    code, out, err = await cli(s, "orders", "--client", "OP@client.example", "--json")
    assert [o["order_ref"] for o in json.loads(out)] == ["desk-1"]
    code, out, err = await cli(s, "orders", "--since", "2999-01-01", "--json")
    assert json.loads(out) == []
    code, out, err = await cli(s, "orders", "--since", "yesterday")
    assert (code, err.strip()) == (
        1, "error: --since 'yesterday' is not an ISO date or time (2026-11-26)")


async def test_rescreen_scores_the_order_again(harness: Harness) -> None:
    from conftest import order_body
    from services.fraud.worker import worker as fraud_worker
    from services.placement.worker import worker as placement_worker

    s = harness.settings
    await harness.start([placement_worker(s), fraud_worker(s), review_worker(s)])
    await harness.publish("order.place", order_body("r-rescreen"))
    order = await harness.screened("r-rescreen")
    assert order["screening"] == "passed"
    # Since then the address turned out to be a banned one.
    await harness.pool.execute("UPDATE orders SET ip_address = '192.0.2.66' WHERE id = $1",
                               order["id"])
    assert (await command(harness, order["id"], "rescreen"))["status"] == "Pending"

    async def fraud() -> bool:
        return (await harness.order("r-rescreen"))["status"] == "Fraud"
    await eventually(fraud)
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM fraud_checks WHERE order_id = $1", order["id"]) == 2
