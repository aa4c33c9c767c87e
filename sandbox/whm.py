"""The sandbox cPanel & WHM server: a real HTTP server speaking a few WHM API 1 functions.

NEVER FOR PRODUCTION: accounts live in memory, one built-in API token opens it, and it fails
on purpose when asked to. `ordermill sandbox` runs it for the demo; the tests use it as
tests/fakes/whm.py's FakeWhm:

    async with SandboxWhm() as whm:
        module = CpanelModule(**whm.module_kwargs)  # plain http, the sandbox's port and token
        ...
        assert whm.calls["createacct"] == 1

Functions: accountsummary (user), listaccts (search, searchtype=user|domain), createacct
(username, domain, plan, contactemail, password), suspendacct (user, reason), unsuspendacct
(user), removeacct (username, or the deprecated user). GET query parameters and POST form
fields are both accepted, as WHM does. Every answer has WHM's shape, `{"metadata":
{"version": 1, "result": 1|0, "reason": ..., "command": ...}, "data": {...}}`, with the
header `X-Ordermill-Sandbox` (and, on success, the banner in `metadata.reason`); a request
without `Authorization: whm USER:TOKEN` (the right ones) gets HTTP 401. Accounts live in
memory (`accounts`, keyed by username, each as accountsummary shows it): a removed account
is gone.

Deliberate failures (`failures`, sandbox/failures.py): createacct of a chosen domain answers
`metadata.result` 0 with a reason saying so, creating nothing.

Faults on demand (the tests'), per function, consumed in the order they were queued, one per call:
- `fail_next(fn, times, status=500)`: answer HTTP `status` with an HTML page (not JSON).
- `hang_next(fn, seconds, times)`: wait `seconds`, then do the call and answer (a slow server:
  the work still happens after a client gave up).
- `reject_next(fn, reason, times)`: answer `metadata.result` 0 with `reason`, doing nothing.
- `drop_next(fn, times)`: do the call (createacct creates the account), then close the
  connection without answering: a worker that timed out or died after the server acted.
`delay` (constructor or attribute) makes every answer wait that many seconds (benchmarks).
`calls` counts every request per function (faulty and unauthorized ones too); `requests`
keeps each one (function, method, parameters, authorized).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from sandbox import BANNER
from sandbox.failures import DeliberateFailures

log = logging.getLogger("ordermill.sandbox.whm")
FaultKind = Literal["status", "hang", "hang_after", "reject", "drop"]


@dataclass(frozen=True)
class WhmRequest:
    function: str
    method: str
    params: dict[str, str]  # query and form fields together, api.version included
    authorized: bool


@dataclass(frozen=True)
class _Fault:
    kind: FaultKind
    status: int = 500
    seconds: float = 0.0
    reason: str = ""


@dataclass
class _Answer:
    result: int
    reason: str
    data: dict[str, Any] | None = None
    output: str | None = None


def absent_reason(user: str) -> str:
    return f"The account “{user}” does not exist."


class SandboxWhm:
    def __init__(self, *, username: str = "root", token: str = "FAKEWHMTOKEN0123456789ABCDEF",
                 delay: float = 0.0, ip: str = "192.0.2.10", plans: Iterable[str] | None = None,
                 host: str = "127.0.0.1", port: int = 0,
                 failures: DeliberateFailures | None = None) -> None:
        self.username = username
        self.token = token
        self.delay = delay
        self.ip = ip
        self.plans = None if plans is None else set(plans)  # None: any package name is accepted
        self.accounts: dict[str, dict[str, Any]] = {}
        self.passwords: dict[str, str] = {}
        self.calls: Counter[str] = Counter()
        self.requests: list[WhmRequest] = []
        self.host = host
        self.port = port  # 0: an ephemeral port, known once started
        self.failures = failures or DeliberateFailures()
        self._faults: dict[str, deque[_Fault]] = {}
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    # ---- life cycle --------------------------------------------------------------------

    async def start(self) -> SandboxWhm:
        app = web.Application()
        app.router.add_route("*", "/json-api/{function}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        log.info("%s: WHM API 1 on %s", BANNER, self.url)
        self._stopping.clear()
        return self

    async def stop(self) -> None:
        self._stopping.set()  # wakes hanging and delayed answers
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> SandboxWhm:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def module_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for CpanelModule to reach this server."""
        return {"hostname": self.host, "port": self.port, "username": self.username,
                "token": self.token, "scheme": "http"}

    # ---- test controls -----------------------------------------------------------------

    def add_account(self, user: str, domain: str, email: str, plan: str = "default", *,
                    suspended: bool = False, reason: str = "") -> dict[str, Any]:
        now = int(time.time())
        account = {
            "user": user, "domain": domain, "email": email, "plan": plan, "ip": self.ip,
            "owner": self.username, "partition": "home", "theme": "jupiter", "backup": 0,
            "disklimit": "unlimited", "diskused": "0M", "inodeslimit": "unlimited",
            "inodesused": 1, "is_locked": 0, "shell": "/usr/local/cpanel/bin/noshell",
            "startdate": time.strftime("%y %b %d %H:%M", time.gmtime(now)),
            "unix_startdate": now, "suspended": 1 if suspended else 0,
            "suspendreason": reason if suspended else "not suspended",
            "suspendtime": now if suspended else None,
        }
        self.accounts[user] = account
        return account

    def fail_next(self, function: str, times: int = 1, *, status: int = 500) -> None:
        self._queue(function, _Fault("status", status=status), times)

    def hang_next(self, function: str, seconds: float, times: int = 1) -> None:
        self._queue(function, _Fault("hang", seconds=seconds), times)

    def hang_after_next(self, function: str, seconds: float, times: int = 1) -> None:
        """Do the work, then hang before answering: the caller dies or times out not knowing."""
        self._queue(function, _Fault("hang_after", seconds=seconds), times)

    def reject_next(self, function: str, reason: str, times: int = 1) -> None:
        self._queue(function, _Fault("reject", reason=reason), times)

    def drop_next(self, function: str, times: int = 1) -> None:
        self._queue(function, _Fault("drop"), times)

    def _queue(self, function: str, fault: _Fault, times: int) -> None:
        self._faults.setdefault(function, deque()).extend([fault] * times)

    def calls_of(self, function: str) -> list[WhmRequest]:
        return [r for r in self.requests if r.function == function]

    # ---- the server --------------------------------------------------------------------

    async def _pause(self, seconds: float) -> bool:
        """Sleep, unless the server stops first (then False)."""
        if seconds <= 0:
            return True
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        function = request.match_info["function"]
        params = {k: v for k, v in request.query.items()}
        if request.method == "POST":
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        authorized = request.headers.get("Authorization") == f"whm {self.username}:{self.token}"
        self.calls[function] += 1
        self.requests.append(WhmRequest(function, request.method, params, authorized))

        if not await self._pause(self.delay):
            return _abort(request)
        if not authorized:
            return web.Response(status=401, content_type="text/html", headers=_HEADERS,
                                text="<html><body>Access denied</body></html>")
        faults = self._faults.get(function)
        fault = faults.popleft() if faults else None
        if fault is not None and fault.kind == "status":
            return web.Response(status=fault.status, content_type="text/html", headers=_HEADERS,
                                text=f"<html><body>{fault.status} Internal Server Error</body></html>")
        if fault is not None and fault.kind == "hang" and not await self._pause(fault.seconds):
            return _abort(request)
        if fault is not None and fault.kind == "reject":
            answer = _Answer(0, fault.reason)
        elif params.get("api.version") != "1":
            answer = _Answer(0, "This sandbox WHM speaks only WHM API 1: pass api.version=1.")
        else:
            answer = self._dispatch(function, params)
        response = web.json_response(_body(function, answer), headers=_HEADERS)
        if fault is not None and fault.kind == "hang_after" and not await self._pause(fault.seconds):
            return _abort(request)
        if fault is not None and fault.kind == "drop":
            return _abort(request)
        return response

    def _dispatch(self, function: str, params: dict[str, str]) -> _Answer:
        handler = {
            "accountsummary": self._accountsummary,
            "listaccts": self._listaccts,
            "createacct": self._createacct,
            "suspendacct": self._suspendacct,
            "unsuspendacct": self._unsuspendacct,
            "removeacct": self._removeacct,
        }.get(function)
        if handler is None:
            return _Answer(0, f"Unknown app (“{function}”) requested for this version (1) of the API.")
        return handler(params)

    def _accountsummary(self, params: dict[str, str]) -> _Answer:
        user = params.get("user", "")
        if not user:
            return _Answer(0, "You must specify the “user” or “domain” parameter.")
        account = self.accounts.get(user)
        if account is None:
            return _Answer(0, absent_reason(user))
        return _Answer(1, "OK", {"acct": [dict(account)]})

    def _listaccts(self, params: dict[str, str]) -> _Answer:
        """Every account, or those whose user or domain matches `search` (a regular expression
        on WHM; a substring here), as WHM's listaccts shows them."""
        search = params.get("search", "").lower()
        field = "domain" if params.get("searchtype") == "domain" else "user"
        found = [dict(a) for a in self.accounts.values() if search in str(a[field]).lower()]
        return _Answer(1, "OK", {"acct": found})

    def _createacct(self, params: dict[str, str]) -> _Answer:
        user = params.get("username", "").lower()  # WHM lowercases usernames
        domain = params.get("domain", "").lower()
        plan = params.get("plan", "default")
        if not user or not domain:
            return _Answer(0, "The “username” and “domain” parameters are required.")
        if user in self.accounts:
            return _Answer(0, f"Sorry, a group for the username “{user}” already exists.")
        if any(a["domain"] == domain for a in self.accounts.values()):
            return _Answer(0, f"The domain “{domain}” already exists in the userdata.")
        if self.plans is not None and plan not in self.plans:
            return _Answer(0, f"The package “{plan}” does not exist.")
        if self.failures.should_fail(domain):
            return _Answer(0, self.failures.reason(domain))
        self.add_account(user, domain, params.get("contactemail", ""), plan)
        log.info("%s: created account %s for %s", BANNER, user, domain)
        if params.get("password"):
            self.passwords[user] = params["password"]
        data = {"ip": self.ip, "nameserver": "ns1.example.net", "nameserver2": "ns2.example.net",
                "nameserver3": None, "nameserver4": None, "nameservera": None,
                "nameservera2": None, "nameservera3": None, "nameservera4": None,
                "nameserverentry": None, "nameserverentry2": None, "nameserverentry3": None,
                "nameserverentry4": None, "package": plan, "feature_list": "default"}
        return _Answer(1, "Account Creation Ok", data,
                       output=f"WWWAcct: account {user} for {domain} created")

    def _suspendacct(self, params: dict[str, str]) -> _Answer:
        user = params.get("user", "")
        account = self.accounts.get(user)
        if account is None:
            return _Answer(0, absent_reason(user))
        account.update(suspended=1, suspendreason=params.get("reason", ""),
                       suspendtime=int(time.time()))
        log.info("%s: suspended account %s", BANNER, user)
        return _Answer(1, "OK", output=f"{user}'s account has been suspended")

    def _unsuspendacct(self, params: dict[str, str]) -> _Answer:
        user = params.get("user", "")
        account = self.accounts.get(user)
        if account is None:
            return _Answer(0, absent_reason(user))
        account.update(suspended=0, suspendreason="not suspended", suspendtime=None)
        log.info("%s: unsuspended account %s", BANNER, user)
        return _Answer(1, "OK", output=f"{user}'s account is now active")

    def _removeacct(self, params: dict[str, str]) -> _Answer:
        user = params.get("username") or params.get("user", "")
        if user not in self.accounts:
            return _Answer(0, absent_reason(user))
        del self.accounts[user]
        self.passwords.pop(user, None)
        log.info("%s: removed account %s", BANNER, user)
        return _Answer(1, f"{user} account removed", output=f"Removing User & Group {user}...Done")


_HEADERS = {"X-Ordermill-Sandbox": BANNER}


def _body(function: str, answer: _Answer) -> dict[str, Any]:
    # A success's reason is read by nobody: it carries the banner. A failure's is read (by
    # the module, by an operator): left as WHM words it.
    reason = f"{answer.reason} ({BANNER})" if answer.result == 1 else answer.reason
    metadata: dict[str, Any] = {"version": 1, "result": answer.result, "reason": reason,
                                "command": function}
    if answer.output is not None:
        metadata["output"] = {"raw": answer.output}
    body: dict[str, Any] = {"metadata": metadata}
    if answer.data is not None:
        body["data"] = answer.data
    return body


def _abort(request: web.Request) -> web.Response:
    """Close the connection without an answer (the response is never written)."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response()
