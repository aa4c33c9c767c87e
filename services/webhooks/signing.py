"""Standard Webhooks signatures (https://www.standardwebhooks.com, docs/contract.md section 10).

A secret is `whsec_` and the base64 of 24 to 64 random bytes; the signature of a delivery is
`v1,` and the base64 HMAC-SHA256, keyed with those bytes, of `{webhook-id}.{timestamp}.{body}`.
During a rotation both the new and the previous secret sign: the header then holds two
signatures, space-separated, and a receiver accepts the message if any of them verifies."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as random_bytes
from collections.abc import Iterable

PREFIX = "whsec_"
MIN_BYTES, MAX_BYTES = 24, 64


class SecretError(ValueError):
    """A secret that is not `whsec_` and the base64 of 24 to 64 bytes."""


def new_secret() -> str:
    return PREFIX + base64.b64encode(random_bytes.token_bytes(32)).decode()


def key_of(secret: str) -> bytes:
    """The HMAC key: the base64-decoded part after `whsec_`."""
    if not secret.startswith(PREFIX):
        raise SecretError("a signing secret starts with whsec_")
    try:
        key = base64.b64decode(secret.removeprefix(PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise SecretError("a signing secret is whsec_ and base64") from None
    if not MIN_BYTES <= len(key) <= MAX_BYTES:
        raise SecretError(f"a signing secret holds {MIN_BYTES} to {MAX_BYTES} bytes,"
                          f" this one {len(key)}")
    return key


def signature(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key_of(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secrets: Iterable[str], webhook_id: str, timestamp: int,
            body: bytes) -> dict[str, str]:
    """The three headers of one attempt: every secret given signs (current first)."""
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, webhook_id, timestamp, body) for s in secrets),
        "content-type": "application/json",
    }
