"""States are types, events are contract classes (issue 12, Build 4 and 5).

The first tests need no server: the review table derived from the one transition table, and
the routing keys the code emits. The others read the schema (every enum is its column's
CHECK constraint), run the migration that turns a payment's reason into `waiting_for`, and
run orders through the workers to check every event in the outbox against its class.
"""

from __future__ import annotations

import ast
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from test_provisioning import FAST_JOBS, pay, starter

from conftest import RUN_ID, TEST_USER, Harness, Infra, _with_db, eventually
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.worker import worker as provisioning_worker
from services.review.handlers import ACTIONS, NOTE, REPORT, RESOLVE, action_table
from services.review.worker import worker as review_worker
from shared import contracts, db
from shared.contracts import EVENTS, Event, OrderFraud
from shared.orders import IN_PLACE, TRANSITIONS
from shared.settings import Settings
from shared.states import (
    AlertDeliveryStatus,
    AlertTrigger,
    DomainStatus,
    EmailStatus,
    InvoiceStatus,
    JobStatus,
    OrderStatus,
    PaymentStatus,
    Screening,
    ServiceStatus,
    WaitingFor,
)
from shared.topology import SERVICE_BINDINGS, SERVICE_EMITS

ROOT = Path(__file__).resolve().parent.parent

# The operator actions table of docs/contract.md, section 1: action -> (allowed from, result).
CONTRACT_ACTIONS = {
    "accept": ({"Pending"}, "Active"),
    "deny": ({"Pending"}, "Cancelled"),
    "cancel": ({"Pending", "Active"}, "Cancelled"),
    "fraud": ({"Pending", "Active", "Cancelled"}, "Fraud"),
    "pending": ({"Cancelled", "Fraud"}, "Pending"),
    "delete": ({"Cancelled", "Fraud"}, None),
    "retry": ({"Pending", "Active", "Cancelled", "Fraud"}, None),
    "rescreen": ({"Pending"}, None),
}


def test_review_table_derived_from_the_transition_table_is_the_contracts() -> None:
    derived = {action: ({str(s) for s in allowed}, result)
               for action, (allowed, result) in action_table().items()}
    assert derived == CONTRACT_ACTIONS
    # Every action the review command accepts has an entry, and nothing else does; `note`,
    # `report` and `resolve` change no status and are handled apart (docs/contract.md, "Notes
    # and reports", "Module queue").
    assert set(ACTIONS) | {NOTE, REPORT, RESOLVE} == set(
        contracts.ReviewCommand.model_fields["action"].annotation.__args__)


def test_the_transition_table_names_only_known_actions_and_no_dead_ends() -> None:
    operator_actions = {a for a, action in ACTIONS.items() if action.result is not None}
    named = set().union(*TRANSITIONS.values())
    assert named == operator_actions | {"screening"}
    assert all(start != end for start, end in TRANSITIONS)
    assert set(IN_PLACE) == {a for a, action in ACTIONS.items() if action.result is None}
    # Every status can be left (an order is never stuck where no action applies).
    assert {start for start, _ in TRANSITIONS} == set(OrderStatus)


def test_enum_values_are_the_contract_words() -> None:
    # docs/contract.md, section 1 "Statuses": the words operators see and events carry.
    assert [s.value for s in OrderStatus] == ["Pending", "Active", "Cancelled", "Fraud"]
    assert [s.value for s in Screening] == ["queued", "passed", "failed", "skipped", "error",
                                            "review"]  # review: 1.3.0, issue 16
    assert [s.value for s in ServiceStatus] == [
        "Pending", "Active", "Suspended", "Terminated", "Cancelled", "Fraud"]
    assert [s.value for s in DomainStatus] == [
        "Pending", "Pending Registration", "Pending Transfer", "Active", "Cancelled", "Fraud"]
    assert [s.value for s in InvoiceStatus] == ["Unpaid", "Paid", "Cancelled"]


# -- routing keys ---------------------------------------------------------------------------------

