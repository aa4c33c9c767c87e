"""A fake minFraud v2.0 web service: real HTTPS on 127.0.0.1, MaxMind's own JSON shapes.

    async with FakeMinFraud() as maxmind:
        settings = settings.model_copy(update=maxmind.settings)  # host, account, licence key
        ...
        assert maxmind.requests[0].body["device"]["ip_address"] == "203.0.113.9"

Endpoints: POST /minfraud/v2.0/score, /insights, /factors (answers built from MaxMind's
published response bodies in tests/fixtures/minfraud/, with `answer` deep-merged on top)
and /minfraud/v2.0/transactions/report (204). HTTP Basic auth with the account id and
licence key: anything else gets 401 with MaxMind's `{"code", "error"}` body.

Faults on demand, consumed one per call in the order queued:
- `fail_next(status, times)`: 401, 402 and 403 answer MaxMind's JSON error bodies
  (AUTHORIZATION_INVALID, INSUFFICIENT_FUNDS, PERMISSION_REQUIRED); 5xx an HTML page.
- `hang_next(seconds, times)`: wait, then answer (a slow service).
`requests` keeps every request (path, service, JSON body, authorized), faulty ones too.
`echo_credentials = True` makes a hostile (or buggy) service: every answer and error body
repeats the Authorization header it was sent, the account id with the licence key, and the key.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import socket
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from fakes.tls import server_context

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "minfraud"
ACCOUNT_ID = 42
LICENSE_KEY = "test-licence-key"
_ERRORS = {
    401: ("AUTHORIZATION_INVALID", "You have supplied an invalid MaxMind account ID and/or"
          " license key in the Authorization header."),
    402: ("INSUFFICIENT_FUNDS", "The license key you have provided does not have sufficient"
          " funds to use this service."),
    403: ("PERMISSION_REQUIRED", "You do not have permission to use this service."),
}


@dataclass(frozen=True)
class MinFraudRequest:
    path: str
    service: str  # score, insights, factors or report
    body: dict[str, Any]
    authorized: bool


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` deep-merged into a copy of `base`; a None value removes the key."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class FakeMinFraud:
    def __init__(self) -> None:
        self.fixtures = {service: json.loads((FIXTURES / f"{service}-response.json").read_text())
                         for service in ("score", "insights", "factors")}
        self.answer: dict[str, Any] = {}  # merged into every answer
        self.requests: list[MinFraudRequest] = []
        self._faults: deque[tuple[str, float]] = deque()
        self.echo_credentials = False
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def settings(self) -> dict[str, Any]:
        return {"fraud_provider": "maxmind", "maxmind_host": self.host,
                "maxmind_account_id": ACCOUNT_ID, "maxmind_license_key": LICENSE_KEY}

    @property
    def environment(self) -> dict[str, str]:
        return {"FRAUD_PROVIDER": "maxmind", "MAXMIND_HOST": self.host,
                "MAXMIND_ACCOUNT_ID": str(ACCOUNT_ID), "MAXMIND_LICENSE_KEY": LICENSE_KEY}

    def fail_next(self, status: int, times: int = 1) -> None:
        self._faults.extend([("status", float(status))] * times)

    def hang_next(self, seconds: float, times: int = 1) -> None:
        self._faults.extend([("hang", seconds)] * times)

    def scored(self, service: str | None = None) -> list[MinFraudRequest]:
        return [r for r in self.requests
                if r.service != "report" and (service is None or r.service == service)]

    async def _handle(self, request: web.Request) -> web.Response:
        service = request.match_info["service"]
        expected = "Basic " + base64.b64encode(f"{ACCOUNT_ID}:{LICENSE_KEY}".encode()).decode()
        authorized = request.headers.get("Authorization") == expected
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        self.requests.append(MinFraudRequest(request.path, service, body, authorized))
        echo = (f" (you sent Authorization: {request.headers.get('Authorization')}, that is"
                f" {ACCOUNT_ID}:{LICENSE_KEY}, key {LICENSE_KEY})" if self.echo_credentials else "")
        if not authorized:
            return _error(401, echo)
        if self._faults:
            kind, value = self._faults.popleft()
            if kind == "status":
                status = int(value)
                if status in _ERRORS:
                    return _error(status, echo)
                return web.Response(status=status, content_type="text/html",
                                    text=f"<html><body>Service Unavailable{echo}</body></html>")
            await asyncio.sleep(value)
        if service == "report":
            return web.Response(status=204)
        answer = merge(self.fixtures[service], self.answer)
        if echo:  # in the fields minFraud fills with its own words
            answer = merge(answer, {"disposition": {"rule_label": f"rule{echo}"}})
            answer["warnings"] = [*answer.get("warnings", []), {
                "code": "INPUT_UNKNOWN", "warning": f"unexpected input{echo}",
                "input_pointer": f"/{LICENSE_KEY}"}]
        return web.json_response(answer)

    async def __aenter__(self) -> FakeMinFraud:
        app = web.Application()
        app.router.add_post("/minfraud/v2.0/transactions/{service:report}", self._handle)
        app.router.add_post("/minfraud/v2.0/{service:score|insights|factors}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock, ssl_context=server_context())
        await site.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _error(status: int, echo: str = "") -> web.Response:
    code, message = _ERRORS[status]
    return web.json_response({"code": code, "error": message + echo}, status=status)
