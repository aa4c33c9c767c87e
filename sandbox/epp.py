"""The sandbox EPP registry: a real TLS server (RFC 5730/5731/5734 shapes).

NEVER FOR PRODUCTION: domains and contacts live in memory, one built-in login opens it, and
it fails on purpose when asked to. Its greeting's svID says so. `ordermill sandbox` runs it
for the demo; the tests use it as tests/fakes/epp.py's FakeEppServer.

It keeps domains and contacts (domain:create, domain:info, domain:transfer request and query,
domain:renew), counts every command it receives by kind (`calls["login"]`,
`calls["domain:create"]`, ...) and fails on demand:

    server.fail_next("domain:create", 2400)           # answer 2400 to the next domain:create
    server.drop_next("domain:create")                  # close without answering (nothing done)
    server.drop_next("domain:create", after=True)      # do it, then close without answering
    server.stall_next("greeting")                      # never answer (the client must time out)
    server.pending_create = True                       # domain:create answers 1001 (pendingCreate)
    server.add_domain("taken.test", owner="other")     # someone else's domain (or ours)
    server.foreign_unknown = True                      # transferring an unknown domain: it is
                                                       # taken as held elsewhere, with that code

Deliberate failures (`failures`, sandbox/failures.py): domain:create and a transfer request
of a chosen name answer 2306 with a reason saying so, doing nothing.

Kinds: "greeting" (the server's first message), "hello", "login", "logout" and
"<object>:<command>" such as "domain:create", "domain:info", "domain:transfer".
The framing is written here independently of the client, so that one mistake cannot hide
another: each data unit is a 4-byte big-endian total length (header included) and the XML.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import xml.etree.ElementTree as ET
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from xml.sax.saxutils import escape

from sandbox import BANNER
from sandbox.failures import DeliberateFailures

log = logging.getLogger("ordermill.sandbox.epp")

EPP = "urn:ietf:params:xml:ns:epp-1.0"
DOMAIN = "urn:ietf:params:xml:ns:domain-1.0"
CONTACT = "urn:ietf:params:xml:ns:contact-1.0"
NS = {"epp": EPP, "domain": DOMAIN, "contact": CONTACT}
OBJECTS = {DOMAIN: "domain", CONTACT: "contact"}

MESSAGES = {
    1000: "Command completed successfully",
    1001: "Command completed successfully; action pending",
    1500: "Command completed successfully; ending session",
    2000: "Unknown command",
    2001: "Command syntax error",
    2002: "Command use error",
    2003: "Required parameter missing",
    2004: "Parameter value range error",
    2005: "Parameter value syntax error",
    2101: "Unimplemented object service",
    2102: "Unimplemented option",
    2104: "Billing failure",
    2106: "Object is not eligible for transfer",
    2200: "Authentication error",
    2201: "Authorization error",
    2202: "Invalid authorization information",
    2300: "Object pending transfer",
    2301: "Object not pending transfer",
    2302: "Object exists",
    2303: "Object does not exist",
    2305: "Object association prohibits operation",
    2306: "Parameter value policy error",
    2308: "Data management policy violation",
    2400: "Command failed",
    2500: "Command failed; server closing connection",
    2501: "Authentication error; server closing connection",
    2502: "Session limit exceeded; server closing connection",
}


@dataclass
class SandboxDomain:
    owner: str  # the sponsoring client's clID
    auth_pw: str
    registrant: str | None = None
    contacts: dict[str, str] = field(default_factory=dict)  # type -> contact id
    years: int | None = None
    status: str = "ok"  # ok, pendingCreate, pendingTransfer
    transfer_to: str | None = None  # the gaining client of a pending (or completed) transfer
    transfer_status: str | None = None  # pending, clientApproved, serverApproved
    expires: datetime | None = None


@dataclass(frozen=True)
class Received:
    kind: str
    cltrid: str | None
    command: ET.Element  # the <command> (or <hello>) element as received


@dataclass
class _Fault:
    action: str  # code, drop, stall
    code: int = 0
    msg: str | None = None
    after: bool = False


@dataclass
class _Response:
    code: int
    res_data: str = ""
    ext_value: str = ""


class _Closed(Exception):
    """The connection is over (dropped on purpose, a 25xx answer, logout)."""


def _frame(xml: str) -> bytes:
    data = xml.encode("utf-8")
    return (len(data) + 4).to_bytes(4, "big") + data


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class SandboxEpp:
    def __init__(self, ssl_context: ssl.SSLContext, *, client_id: str = "ordermill",
                 password: str = "S3cret-login!", host: str = "127.0.0.1", port: int = 0,
                 failures: DeliberateFailures | None = None) -> None:
        self.host = host
        self.port = port  # 0: an ephemeral port, known once started
        self.failures = failures or DeliberateFailures()
        self._ssl = ssl_context
        self.clients: dict[str, str] = {client_id: password}  # clID -> login password
        self.domains: dict[str, SandboxDomain] = {}
        self.contacts: dict[str, str] = {}  # contact id -> sponsoring clID
        self.calls: Counter[str] = Counter()
        self.received: list[Received] = []
        self.connections = 0
        self.pending_create = False  # domain:create answers 1001 and leaves it pendingCreate
        self.instant_transfer = False  # a transfer request completes at once (1000)
        self.info_hides_foreign = False  # domain:info on another's domain: 2201, not limited info
        self.reason_echoes_values = False  # a careless server: its reasons quote what was sent
        self.mangle_cltrid = False  # a broken server: answers carry another clTRID
        self.foreign_unknown = False  # transfer of an unknown domain: held elsewhere, that code
        self._faults: dict[str, deque[_Fault]] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = asyncio.Event()
        self._svtrid = 0

    # -- set-up ---------------------------------------------------------------------------

    def add_client(self, client_id: str, password: str) -> None:
        self.clients[client_id] = password

    def add_contact(self, contact_id: str, owner: str) -> None:
        self.contacts[contact_id] = owner

    def add_domain(self, name: str, owner: str, *, auth_pw: str = "Other-auth1!",
                   status: str = "ok") -> SandboxDomain:
        self.domains[name] = SandboxDomain(owner=owner, auth_pw=auth_pw, status=status)
        return self.domains[name]

    def approve_transfer(self, name: str) -> None:
        domain = self.domains[name]
        assert domain.transfer_to is not None and domain.transfer_status == "pending"
        domain.owner, domain.status, domain.transfer_status = domain.transfer_to, "ok", "clientApproved"

    def fail_next(self, kind: str, code: int, times: int = 1, msg: str | None = None) -> None:
        """Answer `code` (without doing anything) to the next `times` commands of `kind`."""
        self._add(kind, times, _Fault("code", code=code, msg=msg))

    def drop_next(self, kind: str, times: int = 1, *, after: bool = False) -> None:
        """Close the connection instead of answering; with `after`, once the command is done."""
        self._add(kind, times, _Fault("drop", after=after))

    def stall_next(self, kind: str, times: int = 1) -> None:
        """Never answer the next `times` commands of `kind` (nor anything after on that connection)."""
        self._add(kind, times, _Fault("stall"))

    def _add(self, kind: str, times: int, fault: _Fault) -> None:
        self._faults.setdefault(kind, deque()).extend([fault] * times)

    # -- life -----------------------------------------------------------------------------

    async def start(self) -> SandboxEpp:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("%s: EPP over TLS on %s:%s", BANNER, self.host, self.port)
        return self

    async def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):  # ends their reads; stalled ones see _closing
            writer.transport.abort()
        # Not cancelled: Python 3.11's start_server logs a cancelled handler as an error.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> SandboxEpp:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- one connection -------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        session: dict[str, str | None] = {"client": None}
        try:
            fault = self._take("greeting")
            await self._apply_before(fault, writer)
            if fault is not None and fault.action == "code":  # a response instead of a greeting
                writer.write(_frame(self._response(_Response(fault.code), None, fault.msg)))
                await writer.drain()
                raise _Closed
            writer.write(_frame(self._greeting()))
            await writer.drain()
            if fault is not None:  # drop_next("greeting", after=True): greet, then hang up
                writer.transport.abort()
                raise _Closed
            while True:
                header = await reader.readexactly(4)
                data = await reader.readexactly(int.from_bytes(header, "big") - 4)
                await self._answer(data, session, writer)
        except (_Closed, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)
            self._writers.discard(writer)

    async def _apply_before(self, fault: _Fault | None, writer: asyncio.StreamWriter) -> None:
        if fault is None:
            return
        if fault.action == "stall":
            await self._closing.wait()
            raise _Closed
        if fault.action == "drop" and not fault.after:
            writer.transport.abort()
            raise _Closed

    async def _answer(self, data: bytes, session: dict[str, str | None],
                      writer: asyncio.StreamWriter) -> None:
        try:
            root = ET.fromstring(data)
        except ET.ParseError:
            root = None
        command = root.find("epp:command", NS) if root is not None else None
        if root is not None and root.find("epp:hello", NS) is not None:
            self.calls["hello"] += 1
            writer.write(_frame(self._greeting()))
            await writer.drain()
            return
        if command is None:
            writer.write(_frame(self._response(_Response(2001), None)))
            await writer.drain()
            return
        kind, element = _kind(command)
        cltrid = command.findtext("epp:clTRID", namespaces=NS)
        self.calls[kind] += 1
        self.received.append(Received(kind, cltrid, command))
        fault = self._take(kind)
        await self._apply_before(fault, writer)
        if fault is not None and fault.action == "code":
            response = _Response(fault.code)
            msg = fault.msg
        else:
            response = self._execute(kind, command, element, session)
            msg = None
        if fault is not None and fault.action == "drop":  # after: the command took effect
            writer.transport.abort()
            raise _Closed
        writer.write(_frame(self._response(response, cltrid, msg)))
        await writer.drain()
        if response.code == 1500 or response.code >= 2500:
            raise _Closed

    def _take(self, kind: str) -> _Fault | None:
        queue = self._faults.get(kind)
        return queue.popleft() if queue else None

    # -- commands -------------------------------------------------------------------------

    def _execute(self, kind: str, command: ET.Element, element: ET.Element | None,
                 session: dict[str, str | None]) -> _Response:
        client = session["client"]
        if kind == "login":
            return self._login(command, session)
        if client is None:
            return _Response(2002, ext_value=self._reason("not logged in"))
        if kind == "logout":
            session["client"] = None
            return _Response(1500)
        if element is None:
            return _Response(2000)
        handler = {
            "domain:create": self._domain_create,
            "domain:info": self._domain_info,
            "domain:transfer": self._domain_transfer,
            "domain:renew": self._domain_renew,
        }.get(kind)
        if handler is None:
            return _Response(2000 if kind.startswith("domain:") else 2101)
        return handler(command, element, client)

    def _login(self, command: ET.Element, session: dict[str, str | None]) -> _Response:
        if session["client"] is not None:
            return _Response(2002, ext_value=self._reason("already logged in"))
        login = command.find("epp:login", NS)
        clid = login.findtext("epp:clID", default="", namespaces=NS) if login is not None else ""
        pw = login.findtext("epp:pw", default="", namespaces=NS) if login is not None else ""
        if not clid or not pw:
            return _Response(2003)
        if self.clients.get(clid) != pw:
            said = f": {pw}" if self.reason_echoes_values else ""
            return _Response(2200, ext_value=self._reason(f"wrong client id or password{said}",
                                                          f"<pw>{escape(pw)}</pw>"))
        session["client"] = clid
        return _Response(1000)

    def _domain_create(self, command: ET.Element, create: ET.Element, client: str) -> _Response:
        name = (create.findtext("domain:name", default="", namespaces=NS)).strip()
        pw = create.findtext("domain:authInfo/domain:pw", namespaces=NS)
        registrant = create.findtext("domain:registrant", namespaces=NS)
        period = create.find("domain:period", NS)
        if not name or not pw or not registrant:
            return _Response(2003)
        years = 1
        if period is not None:
            if period.get("unit") not in ("y", "m") or not (period.text or "").strip().isdigit():
                return _Response(2005)
            years = int(period.text or "1") // (12 if period.get("unit") == "m" else 1)
            if not 1 <= years <= 10:
                return _Response(2004)
        contacts = {el.get("type", ""): el.text or "" for el in create.findall("domain:contact", NS)}
        for contact_id in (registrant, *contacts.values()):
            if contact_id not in self.contacts:
                return _Response(2303, ext_value=self._reason(f"contact {contact_id} does not exist"))
        if name in self.domains:
            return _Response(2302)
        if self.failures.should_fail(name):
            return _Response(2306, ext_value=self._reason(self.failures.reason(name)))
        pending = self.pending_create
        self.domains[name] = SandboxDomain(owner=client, auth_pw=pw, registrant=registrant,
                                        contacts=contacts, years=years,
                                        status="pendingCreate" if pending else "ok")
        log.info("%s: registered %s for %s (%d y)", BANNER, name, client, years)
        now = _now()
        self.domains[name].expires = now + timedelta(days=365 * years)
        return _Response(1001 if pending else 1000, res_data=(
            f'<domain:creData xmlns:domain="{DOMAIN}"><domain:name>{escape(name)}</domain:name>'
            f"<domain:crDate>{now.isoformat()}</domain:crDate>"
            f"<domain:exDate>{(now + timedelta(days=365 * years)).isoformat()}</domain:exDate>"
            f"</domain:creData>"))

    def _domain_info(self, command: ET.Element, info: ET.Element, client: str) -> _Response:
        name = (info.findtext("domain:name", default="", namespaces=NS)).strip()
        domain = self.domains.get(name)
        if domain is None:
            return _Response(2303)
        pw = info.findtext("domain:authInfo/domain:pw", namespaces=NS)
        full = domain.owner == client or (pw is not None and pw == domain.auth_pw)
        if not full and self.info_hides_foreign:
            return _Response(2201)
        parts = [f"<domain:name>{escape(name)}</domain:name>",
                 f"<domain:roid>{abs(hash(name)) % 10**8}_DOMAIN-SANDBOX</domain:roid>",
                 f'<domain:status s="{domain.status}"/>']
        if full:
            parts.append(f"<domain:registrant>{escape(domain.registrant or '')}</domain:registrant>")
        parts.append(f"<domain:clID>{escape(domain.owner)}</domain:clID>")
        if domain.expires is not None:
            parts.append(f"<domain:exDate>{domain.expires.isoformat()}</domain:exDate>")
        if full:
            parts.append(f"<domain:authInfo><domain:pw>{escape(domain.auth_pw)}</domain:pw>"
                         f"</domain:authInfo>")
        return _Response(1000, res_data=(
            f'<domain:infData xmlns:domain="{DOMAIN}">{"".join(parts)}</domain:infData>'))

    def _domain_transfer(self, command: ET.Element, transfer: ET.Element, client: str) -> _Response:
        op = command.find("epp:transfer", NS)
        op_name = op.get("op") if op is not None else None
        name = (transfer.findtext("domain:name", default="", namespaces=NS)).strip()
        pw = transfer.findtext("domain:authInfo/domain:pw", namespaces=NS)
        domain = self.domains.get(name)
        if op_name not in ("request", "query"):
            return _Response(2102 if op_name else 2003)
        if domain is None and op_name == "request" and self.foreign_unknown and name and pw:
            domain = self.add_domain(name, "other-registrar", auth_pw=pw)
        if domain is None:
            return _Response(2303)
        if op_name == "query":
            allowed = client in (domain.owner, domain.transfer_to) or pw == domain.auth_pw
            if not allowed:
                return _Response(2201)
            if domain.transfer_status is None:
                return _Response(2301)
            return _Response(1000, res_data=self._trn_data(name, domain))
        if domain.owner == client:
            return _Response(2106, ext_value=self._reason("the domain is already yours"))
        if domain.status == "pendingTransfer":
            return _Response(2300)
        if pw != domain.auth_pw:
            said = f": {pw}" if self.reason_echoes_values else ""
            return _Response(2202, ext_value=self._reason(f"wrong authInfo{said}"))
        if self.failures.should_fail(name):
            return _Response(2306, ext_value=self._reason(self.failures.reason(name)))
        log.info("%s: transfer of %s to %s requested", BANNER, name, client)
        losing = domain.owner
        domain.transfer_to = client
        if self.instant_transfer:
            domain.owner, domain.transfer_status = client, "serverApproved"
        else:
            domain.status, domain.transfer_status = "pendingTransfer", "pending"
        return _Response(1000 if self.instant_transfer else 1001,
                         res_data=self._trn_data(name, domain, losing))

    def _domain_renew(self, command: ET.Element, renew: ET.Element, client: str) -> _Response:
        """RFC 5731 renew: the sponsor only, naming the current expiry date (a guard against
        renewing twice); the period is added to it."""
        name = (renew.findtext("domain:name", default="", namespaces=NS)).strip()
        current = (renew.findtext("domain:curExpDate", default="", namespaces=NS)).strip()
        period = renew.find("domain:period", NS)
        domain = self.domains.get(name)
        if not name or not current:
            return _Response(2003)
        if domain is None:
            return _Response(2303)
        if domain.owner != client:
            return _Response(2201)
        years = 1
        if period is not None:
            if period.get("unit") not in ("y", "m") or not (period.text or "").strip().isdigit():
                return _Response(2005)
            years = int(period.text or "1") // (12 if period.get("unit") == "m" else 1)
        expires = domain.expires or _now() + timedelta(days=365 * (domain.years or 1))
        if current != expires.date().isoformat():
            return _Response(2004, ext_value=self._reason(
                f"curExpDate is {expires.date().isoformat()}"))
        if not 1 <= years <= 10 or expires + timedelta(days=365 * years) > _now() + timedelta(
                days=365 * 10 + 3):
            return _Response(2004)
        domain.expires = expires + timedelta(days=365 * years)
        log.info("%s: renewed %s for %d y", BANNER, name, years)
        return _Response(1000, res_data=(
            f'<domain:renData xmlns:domain="{DOMAIN}"><domain:name>{escape(name)}</domain:name>'
            f"<domain:exDate>{domain.expires.isoformat()}</domain:exDate></domain:renData>"))

    def _trn_data(self, name: str, domain: SandboxDomain, losing: str | None = None) -> str:
        now = _now().isoformat()
        acting = losing or (domain.owner if domain.transfer_status == "pending" else "")
        return (f'<domain:trnData xmlns:domain="{DOMAIN}"><domain:name>{escape(name)}</domain:name>'
                f"<domain:trStatus>{domain.transfer_status}</domain:trStatus>"
                f"<domain:reID>{escape(domain.transfer_to or '')}</domain:reID>"
                f"<domain:reDate>{now}</domain:reDate><domain:acID>{escape(acting)}</domain:acID>"
                f"<domain:acDate>{now}</domain:acDate></domain:trnData>")

    # -- XML ------------------------------------------------------------------------------

    def _reason(self, text: str, value: str = "<undef/>") -> str:
        """An <extValue>'s content (RFC 5730): the offending element, then why."""
        return f'<value>{value}</value><reason lang="en">{escape(text)}</reason>'

    def _greeting(self) -> str:
        return (f'<?xml version="1.0" encoding="UTF-8" standalone="no"?><epp xmlns="{EPP}"><greeting>'
                f"<svID>{escape(BANNER)}</svID><svDate>{_now().isoformat()}</svDate>"
                f"<svcMenu><version>1.0</version><lang>en</lang><objURI>{DOMAIN}</objURI>"
                f"<objURI>{CONTACT}</objURI></svcMenu>"
                f"<dcp><access><all/></access><statement><purpose><admin/><prov/></purpose>"
                f"<recipient><ours/><public/></recipient><retention><stated/></retention>"
                f"</statement></dcp></greeting></epp>")

    def _response(self, response: _Response, cltrid: str | None, msg: str | None = None) -> str:
        self._svtrid += 1
        text = msg or MESSAGES.get(response.code, "Command failed")
        ext = f"<extValue>{response.ext_value}</extValue>" if response.ext_value else ""
        res_data = f"<resData>{response.res_data}</resData>" if response.res_data else ""
        if cltrid and self.mangle_cltrid:
            cltrid = f"other-{cltrid}"
        trid = (f"<clTRID>{escape(cltrid)}</clTRID>" if cltrid else "") + \
            f"<svTRID>SANDBOX-{self._svtrid}</svTRID>"
        return (f'<?xml version="1.0" encoding="UTF-8" standalone="no"?><epp xmlns="{EPP}">'
                f'<response><result code="{response.code}"><msg>{escape(text)}</msg>{ext}</result>'
                f"{res_data}<trID>{trid}</trID></response></epp>")


def _kind(command: ET.Element) -> tuple[str, ET.Element | None]:
    """("login", None), ("logout", None) or ("domain:create", <domain:create>)."""
    for child in command:
        verb = child.tag.rpartition("}")[2]
        if verb in ("clTRID", "extension"):
            continue
        if verb in ("login", "logout"):
            return verb, None
        element = next(iter(child), None)
        if element is None:
            return verb, None
        namespace, _, _ = element.tag[1:].partition("}")
        return f"{OBJECTS.get(namespace, namespace)}:{verb}", element
    return "unknown", None
