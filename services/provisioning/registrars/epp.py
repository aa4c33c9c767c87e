"""An EPP registrar: RFC 5730 (protocol), 5734 (TCP + TLS transport), 5731 (domain mapping).

One connection per call: connect over TLS, read the server's <greeting>, <login>, run the
command(s), <logout>, close. Every command carries its own clTRID (a uuid), checked in the answer.

Registrant: every domain is created with one configured registrant contact id (`registrant_id`,
a contact the provider created at the registry beforehand), plus optional admin/tech/billing
contact ids (`contacts`). No <contact:create> is sent: the Registrant of a DomainRequest lacks the
postal address (city) that RFC 5733 makes mandatory for a contact.

Idempotency (a retry after a lost answer must not fail or act twice):
- register: 2302 "object exists" is followed by <domain:info>; a domain whose sponsor (clID)
  is us was created by an earlier attempt and is adopted. Anyone else's is a definitive failure.
- transfer: 2300 "pending transfer" is followed by a transfer query; a pending transfer that we
  requested is adopted. A refusal other than a bad EPP code is followed by <domain:info>: a
  domain we already sponsor was transferred by an earlier attempt and is adopted.

Results: never raises for a remote failure. Connection errors, timeouts, TLS failures, malformed
answers, 2400 (command failed) and 2500-2502 (server closing the session) are transient; a refused
login (2200, 2501) and other 2xxx codes are definitive. Secrets (the login password, the
generated authInfo of a new domain, a transfer's EPP code) are never logged, never returned and
scrubbed from any error text built from the server's words.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import string
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from services.provisioning.registrars.base import DomainOutcome, DomainRequest, RegistrarResult
from shared.scrub import scrub as _scrub
from shared.settings_parts import EppSettings
from shared.states import DomainStatus

log = logging.getLogger("ordermill.registrar.epp")

EPP_NS = "urn:ietf:params:xml:ns:epp-1.0"
DOMAIN_NS = "urn:ietf:params:xml:ns:domain-1.0"
CONTACT_NS = "urn:ietf:params:xml:ns:contact-1.0"
_NS = {"epp": EPP_NS, "domain": DOMAIN_NS, "contact": CONTACT_NS}

MAX_FRAME = 4 * 1024 * 1024  # an answer larger than this is not a sane EPP message
TRANSIENT_CODES = frozenset({2400, 2500, 2501, 2502})
LOGIN_REFUSED_CODES = frozenset({2200, 2501})  # 2501 at login: authentication error, closing
AUTH_ERROR_CODES = frozenset({2201, 2202})
_AUTHINFO_SPECIALS = "!#$%*+-=?@^_~"


def frame(xml: bytes) -> bytes:
    """RFC 5734 data unit: a 4-byte big-endian total length (header included), then the XML."""
    return (len(xml) + 4).to_bytes(4, "big") + xml


def generate_authinfo(length: int = 16) -> str:
    """A random domain authInfo password with a lower, an upper, a digit and a special character
    (what registries' password policies commonly ask for)."""
    alphabet = string.ascii_letters + string.digits + _AUTHINFO_SPECIALS
    required = [secrets.choice(string.ascii_lowercase), secrets.choice(string.ascii_uppercase),
                secrets.choice(string.digits), secrets.choice(_AUTHINFO_SPECIALS)]
    chars = required + [secrets.choice(alphabet) for _ in range(length - len(required))]
    secrets.SystemRandom().shuffle(chars)
    return "".join(chars)


class _Transient(Exception):
    """A failure worth retrying later (the session broke or the server was unwell)."""


class _Definitive(Exception):
    """A failure that no retry will fix; the job is parked for an operator."""


@dataclass(frozen=True)
class EppResponse:
    code: int
    msg: str
    reason: str | None  # the first <extValue><reason>, if any
    res_data: ET.Element | None
    sv_trid: str | None

    @property
    def ok(self) -> bool:
        return 1000 <= self.code < 2000

    def describe(self) -> str:
        text = f"EPP {self.code} {self.msg}"
        return f"{text}: {self.reason}" if self.reason else text


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float, scrub: tuple[str, ...]) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._scrub = scrub

    async def read(self) -> ET.Element:
        async with asyncio.timeout(self._timeout):
            header = await self._reader.readexactly(4)
            length = int.from_bytes(header, "big")
            if not 4 < length <= MAX_FRAME:
                raise _Transient(f"EPP server sent a bad frame length {length}")
            data = await self._reader.readexactly(length - 4)
        try:
            root = ET.fromstring(data)
        except ET.ParseError as exc:
            raise _Transient(f"EPP server sent malformed XML: {exc}") from None
        if root.tag != f"{{{EPP_NS}}}epp":
            raise _Transient(_scrub(f"EPP server sent an unexpected root element {root.tag}",
                                    self._scrub))
        # Every text the server sent, scrubbed once: what is kept of an answer (a message, a
        # reason, the server's transaction id in detail) never holds a password it echoed.
        for element in root.iter():
            element.text = element.text and _scrub(element.text, self._scrub)
            element.tail = element.tail and _scrub(element.tail, self._scrub)
            for name, value in element.attrib.items():
                element.attrib[name] = _scrub(value, self._scrub)
        return root

    async def send(self, xml: str) -> None:
        self._writer.write(frame(xml.encode("utf-8")))
        async with asyncio.timeout(self._timeout):
            await self._writer.drain()

    async def command(self, name: str, body: str) -> EppResponse:
        """Send one <command> (body is the inner XML) and parse its <response>."""
        cltrid = uuid.uuid4().hex
        await self.send(_command_xml(body, cltrid))
        root = await self.read()
        response = root.find("epp:response", _NS)
        if response is None:
            raise _Transient(f"EPP server answered {name} without a <response>")
        result = response.find("epp:result", _NS)
        code_text = result.get("code") if result is not None else None
        if result is None or code_text is None or not code_text.isdigit():
            raise _Transient(f"EPP server answered {name} without a result code")
        echoed = response.findtext("epp:trID/epp:clTRID", namespaces=_NS)
        if echoed is not None and echoed != cltrid:
            raise _Transient(f"EPP server answered {name} with another command's clTRID")
        reason = result.findtext("epp:extValue/epp:reason", namespaces=_NS)
        answer = EppResponse(
            code=int(code_text),
            msg=_scrub((result.findtext("epp:msg", default="", namespaces=_NS)).strip(),
                       self._scrub),
            reason=_scrub(reason.strip(), self._scrub) if reason else None,
            res_data=response.find("epp:resData", _NS),
            sv_trid=response.findtext("epp:trID/epp:svTRID", namespaces=_NS),
        )
        log.debug("epp command answered", extra={"command": name, "code": answer.code,
                                                 "cltrid": cltrid, "svtrid": answer.sv_trid})
        if answer.code in TRANSIENT_CODES and name != "login":
            raise _Transient(f"{name}: {answer.describe()}")
        return answer



