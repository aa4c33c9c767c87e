"""Secrets kept out of what a remote party answers: a provider, a hosting server or a registry
that echoes a credential (hostile, or buggy) must not get it stored, logged or shown."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

SCRUBBED = "***"
_DEPTH_LIMIT = 200  # an answer is a few levels deep; deeper is cut, not recursed


def _forms(secret: str) -> set[str]:
    """The secret as it may come back: as sent, and as JSON, a URL or XML would carry it."""
    return {secret, json.dumps(secret)[1:-1], quote(secret, safe=""), quote(secret),
            escape(secret, {'"': "&quot;", "'": "&apos;"})} - {""}


def basic_credentials(user: object, password: str) -> tuple[str, ...]:
    """What HTTP Basic auth sends (`user:password`, and its base64), then the password alone:
    an echo of the Authorization header gives away the password as much as the password."""
    pair = f"{user}:{password}"
    return (pair, base64.b64encode(pair.encode()).decode(), password)


def _all_forms(secrets: Iterable[str | None]) -> list[str]:
    # The longest first, so `account:key` goes as a whole before `key`.
    return sorted({form for secret in secrets if secret for form in _forms(secret)},
                  key=len, reverse=True)


def _replaced(text: str, forms: list[str]) -> str:
    for form in forms:
        if form in text:
            text = text.replace(form, SCRUBBED)
    return text


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret (and its escaped forms) replaced by `***`."""
    return _replaced(text, _all_forms(secrets))


def scrub_data(value: Any, secrets: Iterable[str | None]) -> Any:
    """A copy of parsed JSON (keys and values, at any depth) with the secrets scrubbed."""
    forms = _all_forms(secrets)
    if not forms:
        return value

    def walk(item: Any, depth: int) -> Any:
        if isinstance(item, str):
            return _replaced(item, forms)
        if depth > _DEPTH_LIMIT:
            return SCRUBBED if isinstance(item, dict | list) else item
        if isinstance(item, dict):
            return {walk(k, depth + 1): walk(v, depth + 1) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [walk(v, depth + 1) for v in item]
        return item

    return walk(value, 0)
