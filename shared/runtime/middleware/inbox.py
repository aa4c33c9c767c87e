"""Inbox dedupe: `(consumer, message_id)` recorded in the handler's transaction, with a hash of
what the handler reads. A delivery already recorded (a redelivery, or twice in one batch) is
skipped; an id reused for a different message is refused, never silently skipped."""

from __future__ import annotations

import asyncpg

from shared.contracts import shown
from shared.errors import Rejected, RejectKind
from shared.runtime.chain import Middleware, Next
from shared.runtime.work import Batch


class InboxDedupe(Middleware):
    async def __call__(self, batch: Batch, call_next: Next) -> None:
        conn = batch.conn
        assert conn is not None
        items = batch.items
        consumer = items[0].spec.service
        if len(items) == 1:  # alone (not under load): one row, no arrays to build and unnest
            item = items[0]
            if await conn.fetchval(
                "INSERT INTO inbox (consumer, message_id, body_hash) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING RETURNING true",
                consumer, item.message_id, item.body_hash,
            ):
                batch.todo.append(item)
            else:
                await refuse_reused_ids(conn, consumer, [item.message_id], [item.body_hash])
            return await call_next(batch)
        ids = [item.message_id for item in items]
        hashes = [item.body_hash for item in items]
        fresh = {r["message_id"] for r in await conn.fetch(
            "INSERT INTO inbox (consumer, message_id, body_hash)"
            " SELECT $1, u.id, u.hash FROM unnest($2::text[], $3::bytea[]) AS u(id, hash)"
            " ON CONFLICT DO NOTHING RETURNING message_id",
            consumer, ids, hashes,
        )}
        if len(fresh) < len(items):
            await refuse_reused_ids(conn, consumer, ids, hashes)
        for item in items:
            if item.message_id in fresh:
                fresh.discard(item.message_id)  # twice in one batch: handled once
                batch.todo.append(item)
        await call_next(batch)


class OncePerBatch(Middleware):
    """In place of the inbox, for a worker whose writes are idempotent by the message's id
    (`WorkerSpec.inbox=False`): every message of the batch is handled, each id once (twice in
    one batch: handled once, as the inbox would)."""

    async def __call__(self, batch: Batch, call_next: Next) -> None:
        seen: set[str] = set()
        for item in batch.items:
            if item.message_id not in seen:
                seen.add(item.message_id)
                batch.todo.append(item)
        await call_next(batch)


async def refuse_reused_ids(conn: asyncpg.Connection, consumer: str, ids: list[str],
                            hashes: list[bytes]) -> None:
    """A message id seen before is a redelivery, skipped, only if the body is the same: a
    publisher that reuses ids for new messages (a storefront's counter restarting) would
    otherwise lose them without a trace. Refused as bad input: the dead letter says why.
    (Rows from before the hash was kept have none: not compared.)"""
    reused = await conn.fetchval(
        "SELECT i.message_id FROM inbox i"
        " JOIN unnest($2::text[], $3::bytea[]) AS u(id, hash) ON i.message_id = u.id"
        " WHERE i.consumer = $1 AND i.body_hash <> u.hash LIMIT 1",
        consumer, ids, hashes)
    if reused is not None:
        # Dead-lettered, not answered with order.rejected: the order the first message
        # placed may have this one's order_ref, and a storefront would believe it refused.
        raise Rejected(f"message_id {shown(reused)} was used before for a different message;"
                       " this one was not handled: publish it with an id of its own",
                       tell_publisher=False, kind=RejectKind.DUPLICATE_ID)