def _emitted_keys() -> dict[str, set[str]]:
    """Routing keys written as text where the code emits an event: `emit("key", ...)`,
    `write_event(conn, "key", ...)`, the job runner's `_event(job, "key", ...)` and the
    rejection event of a WorkerSpec; and the contract classes passed to emit/write_event."""
    keys: dict[str, set[str]] = {}
    for path in [*ROOT.glob("shared/**/*.py"), *ROOT.glob("services/**/*.py"),
                 *ROOT.glob("cli/**/*.py")]:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
                    node.func, "id", "")
                args = node.args
                if name in ("emit", "write_event", "_event"):
                    for arg in args[:2]:
                        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                            keys.setdefault(arg.value, set()).add(str(path.relative_to(ROOT)))
                        elif isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and \
                                arg.func.id[0].isupper():
                            cls = getattr(contracts, arg.func.id, None)
                            assert cls is not None, f"{path}: emits {arg.func.id}, not a contract"
                            key = cls.__dict__.get("routing_key")
                            assert key, f"{path}: {arg.func.id} has no routing key"
                            keys.setdefault(key, set()).add(str(path.relative_to(ROOT)))
                for kw in node.keywords:
                    if kw.arg == "rejection_event" and isinstance(kw.value, ast.Constant):
                        keys.setdefault(kw.value.value, set()).add(str(path.relative_to(ROOT)))
    return keys


def test_every_routing_key_the_code_emits_has_a_contract_class() -> None:
    emitted = _emitted_keys()
    # (An event built elsewhere and passed as a variable is a class instance: its key is its
    # class's, so it has one by construction.)
    assert {"order.placed", "order.screened", "invoice.paid", "service.created",
            "email.send"} <= set(emitted)  # the scan finds them
    missing = {key: where for key, where in emitted.items() if key not in EVENTS}
    assert not missing, f"routing keys emitted without a contract class: {missing}"
    # Review's events come from its action table.
    for action in ACTIONS.values():
        assert action.event.__dict__.get("routing_key") in EVENTS
    # What each service may publish (its RabbitMQ user's rights) is exactly the classes.
    may_publish = set().union(*SERVICE_EMITS.values())
    assert may_publish == set(EVENTS)
    assert set(emitted) <= may_publish
    # Every event a service consumes has its class too (commands are consumed as theirs).
    commands = {"order.place", "payment.received", "review.command"}
    assert set().union(*SERVICE_BINDINGS.values()) - commands <= set(EVENTS)


def test_emit_takes_the_key_from_the_class() -> None:
    from datetime import UTC, datetime

    from shared.uow import MessageContext, UnitOfWork

    uow = UnitOfWork(None, MessageContext(  # type: ignore[arg-type]
        consumer="review", message_id="m1", routing_key="review.command",
        received_at=datetime.now(UTC)))
    uow.emit(OrderFraud(order_id=1, order_ref="r1", operator="alice", source="operator"))
    uow.emit("order.fraud", {"order_id": 1})  # the older form still works
    with pytest.raises(TypeError):
        uow.emit(contracts.OrderEvent(order_id=1, order_ref="r1"))  # no routing key
    with pytest.raises(TypeError):
        uow.emit(OrderFraud(order_id=1, order_ref="r1", source="operator"), {"x": 1})
    (_, key, body, *_), (_, old_key, *_) = uow.take_events()
    assert (key, old_key) == ("order.fraud", "order.fraud")
    assert body == {"order_id": 1, "order_ref": "r1", "operator": "alice", "source": "operator"}


# -- the schema -----------------------------------------------------------------------------------

COLUMNS: dict[tuple[str, str], set[str]] = {
    ("orders", "status"): {s.value for s in OrderStatus},
    ("orders", "screening"): {s.value for s in Screening},
    ("fraud_checks", "result"): {s.value for s in Screening} - {"queued"},
    ("services", "status"): {s.value for s in ServiceStatus},
    ("domains", "status"): {s.value for s in DomainStatus},
    ("invoices", "status"): {s.value for s in InvoiceStatus},
    ("jobs", "status"): {s.value for s in JobStatus},
    ("emails", "status"): {s.value for s in EmailStatus},
    ("payments", "status"): {s.value for s in PaymentStatus},
    ("payments", "waiting_for"): {s.value for s in WaitingFor},
    ("alerts", "trigger"): {s.value for s in AlertTrigger},
    ("alert_deliveries", "status"): {s.value for s in AlertDeliveryStatus},
}


