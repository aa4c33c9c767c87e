"""Alert rule sets in the database: `ordermill notify load` adds one in a single statement
(so the rules in force change all at once, never half a file), the latest is in force for
every alerts worker, and each alert names the set it was raised under.

The Slack URLs are kept apart from the rules, sealed (services/webhooks/sealing.py), and the
stored channels carry only their host: what is read to match rules and to show them holds
no secret."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from services.alerts.rules import EMPTY, AlertRules, SlackChannel, parse_rules
from services.webhooks.sealing import Sealer

# How long a worker trusts the id of the set in force before asking again: a load takes
# effect within this, and a busy worker does not ask once per event.
CURRENT_TTL_SECONDS = 2.0


def _public(rules: AlertRules) -> tuple[dict[str, Any], dict[str, str]]:
    """The channels as stored (a Slack URL cut to scheme://host/) and the URLs themselves."""
    channels: dict[str, Any] = {}
    urls: dict[str, str] = {}
    for name, channel in rules.channels.items():
        if isinstance(channel, SlackChannel):
            parts = urlsplit(channel.url)
            channels[name] = {"type": "slack", "url": f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/"}
            urls[name] = channel.url
        else:
            channels[name] = channel.model_dump(mode="json")
    return channels, urls


async def store(conn: asyncpg.Connection, rules: AlertRules, *, source: str, loaded_by: str,
                sealer: Sealer) -> int:
    """One statement: the new set is in force from its commit, whole. (The connection's
    JSON codec, shared/db.py, writes the lists and dicts.)"""
    channels, urls = _public(rules)
    secrets = {name: sealer.seal(url) for name, url in urls.items()}
    return await conn.fetchval(
        "INSERT INTO alert_rule_sets (source, rules, channels, secrets, loaded_by)"
        " VALUES ($1, $2, $3, $4, $5) RETURNING id",
        source, [r.model_dump(mode="json", exclude_defaults=True) | {
            "trigger": str(r.trigger), "channels": r.channels} for r in rules.rules],
        channels, secrets, loaded_by)


def _loaded(row: asyncpg.Record) -> AlertRules:
    def read(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value
    return parse_rules({"channels": read(row["channels"]), "rules": read(row["rules"])}, row["id"])


class RuleStore:
    """The set in force, cached by its id. `refresh` reads the id again (the alerts worker,
    once a batch of events, before their transaction: a set loaded before an event was
    published is the one that event meets); `current` only every CURRENT_TTL_SECONDS (the
    sweep; a handler, right after its batch's refresh)."""

    def __init__(self, ttl: float = CURRENT_TTL_SECONDS) -> None:
        self.ttl = ttl
        self._cached: AlertRules = EMPTY
        self._checked = -float("inf")

    async def current(self, conn: asyncpg.Connection | asyncpg.Pool) -> AlertRules:
        if time.monotonic() - self._checked < self.ttl:
            return self._cached
        return await self.refresh(conn)

    async def refresh(self, conn: asyncpg.Connection | asyncpg.Pool) -> AlertRules:
        """The set in force now: its id read (an index's last entry), the set itself only
        when that id is newer than this store's. Never older: refreshes overlap (a worker's
        batchers, the sweep), and a slow one that read before `notify load` committed must
        not put back the set a faster one has already replaced, or the next event's handler
        (`current`, within its TTL) would alert under the old set after `wanted` chose the
        event under the new one. Sets are only ever added, their ids rising."""
        latest = await conn.fetchval("SELECT max(id) FROM alert_rule_sets")
        if latest is not None and self._older_than(latest):
            row = await conn.fetchrow("SELECT id, rules, channels FROM alert_rule_sets"
                                      " WHERE id = $1", latest)
            if self._older_than(row["id"]):  # not replaced by a newer one meanwhile
                self._cached = _loaded(row)
        self._checked = time.monotonic()
        return self._cached

    def _older_than(self, rule_set_id: int) -> bool:
        return self._cached.id is None or self._cached.id < rule_set_id


async def latest(conn: asyncpg.Connection) -> dict[str, Any] | None:
    """The set in force as `ordermill notify show` prints it (no secret)."""
    row = await conn.fetchrow("SELECT id, source, rules, channels, loaded_by, loaded_at"
                              " FROM alert_rule_sets ORDER BY id DESC LIMIT 1")
    if row is None:
        return None
    return {"id": row["id"], "source": row["source"], "loaded_by": row["loaded_by"],
            "loaded_at": row["loaded_at"].isoformat(), **_loaded(row).shown()}


async def slack_url(conn: asyncpg.Connection | asyncpg.Pool, rule_set_id: int, channel: str,
                    sealer: Sealer) -> str | None:
    """A Slack channel's URL, unsealed (SealError if the key cannot open it)."""
    sealed = await conn.fetchval("SELECT secrets ->> $2 FROM alert_rule_sets WHERE id = $1",
                                 rule_set_id, channel)
    return None if sealed is None else sealer.unseal(sealed)
