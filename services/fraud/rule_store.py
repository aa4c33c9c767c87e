"""Operator rule sets in the database: `ordermill fraud rules load` adds one, the latest is in
force for every fraud worker, and each screening names the set it ran under."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from services.fraud.operator_rules import EMPTY, RuleSet, parse


class RuleStore:
    """The rule set in force, cached by its id. The screening's facts query reads the latest
    id with the order, so a newly loaded set is used by the next screening (a re-screen right
    after a load included) without an extra round trip when nothing changed."""

    def __init__(self) -> None:
        self._cached: RuleSet = EMPTY

    async def current(self, conn: asyncpg.Connection | asyncpg.Pool,
                      rule_set_id: int | None) -> RuleSet:
        if rule_set_id is None:
            return EMPTY
        if self._cached.id != rule_set_id:
            rules = await conn.fetchval("SELECT rules FROM fraud_rule_sets WHERE id = $1",
                                        rule_set_id)
            self._cached = parse({"rules": rules}, rule_set_id)
        return self._cached


async def store(conn: asyncpg.Connection, rules: RuleSet, *, source: str,
                loaded_by: str) -> int:
    return await conn.fetchval(
        "INSERT INTO fraud_rule_sets (source, rules, loaded_by) VALUES ($1, $2, $3) RETURNING id",
        source, rules.as_json(), loaded_by)


async def latest(conn: asyncpg.Connection) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM fraud_rule_sets ORDER BY id DESC LIMIT 1")
    if row is None:
        return None
    rules = row["rules"] if not isinstance(row["rules"], str) else json.loads(row["rules"])
    return {"id": row["id"], "source": row["source"], "loaded_by": row["loaded_by"],
            "loaded_at": row["loaded_at"].isoformat(), "rules": rules}
