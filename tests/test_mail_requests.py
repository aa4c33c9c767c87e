"""The mail worker records a batch of `email.send` requests (as the runtime hands one under
load, or a steady flow's few a transaction) in one INSERT, in the messages' order, counted
statement by statement on a real database; a resend writes nothing twice; a request for an
order that does not exist is dead-lettered alone and the others are recorded."""

from __future__ import annotations

from test_webhook_fanout import Statements

from conftest import order_body
from services.fraud.worker import worker as fraud_worker
from services.notify.worker import worker as notify_worker
from services.placement.worker import worker as placement_worker
from shared.runtime.testing import InMemoryFlow


async def _requests(flow: InMemoryFlow, refs: list[str]) -> list:
    s = flow.settings
    flow.add(placement_worker(s), fraud_worker(s))
    for n, ref in enumerate(refs):
        await flow.send("order.place", order_body(ref, ip_address=f"203.0.113.{40 + n}"))
    events = await flow.run()
    flow.add(notify_worker(s))
    return [e for e in events if e.routing_key == "email.send"]


async def test_a_batch_of_mail_requests_is_recorded_in_one_statement_in_order(
    flow: InMemoryFlow,
) -> None:
    requests = await _requests(flow, ["mailb-0", "mailb-1"])
    assert len(requests) == 4  # a confirmation and an invoice each
    statements = Statements()
    await statements.watch(flow.pool)
    batch = [flow.as_delivery(e) for e in requests]
    # The same request again in the batch (a resend under another message id): once.
    batch.append(flow.message("email.send", requests[0].body))
    await flow.deliver(batch, to="notify")

    assert [m.outcome for m in batch] == ["acked"] * len(batch)
    assert statements.count("INSERT INTO emails") == 1
    assert statements.count("BEGIN") == 1
    rows = await flow.pool.fetch("SELECT dedupe_key, template, recipient, order_id"
                                 " FROM emails ORDER BY id")
    assert [r["dedupe_key"] for r in rows] == [e.body["dedupe_key"] for e in requests]
    assert [(r["template"], r["recipient"], r["order_id"]) for r in rows] == [
        (e.body["template"], e.body["recipient"], e.body["order_id"]) for e in requests]

    # Delivered again past the inbox (a redelivery after a lost ack): nothing twice.
    await flow.pool.execute("DELETE FROM inbox WHERE consumer = 'notify'")
    again = [flow.as_delivery(e) for e in requests]
    await flow.deliver(again, to="notify")
    assert [m.outcome for m in again] == ["acked"] * len(again)
    assert await flow.pool.fetchval("SELECT count(*) FROM emails") == len(requests)


async def test_a_request_for_an_unknown_order_is_dead_lettered_alone_from_its_batch(
    flow: InMemoryFlow,
) -> None:
    requests = await _requests(flow, ["mailu-0"])
    unknown = flow.message("email.send", {
        **requests[0].body, "order_id": 999999, "dedupe_key": "mailu-x:confirmation"})
    batch = [flow.as_delivery(requests[0]), unknown, flow.as_delivery(requests[1])]
    await flow.deliver(batch, to="notify")

    assert [m.outcome for m in batch] == ["acked", "dead", "acked"]
    [dead] = flow.dead("notify")
    assert dead.message_id == unknown.message_id
    assert dead.reason == "unknown order 999999"
    rows = await flow.pool.fetch("SELECT dedupe_key FROM emails ORDER BY id")
    assert [r["dedupe_key"] for r in rows] == [e.body["dedupe_key"] for e in requests]
