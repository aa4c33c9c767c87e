"""`ordermill notify ...`: the staff alert rules (services/alerts/, README "Staff alerts").

    ordermill notify load FILE    # check the file, then make it the rules in force, whole
    ordermill notify show [--json]
    ordermill notify deliveries [--state parked] [--limit N] [--json]   # the Slack messages
    ordermill notify replay ID | --all-parked                          # send them again

A mistake in the file is one line (`error: FILE: rules.2 (big-order): ...`) and nothing is
changed. A Slack URL is a secret: it is stored sealed (WEBHOOK_SECRET_KEY) and shown only by
its host. The command functions read `cli.main`'s helpers when they run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import typer

from shared.contracts import BIGINT_MAX

app = typer.Typer(help="Staff alert rules: who hears about what (TOML, see alerts.example.toml).",
                  no_args_is_help=True)


@app.command("load")
def load(file: Path = typer.Argument(..., help="The rules file (TOML).")) -> None:
    """Check a rules file and make it the rules in force for every alerts worker (at once,
    whole: the rules loaded before are replaced, and kept as history)."""
    from cli import main as m
    from services.alerts.rules import RulesError, parse_toml
    from services.alerts.store import store
    from services.webhooks.addresses import Policy
    from services.webhooks.sealing import Sealer, SealError

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise m.UserError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
    s = m.settings()
    try:
        rules = parse_toml(text)
        rules.check_addresses(Policy.of(s.webhook_allow_networks))
        sealer = Sealer.from_key(s.webhook_secret_key)
    except (RulesError, SealError) as exc:
        raise m.UserError(f"{file}: {exc}") from None
    operator = m._amqp_user(s) or "cli"

    async def save(conn: asyncpg.Connection) -> int:
        endpoints = rules.endpoints()
        known = {r[0] for r in await conn.fetch(
            "SELECT id FROM webhook_endpoints WHERE id = ANY($1::bigint[])", endpoints)}
        for name, channel in rules.channels.items():
            if getattr(channel, "endpoint", None) is not None and channel.endpoint not in known:
                raise m.UserError(f"{file}: channel {name!r}: webhook endpoint {channel.endpoint}"
                                  " does not exist (`ordermill webhooks list`)")
        # A product the catalog does not have would make a rule that never fires, silently.
        catalog = {r[0] for r in await conn.fetch("SELECT slug FROM products")}
        for rule in rules.rules:
            unknown = sorted(set(rule.when.product or ()) - catalog)
            if unknown:
                raise m.UserError(f"{file}: rule {rule.name!r}: no product {unknown[0]!r} in the"
                                  " catalog (`ordermill catalog show`)")
        return await store(conn, rules, source=file.name, loaded_by=operator, sealer=sealer)

    rule_set_id = m._with_db(save)
    if any(c.type == "slack" for c in rules.channels.values()) and not sealer.encrypted:
        m._say("warning: WEBHOOK_SECRET_KEY is not set: the Slack URLs are stored unencrypted")
    by_trigger: dict[str, int] = {}
    for rule in rules.rules:
        by_trigger[rule.trigger] = by_trigger.get(rule.trigger, 0) + 1
    summary = ", ".join(f"{n} {t}" for t, n in sorted(by_trigger.items())) or "none"
    m._say(f"alert rules {rule_set_id} loaded from {file.name}: {len(rules.rules)} rule(s)"
           f" ({summary}), {len(rules.channels)} channel(s)")


@app.command("show")
def show(as_json: bool = typer.Option(False, "--json", help="Print JSON only.")) -> None:
    """The alert rules in force and their channels (a Slack channel by its host only)."""
    from cli import main as m
    from services.alerts.store import latest

    data = m._with_db(latest)
    if as_json:
        return m.emit_json(data)
    if data is None:
        m._say("no alert rules loaded (`ordermill notify load FILE`, see alerts.example.toml)")
        return
    m._say(f"alert rules {data['id']} from {data['source']}, loaded by {data['loaded_by']}"
           f" at {data['loaded_at'][:19]}")
    m.out.print(m.table("Channels", ["name", "type", "where"], [
        [name, c["type"], _where(c)] for name, c in data["channels"].items()]))
    m.out.print(m.table("Rules", ["name", "trigger", "when", "channels", "description"], [
        [r["name"], r["trigger"], "; ".join(f"{k}={_value(v)}" for k, v in r.get("when", {}).items()),
         ", ".join(r["channels"]), r.get("description", "")] for r in data["rules"]]))


def _where(channel: dict[str, Any]) -> str:
    if channel["type"] == "email":
        return ", ".join(channel["to"])
    if channel["type"] == "slack":
        return f"{channel['host']} (URL secret)"
    return f"webhook endpoint {channel['endpoint']}"


def _value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _slack(fn: Any) -> Any:
    """`fn(conn)` on a connection; an AlertDeliveryError is one line."""
    from cli import main as m
    from services.alerts.deliveries import AlertDeliveryError

    try:
        return m._with_db(fn)
    except AlertDeliveryError as exc:
        raise m.UserError(str(exc)) from None


@app.command("deliveries")
def deliveries(
    state: str = typer.Option(None, "--state", help="Only these: pending, sending, delivered"
                              " or parked (retries spent, or refused by Slack)."),
    limit: int = typer.Option(20, min=1, max=1000, help="The newest N."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """The alerts' Slack messages, newest first: state, attempts, Slack's answer (a channel
    by its host: the URL is a secret)."""
    from cli import main as m
    from services.alerts import deliveries as ops

    found = _slack(lambda conn: ops.deliveries(conn, state=state, limit=limit))
    if as_json:
        return m.emit_json(found)
    m.out.print(m.table("Slack messages" + (f" ({state})" if state else ""),
                        ["id", "alert", "rule", "channel", "status", "attempts", "code",
                         "last error", "title"],
                        [[d["id"], d["alert_id"], d["rule"],
                          f"{d['channel']} ({d['host'] or 'channel gone'})", d["status"],
                          d["attempts"], d["status_code"] or "", (d["last_error"] or "")[:120],
                          d["title"]] for d in found]))


@app.command("replay")
def replay(
    delivery_id: int = typer.Argument(None, min=1, max=BIGINT_MAX, show_default=False,
                                      help="A Slack message to send again."),
    all_parked: bool = typer.Option(False, "--all-parked",
                                    help="Send every parked Slack message again."),
) -> None:
    """Send a Slack message again (or every parked one), with a fresh retry schedule."""
    from cli import main as m
    from services.alerts import deliveries as ops

    if (delivery_id is None) == (not all_parked):
        raise m.UserError("name a DELIVERY_ID or --all-parked (one of them)")
    if delivery_id is not None:
        d = _slack(lambda conn: ops.replay(conn, delivery_id))
        m._say(f"Slack delivery {delivery_id} (alert {d['alert_id']}, channel {d['channel']})"
               " queued again")
        return
    count = _slack(ops.replay_parked)
    m._say(f"{count} parked Slack delivery(ies) queued again")
