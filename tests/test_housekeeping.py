"""Bounded tables (issue 15, target 3): housekeeping deletes, in small batches, only what is
past its retention window and finished: published events, dedupe rows, done or cancelled
jobs, sent mails, delivered or cancelled webhooks (with their attempts). Unpublished events,
open or parked jobs, unsent or parked mails and webhooks not delivered stay whatever their
age; and every table's rule reads its rows by an index."""

from __future__ import annotations

import json

import asyncpg

from shared.housekeeping import Housekeeper, retention_rules
from shared.settings import Settings

OLD, NEW = "now() - interval '200 days'", "now() - interval '1 hour'"


async def _seed(conn: asyncpg.Connection) -> None:
    client = await conn.fetchval("INSERT INTO clients (email) VALUES ('hk@example.com') RETURNING id")
    order = await conn.fetchval(
        "INSERT INTO orders (order_ref, order_number, client_id, currency, send_confirmation,"
        " generate_invoice, total) VALUES ('hk-1', 1, $1, 'USD', true, true, 10) RETURNING id",
        client)
    product = await conn.fetchval("SELECT min(id) FROM products")
    for published, age in [("old", OLD), ("new", NEW), ("unpublished", OLD)]:
        await conn.execute(
            "INSERT INTO outbox (message_id, routing_key, body, created_at, published_at)"
            f" VALUES (gen_random_uuid(), 'hk', $1, {age},"
            f" {'NULL' if published == 'unpublished' else age})", {"n": published})
    for n in range(5):
        await conn.execute("INSERT INTO inbox (consumer, message_id, processed_at)"
                           f" VALUES ('fraud', 'old-{n}', {OLD})")
    await conn.execute("INSERT INTO inbox (consumer, message_id, processed_at)"
                       f" VALUES ('fraud', 'new', {NEW})")
    jobs = [("done", OLD), ("cancelled", OLD), ("done", NEW), ("parked", OLD), ("pending", OLD),
            ("running", OLD)]
    for n, (status, age) in enumerate(jobs):
        service = await conn.fetchval(
            "INSERT INTO services (order_id, product_id, billing_cycle, amount)"
            " VALUES ($1, $2, 'monthly', 10) RETURNING id", order, product)
        await conn.execute(
            "INSERT INTO jobs (order_id, service_id, kind, status, detail, created_at, updated_at)"
            f" VALUES ($1, $2, 'create', $3, $4, {age}, {age})",
            order, service, status, {"n": f"{status} {n}"})
    mails = [("sent", OLD), ("sent", NEW), ("parked", OLD), ("pending", OLD)]
    for n, (status, age) in enumerate(mails):
        await conn.execute(
            "INSERT INTO emails (dedupe_key, template, recipient, order_id, message_id, status,"
            f" created_at, sent_at) VALUES ($1, 'x', 'hk@example.com', $2, $1, $3, {age},"
            f" CASE WHEN $3 = 'sent' THEN {age} END)", f"{status}-{n}", order, status)
    endpoint = await conn.fetchval(
        "INSERT INTO webhook_endpoints (url, events, secret)"
        " VALUES ('https://hooks.example/in', '{*}', 'plain:whsec_x') RETURNING id")
    hooks = [("delivered", OLD), ("cancelled", OLD), ("delivered", NEW), ("parked", OLD),
             ("pending", OLD), ("sending", OLD)]
    for n, (status, age) in enumerate(hooks):
        delivery = await conn.fetchval(
            "INSERT INTO webhook_deliveries (endpoint_id, webhook_id, event_type, event_id, body,"
            f" status, created_at, updated_at) VALUES ($1, $2, 'order.placed', $2, '{{}}', $3,"
            f" {age}, {age}) RETURNING id", endpoint, f"{status}-{n}", status)
        await conn.execute("INSERT INTO webhook_attempts (delivery_id, attempt, outcome, duration_ms)"
                           " VALUES ($1, 1, 'failed', 5)", delivery)


async def test_pruning_removes_only_finished_rows_past_retention(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await _seed(conn)
    # Batches of two: the five old dedupe rows take three.
    keeper = Housekeeper(Settings(outbox_retention_hours=72, inbox_retention_days=30,
                                  job_retention_days=90, email_retention_days=90,
                                  webhook_retention_days=30, housekeeping_batch=2,
                                  housekeeping_pause_ms=0).housekeeping)
    assert await keeper.once(pool) == {"outbox": 1, "inbox": 5, "jobs": 2, "emails": 1,
                                       "webhook_deliveries": 2,
                                       "alerts": 0}
    assert [r["n"] for r in await pool.fetch("SELECT body->>'n' AS n FROM outbox ORDER BY id")] == [
        "new", "unpublished"]
    assert [r["message_id"] for r in await pool.fetch("SELECT message_id FROM inbox")] == ["new"]
    assert [r["n"] for r in await pool.fetch("SELECT detail->>'n' AS n FROM jobs ORDER BY id")] == [
        "done 2", "parked 3", "pending 4", "running 5"]
    assert [r["dedupe_key"] for r in await pool.fetch(
        "SELECT dedupe_key FROM emails ORDER BY id")] == ["sent-1", "parked-2", "pending-3"]
    kept = ["delivered-2", "parked-3", "pending-4", "sending-5"]
    assert [r["webhook_id"] for r in await pool.fetch(
        "SELECT webhook_id FROM webhook_deliveries ORDER BY id")] == kept
    assert [r["webhook_id"] for r in await pool.fetch(  # the deleted ones' attempts went too
        "SELECT d.webhook_id FROM webhook_attempts a JOIN webhook_deliveries d"
        " ON d.id = a.delivery_id ORDER BY a.id")] == kept
    assert await pool.fetchval("SELECT count(*) FROM webhook_attempts") == len(kept)
    # Nothing more to do: a second pass deletes nothing.
    assert await keeper.once(pool) == {"outbox": 0, "inbox": 0, "jobs": 0, "emails": 0,
                                       "webhook_deliveries": 0,
                                       "alerts": 0}


async def test_each_tables_rule_reads_by_an_index(pool: asyncpg.Pool) -> None:
    """With sequential scans priced out, every rule's delete is planned on an index: the
    rows to prune are found without reading the retention window."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        for rule in retention_rules(Settings().housekeeping):
            plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + rule.query, rule.keep_seconds, 100)
            text = json.dumps(plan if not isinstance(plan, str) else json.loads(plan))
            assert '"Seq Scan"' not in text, (rule.table, text)
            assert f'"{rule.table}_' in text, (rule.table, text)  # one of its own indexes
