"""`ordermill fraud ...`: the fraud policy's operator commands (issue 16), and what
`ordermill rescreen` and `ordermill fraud-report` need of it.

    ordermill fraud ORDER_ID            # Mark as Fraud: the operator action, as always
    ordermill fraud rules load FILE     # a new rule set (TOML), in force for the next screening
    ordermill fraud rules show [--json] # the rule set in force

The command functions read `cli.main`'s helpers when they run (main registers this app).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import typer
from typer.core import TyperGroup

from shared.orders import ORDER_STATUSES
from shared.states import OrderStatus, Screening


class _FraudGroup(TyperGroup):
    """`ordermill fraud ORDER_ID` stays the operator action (docs/contract.md, section 5):
    anything that is not one of the group's commands is the order to mark as Fraud."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # a click Context
        if args and args[0] not in self.commands and args[0] != "--help":
            args = ["mark", *args]
        return super().parse_args(ctx, args)


fraud_app = typer.Typer(
    cls=_FraudGroup, no_args_is_help=True,
    help="ordermill fraud ORDER_ID marks an order as Fraud (live accounts are terminated);"
         " ordermill fraud rules ... manages the operator fraud rules.")
rules_app = typer.Typer(help="Operator fraud rules (TOML, see fraud-rules.example.toml).",
                        no_args_is_help=True)
fraud_app.add_typer(rules_app, name="rules")


@fraud_app.command("mark", hidden=True)
def mark(order_id: int = typer.Argument(..., min=1, max=2**63 - 1, show_default=False),
         timeout: float = typer.Option(10.0, "--timeout", min=0.5,
                                       help="Seconds to wait for the answer.")) -> None:
    """Mark an order as Fraud; live accounts are terminated."""
    from cli import main as m

    m.review("fraud", order_id, timeout=timeout)


@rules_app.command("load")
def rules_load(file: Path = typer.Argument(..., help="The rules file (TOML).")) -> None:
    """Load a rule set: it replaces the one in force for every screening from now on (the
    sets loaded before are kept, and each screening names the set it ran under)."""
    from cli import main as m
    from services.fraud.operator_rules import RulesError, parse_toml
    from services.fraud.rule_store import store

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise m.UserError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        rules = parse_toml(text)
    except RulesError as exc:
        raise m.UserError(f"{file}: {exc}") from None
    s = m.settings()
    operator = m._amqp_user(s) or "cli"
    rule_set_id = m._with_db(lambda c: store(c, rules, source=file.name, loaded_by=operator))
    by_action: dict[str, int] = {}
    for rule in rules.rules:
        by_action[rule.action] = by_action.get(rule.action, 0) + 1
    summary = ", ".join(f"{n} {action}" for action, n in sorted(by_action.items())) or "none"
    m._say(f"rule set {rule_set_id} loaded from {file.name}: {len(rules.rules)} rule(s)"
           f" ({summary})")


@rules_app.command("show")
def rules_show(as_json: bool = typer.Option(False, "--json", help="Print JSON only.")) -> None:
    """The rule set in force."""
    from cli import main as m
    from services.fraud.rule_store import latest

    data = m._with_db(latest)
    if as_json:
        return m.emit_json(data)
    if data is None:
        m._say("no rules loaded (`ordermill fraud rules load FILE`)")
        return
    m._say(f"rule set {data['id']} from {data['source']}, loaded by {data['loaded_by']}"
           f" at {data['loaded_at'][:19]}")
    m.out.print(m.table("Rules", ["name", "action", "points", "when", "description"], [
        [r["name"], r["action"], r.get("points", "0") if r["action"] == "score" else "",
         _when(r["when"]), r.get("description", "")] for r in data["rules"]]))


def _when(when: dict[str, Any]) -> str:
    """A rule's conditions as written, without the options that do not apply."""
    shown = dict(when)
    if "words" not in shown:
        shown.pop("words_in", None)
    if "orders_per_client" not in shown and "orders_per_ip" not in shown:
        shown.pop("window_minutes", None)
    return "; ".join(f"{key}={value}" for key, value in shown.items())


