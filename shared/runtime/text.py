"""Texts the runtime writes: reasons, dead-letter headers, and what it redacts from them."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pydantic import ValidationError

from shared import broker

REASON_HEADER = "x-ordermill-reason"
REPLAYS_HEADER = "x-ordermill-replays"  # written by `dead-letters --replay`
REASON_LIMIT = 1000  # a reason goes into a log line, a header and order.rejected
SECRET_KEYS = frozenset({"epp_code", "password", "token", "license_key", "licence_key", "api_key"})
REDACTED = "[redacted]"


def redact(value: Any) -> Any:
    """A copy with secrets replaced: dead letters and logs never carry them."""
    if isinstance(value, dict):
        return {k: REDACTED if k in SECRET_KEYS and v else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def describe_validation_error(error: ValidationError, *, prefix: str = "schema: ",
                              env_names: bool = False) -> str:
    parts = []
    for item in error.errors()[:5]:
        # Field names and indexes only: pydantic also names the union branch or validator it
        # tried ("lax-or-strict[...]"), which says nothing to the storefront that reads this.
        where = ".".join(str(p) for p in item["loc"]
                         if isinstance(p, int) or _FIELD_NAME.match(p)) or "body"
        message = item["msg"].removeprefix("Value error, ")  # pydantic's prefix for ValueError
        parts.append(f"{where.upper() if env_names else where}: {message}")
    more = f" (+{error.error_count() - 5} more)" if error.error_count() > 5 else ""
    return prefix + "; ".join(parts) + more


def header_text(text: str, limit: int = 255) -> str:
    """A text for a header the runtime writes: encodable (no lone surrogate) and capped, so a
    dead-letter copy always fits a frame."""
    text = broker.escaped(text)
    return text if len(text) <= limit else text[:limit] + "..."


def property_text(value: str | None) -> str | None:
    """A short-string property copied onto a dead letter, or None if it cannot be sent again."""
    if not isinstance(value, str) or broker.undecodable(value) or len(value.encode()) > 255:
        return None
    return value


def first_line(text: str) -> str:
    return (text.splitlines() or [""])[0][:200]


def body_id(body: bytes) -> str:
    """The id of a message that came without one."""
    return "sha256:" + hashlib.sha256(body).hexdigest()
