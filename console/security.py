"""Sessions, CSRF and the security headers every response carries.

A session is a signed cookie (itsdangerous, HMAC-SHA1 over the key CONSOLE_SECRET_KEY, with
its issue time): HttpOnly, SameSite=Lax, Secure behind HTTPS. It holds the operator's id,
when its password was set (a password changed since ends it) and the CSRF token; the operator
is read again from the database on every request (removed or disabled: signed out). Every
POST carries the token, in the form (`csrf`) or, from htmx, in the `X-CSRF-Token` header;
without it, or with another, the request is refused with 403."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "ordermill_console"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"

# No inline script or style anywhere: script-src 'self' serves htmx and console.js only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


@dataclass
class Session:
    """What the cookie holds. `operator_id` None: not signed in (the sign-in form's CSRF
    token lives in such a session too)."""

    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    operator_id: int | None = None
    # When the operator's password was last set (epoch seconds): a session of an older
    # password is over (`operator passwd`).
    password_epoch: float = 0.0
    changed: bool = False  # to be written back on the response

    def as_dict(self) -> dict[str, Any]:
        return {"c": self.csrf, "o": self.operator_id, "p": self.password_epoch}

    def csrf_ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(self.csrf.encode(), str(given).encode())


class SessionCodec:
    def __init__(self, secret_key: str, max_age_seconds: float) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key, salt="ordermill-console-session")
        self.max_age = int(max_age_seconds)

    def dumps(self, session: Session) -> str:
        return self._serializer.dumps(session.as_dict())

    def loads(self, cookie: str | None) -> Session | None:
        """The session, or None for no cookie, a tampered or expired one."""
        if not cookie:
            return None
        try:
            data = self._serializer.loads(cookie, max_age=self.max_age)
        except (BadSignature, ValueError, TypeError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("c"), str):
            return None
        operator = data.get("o")
        return Session(csrf=data["c"], operator_id=operator if isinstance(operator, int) else None,
                       password_epoch=float(data.get("p") or 0))


class SecurityHeaders:
    """Pure ASGI middleware: the headers above on every response (pages, partials, static,
    errors alike)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *((n, v) for n, v in HEADERS if n not in present)]
            await send(message)

        await self.app(scope, receive, with_headers)
