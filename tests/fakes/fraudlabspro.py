"""A fake FraudLabs Pro v2 API: real HTTPS on 127.0.0.1 (the test CA, tests/fakes/tls.py),
FraudLabs Pro's documented form requests and JSON answers.

    async with FakeFraudLabsPro() as flp:
        settings = Settings.model_validate({**s.model_dump(), **flp.settings})
        flp.status, flp.score = "REVIEW", 42
        ...
        assert flp.requests[0].form["ip"] == "203.0.113.9"

Endpoints: POST /v2/order/screen (form fields `key`, `format`, `ip`, `email`, `bill_*`,
`user_order_id`, `amount`, `currency`, ...), answered with the object-based v2 body
(`fraudlabspro_id`, `fraudlabspro_score`, `fraudlabspro_status`, `fraudlabspro_rules`,
`ip_geolocation`, `email_address`, `remaining_credits`, ...); POST /v2/order/feedback (`id`,
`action` APPROVE / REJECT / REJECT_BLACKLIST, `notes`). A wrong key gets HTTP 401 with
`{"error": {"error_code": 10001, "error_message": "INVALID API KEY"}}`.

Faults, one per call in the order queued: `fail_next("credits")` (10007 INSUFFICIENT
CREDIT), `fail_next("expired")` (10006), `fail_next(503)` (an HTML error page),
`hang_next(seconds)`. `echo_key = True` repeats the key it was sent in every answer and error.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from fakes.tls import server_context

API_KEY = "flp-test-key-0123456789ABCDEF"
_ERRORS = {"key": (401, 10001, "INVALID API KEY"), "expired": (401, 10006, "API KEY EXPIRED"),
           "credits": (402, 10007, "INSUFFICIENT CREDIT")}


@dataclass(frozen=True)
class FlpRequest:
    call: str  # screen or feedback
    form: dict[str, str]

    @property
    def authorized(self) -> bool:
        return self.form.get("key") == API_KEY


class FakeFraudLabsPro:
    def __init__(self) -> None:
        self.status = "APPROVE"
        self.score = 12
        self.ip_country = "GB"
        self.rules: list[str] = []
        self.requests: list[FlpRequest] = []
        self.echo_key = False
        self._faults: deque[tuple[str, Any]] = deque()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._ids = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def settings(self) -> dict[str, Any]:
        return {"fraud_provider": "fraudlabspro", "fraudlabspro_host": self.host,
                "fraudlabspro_api_key": API_KEY}

    @property
    def environment(self) -> dict[str, str]:
        return {"FRAUD_PROVIDER": "fraudlabspro", "FRAUDLABSPRO_HOST": self.host,
                "FRAUDLABSPRO_API_KEY": API_KEY}

    def fail_next(self, fault: str | int, times: int = 1) -> None:
        self._faults.extend([("fail", fault)] * times)

    def hang_next(self, seconds: float, times: int = 1) -> None:
        self._faults.extend([("hang", seconds)] * times)

    def screened(self) -> list[FlpRequest]:
        return [r for r in self.requests if r.call == "screen"]

    def _echo(self, form: dict[str, str]) -> str:
        return f" (you sent key={form.get('key')})" if self.echo_key else ""

    async def _handle(self, request: web.Request) -> web.Response:
        call = request.match_info["call"]
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append(FlpRequest(call, form))
        if not form.get("key") or form["key"] != API_KEY:
            return _error("key", self._echo(form))
        if self._faults:
            kind, value = self._faults.popleft()
            if kind == "hang":
                await asyncio.sleep(value)
            elif isinstance(value, int):
                return web.Response(status=value, content_type="text/html",
                                    text=f"<html>Service Unavailable{self._echo(form)}</html>")
            else:
                return _error(value, self._echo(form))
        if call == "feedback":
            if form.get("action") not in ("APPROVE", "REJECT", "REJECT_BLACKLIST"):
                return web.json_response({"error": {"error_code": 10015,
                                                    "error_message": "INVALID ACTION"}},
                                         status=400)
            return web.json_response({"fraudlabspro_id": form.get("id")})
        if not form.get("ip"):
            return web.json_response({"error": {"error_code": 10002,
                                                "error_message": "INVALID IP ADDRESS"}},
                                     status=400)
        self._ids += 1
        return web.json_response(self.answer(form))

    def answer(self, form: dict[str, str]) -> dict[str, Any]:
        """The v2 screen order answer for the request."""
        email = form.get("email", "")
        return {
            "ip_geolocation": {
                "ip": form.get("ip"), "continent": "Europe", "country_code": self.ip_country,
                "country_name": "United Kingdom", "region": "England", "city": "London",
                "latitude": 51.5085, "longitude": -0.1257, "zip_code": "EC2V",
                "timezone": "+01:00", "isp_name": "Example ISP", "domain": "example.net",
                "netspeed": "DSL", "mobile_mnc": "-", "mobile_mcc": "-", "mobile_brand": "-",
                "elevation": 20, "usage_type": ["ISP"], "is_proxy": False, "proxy_type": "-",
                "is_in_blacklist": False,
            },
            "billing_address": {"ip_distance_in_km": 12.5, "ip_distance_in_mile": 7.77,
                                "is_ip_country_match": form.get("bill_country") ==
                                self.ip_country},
            "shipping_address": {"is_address_ship_forward": None, "is_bill_country_match": None,
                                 "is_bill_state_match": None, "is_bill_city_match": None,
                                 "is_bill_postcode_match": None,
                                 "is_export_controlled_country": None, "is_in_blacklist": None},
            "email_address": {"is_free": email.endswith("@gmail.com"), "is_disposable": False,
                              "is_new_domain_name": False, "is_domain_exist": True,
                              "is_in_blacklist": False},
            "phone_number": {"is_disposable": None, "is_in_blacklist": None},
            "username": {"is_high_risk": None, "is_in_blacklist": None},
            "device": {"is_malware_exploit": None, "is_in_blacklist": None},
            "user_order_id": form.get("user_order_id", ""),
            "fraudlabspro_id": f"20260101-{self._ids:06d}",
            "fraudlabspro_score": self.score,
            "fraudlabspro_status": self.status,
            "fraudlabspro_rules": [*self.rules, *([f"echo{self._echo(form)}"]
                                                  if self.echo_key else [])],
            "api_version": "2.0.0",
            "remaining_credits": 499,
        }

    async def __aenter__(self) -> FakeFraudLabsPro:
        app = web.Application()
        app.router.add_post("/v2/order/{call:screen|feedback}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=server_context()).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _error(kind: str, echo: str = "") -> web.Response:
    status, code, message = _ERRORS[kind]
    return web.json_response({"error": {"error_code": code, "error_message": message + echo}},
                             status=status)
