"""cPanel & WHM server module: WHM API 1 (JSON) over HTTPS, with an API token.

Every call is `/json-api/<function>?api.version=1&...` with the header
`Authorization: whm USER:TOKEN`; WHM answers
`{"metadata": {"version": 1, "result": 1|0, "reason": "...", "command": "..."}, "data": {...}}`
and only `metadata.result == 1` is a success.

Reliability (docs/contract.md, section 4, rules 4 and 5):
- `create` looks first (`accountsummary`): an account with our username, domain and contact
  email is ours and is adopted, not created again, so a retry after a crash or a timeout
  between WHM's create and our commit converges. An account with our username that is not
  ours is a definitive failure: we never touch it.
- `terminate` looks first too: an absent account is a success (a retried termination
  converges) and an account whose domain is not ours is never removed.
- No retry in here: transient failures (connection refused, DNS, timeout, dropped connection,
  HTTP 5xx) come back with `transient=True` and the job runner schedules the next attempt.

Secrets: the token and the account password are never logged and never appear in an error
string or in `detail`; `createacct` is sent as a POST form (the password stays out of URLs and
access logs, and an HTTP client never retries a POST by itself).
"""

from __future__ import annotations

import json
import logging
import re
import ssl as ssl_module
from typing import Any

import aiohttp
from yarl import URL

from services.provisioning.modules.base import Account, ModuleResult
from shared.scrub import scrub_data
from shared.settings_parts import WhmSettings

log = logging.getLogger("ordermill.modules.cpanel")

# accountsummary / removeacct / suspendacct on a username WHM does not know. WHM's wording is
# not a contract, so match loosely; an unrecognised reason is a definitive failure (safe side).
_ABSENT = re.compile(r"does ?n[o']t exist|no such (user|account)|not (be )?found|unknown (user|account)",
                     re.IGNORECASE)