def _command_xml(body: str, cltrid: str) -> str:
    return (f'<?xml version="1.0" encoding="UTF-8" standalone="no"?>'
            f'<epp xmlns="{EPP_NS}"><command>{body}<clTRID>{cltrid}</clTRID></command></epp>')


def _domain_name(raw: str) -> str:
    name = raw.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise _Definitive(f"invalid domain name {raw!r}") from None
    if not name or " " in name:
        raise _Definitive(f"invalid domain name {raw!r}")
    return name


def _authinfo(pw: str) -> str:
    return f"<domain:authInfo><domain:pw>{escape(pw)}</domain:pw></domain:authInfo>"


class EppRegistrar:
    """A Registrar speaking EPP to a registry (or a registrar's EPP gateway)."""

    name = "epp"

    def __init__(
        self,
        host: str,
        port: int = 700,
        *,
        client_id: str,
        password: str,
        registrant_id: str,
        contacts: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        """`contacts` maps a contact type (admin, tech, billing) to a contact id. TLS: pass a ready
        `ssl_context`, or a `cafile` to trust (default: the system's CAs) and, where the registry
        wants a client certificate (RFC 5734 expects one), `certfile`/`keyfile`. `timeout` bounds
        each step (connect and TLS handshake, each answer), not the whole call."""
        if ssl_context is None:
            ssl_context = ssl.create_default_context(cafile=cafile)
            if certfile:
                ssl_context.load_cert_chain(certfile, keyfile)
        self.host = host
        self.port = port
        self.client_id = client_id
        self._password = password
        self.registrant_id = registrant_id
        self.contacts = dict(contacts or {})
        self._ssl = ssl_context
        self.timeout = timeout

    @classmethod
    def from_settings(cls, epp: EppSettings, password: str) -> EppRegistrar:
        """The registrar EPP_HOST, EPP_CLIENT_ID and EPP_REGISTRANT_ID name; EPP_PASSWORD is
        no setting (the caller reads it from the environment when it is needed)."""
        if not (epp.host and epp.client_id and epp.registrant_id):
            raise ValueError("EPP registrar needs EPP_HOST, EPP_CLIENT_ID and EPP_REGISTRANT_ID")
        return cls(epp.host, epp.port, client_id=epp.client_id, password=password,
                   registrant_id=epp.registrant_id, cafile=epp.cafile, timeout=epp.timeout)

    def __repr__(self) -> str:  # no password
        return f"EppRegistrar({self.host}:{self.port}, client_id={self.client_id!r})"

    # -- the Registrar interface ------------------------------------------------------------

    async def register(self, request: DomainRequest) -> RegistrarResult:
        authinfo = generate_authinfo()
        return await self._call("register", request, (authinfo,),
                                lambda s, name: self._register(s, name, request, authinfo))

    async def transfer(self, request: DomainRequest) -> RegistrarResult:
        if not request.epp_code:
            return RegistrarResult.failure(f"transfer of {request.domain} needs an EPP code")
        epp_code = request.epp_code
        return await self._call("transfer", request, (epp_code,),
                                lambda s, name: self._transfer(s, name, request, epp_code))

    async def close(self) -> None:
        return None  # one connection per call: nothing stays open

    # -- commands ---------------------------------------------------------------------------

    async def _register(self, session: _Session, name: str, request: DomainRequest,
                        authinfo: str) -> RegistrarResult:
        contacts = "".join(f'<domain:contact type="{escape(kind)}">{escape(cid)}</domain:contact>'
                           for kind, cid in self.contacts.items())
        answer = await session.command("domain:create", (
            f'<create><domain:create xmlns:domain="{DOMAIN_NS}">'
            f"<domain:name>{escape(name)}</domain:name>"
            f'<domain:period unit="y">{int(request.years)}</domain:period>'
            f"<domain:registrant>{escape(self.registrant_id)}</domain:registrant>{contacts}"
            f"{_authinfo(authinfo)}</domain:create></create>"))
        if answer.code in (1000, 1001):
            status: DomainOutcome = (DomainStatus.ACTIVE if answer.code == 1000
                                     else DomainStatus.PENDING_REGISTRATION)
            return RegistrarResult.success(status, **_detail(answer, "domain:creData"))
        if answer.code != 2302:
            raise _Definitive(f"registration of {name} failed: {answer.describe()}")
        # Exists: ours from an earlier attempt whose answer was lost, or someone else's.
        info = await self._info(session, name)
        if info is None or info.findtext("domain:clID", namespaces=_NS) != self.client_id:
            raise _Definitive(f"domain {name} is registered to someone else")
        statuses = {el.get("s") for el in info.findall("domain:status", _NS)}
        status = (DomainStatus.PENDING_REGISTRATION if "pendingCreate" in statuses
                  else DomainStatus.ACTIVE)
        expires = info.findtext("domain:exDate", namespaces=_NS)
        return RegistrarResult.success(status, adopted=True, result_code=answer.code,
                                       **({"expires": expires} if expires else {}))

    async def _transfer(self, session: _Session, name: str, request: DomainRequest,
                        epp_code: str) -> RegistrarResult:
        answer = await session.command("domain:transfer", (
            f'<transfer op="request"><domain:transfer xmlns:domain="{DOMAIN_NS}">'
            f"<domain:name>{escape(name)}</domain:name>"
            f'<domain:period unit="y">{int(request.years)}</domain:period>'
            f"{_authinfo(epp_code)}</domain:transfer></transfer>"))
        if answer.code in (1000, 1001):
            status: DomainOutcome = (DomainStatus.ACTIVE if answer.code == 1000
                                     else DomainStatus.PENDING_TRANSFER)
            return RegistrarResult.success(status, **_detail(answer, "domain:trnData"))
        if answer.code in AUTH_ERROR_CODES:
            raise _Definitive(f"transfer refused: {answer.describe()}")
        if answer.code == 2300:  # already pending: ours, from an earlier attempt?
            query = await session.command("domain:transfer", (
                f'<transfer op="query"><domain:transfer xmlns:domain="{DOMAIN_NS}">'
                f"<domain:name>{escape(name)}</domain:name>"
                f"{_authinfo(epp_code)}</domain:transfer></transfer>"))
            data = query.res_data if query.ok else None
            trn = data.find("domain:trnData", _NS) if data is not None else None
            if (trn is not None and trn.findtext("domain:reID", namespaces=_NS) == self.client_id
                    and trn.findtext("domain:trStatus", namespaces=_NS) == "pending"):
                return RegistrarResult.success(DomainStatus.PENDING_TRANSFER, adopted=True,
                                               result_code=answer.code)
            raise _Definitive(f"transfer refused: {answer.describe()}")
        # Refused otherwise (not eligible, ...): already ours, transferred by an earlier attempt?
        try:
            info = await self._info(session, name)
        except _Definitive:  # e.g. 2303: no such domain; the refusal says more than the info
            info = None
        if info is not None and info.findtext("domain:clID", namespaces=_NS) == self.client_id:
            return RegistrarResult.success(DomainStatus.ACTIVE, adopted=True,
                                           result_code=answer.code)
        raise _Definitive(f"transfer refused: {answer.describe()}")

    async def _info(self, session: _Session, name: str) -> ET.Element | None:
        """<domain:infData>, or None when the registry will not tell us (not the sponsor)."""
        answer = await session.command("domain:info", (
            f'<info><domain:info xmlns:domain="{DOMAIN_NS}">'
            f'<domain:name hosts="none">{escape(name)}</domain:name></domain:info></info>'))
        if answer.code in AUTH_ERROR_CODES:
            return None
        if not answer.ok or answer.res_data is None:
            raise _Definitive(f"domain info for {name} failed: {answer.describe()}")
        return answer.res_data.find("domain:infData", _NS)

    # -- the session ------------------------------------------------------------------------

    async def _call(self, op: str, request: DomainRequest, secret_values: tuple[str, ...],
                    action: Callable[[_Session, str], Awaitable[RegistrarResult]]) -> RegistrarResult:
        extra = {"domain_id": request.domain_id, "domain": request.domain, "registrar": self.name}
        scrub = (self._password, *secret_values)
        try:
            name = _domain_name(request.domain)
            async with self._session(scrub) as session:
                result = await action(session, name)
        except _Definitive as exc:
            result = RegistrarResult.failure(_scrub(str(exc), scrub))
        except _Transient as exc:
            result = RegistrarResult.failure(_scrub(str(exc), scrub), transient=True)
        except TimeoutError:
            result = RegistrarResult.failure(
                f"EPP server {self.host}:{self.port} did not answer within {self.timeout:g} s",
                transient=True)
        except ssl.SSLError as exc:
            result = RegistrarResult.failure(
                f"TLS with EPP server {self.host}:{self.port} failed: {exc.reason or exc}",
                transient=True)
        except (OSError, EOFError) as exc:  # refused, reset, closed (IncompleteReadError)
            what = "closed the connection" if isinstance(exc, EOFError) else f"unreachable: {exc}"
            result = RegistrarResult.failure(
                _scrub(f"EPP server {self.host}:{self.port} {what}", scrub), transient=True)
        if result.ok:
            log.info("registrar call done", extra={**extra, "op": op, "status": result.status,
                                                   "adopted": bool(result.detail.get("adopted"))})
        else:
            log.warning("registrar call failed", extra={**extra, "op": op, "error": result.error,
                                                        "transient": result.transient})
        return result

    @contextlib.asynccontextmanager
    async def _session(self, scrub: tuple[str, ...]) -> AsyncIterator[_Session]:
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self._ssl, ssl_handshake_timeout=self.timeout)
        try:
            session = _Session(reader, writer, self.timeout, scrub)
            greeting = await session.read()
            if greeting.find("epp:greeting", _NS) is None:  # e.g. a 2502 when the server is full
                said = greeting.find("epp:response/epp:result", _NS)
                why = (f": EPP {said.get('code')} {said.findtext('epp:msg', '', _NS).strip()}"
                       if said is not None else "")
                raise _Transient(f"EPP server did not start with a <greeting>{why}")
            await self._login(session)
            yield session
            with contextlib.suppress(_Transient, OSError, EOFError, TimeoutError):
                await session.command("logout", "<logout/>")  # the result is already known
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
                async with asyncio.timeout(min(self.timeout, 2.0)):
                    await writer.wait_closed()

    async def _login(self, session: _Session) -> None:
        answer = await session.command("login", (
            f"<login><clID>{escape(self.client_id)}</clID><pw>{escape(self._password)}</pw>"
            f"<options><version>1.0</version><lang>en</lang></options>"
            f"<svcs><objURI>{DOMAIN_NS}</objURI><objURI>{CONTACT_NS}</objURI></svcs></login>"))
        if answer.code == 1000:
            return
        if answer.code in LOGIN_REFUSED_CODES:
            raise _Definitive(f"EPP login as {self.client_id} refused: {answer.describe()}")
        if answer.code in TRANSIENT_CODES:
            raise _Transient(f"EPP login as {self.client_id} failed: {answer.describe()}")
        raise _Definitive(f"EPP login as {self.client_id} failed: {answer.describe()}")


def _detail(answer: EppResponse, data: str) -> dict[str, Any]:
    detail: dict[str, Any] = {"result_code": answer.code}
    if answer.sv_trid:
        detail["sv_trid"] = answer.sv_trid
    found = answer.res_data.find(data, _NS) if answer.res_data is not None else None
    expires = found.findtext("domain:exDate", namespaces=_NS) if found is not None else None
    if expires:
        detail["expires"] = expires
    return detail
