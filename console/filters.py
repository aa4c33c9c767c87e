"""Jinja filters: ages, times, money, statuses as badges, and outside text made visible.

Autoescape makes every value text, never markup; `t` also writes the characters that would
act on a terminal or hide text (ESC, bidi overrides, zero-width ones) as visible escapes, as
the CLI does (cli/views.py printable), so a hostile name shows what it holds."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from jinja2 import Environment

from cli.views import printable

BADGES = {
    "Pending": "warn", "Active": "ok", "Cancelled": "muted", "Fraud": "bad",
    "passed": "ok", "skipped": "muted", "queued": "info", "failed": "bad", "error": "bad",
    "Paid": "ok", "Unpaid": "warn", "applied": "ok", "unapplied": "bad",
    "done": "ok", "parked": "bad", "running": "info", "pending": "info", "cancelled": "muted",
    "Terminated": "muted", "Pending Registration": "info", "Pending Transfer": "info",
    "reject": "bad", "manual_review": "warn", "accept": "ok", "test": "muted",
}


def _when(value: Any) -> str:
    if value is None:
        return "\u2013"  # an en dash: nothing
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _age(value: Any) -> str:
    if value is None:
        return "\u2013"  # an en dash: nothing
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    seconds = max(0, int((datetime.now(UTC) - value).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


RECENT_DAYS = 30


def _ago(value: Any) -> str:
    """When something happened, as an operator scans a list: "3 h ago" within RECENT_DAYS,
    the day after that ("2015-03-02": an age of "4343 d" has to be worked out)."""
    if value is None:
        return "\u2013"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if datetime.now(UTC) - value >= timedelta(days=RECENT_DAYS):
        return value.astimezone(UTC).strftime("%Y-%m-%d")
    return f"{_age(value)} ago"


def _badge(value: Any) -> str:
    return BADGES.get(str(value), "muted")


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def install(env: Environment) -> None:
    env.filters.update(t=lambda v: printable(v, multiline=True), when=_when, age=_age, ago=_ago,
                       badge=_badge, pretty=lambda v: printable(_pretty(v), multiline=True),
                       number=_number)
