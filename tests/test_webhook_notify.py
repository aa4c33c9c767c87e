"""The webhook sender is woken only when a delivery is due (migration 0037): the webhook
worker's insert runs for every event and, with no endpoint subscribed, inserts nothing;
that must not cost a NOTIFY (a transaction of the listener's and a sender's pass each)."""

from __future__ import annotations

import asyncio

import asyncpg

from conftest import eventually
from services.webhooks.outbound import enqueue_to_subscribers
from shared.settings import Settings


async def test_an_insert_notifies_only_when_it_added_a_delivery(db_settings: Settings) -> None:
    conn = await asyncpg.connect(db_settings.database_url)
    heard: list[str] = []
    listener = await asyncpg.connect(db_settings.database_url)
    await listener.add_listener("ordermill_webhooks", lambda *args: heard.append(args[3]))

    async def wakes() -> int:
        """The trigger's NOTIFYs so far: notifications arrive in commit order, so once a
        mark sent now is heard, every earlier one has been."""
        mark = f"mark-{len(heard)}"
        await conn.execute("SELECT pg_notify('ordermill_webhooks', $1)", mark)
        await eventually(lambda: asyncio.sleep(0, mark in heard), timeout=5)
        return sum(1 for payload in heard if payload == "")

    try:
        # No endpoint subscribes to order.placed: nothing inserted, nothing said.
        assert await enqueue_to_subscribers(conn, "order.placed", {"order_ref": "n-1"},
                                            event_id="evt-1") == 0
        assert await wakes() == 0
        await conn.execute(
            "INSERT INTO webhook_endpoints (url, events, secret)"
            " VALUES ('https://hooks.example/in', '{order.placed}', 'plain:whsec_x')")
        assert await enqueue_to_subscribers(conn, "order.placed", {"order_ref": "n-2"},
                                            event_id="evt-2") == 1
        assert await wakes() == 1
        # The same event again: no new delivery (its webhook_id exists), no NOTIFY.
        assert await enqueue_to_subscribers(conn, "order.placed", {"order_ref": "n-2"},
                                            event_id="evt-2") == 0
        assert await wakes() == 1
        # A retry rescheduled (next_attempt_at changed) still wakes the sender.
        await conn.execute("UPDATE webhook_deliveries SET next_attempt_at = now()")
        assert await wakes() == 2
    finally:
        await listener.close()
        await conn.close()
