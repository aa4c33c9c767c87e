"""The cPanel server module against a fake WHM server (no RabbitMQ or PostgreSQL needed)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
from fakes.whm import FakeWhm, absent_reason

from services.provisioning.modules.autorelease import AutoreleaseModule
from services.provisioning.modules.base import Account, ModuleResult
from services.provisioning.modules.cpanel import CpanelModule

ACCOUNT = Account(service_id=7, username="annlee7", domain="annlee.example", plan="starter",
                  contact_email="ann@lee.example", password="Pa55-w0rd-not-in-logs")


@pytest.fixture
async def whm() -> AsyncIterator[FakeWhm]:
    async with FakeWhm() as server:
        yield server


@pytest.fixture
async def cpanel(whm: FakeWhm) -> AsyncIterator[CpanelModule]:
    module = CpanelModule(**whm.module_kwargs, timeout=2.0, long_timeout=2.0)
    yield module
    await module.close()


def assert_no_secrets(*texts: object, token: str) -> None:
    for text in texts:
        assert token not in str(text)
        assert ACCOUNT.password not in str(text)


async def test_create_calls_createacct_once_with_the_account(
    whm: FakeWhm, cpanel: CpanelModule
) -> None:
    result = await cpanel.create(ACCOUNT)

    assert result == ModuleResult.success(adopted=False, ip=whm.ip, package="starter")
    assert [r.function for r in whm.requests] == ["accountsummary", "createacct"]
    assert all(r.authorized for r in whm.requests)
    summary, create = whm.requests
    assert summary.params == {"api.version": "1", "user": "annlee7"}
    assert create.method == "POST"  # the password stays out of URLs and access logs
    assert create.params == {"api.version": "1", "username": "annlee7", "domain": "annlee.example",
                             "plan": "starter", "contactemail": "ann@lee.example",
                             "password": ACCOUNT.password}
    assert whm.accounts["annlee7"]["domain"] == "annlee.example"
    assert whm.accounts["annlee7"]["email"] == "ann@lee.example"
    assert whm.accounts["annlee7"]["plan"] == "starter"


async def test_create_without_password_sends_none(whm: FakeWhm, cpanel: CpanelModule) -> None:
    result = await cpanel.create(replace(ACCOUNT, password=None))
    assert result.ok
    assert "password" not in whm.calls_of("createacct")[0].params


async def test_create_retried_after_the_server_created_but_dropped_the_answer_adopts(
    whm: FakeWhm, cpanel: CpanelModule
) -> None:
    whm.drop_next("createacct")

    first = await cpanel.create(ACCOUNT)
    assert not first.ok and first.transient
    assert "annlee7" in whm.accounts  # the server did create it

    second = await cpanel.create(ACCOUNT)
    assert second.ok
    assert second.detail["adopted"] is True
    assert second.detail["ip"] == whm.ip
    assert whm.calls["createacct"] == 1
    assert len(whm.accounts) == 1


async def test_create_adopts_an_account_of_ours_whatever_the_case(
    whm: FakeWhm, cpanel: CpanelModule
) -> None:
    whm.add_account("annlee7", "AnnLee.example", "Ann@Lee.example", "starter", suspended=True)
    result = await cpanel.create(ACCOUNT)
    assert result == ModuleResult.success(adopted=True, ip=whm.ip, package="starter", suspended=True)
    assert whm.calls["createacct"] == 0


@pytest.mark.parametrize(("domain", "email"), [
    ("someone-else.example", "ann@lee.example"),
    ("annlee.example", "bob@elsewhere.example"),
])
async def test_create_refuses_an_existing_account_that_is_not_ours(
    whm: FakeWhm, cpanel: CpanelModule, domain: str, email: str
) -> None:
    whm.add_account("annlee7", domain, email, "gold")

    result = await cpanel.create(ACCOUNT)

    assert not result.ok and not result.transient
    assert result.error is not None
    assert "'annlee7' already exists" in result.error and "not ours" in result.error
    assert whm.calls["createacct"] == 0
    assert whm.accounts["annlee7"]["domain"] == domain  # untouched


async def test_create_race_already_exists_rechecks_and_adopts(
    whm: FakeWhm, cpanel: CpanelModule
) -> None:
    # Another attempt created it between our look and our createacct: WHM says it exists.
    whm.add_account("annlee7", "annlee.example", "ann@lee.example", "starter")
    whm.reject_next("accountsummary", absent_reason("annlee7"))

    result = await cpanel.create(ACCOUNT)

    assert result.ok and result.detail["adopted"] is True
    assert whm.calls["createacct"] == 1
    assert whm.calls["accountsummary"] == 2


async def test_create_race_with_a_foreign_account_is_refused(
    whm: FakeWhm, cpanel: CpanelModule
) -> None:
    whm.add_account("annlee7", "other.example", "ann@lee.example", "starter")
    whm.reject_next("accountsummary", absent_reason("annlee7"))

    result = await cpanel.create(ACCOUNT)

    assert not result.ok and not result.transient
    assert result.error is not None and "not ours" in result.error


@pytest.mark.parametrize("function", ["accountsummary", "createacct"])
@pytest.mark.parametrize("status", [500, 502, 503])
async def test_http_5xx_is_transient(
    whm: FakeWhm, cpanel: CpanelModule, function: str, status: int
) -> None:
    whm.fail_next(function, status=status)

    result = await cpanel.create(ACCOUNT)

    assert not result.ok and result.transient
    assert result.error is not None and f"HTTP {status}" in result.error
    assert whm.calls[function] == 1
    assert (await cpanel.create(ACCOUNT)).ok  # the next attempt goes through


async def test_timeout_is_transient_and_bounded(whm: FakeWhm) -> None:
    module = CpanelModule(**whm.module_kwargs, timeout=0.2)
    whm.hang_next("accountsummary", 5.0)
    try:
        started = time.monotonic()
        result = await module.create(ACCOUNT)
        elapsed = time.monotonic() - started
    finally:
        await module.close()

    assert not result.ok and result.transient
    assert result.error is not None and "no answer within 0.2 s" in result.error
    assert elapsed < 2.0
    assert whm.calls["createacct"] == 0


async def test_slow_createacct_uses_the_long_timeout_then_adopts(whm: FakeWhm) -> None:
    module = CpanelModule(**whm.module_kwargs, timeout=5.0, long_timeout=0.2)
    whm.hang_next("createacct", 0.6)  # the server still creates it after we gave up
    try:
        first = await module.create(ACCOUNT)
        assert not first.ok and first.transient
        assert first.error is not None and "createacct: no answer within 0.2 s" in first.error
        await _until(lambda: "annlee7" in whm.accounts)
        second = await module.create(ACCOUNT)
    finally:
        await module.close()
    assert second.ok and second.detail["adopted"] is True
    assert whm.calls["createacct"] == 1


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    module = CpanelModule("127.0.0.1", "root", "T0KEN", port=port, scheme="http")
    try:
        result = await module.create(ACCOUNT)
    finally:
        await module.close()
    assert not result.ok and result.transient
    assert result.error is not None and "cannot connect" in result.error


async def test_invalid_json_on_a_5xx_is_transient(whm: FakeWhm, cpanel: CpanelModule) -> None:
    whm.fail_next("accountsummary", status=500)  # the fake answers an HTML page
    result = await cpanel.terminate(ACCOUNT)
    assert not result.ok and result.transient


@pytest.mark.parametrize(("status", "transient", "message"), [
    (200, True, "accountsummary: invalid JSON in the answer"),  # a proxy's page, a half answer
    (404, False, "accountsummary: unexpected HTTP 404"),
    (403, False, "accountsummary: authentication failed: HTTP 403"),
])
async def test_other_http_answers(
    whm: FakeWhm, cpanel: CpanelModule, status: int, transient: bool, message: str
) -> None:
    whm.fail_next("accountsummary", status=status)  # the fake answers an HTML page
    result = await cpanel.create(ACCOUNT)
    assert not result.ok
    assert result.transient is transient
    assert result.error is not None and message in result.error
    assert whm.calls["createacct"] == 0


async def test_result_0_is_definitive_with_the_reason(whm: FakeWhm, cpanel: CpanelModule) -> None:
    whm.reject_next("createacct", "The package “starter” does not exist.")

    result = await cpanel.create(ACCOUNT)

    assert not result.ok and not result.transient
    assert result.error is not None and "The package “starter” does not exist." in result.error
    assert whm.accounts == {}


async def test_an_unknown_package_is_definitive(cpanel: CpanelModule, whm: FakeWhm) -> None:
    whm.plans = {"gold"}
    result = await cpanel.create(ACCOUNT)
    assert not result.ok and not result.transient
    assert result.error is not None and "package “starter”" in result.error


async def test_accountsummary_refusing_for_another_reason_creates_nothing(
    whm: FakeWhm, cpanel: CpanelModule
) -> None:
    whm.reject_next("accountsummary", "Permission denied: you do not have the “list-accts” privilege.")

    result = await cpanel.create(ACCOUNT)

    assert not result.ok and not result.transient
    assert result.error is not None and "Permission denied" in result.error
    assert whm.calls["createacct"] == 0


async def test_wrong_token_is_a_definitive_auth_failure_without_the_token(
    whm: FakeWhm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "WRONGTOKEN-9f8e7d6c5b4a"
    module = CpanelModule(**{**whm.module_kwargs, "token": wrong})
    try:
        results = [await module.create(ACCOUNT), await module.suspend(ACCOUNT, "unpaid"),
                   await module.terminate(ACCOUNT)]
    finally:
        await module.close()

    for result in results:
        assert not result.ok and not result.transient
        assert result.error is not None and "authentication failed: HTTP 401" in result.error
        assert_no_secrets(result, result.error, result.detail, token=wrong)
    assert_no_secrets(caplog.text, repr(module), token=wrong)
    assert whm.requests and not any(r.authorized for r in whm.requests)
    assert whm.accounts == {}


async def test_secrets_stay_out_of_logs_and_results(
    whm: FakeWhm, cpanel: CpanelModule, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    whm.reject_next("createacct", f"Weak password: {ACCOUNT.password}")  # a server echoing it
    failed = await cpanel.create(ACCOUNT)
    created = await cpanel.create(ACCOUNT)

    assert not failed.ok and failed.error is not None and "Weak password: ***" in failed.error
    assert created.ok
    assert_no_secrets(caplog.text, failed, created, repr(cpanel), token=whm.token)
    assert "annlee7" in caplog.text  # the log does say what happened


async def test_suspend_unsuspend_terminate(whm: FakeWhm, cpanel: CpanelModule) -> None:
    assert (await cpanel.create(ACCOUNT)).ok

    assert await cpanel.suspend(ACCOUNT, "Overdue invoice 17") == ModuleResult.success()
    assert whm.accounts["annlee7"]["suspended"] == 1
    assert whm.accounts["annlee7"]["suspendreason"] == "Overdue invoice 17"
    assert whm.calls_of("suspendacct")[-1].params == {
        "api.version": "1", "user": "annlee7", "reason": "Overdue invoice 17"}

    assert await cpanel.unsuspend(ACCOUNT) == ModuleResult.success()
    assert whm.accounts["annlee7"]["suspended"] == 0
    assert whm.calls_of("unsuspendacct")[-1].params == {"api.version": "1", "user": "annlee7"}

    assert await cpanel.terminate(ACCOUNT) == ModuleResult.success(absent=False)
    assert "annlee7" not in whm.accounts
    assert whm.calls_of("removeacct")[-1].params == {"api.version": "1", "username": "annlee7"}


async def test_terminate_an_absent_account_succeeds(whm: FakeWhm, cpanel: CpanelModule) -> None:
    assert await cpanel.terminate(ACCOUNT) == ModuleResult.success(absent=True)
    assert whm.calls["removeacct"] == 0
    # ... and again: a retried termination converges
    assert (await cpanel.terminate(ACCOUNT)).ok


async def test_terminate_converges_when_the_account_vanished_meanwhile(
    whm: FakeWhm, cpanel: CpanelModule
) -> None:
    whm.add_account("annlee7", "annlee.example", "ann@lee.example")
    whm.reject_next("removeacct", absent_reason("annlee7"))
    assert await cpanel.terminate(ACCOUNT) == ModuleResult.success(absent=True)
    assert whm.calls["removeacct"] == 1


async def test_terminate_retried_after_a_dropped_answer(whm: FakeWhm, cpanel: CpanelModule) -> None:
    whm.add_account("annlee7", "annlee.example", "ann@lee.example")
    whm.drop_next("removeacct")
    first = await cpanel.terminate(ACCOUNT)
    # aiohttp itself resends a GET once when a reused connection drops: then the resent
    # removeacct finds the account gone, and that already counts as done.
    if first.ok:
        assert first.detail == {"absent": True}
        assert whm.calls["removeacct"] == 2
    else:
        assert first.transient
        assert await cpanel.terminate(ACCOUNT) == ModuleResult.success(absent=True)
    assert "annlee7" not in whm.accounts


async def test_terminate_never_removes_an_account_of_another_domain(
    whm: FakeWhm, cpanel: CpanelModule
) -> None:
    whm.add_account("annlee7", "someone-else.example", "ann@lee.example")

    result = await cpanel.terminate(ACCOUNT)

    assert not result.ok and not result.transient
    assert result.error is not None and "refusing to remove" in result.error
    assert "annlee7" in whm.accounts
    assert whm.calls["removeacct"] == 0


async def test_suspend_an_absent_account_is_definitive(whm: FakeWhm, cpanel: CpanelModule) -> None:
    result = await cpanel.suspend(ACCOUNT, "abuse")
    assert not result.ok and not result.transient
    assert result.error is not None and "does not exist" in result.error


async def test_close_closes_the_session_and_a_later_call_reopens_one(
    whm: FakeWhm, cpanel: CpanelModule
) -> None:
    assert (await cpanel.terminate(ACCOUNT)).ok
    session = cpanel._session
    assert session is not None and not session.closed
    await cpanel.close()
    assert session.closed
    await cpanel.close()  # twice is fine
    assert (await cpanel.terminate(ACCOUNT)).ok


async def test_fake_delay_slows_every_answer(whm: FakeWhm, cpanel: CpanelModule) -> None:
    whm.delay = 0.05
    started = time.monotonic()
    assert (await cpanel.terminate(ACCOUNT)).ok
    assert time.monotonic() - started >= 0.05


async def test_autorelease_always_succeeds() -> None:
    module = AutoreleaseModule()
    assert module.name == "autorelease"
    assert await module.create(ACCOUNT) == ModuleResult.success()
    assert await module.suspend(ACCOUNT, "x") == ModuleResult.success()
    assert await module.unsuspend(ACCOUNT) == ModuleResult.success()
    assert await module.terminate(ACCOUNT) == ModuleResult.success()
    await module.close()


async def _until(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.02)
