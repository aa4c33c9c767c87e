"""`ordermill demo`: a storefront simulator publishing a realistic stream of orders.

Like a storefront it publishes orders and pays most invoices (as its gateway); like an
operator, once setups go quiet, it cancels a few orders whose accounts were created (review
commands, so the accounts are terminated on their server). Its summary says which setups
were parked on purpose by the sandbox (`ordermill sandbox`) and how to retry them.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from ipaddress import IPv4Address
from typing import Any

import aio_pika
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared import broker
from shared.parties import amqp_user
from shared.settings import Settings
from shared.topology import Names, declare_topology

FIRST = ["Ann", "Bob", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kemal",
         "Lina", "Mario", "Nia", "Olu", "Priya", "Quinn", "Rosa", "Sven", "Tomas"]
LAST = ["Lee", "Smith", "Garcia", "Okafor", "Novak", "Silva", "Kim", "Muller", "Rossi", "Khan"]
COUNTRIES = ["GB", "US", "DE", "FR", "NL", "ES", "IT", "CA", "AU", "IE"]
PRODUCTS = [("starter", "monthly", 5), ("starter", "annually", 3), ("business", "annually", 2),
            ("trial", "monthly", 1), ("reseller", "monthly", 1), ("dedicated", "monthly", 1)]
TLDS = ["com", "net", "example"]
FREE_MAIL = ["gmail.com", "yahoo.com", "outlook.com"]
# What the sandbox's deliberate failures say (sandbox/failures.py): the demo counts them apart.
SANDBOX_MARK = "failed on purpose"
EVENTS = ("order.placed", "order.rejected", "order.screened", "order.fraud", "invoice.paid",
          "payment.unapplied", "service.created", "service.failed", "service.terminated",
          "domain.registered", "domain.failed")


def _random_ip(rng: random.Random) -> str:
    # 100.64.0.0/10: plenty of addresses, so honest clients rarely share one.
    return str(IPv4Address(0x64400000 + rng.randrange(1 << 22)))


def make_order(rng: random.Random, ref: str, kind: str, ring_ip: str) -> dict[str, Any]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    slug = f"{first}{last}{rng.randrange(10_000)}".lower()
    domain = f"{slug}.{rng.choice(TLDS)}"
    if kind == "ring":
        # A card-testing ring: many new clients, free mail, one IP.
        email, ip = f"{slug}@{rng.choice(FREE_MAIL)}", ring_ip
    elif kind == "disposable":
        email, ip = f"{slug}@mailinator.com", _random_ip(rng)
    else:
        mail_domain = rng.choice(FREE_MAIL) if rng.random() < 0.3 else f"{slug}.example"
        email, ip = f"{first.lower()}@{mail_domain}", _random_ip(rng)
    product, cycle, _ = rng.choices(PRODUCTS, weights=[w for *_, w in PRODUCTS])[0]
    items: list[dict[str, Any]] = [
        {"type": "product", "product": product, "billing_cycle": cycle,
         "domain": None if product == "dedicated" else domain}]
    if product != "dedicated" and rng.random() < 0.7:
        items.append({"type": "domain", "domain": domain, "action": "register", "years": 1})
    if kind == "bad":
        items[0]["product"] = "no-such-product"
    return {
        "order_ref": ref,
        "client": {"email": email, "first_name": first, "last_name": last,
                   "country": rng.choice(COUNTRIES), "company": None},
        "items": items, "currency": "USD", "payment_method": "stripe",
        "promo_code": "WELCOME10" if product == "starter" and rng.random() < 0.2 else None,
        "ip_address": ip, "send_confirmation": True, "generate_invoice": True,
    }


SETUP_EVENTS = ("service.created", "service.failed", "service.terminated", "domain.registered",
                "domain.failed")


@dataclass
class Tally:
    published: dict[str, float] = field(default_factory=dict)
    outcome: dict[str, str] = field(default_factory=dict)
    latency_ms: list[float] = field(default_factory=list)
    placed: int = 0
    paid_at: dict[str, float] = field(default_factory=dict)  # when the demo paid the order
    setup_ms: list[float] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # parked setups, by reason
    created_orders: dict[str, int] = field(default_factory=dict)  # ref -> id, an account created
    cancelled: list[int] = field(default_factory=list)  # cancelled by the demo, as an operator
    parked_orders: dict[str, set[int]] = field(default_factory=dict)  # reason -> order ids
    last_event: float = field(default_factory=time.time)

    def record(self, key: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Count an event; returns the order.placed body when the order is to be paid."""
        ref = body.get("order_ref")
        if ref not in self.published:
            return None  # another storefront's order
        self.last_event = time.time()
        if key in SETUP_EVENTS or key in ("invoice.paid", "payment.unapplied"):
            self.counts[key] = self.counts.get(key, 0) + 1
            if key == "service.created" and ref in self.paid_at:
                self.setup_ms.append((time.time() - self.paid_at[ref]) * 1000)
            if key == "service.created" and isinstance(body.get("order_id"), int):
                self.created_orders[ref] = body["order_id"]
            if key.endswith(".failed"):
                reason = str(body.get("detail", {}).get("error", "unknown"))
                self.failures[reason] = self.failures.get(reason, 0) + 1
                if isinstance(body.get("order_id"), int):
                    self.parked_orders.setdefault(reason, set()).add(body["order_id"])
            return None
        if key == "order.placed":
            self.placed += 1
            return body
        if ref in self.outcome:
            return None
        if key == "order.screened":
            self.outcome[ref] = body.get("screening", "passed")
        elif key == "order.fraud":
            self.outcome[ref] = "Fraud"
        else:
            self.outcome[ref] = "rejected"
        if key != "order.rejected":
            self.latency_ms.append((time.time() - self.published[ref]) * 1000)
        return None


