"""The provisioning consumer's batch locks its orders first, in id order, as every other
batch does (fraud's, the job outcome writer's).

Its handlers lock each order as its message comes (a payment by invoice id or order ref, an
order event by id), so a batch of payments locked its orders in the order they were paid:
against the fraud worker's batch or the job outcome writer, both locking in id order, that
made cycles, and PostgreSQL broke each after its 1 s `deadlock_timeout` (seen in
bench/sustained.py: a three-way deadlock of a payment batch, an order event and a job
outcome write). Locked here first, in one statement, the handlers' own locks are already
held and cost no wait. A message alone is not loaded (its one lock cannot make a cycle)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from services.provisioning.payments import TEXT_LIMITS, int_or_none
from shared.contracts import OrderEvent, PaymentReceived


async def lock_orders(messages: Sequence[Any], conn: asyncpg.Connection) -> list[None]:
    """Lock every order the batch's messages name, in id order. Nothing is read for the
    handlers (each still reads its order under the lock it now holds). An order whose
    payment its handler will not apply (an unauthorized publisher, no currency) is locked
    all the same, for the batch's transaction only: cheaper than deciding twice."""
    order_ids: set[int] = set()
    invoice_ids: set[int] = set()
    refs: set[str] = set()
    for message in messages:
        if isinstance(message, OrderEvent):
            order_ids.add(message.order_id)
        elif isinstance(message, PaymentReceived):
            invoice_id = int_or_none(message.invoice_id)
            if invoice_id is not None:
                invoice_ids.add(invoice_id)
            elif message.order_ref is not None:
                # A longer one is none (the payment keeps a shortened copy, no order's).
                if len(message.order_ref) <= TEXT_LIMITS["order_ref"]:
                    refs.add(message.order_ref)
    if order_ids or invoice_ids or refs:
        await conn.fetch(
            # The ids first, as an array: the lock is then an index scan of the primary key
            # (an OR of the three would scan every order).
            "SELECT 1 FROM orders o WHERE o.id = ANY(ARRAY("
            "  SELECT unnest($1::bigint[])"
            "  UNION ALL SELECT i.order_id FROM invoices i WHERE i.id = ANY($2::bigint[])"
            "  UNION ALL SELECT x.id FROM orders x WHERE x.order_ref = ANY($3::text[])))"
            " ORDER BY o.id FOR NO KEY UPDATE",
            sorted(order_ids), sorted(invoice_ids), sorted(refs))
    return [None] * len(messages)