# -- rescreen ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RescreenFilter:
    """Which orders `ordermill rescreen` sends to screening again."""

    status: OrderStatus
    screening: Screening | None
    since: datetime | None
    until: datetime | None
    all_errors: bool = False

    async def order_ids(self, conn: asyncpg.Connection) -> list[int]:
        return await orders_to_rescreen(conn, status=self.status, screening=self.screening,
                                        since=self.since, until=self.until)

    def none_found(self) -> str:
        if self.all_errors:
            return "no Pending order has a screening error"
        return "no order to re-screen"


# By orders_status_created_idx (status, created_at, id) WHERE deleted_at IS NULL (migration
# 0030): not a scan of orders.
RESCREEN_QUERY = (
    "SELECT id FROM orders WHERE status = $1 AND deleted_at IS NULL"
    " AND ($2::text IS NULL OR screening = $2)"
    " AND created_at >= coalesce($3::timestamptz, '-infinity')"
    " AND created_at < coalesce($4::timestamptz, 'infinity')"
    " ORDER BY id"
)


async def orders_to_rescreen(conn: asyncpg.Connection, *, status: str, screening: str | None,
                             since: datetime | None, until: datetime | None) -> list[int]:
    return [r["id"] for r in await conn.fetch(RESCREEN_QUERY, status, screening, since, until)]


def rescreen_filter(*, order_id: int | None, all_errors: bool, status: str | None,
                    screening: str | None, since: datetime | None, until: datetime | None,
                    error: Callable[[str], Exception]) -> RescreenFilter | None:
    """The orders asked for, or None for the one ORDER_ID; a mistake raises `error`."""
    many = all_errors or status is not None
    if order_id is not None and (many or screening or since or until):
        raise error("give an ORDER_ID or --status/--all-errors, not both")
    if order_id is not None:
        return None
    if not many:
        if screening or since or until:
            raise error("--screening, --since and --until need --status (or --all-errors)")
        raise error("give an ORDER_ID, --status or --all-errors")
    if status is not None:
        status = status.capitalize()
        if status not in ORDER_STATUSES:
            raise error(f"unknown status {status!r}; use {', '.join(ORDER_STATUSES)}")
        if status != OrderStatus.PENDING:
            raise error(f"only Pending orders are screened again, not {status} ones"
                        " (set one back to Pending first)")
    chosen: Screening | None = None
    if screening is not None:
        try:
            chosen = Screening(screening.lower())
        except ValueError:
            raise error(f"unknown screening {screening!r}; use"
                        f" {', '.join(s.value for s in Screening)}") from None
    if all_errors:
        if chosen not in (None, Screening.ERROR):
            raise error("--all-errors is --screening error")
        chosen = Screening.ERROR
    return RescreenFilter(OrderStatus.PENDING, chosen, since, until, all_errors=all_errors)


# -- fraud-report --------------------------------------------------------------------------

# What `--tag` tells FraudLabs Pro's feedback API.
FLP_FEEDBACK = {"not_fraud": "APPROVE", "chargeback": "REJECT", "suspected_fraud": "REJECT",
                "spam_or_abuse": "REJECT_BLACKLIST"}

_REPORT_ROW = """
SELECT o.order_number, o.ip_address,
  (SELECT f.raw->>'id' FROM fraud_checks f WHERE f.order_id = o.id AND f.provider = 'maxmind'
     AND f.raw ? 'id' ORDER BY f.id DESC LIMIT 1) AS minfraud_id,
  (SELECT f.raw->>'fraudlabspro_id' FROM fraud_checks f WHERE f.order_id = o.id
     AND f.provider = 'fraudlabspro' AND f.raw ? 'fraudlabspro_id' ORDER BY f.id DESC LIMIT 1)
     AS flp_id,
  (SELECT f.provider FROM fraud_checks f WHERE f.order_id = o.id
     AND f.provider IN ('maxmind', 'fraudlabspro') ORDER BY f.id DESC LIMIT 1) AS provider
FROM orders o WHERE o.id = $1
"""


async def report_row(conn: asyncpg.Connection, order_id: int) -> dict[str, Any] | None:
    row = await conn.fetchrow(_REPORT_ROW, order_id)
    return dict(row) if row is not None else None