async def run_demo(s: Settings, console: Console, *, orders: int, rate: float,
                   wait_seconds: float, pay_share: float = 0.85, cancel: int = 3) -> None:
    rng = random.Random()
    run_id = uuid.uuid4().hex[:6]
    names = Names(s.namespace)
    tally = Tally()
    connection = await broker.connect(s.amqp_url, attempts=3)
    user = amqp_user(s.amqp_url)  # the broker checks it; the workers check who it is
    async with connection:
        channel = await broker.open_publisher(connection)
        await declare_topology(connection, names, delivery_limit=s.queue_delivery_limit,
                               replicas=s.queue_replicas)
        exchange = await channel.get_exchange(names.exchange)
        # Like a real storefront: its own queue bound to the events it cares about.
        listen = await connection.channel()
        events = await listen.declare_queue(exclusive=True, auto_delete=True)
        for key in EVENTS:
            await events.bind(names.exchange, routing_key=key)

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                placed = tally.record(message.routing_key or "", json.loads(message.body))
                if (placed and placed["invoice_id"] and Decimal(placed["total"]) > 0
                        and rng.random() < pay_share):
                    # ...and like its payment gateway: most clients pay their invoice.
                    tally.paid_at[placed["order_ref"]] = time.time()
                    payment = {"invoice_id": placed["invoice_id"], "amount": placed["total"],
                               "currency": placed["currency"], "gateway": "demo-gateway",
                               "transaction_id": f"demo-{uuid.uuid4().hex[:12]}"}
                    await broker.publish(exchange, "payment.received", broker.json_message(
                        payment, routing_key="payment.received", user_id=user))

        await events.consume(on_event)
        ring_ip = _random_ip(rng)
        kinds = rng.choices(["honest", "ring", "disposable", "bad"], weights=[85, 8, 5, 2],
                            k=orders)
        started = time.time()
        with Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            sent = progress.add_task("published", total=orders)
            done = progress.add_task("screened", total=orders)
            paid = progress.add_task("paid", total=None)
            setups = progress.add_task("set up", total=None)

            def refresh() -> None:
                progress.update(done, completed=len(tally.outcome))
                progress.update(paid, completed=tally.counts.get("invoice.paid", 0),
                                total=max(1, len(tally.paid_at)))
                progress.update(setups, completed=tally.counts.get("service.created", 0)
                                + tally.counts.get("domain.registered", 0))

            for n, kind in enumerate(kinds):
                ref = f"demo-{run_id}-{n + 1:06d}"
                body = make_order(rng, ref, kind, ring_ip)
                tally.published[ref] = time.time()
                await broker.publish(exchange, "order.place",
                                     broker.json_message(body, routing_key="order.place",
                                                         user_id=user))
                progress.update(sent, completed=n + 1)
                refresh()
                delay = started + (n + 1) / rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            deadline = time.time() + wait_seconds
            # Wait for every order's screening, then for setups to go quiet for 3 s.
            while time.time() < deadline and (
                    len(tally.outcome) < orders or time.time() - tally.last_event < 3):
                refresh()
                await asyncio.sleep(0.2)
            refresh()
        elapsed = time.time() - started
        if cancel:
            await _cancel_some(connection, exchange, user, tally, console, cancel,
                               wait_seconds=min(wait_seconds, 30.0))
    _summary(console, tally, orders, elapsed)
    if len(tally.outcome) < orders:
        console.print(f"[yellow]{orders - len(tally.outcome)} order(s) not screened within "
                      f"{wait_seconds:.0f} s: are the workers running (`ordermill run`)?[/yellow]")