async def test_each_enum_is_its_columns_check_constraint(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        await _compare_checks(conn)
    finally:
        await conn.close()


async def _compare_checks(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch(
        "SELECT c.conrelid::regclass::text AS tbl, a.attname AS col,"
        " pg_get_constraintdef(c.oid) AS def FROM pg_constraint c"
        " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]"
        " WHERE c.contype = 'c' AND cardinality(c.conkey) = 1")
    checks = {(r["tbl"], r["col"]): set(re.findall(r"'([^']*)'::text", r["def"])) for r in rows}
    for column, values in COLUMNS.items():
        assert checks.get(column) == values, column
    # The defaults the schema writes are members too.
    defaults = await conn.fetch(
        "SELECT table_name, column_name, column_default FROM information_schema.columns"
        " WHERE table_schema = 'public' AND (table_name, column_name) IN"
        " (('orders', 'status'), ('orders', 'screening'), ('jobs', 'status'),"
        "  ('services', 'status'), ('domains', 'status'), ('emails', 'status'))")
    for r in defaults:
        value = re.match(r"'([^']*)'", r["column_default"]).group(1)
        assert value in COLUMNS[(r["table_name"], r["column_name"])], r


async def test_the_migration_fills_waiting_for_from_the_reasons(infra: Infra) -> None:
    """A payment stored unapplied before 0015 keeps waiting: its reason's text becomes the
    column the code now reads."""
    name = f"om_{RUN_ID}_waiting"
    admin = await asyncpg.connect(_with_db(infra.database_url, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = _with_db(infra.database_url, name)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE schema_migrations ("
                           " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        for version, sql in db._migration_files():
            if version < "0015":
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        rows = [  # (transaction id, status, reason, trusted)
            ("t-before", "unapplied", "order not placed yet: shop1-9", True),
            ("t-invoice", "unapplied", "unknown invoice 99", True),
            ("t-fraud", "unapplied", "order shop1-7 is Fraud", True),
            ("t-cancelled", "unapplied", "order shop1-8 is Cancelled", True),
            ("t-inv-cancelled", "unapplied", "invoice 12 is Cancelled", True),
            ("t-currency", "unapplied", "currency EUR does not match invoice 3 in USD", True),
            ("t-forged", "unapplied", "unknown invoice 98", False),
            ("t-applied", "applied", None, True),
        ]
        for txn, status, reason, trusted in rows:
            await conn.execute(
                "INSERT INTO payments (gateway, transaction_id, amount, raw_amount, currency,"
                " status, reason, message_id, trusted)"
                " VALUES ('stripe', $1, 5.95, '5.95', 'USD', $2, $3, $1, $4)",
                txn, status, reason, trusted)
    finally:
        await conn.close()
    pool = await db.create_pool(url, max_size=1, attempts=3)
    try:
        assert "0015_payment_waiting" in await db.migrate(pool)
        got = {r["transaction_id"]: r["waiting_for"] for r in await pool.fetch(
            "SELECT transaction_id, waiting_for FROM payments")}
    finally:
        await pool.close()
    assert got == {"t-before": "order", "t-invoice": "order", "t-fraud": "review",
                   "t-cancelled": "review", "t-inv-cancelled": "review", "t-currency": None,
                   "t-forged": None, "t-applied": None}


# -- the workers ----------------------------------------------------------------------------------

def _all_workers(h: Harness) -> list:
    return [placement_worker(h.settings), fraud_worker(h.settings),
            provisioning_worker(h.settings), review_worker(h.settings)]


async def _waiting_for(h: Harness, txn: str) -> tuple[str, str | None] | None:
    """The payment's (status, waiting_for); None until it is stored."""
    row = await h.pool.fetchrow(
        "SELECT status, waiting_for FROM payments WHERE transaction_id = $1", txn)
    return (row["status"], row["waiting_for"]) if row else None


async def _review(h: Harness, order_id: int, action: str, **extra: Any) -> None:
    await h.publish("review.command", {"order_id": order_id, "action": action,
                                       "operator": "alice", **extra})


async def test_waiting_for_is_set_where_the_reason_is_decided_and_used(harness: Harness) -> None:
    h = harness
    h.settings = h.settings.model_copy(update=FAST_JOBS)
    await h.start(_all_workers(h))
    # Before its order: waits for the order, applied when it arrives.
    await pay(h, "5.95", "w-early", order_ref="w-early")
    assert await eventually(lambda: _waiting_for(h, "w-early")) == ("unapplied", "order")
    await h.publish("order.place", starter("w-early"))
    await h.screened("w-early")

    async def applied(txn: str) -> bool:
        return (await _waiting_for(h, txn)) == ("applied", None)
    await eventually(lambda: applied("w-early"))
    # A Fraud order's payment waits for review; set back to Pending, it is applied.
    await h.publish("order.place", starter("w-fraud", ip_address="192.0.2.66"))
    fraud = await h.screened("w-fraud")
    assert fraud["status"] == "Fraud"
    invoice_id = await h.pool.fetchval("SELECT id FROM invoices WHERE order_id = $1", fraud["id"])
    await pay(h, "5.95", "w-fraud", invoice_id=invoice_id)
    await eventually(lambda: _waiting_for(h, "w-fraud"))
    assert await _waiting_for(h, "w-fraud") == ("unapplied", "review")
    await _review(h, fraud["id"], "pending")
    await eventually(lambda: applied("w-fraud"))
    # Nothing to wait for: a currency that does not match, and a publisher that is no gateway.
    await pay(h, "5.95", "w-eur", invoice_id=invoice_id, currency="EUR")
    await eventually(lambda: _waiting_for(h, "w-eur"))
    assert await _waiting_for(h, "w-eur") == ("unapplied", None)
    await h.stop_all()
    # The test's user is no gateway now (nor an operator: it reviews as the console).
    await h.start(_all_workers(h), payment_publishers=["gateway-stripe"],
                  operator_users=["desk"], console_users=[TEST_USER])
    await pay(h, "5.95", "w-forged", order_ref="w-later")
    await eventually(lambda: _waiting_for(h, "w-forged"))
    assert await _waiting_for(h, "w-forged") == ("unapplied", None)
    await h.publish("order.place", starter("w-later"))
    later = await h.screened("w-later")
    await _review(h, later["id"], "accept")
    await eventually(lambda: h.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'order.accepted'"))
    assert await _waiting_for(h, "w-forged") == ("unapplied", None)  # never applied
    assert await h.pool.fetchval(
        "SELECT amount_paid FROM invoices WHERE order_id = $1", later["id"]) == Decimal("0.00")


async def test_every_event_in_the_outbox_is_its_contract_class(harness: Harness) -> None:
    """Orders through placement, screening, payment, setup and every review action: each
    event's body reads as its class and writes back as the same body (today's fields)."""
    h = harness
    h.settings = h.settings.model_copy(update=FAST_JOBS)
    await h.start(_all_workers(h))
    await h.publish("order.place", starter("ev-a"))
    a = await h.screened("ev-a")
    invoice_id = await h.pool.fetchval("SELECT id FROM invoices WHERE order_id = $1", a["id"])
    await pay(h, "5.95", "ev-a", invoice_id=invoice_id)
    await pay(h, "1.00", "ev-unknown", invoice_id=999999)
    await eventually(lambda: h.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'service.created'"))
    await _review(h, a["id"], "accept", options={"run_module_create": True,
                                                  "send_welcome_email": True,
                                                  "register_domains": True})
    await eventually(lambda: h.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'domain.registered'"))
    await _review(h, a["id"], "cancel")
    await eventually(lambda: h.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'service.terminated'"))
    await _review(h, a["id"], "fraud")  # commands may be handled at once: one at a time
    await eventually(lambda: h.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'order.fraud'"))
    await _review(h, a["id"], "delete")
    await h.publish("order.place", starter("ev-b", ip_address="192.0.2.66"))  # Fraud
    b = await h.screened("ev-b")
    await _review(h, b["id"], "pending")
    await eventually(lambda: h.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'order.pending'"))
    await _review(h, b["id"], "rescreen")
    await eventually(lambda: h.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'order.rescreen'"))
    await _review(h, b["id"], "deny")
    await h.publish("order.place", {"order_ref": "ev-bad", "items": []}, user_id=TEST_USER)
    expected = {"order.placed", "order.screened", "order.fraud", "invoice.paid",
                "payment.unapplied", "service.created", "domain.registered", "order.accepted",
                "order.cancelled", "service.terminated", "order.deleted", "order.pending",
                "order.rescreen", "email.send", "order.rejected"}

    async def all_seen() -> set[str] | None:
        keys = {r["routing_key"] for r in await h.pool.fetch(
            "SELECT DISTINCT routing_key FROM outbox WHERE NOT direct")}
        return keys if expected <= keys else None
    try:
        await eventually(all_seen, timeout=30)
    except AssertionError:
        keys = {r["routing_key"] for r in await h.pool.fetch("SELECT routing_key FROM outbox")}
        raise AssertionError(f"events never written: {expected - keys}") from None
    rows = await h.pool.fetch("SELECT routing_key, body FROM outbox WHERE NOT direct ORDER BY id")
    fraud_bodies = []
    for row in rows:
        cls: type[Event] = EVENTS[row["routing_key"]]
        assert cls.model_validate(row["body"]).payload() == row["body"], row["routing_key"]
        if row["routing_key"] == "order.fraud":
            fraud_bodies.append(row["body"])
    # One event, two publishers, each with its own fields.
    assert {tuple(sorted(b)) for b in fraud_bodies} == {
        ("order_id", "order_ref", "score", "source"),
        ("operator", "order_id", "order_ref", "source")}
