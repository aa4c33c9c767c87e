"""The EPP registrar against a fake EPP registry over real TLS, and the manual registrar.

No RabbitMQ or PostgreSQL: the certificates are made at test time with trustme.
"""

from __future__ import annotations

import logging
import socket
import ssl
import string
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from fakes.epp import FakeEppServer

from services.provisioning.registrars.base import DomainRequest, Registrant, RegistrarResult
from services.provisioning.registrars.epp import EppRegistrar, frame
from services.provisioning.registrars.manual import ManualRegistrar

CLIENT_ID = "ordermill"
PASSWORD = "Login-pw-7f3a!"
REGISTRANT = "OM-REG-1"
EPP_CODE = "Xfer-code-42!"
ANN = Registrant(first_name="Ann", last_name="Lee", email="ann@lee.example", country="GB")


def request(domain: str = "annlee.test", *, years: int = 2, epp_code: str | None = None,
            domain_id: int = 7) -> DomainRequest:
    return DomainRequest(domain_id=domain_id, domain=domain, years=years, registrant=ANN,
                         epp_code=epp_code)


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record with its extras (caplog.text has the messages only)."""
    return "\n".join(str(vars(record)) for record in caplog.records)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture
def cafile(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def server(server_ssl: ssl.SSLContext) -> AsyncIterator[FakeEppServer]:
    async with FakeEppServer(server_ssl, client_id=CLIENT_ID, password=PASSWORD) as srv:
        srv.add_contact(REGISTRANT, CLIENT_ID)
        yield srv


@pytest.fixture
def registrar(server: FakeEppServer, cafile: str) -> EppRegistrar:
    return EppRegistrar("127.0.0.1", server.port, client_id=CLIENT_ID, password=PASSWORD,
                        registrant_id=REGISTRANT, cafile=cafile, timeout=2.0)


def other(registrar: EppRegistrar, **changes: object) -> EppRegistrar:
    params: dict[str, object] = {
        "client_id": CLIENT_ID, "password": PASSWORD, "registrant_id": REGISTRANT,
        "ssl_context": registrar._ssl, "timeout": 2.0}
    params.update(changes)
    return EppRegistrar(registrar.host, registrar.port, **params)  # type: ignore[arg-type]


def test_a_frame_counts_its_own_four_byte_header() -> None:
    assert frame(b"<epp/>") == b"\x00\x00\x00\x0a<epp/>"


# -- register ----------------------------------------------------------------------------------

async def test_register_creates_the_domain_active(
    server: FakeEppServer, registrar: EppRegistrar, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    result = await registrar.register(request(years=2))

    assert result.ok and result.status == "Active", result
    assert result.detail["result_code"] == 1000
    assert result.detail["expires"]
    domain = server.domains["annlee.test"]
    assert (domain.owner, domain.registrant, domain.years) == (CLIENT_ID, REGISTRANT, 2)
    assert dict(server.calls) == {"login": 1, "domain:create": 1, "logout": 1}
    cltrids = [r.cltrid for r in server.received]
    assert all(cltrids) and len(set(cltrids)) == 3
    # The generated authInfo is strong and secret: neither returned nor logged.
    pw = domain.auth_pw
    assert len(pw) >= 12
    assert {bool(set(pw) & set(chars)) for chars in
            (string.ascii_lowercase, string.ascii_uppercase, string.digits)} == {True}
    assert "annlee.test" in logged(caplog)
    for secret in (pw, PASSWORD):
        assert secret not in repr(result) and secret not in logged(caplog)
    assert PASSWORD not in repr(registrar)


async def test_every_domain_gets_its_own_authinfo(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    assert (await registrar.register(request("one.test"))).ok
    assert (await registrar.register(request("two.test"))).ok
    assert server.domains["one.test"].auth_pw != server.domains["two.test"].auth_pw


async def test_register_pending_at_the_registry(server: FakeEppServer, registrar: EppRegistrar) -> None:
    server.pending_create = True
    result = await registrar.register(request())
    assert result == RegistrarResult.success("Pending Registration", **result.detail)
    assert result.detail["result_code"] == 1001
    assert server.domains["annlee.test"].status == "pendingCreate"


async def test_an_internationalised_name_is_sent_as_its_a_label(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    assert (await registrar.register(request("Bücher.test"))).status == "Active"
    assert list(server.domains) == ["xn--bcher-kva.test"]


async def test_a_domain_already_ours_is_adopted_not_created_again(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    server.add_domain("annlee.test", owner=CLIENT_ID)
    result = await registrar.register(request())
    assert result.ok and result.status == "Active"
    assert result.detail["adopted"] is True
    assert server.calls["domain:create"] == 1  # answered 2302
    assert server.calls["domain:info"] == 1
    assert len(server.domains) == 1


@pytest.mark.parametrize(("pending", "status"), [(False, "Active"), (True, "Pending Registration")])
async def test_a_retry_after_a_lost_answer_adopts_what_the_first_attempt_created(
    server: FakeEppServer, registrar: EppRegistrar, pending: bool, status: str,
) -> None:
    server.pending_create = pending
    server.drop_next("domain:create", after=True)
    first = await registrar.register(request())
    assert not first.ok and first.transient, first
    assert server.domains["annlee.test"].owner == CLIENT_ID  # it was created all the same

    second = await registrar.register(request())
    assert second.ok and second.status == status and second.detail["adopted"] is True
    assert server.calls["domain:create"] == 2
    assert len(server.domains) == 1


@pytest.mark.parametrize("info_hides_foreign", [False, True])
async def test_a_domain_registered_to_someone_else_is_a_definitive_failure(
    server: FakeEppServer, registrar: EppRegistrar, info_hides_foreign: bool,
) -> None:
    server.info_hides_foreign = info_hides_foreign  # 2201 instead of limited infData
    server.add_domain("annlee.test", owner="rival")
    result = await registrar.register(request())
    assert not result.ok and not result.transient
    assert result.error == "domain annlee.test is registered to someone else"
    assert server.domains["annlee.test"].owner == "rival"
    assert server.calls["domain:info"] == 1


@pytest.mark.parametrize("code", [2400, 2500, 2501, 2502])
async def test_a_server_side_failure_is_transient(
    server: FakeEppServer, registrar: EppRegistrar, code: int,
) -> None:
    server.fail_next("domain:create", code)
    result = await registrar.register(request())
    assert not result.ok and result.transient
    assert str(code) in (result.error or "")
    assert server.domains == {}
    assert (await registrar.register(request())).status == "Active"  # the next attempt works


@pytest.mark.parametrize(("code", "msg"), [(2306, "name is reserved"), (2104, "Billing failure"),
                                           (2004, "Parameter value range error")])
async def test_another_error_code_is_definitive_with_its_code_and_message(
    server: FakeEppServer, registrar: EppRegistrar, code: int, msg: str,
) -> None:
    server.fail_next("domain:create", code, msg=msg)
    result = await registrar.register(request())
    assert not result.ok and not result.transient
    assert result.error == f"registration of annlee.test failed: EPP {code} {msg}"


async def test_an_unknown_registrant_contact_is_definitive(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    result = await other(registrar, registrant_id="NO-SUCH").register(request())
    assert not result.ok and not result.transient
    assert "EPP 2303" in (result.error or "") and "NO-SUCH" in (result.error or "")


# -- the connection ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["greeting", "login", "domain:create"])
async def test_a_dropped_connection_is_transient(
    server: FakeEppServer, registrar: EppRegistrar, kind: str,
) -> None:
    server.drop_next(kind)
    result = await registrar.register(request())
    assert not result.ok and result.transient
    assert "closed the connection" in (result.error or "")
    assert server.domains == {}


@pytest.mark.parametrize("kind", ["greeting", "login", "domain:create"])
async def test_a_stalled_server_times_out_transient(
    server: FakeEppServer, registrar: EppRegistrar, kind: str,
) -> None:
    server.stall_next(kind)
    started = time.monotonic()
    result = await other(registrar, timeout=0.3).register(request())
    assert time.monotonic() - started < 2.0
    assert not result.ok and result.transient
    assert "did not answer within 0.3 s" in (result.error or "")


async def test_a_server_that_answers_instead_of_greeting_is_transient(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    server.fail_next("greeting", 2502)  # a full server may say so and close
    result = await registrar.register(request())
    assert not result.ok and result.transient
    assert result.error == ("EPP server did not start with a <greeting>: "
                            "EPP 2502 Session limit exceeded; server closing connection")
    assert server.calls["login"] == 0


async def test_an_answer_to_another_command_is_transient(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    server.mangle_cltrid = True
    result = await registrar.register(request())
    assert not result.ok and result.transient
    assert result.error == "EPP server answered login with another command's clTRID"


async def test_an_unreachable_server_is_transient(registrar: EppRegistrar) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the test connects
    result = await EppRegistrar("127.0.0.1", port, client_id=CLIENT_ID, password=PASSWORD,
                                registrant_id=REGISTRANT, ssl_context=registrar._ssl,
                                timeout=2.0).register(request())
    assert not result.ok and result.transient
    assert "unreachable" in (result.error or "")


async def test_an_untrusted_certificate_fails_the_handshake_transient(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)
    result = await other(registrar, ssl_context=stranger).register(request())
    assert not result.ok and result.transient
    assert "TLS" in (result.error or "")
    assert server.calls["login"] == 0


@pytest.mark.parametrize("code", [2200, 2501])
async def test_a_refused_login_is_definitive_and_never_shows_the_password(
    server: FakeEppServer, registrar: EppRegistrar, caplog: pytest.LogCaptureFixture, code: int,
) -> None:
    caplog.set_level(logging.DEBUG)
    server.reason_echoes_values = True  # the server's reason quotes the password it got
    wrong = "Wrong-pw-1234!"
    bad = other(registrar, password=wrong)
    if code != 2200:
        server.fail_next("login", code)
    result = await bad.register(request())
    assert not result.ok and not result.transient
    assert f"EPP {code}" in (result.error or "")
    assert result.error.startswith(f"EPP login as {CLIENT_ID} refused")  # type: ignore[union-attr]
    assert server.calls["login"] == 1 and server.calls["domain:create"] == 0
    assert "annlee.test" in logged(caplog)
    for secret in (wrong, PASSWORD):
        assert secret not in (result.error or "") and secret not in logged(caplog)


async def test_a_session_limit_at_login_is_transient(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    server.fail_next("login", 2502)
    result = await registrar.register(request())
    assert not result.ok and result.transient and "EPP 2502" in (result.error or "")


# -- transfer ----------------------------------------------------------------------------------

async def test_transfer_is_pending_until_the_losing_registrar_acts(
    server: FakeEppServer, registrar: EppRegistrar, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server.add_domain("annlee.test", owner="rival", auth_pw=EPP_CODE)
    result = await registrar.transfer(request(epp_code=EPP_CODE, years=1))
    assert result.ok and result.status == "Pending Transfer", result
    assert result.detail["result_code"] == 1001
    domain = server.domains["annlee.test"]
    assert (domain.owner, domain.transfer_to, domain.status) == ("rival", CLIENT_ID, "pendingTransfer")
    assert "annlee.test" in logged(caplog) and EPP_CODE not in logged(caplog)
    assert EPP_CODE not in repr(result)


async def test_transfer_approved_at_once_is_active(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    server.instant_transfer = True
    server.add_domain("annlee.test", owner="rival", auth_pw=EPP_CODE)
    result = await registrar.transfer(request(epp_code=EPP_CODE))
    assert result.ok and result.status == "Active"
    assert server.domains["annlee.test"].owner == CLIENT_ID


async def test_a_wrong_epp_code_is_refused_definitively_and_not_shown(
    server: FakeEppServer, registrar: EppRegistrar, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server.reason_echoes_values = True
    server.add_domain("annlee.test", owner="rival", auth_pw=EPP_CODE)
    wrong = "Not-the-code-9"
    result = await registrar.transfer(request(epp_code=wrong))
    assert not result.ok and not result.transient
    assert (result.error or "").startswith("transfer refused: EPP 2202 Invalid authorization")
    assert wrong not in (result.error or "") and wrong not in logged(caplog)
    assert server.domains["annlee.test"].transfer_to is None
    assert server.calls["domain:info"] == 0  # a refusal for the code needs no second look


async def test_an_authorization_error_is_refused_definitively(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    server.add_domain("annlee.test", owner="rival", auth_pw=EPP_CODE)
    server.fail_next("domain:transfer", 2201)
    result = await registrar.transfer(request(epp_code=EPP_CODE))
    assert not result.ok and not result.transient
    assert result.error == "transfer refused: EPP 2201 Authorization error"


async def test_a_retried_transfer_adopts_our_pending_request(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    server.add_domain("annlee.test", owner="rival", auth_pw=EPP_CODE)
    server.drop_next("domain:transfer", after=True)
    assert (await registrar.transfer(request(epp_code=EPP_CODE))).transient
    result = await registrar.transfer(request(epp_code=EPP_CODE))
    assert result.ok and result.status == "Pending Transfer" and result.detail["adopted"] is True
    assert server.calls["domain:transfer"] == 3  # request, request (2300), query


async def test_a_transfer_pending_for_someone_else_is_refused(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    domain = server.add_domain("annlee.test", owner="rival", auth_pw=EPP_CODE, status="pendingTransfer")
    domain.transfer_to, domain.transfer_status = "third-party", "pending"
    result = await registrar.transfer(request(epp_code=EPP_CODE))
    assert not result.ok and not result.transient
    assert result.error == "transfer refused: EPP 2300 Object pending transfer"


async def test_a_retried_transfer_of_a_domain_already_ours_is_adopted(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    server.instant_transfer = True
    server.add_domain("annlee.test", owner="rival", auth_pw=EPP_CODE)
    server.drop_next("domain:transfer", after=True)
    assert (await registrar.transfer(request(epp_code=EPP_CODE))).transient
    result = await registrar.transfer(request(epp_code=EPP_CODE))  # answered 2106
    assert result.ok and result.status == "Active" and result.detail["adopted"] is True


async def test_transfer_of_an_unknown_domain_is_refused(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    result = await registrar.transfer(request(epp_code=EPP_CODE))
    assert not result.ok and not result.transient
    assert result.error == "transfer refused: EPP 2303 Object does not exist"


async def test_transfer_without_an_epp_code_makes_no_call(
    server: FakeEppServer, registrar: EppRegistrar,
) -> None:
    result = await registrar.transfer(request(epp_code=None))
    assert not result.ok and not result.transient and "EPP code" in (result.error or "")
    assert server.connections == 0


# -- the manual registrar ----------------------------------------------------------------------

async def test_the_manual_registrar_leaves_the_work_to_an_operator(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    manual = ManualRegistrar()
    assert manual.name == "manual"
    assert await manual.register(request()) == RegistrarResult(
        True, status="Pending Registration", detail={"manual": True})
    assert await manual.transfer(request(epp_code=EPP_CODE)) == RegistrarResult(
        True, status="Pending Transfer", detail={"manual": True})
    assert "annlee.test" in logged(caplog) and EPP_CODE not in logged(caplog)
    await manual.close()