async def _cancel_some(connection: aio_pika.abc.AbstractConnection,
                       exchange: aio_pika.abc.AbstractExchange, user: str | None, tally: Tally,
                       console: Console, how_many: int, *, wait_seconds: float) -> None:
    """Cancel a few orders whose accounts were created, as an operator would (review.command),
    and wait for their accounts' terminations."""
    parked = {oid for ids in tally.parked_orders.values() for oid in ids}
    order_ids = [oid for oid in tally.created_orders.values() if oid not in parked][:how_many]
    if not order_ids:
        return
    channel = await connection.channel()
    replies = await broker.declare_reply_queue(channel)
    waiting: dict[str, int] = {}
    for order_id in order_ids:
        correlation = uuid.uuid4().hex
        waiting[correlation] = order_id
        body = {"order_id": order_id, "action": "cancel", "operator": user or "demo"}
        await broker.publish(exchange, "review.command", broker.json_message(
            body, routing_key="review.command", correlation_id=correlation,
            reply_to=replies.name, user_id=user, expiration=wait_seconds))
    cancelled: list[int] = []
    try:
        async with replies.iterator(timeout=wait_seconds) as incoming:
            async for reply in incoming:
                await reply.ack()
                order_id = waiting.pop(reply.correlation_id or "", None)
                if order_id is not None and json.loads(reply.body).get("ok"):
                    cancelled.append(order_id)
                if not waiting:
                    break
    except TimeoutError:
        pass
    if waiting:
        console.print(f"[yellow]{len(waiting)} cancellation(s) unanswered: is the demo's RabbitMQ "
                      f"user {user or 'guest'!r} in OPERATOR_USERS?[/yellow]")
    tally.cancelled = sorted(cancelled)
    # The terminations arrive on the events queue (Tally.record counts them): poll the count.
    for _ in range(int(wait_seconds * 5)):
        if tally.counts.get("service.terminated", 0) >= len(cancelled):
            break
        await asyncio.sleep(0.2)


def _summary(console: Console, tally: Tally, orders: int, elapsed: float) -> None:
    counts: dict[str, int] = {}
    for outcome in tally.outcome.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    c = tally.counts
    table = Table(title="Demo summary", title_justify="left")
    table.add_column("what")
    table.add_column("count", justify="right")
    for label, value in [("published", orders), ("placed", tally.placed),
                         ("rejected (bad input)", counts.get("rejected", 0)),
                         ("screened: passed", counts.get("passed", 0)),
                         ("screened: skipped", counts.get("skipped", 0)),
                         ("screened: error", counts.get("error", 0)),
                         ("Fraud", counts.get("Fraud", 0)),
                         ("payments sent", len(tally.paid_at)),
                         ("invoices paid", c.get("invoice.paid", 0)),
                         ("payments kept unapplied", c.get("payment.unapplied", 0)),
                         ("services Active", c.get("service.created", 0)),
                         ("services failed (parked)", c.get("service.failed", 0)),
                         ("orders cancelled by the demo", len(tally.cancelled)),
                         ("services terminated", c.get("service.terminated", 0)),
                         ("domains registered", c.get("domain.registered", 0)),
                         ("domains failed (parked)", c.get("domain.failed", 0))]:
        table.add_row(label, str(value))
    console.print(table)
    if tally.latency_ms:
        console.print(f"publish -> screened: {_percentiles(tally.latency_ms)} over "
                      f"{len(tally.latency_ms)} orders; "
                      f"{len(tally.outcome) / elapsed:.1f} orders/s in {elapsed:.1f} s")
    if tally.setup_ms:
        console.print(f"payment -> service Active: {_percentiles(tally.setup_ms)} over "
                      f"{len(tally.setup_ms)} services")
    on_purpose = {r: n for r, n in tally.failures.items() if SANDBOX_MARK in r}
    for reason, n in sorted(tally.failures.items(), key=lambda kv: -kv[1]):
        if reason not in on_purpose:
            console.print(f"[yellow]{n} setup(s) parked: {escape(reason)}[/yellow] "
                          "(see `ordermill failures`)")
    console.print(f"{c.get('service.created', 0)} hosting accounts created, "
                  f"{c.get('domain.registered', 0)} domains registered, "
                  f"{c.get('service.terminated', 0)} accounts terminated after "
                  f"{len(tally.cancelled)} cancellation(s)"
                  + (f" (orders {', '.join(map(str, tally.cancelled))})" if tally.cancelled else ""))
    if on_purpose:
        ids = sorted({oid for r in on_purpose for oid in tally.parked_orders.get(r, ())})
        console.print(f"[yellow]{sum(on_purpose.values())} setup(s) parked on purpose by the "
                      f"sandbox[/yellow], in orders {', '.join(map(str, ids))}: see them with "
                      f"`ordermill failures`, run them again with `ordermill retry "
                      f"{ids[0] if ids else 'ORDER_ID'}` (each order's), and they complete.")


def _percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered):.1f} ms, p99 {p99:.1f} ms"