class _CallFailed(Exception):
    """A call that did not return `metadata.result == 1`, already classified."""

    def __init__(self, error: str, *, transient: bool, reason: str | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.transient = transient
        self.reason = reason  # metadata.reason when WHM answered result 0

    def result(self) -> ModuleResult:
        return ModuleResult.failure(self.error, transient=self.transient)


class CpanelModule:
    """A cPanel & WHM server, reached with a WHM API token (root or a reseller).

    hostname, port: the WHM server (2087 is WHM over TLS).
    username, token: the WHM user and its API token (a secret).
    timeout: seconds for a quick call (accountsummary, suspendacct, unsuspendacct).
    long_timeout: seconds for createacct and removeacct, which take tens of seconds on a
        busy server; when it runs out the call is transient and the next attempt adopts the
        account (create) or finds it gone (terminate).
    verify: True (verify the certificate), False (accept a self-signed one), or an
        `ssl.SSLContext` (for example one trusting the server's own CA).
    scheme: "https", or "http" for the plain-HTTP fake server in tests (or port 2086).
    """

    name = "cpanel"
    calls_server = True  # its lane's calls are capped by JOB_LANE_CONCURRENCY

    def __init__(
        self,
        hostname: str,
        username: str,
        token: str,
        *,
        port: int = 2087,
        timeout: float = 10.0,
        long_timeout: float = 180.0,
        verify: bool | ssl_module.SSLContext = True,
        scheme: str = "https",
    ) -> None:
        if scheme not in ("https", "http"):
            raise ValueError(f"scheme must be 'https' or 'http', not {scheme!r}")
        self.hostname = hostname
        self.port = port
        self.username = username
        self._token = token
        self.timeout = timeout
        self.long_timeout = long_timeout
        self._verify = verify
        self._base = URL.build(scheme=scheme, host=hostname, port=port, path="/json-api/")
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def for_server(cls, whm: WhmSettings, *, hostname: str, port: int, username: str,
                   token: str) -> CpanelModule:
        """A catalog server's module with the WHM settings (WHM_SCHEME, the module timeout);
        the token comes from the environment variable the server names."""
        return cls(hostname, username, token, port=port, timeout=whm.timeout,
                   **({"scheme": whm.scheme} if whm.scheme else {}))

    def __repr__(self) -> str:  # never the token
        return f"CpanelModule({self.username}@{self.hostname}:{self.port})"

    # ---- the ServerModule interface -------------------------------------------------------

    async def create(self, account: Account) -> ModuleResult:
        try:
            found = await self._summary(account.username)
            if found is not None:
                return self._adopt_or_refuse(account, found)
            try:
                data = await self._call("createacct", self._create_params(account), long=True,
                                        post=True, secrets=(account.password,))
            except _CallFailed as exc:
                if exc.reason is None:
                    raise
                # result 0: maybe a race (another attempt created it meanwhile), maybe a real
                # refusal (unknown package, domain owned by another account). Look again.
                found = await self._summary(account.username)
                if found is None:
                    raise
                return self._adopt_or_refuse(account, found)
        except _CallFailed as exc:
            return exc.result()
        log.info("cpanel %s: created account %s", self.hostname, account.username)
        return ModuleResult.success(adopted=False, ip=data.get("ip"), package=data.get("package"))

    async def suspend(self, account: Account, reason: str) -> ModuleResult:
        try:
            await self._call("suspendacct", {"user": account.username, "reason": reason})
        except _CallFailed as exc:
            return exc.result()
        return ModuleResult.success()

    async def unsuspend(self, account: Account) -> ModuleResult:
        try:
            await self._call("unsuspendacct", {"user": account.username})
        except _CallFailed as exc:
            return exc.result()
        return ModuleResult.success()

    async def terminate(self, account: Account) -> ModuleResult:
        try:
            found = await self._summary(account.username)
            if found is None:
                return ModuleResult.success(absent=True)
            if _norm(found.get("domain")) != _norm(account.domain):
                # Contact emails change (the customer edits theirs); the main domain does not,
                # without an operator. Never remove an account that may not be ours.
                return ModuleResult.failure(
                    f"refusing to remove cPanel account {account.username!r} on {self.hostname}: "
                    f"its domain is {found.get('domain')!r}, ours is {account.domain!r}")
            try:
                await self._call("removeacct", {"username": account.username}, long=True)
            except _CallFailed as exc:
                if exc.reason is not None and _ABSENT.search(exc.reason):
                    return ModuleResult.success(absent=True)  # removed meanwhile
                raise
        except _CallFailed as exc:
            return exc.result()
        log.info("cpanel %s: removed account %s", self.hostname, account.username)
        return ModuleResult.success(absent=False)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # ---- helpers ---------------------------------------------------------------------------

    def _create_params(self, account: Account) -> dict[str, str]:
        params = {"username": account.username, "domain": account.domain, "plan": account.plan,
                  "contactemail": account.contact_email}
        if account.password:
            params["password"] = account.password
        return params

    def _adopt_or_refuse(self, account: Account, found: dict[str, Any]) -> ModuleResult:
        domain, email = found.get("domain"), found.get("email")
        if _norm(domain) == _norm(account.domain) and _norm(email) == _norm(account.contact_email):
            log.info("cpanel %s: account %s already exists and is ours: adopted",
                     self.hostname, account.username)
            return ModuleResult.success(adopted=True, ip=found.get("ip"), package=found.get("plan"),
                                        suspended=bool(_int(found.get("suspended"))))
        return ModuleResult.failure(
            f"cPanel account {account.username!r} already exists on {self.hostname} and is not ours "
            f"(domain {domain!r}, contact email {email!r}; expected {account.domain!r}, "
            f"{account.contact_email!r})")

    async def _summary(self, user: str) -> dict[str, Any] | None:
        """The account's accountsummary entry, or None when WHM says it does not exist."""
        try:
            data = await self._call("accountsummary", {"user": user})
        except _CallFailed as exc:
            if exc.reason is not None and _ABSENT.search(exc.reason):
                return None
            raise
        accounts = data.get("acct") if isinstance(data, dict) else None
        if not accounts:
            return None
        if not isinstance(accounts, list) or not isinstance(accounts[0], dict):
            raise _CallFailed(f"cPanel {self.hostname}: accountsummary: unexpected response",
                              transient=True)
        return accounts[0]

    def _session_for_calls(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"whm {self.username}:{self._token}"},
                connector=aiohttp.TCPConnector(ssl=self._verify),
            )
        return self._session

    async def _call(self, function: str, params: dict[str, str], *, long: bool = False,
                    post: bool = False, secrets: tuple[str | None, ...] = ()) -> dict[str, Any]:
        """One WHM API 1 call: its `data` on result 1, else a classified _CallFailed."""
        where = f"cPanel {self.hostname}: {function}"
        scrub = (self._token, *secrets)
        url = self._base / function
        args = {"api.version": "1", **params}
        timeout = aiohttp.ClientTimeout(total=self.long_timeout if long else self.timeout)
        session = self._session_for_calls()
        try:
            if post:
                request = session.post(url, data=args, timeout=timeout, allow_redirects=False)
            else:
                request = session.get(url, params=args, timeout=timeout, allow_redirects=False)
            async with request as response:
                status = response.status
                body = await response.read()
        except TimeoutError:
            raise _CallFailed(f"{where}: no answer within {timeout.total:g} s", transient=True) from None
        except aiohttp.ClientSSLError as exc:
            raise _CallFailed(f"{where}: TLS failed ({type(exc).__name__}); check the certificate "
                              "or the verify option", transient=False) from None
        except aiohttp.InvalidURL:
            raise _CallFailed(f"{where}: invalid server address", transient=False) from None
        except aiohttp.ClientConnectorError as exc:
            cause = exc.os_error.strerror or type(exc.os_error).__name__
            raise _CallFailed(f"{where}: cannot connect ({cause})", transient=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _CallFailed(f"{where}: connection failed ({type(exc).__name__})",
                              transient=True) from None
        log.debug("%s: HTTP %s", where, status)

        if status in (401, 403):
            raise _CallFailed(f"{where}: authentication failed: HTTP {status} (check the WHM "
                              f"username {self.username!r} and its API token)", transient=False)
        if status >= 500:
            raise _CallFailed(f"{where}: HTTP {status}", transient=True)
        if status != 200:
            raise _CallFailed(f"{where}: unexpected HTTP {status}", transient=False)
        try:
            # Scrubbed as a whole: whatever the server echoes (a reason, an account's domain
            # quoted in a refusal, an IP kept in detail) never carries the token or password.
            payload = scrub_data(json.loads(body), scrub)
        except ValueError:  # also UnicodeDecodeError: a proxy's error page, a half answer
            raise _CallFailed(f"{where}: invalid JSON in the answer", transient=True) from None
        metadata = payload.get("metadata") if isinstance(payload, dict) else None
        if not isinstance(metadata, dict) or "result" not in metadata:
            raise _CallFailed(f"{where}: unexpected answer (no metadata.result)", transient=True)
        if _int(metadata.get("result")) != 1:
            reason = str(metadata.get("reason") or "no reason given")
            raise _CallFailed(f"{where}: {reason}", transient=False, reason=reason)
        data = payload.get("data")
        return data if isinstance(data, dict) else {}


def _norm(value: Any) -> str:
    return str(value or "").strip().lower()


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None

