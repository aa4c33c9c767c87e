"""`ordermill notify ...`: the staff alert rules (services/alerts/, README "Staff alerts").

    ordermill notify load FILE    # check the file, then make it the rules in force, whole
    ordermill notify show [--json]

A mistake in the file is one line (`error: FILE: rules.2 (big-order): ...`) and nothing is
changed. A Slack URL is a secret: it is stored sealed (WEBHOOK_SECRET_KEY) and shown only by
its host. The command functions read `cli.main`'s helpers when they run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import typer

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
