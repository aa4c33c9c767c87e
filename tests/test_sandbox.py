"""`ordermill sandbox`: the WHM and EPP sandboxes as the demo runs them, reached through
Ordermill's own cPanel module and EPP registrar, built from the settings it prints; their
deliberate failures; and production settings that never point at a sandbox."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from test_provisioning_servers import place_and_pay, service, start

from conftest import ROOT, Harness, eventually
from sandbox.failures import MARKER, DeliberateFailures
from sandbox.whm import SandboxWhm
from services.provisioning.modules.base import Account
from services.provisioning.providers import Providers
from services.provisioning.registrars.base import DomainRequest, Registrant
from shared.orders import transition
from shared.settings import Settings

ORDERMILL = str(Path(sys.executable).with_name("ordermill"))
SANDBOX_SETTINGS = ("WHM_SCHEME", "WHM_TOKEN_SANDBOX", "EPP_HOST", "EPP_PORT", "EPP_CLIENT_ID",
                    "EPP_PASSWORD", "EPP_REGISTRANT_ID", "EPP_CAFILE")


@dataclass
class Running:
    process: subprocess.Popen[str]
    printed: str
    env: dict[str, str]  # the env file: the settings that point Ordermill at the sandbox
    whm_hostname: str  # the catalog server's hostname (host:port)

    def server(self) -> dict[str, Any]:
        """The catalog's server row, as the provisioning worker reads it."""
        return {"id": 1, "name": "sandbox-web1", "hostname": self.whm_hostname,
                "username": "root", "token_env": "WHM_TOKEN_SANDBOX"}


def _launch(state_dir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [ORDERMILL, "sandbox", "--whm-port", "0", "--epp-port", "0", "--state-dir",
         str(state_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


def _started(process: subprocess.Popen[str]) -> Running:
    """Read what it prints up to "Ctrl-C stops it." (printed once both listen)."""
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C stops it."):
            break
    printed = "".join(lines)
    assert printed.endswith("Ctrl-C stops it.\n"), (printed, process.stderr and process.stderr.read())
    env_file = re.search(r"\. (\S+/env); set \+a", printed)
    hostname = re.search(r'hostname = "([^"]+)"', printed)
    assert env_file and hostname, printed
    env = dict(line.split("=", 1) for line in Path(env_file[1]).read_text().splitlines())
    return Running(process, printed, env, hostname[1])


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=15)
    return err


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    process = _launch(tmp_path_factory.mktemp("sandbox-state"), "--fail-rate", "0")
    try:
        yield _started(process)
    finally:
        _stop(process)


def _providers(running: Running, monkeypatch: pytest.MonkeyPatch) -> Providers:
    """Providers built as the provisioning worker builds them: from the settings."""
    for name in SANDBOX_SETTINGS:
        monkeypatch.setenv(name, running.env[name])
    return Providers(Settings().providers, environ=running.env)


ANN = Registrant(first_name="Ann", last_name="Lee", email="ann@lee.example", country="GB")


def domain(domain_id: int, name: str, *, years: int = 1, epp_code: str | None = None) -> DomainRequest:
    return DomainRequest(domain_id=domain_id, domain=name, years=years, registrant=ANN,
                         epp_code=epp_code)


def account(domain: str, username: str) -> Account:
    return Account(service_id=1, username=username, domain=domain, plan="default",
                   contact_email=f"owner@{domain}", password="Pw-0123456789abc")


async def _whm(running: Running, function: str, **params: str) -> tuple[dict[str, Any], str]:
    """A raw WHM API 1 call, as any WHM client makes it: the answer and the sandbox header."""
    async with aiohttp.ClientSession(headers={
            "Authorization": f"whm root:{running.env['WHM_TOKEN_SANDBOX']}"}) as session:
        url = f"http://{running.whm_hostname}/json-api/{function}"
        async with session.get(url, params={"api.version": "1", **params}) as response:
            return await response.json(), response.headers.get("X-Ordermill-Sandbox", "")


async def _listed(running: Running) -> dict[str, dict[str, Any]]:
    body, _ = await _whm(running, "listaccts")
    return {a["user"]: a for a in body["data"]["acct"]}


def test_it_prints_the_settings_without_its_secrets(sandbox: Running) -> None:
    assert "never for production" in sandbox.printed
    assert sorted(sandbox.env) == sorted(SANDBOX_SETTINGS)
    for secret in ("WHM_TOKEN_SANDBOX", "EPP_PASSWORD"):
        assert sandbox.env[secret] not in sandbox.printed
    assert f"EPP_CAFILE={sandbox.env['EPP_CAFILE']}" in sandbox.printed
    state = Path(sandbox.env["EPP_CAFILE"]).parent
    for private in ("env", "logins.json", "ca-key.pem"):
        assert (state / private).stat().st_mode & 0o077 == 0, private


async def test_an_account_s_life_on_the_sandbox_whm_through_the_cpanel_module(
    sandbox: Running, monkeypatch: pytest.MonkeyPatch,
) -> None:
    providers = _providers(sandbox, monkeypatch)
    module = providers.module("cpanel", sandbox.server())  # type: ignore[arg-type]
    life = account("lifecycle.example", "lifecyc1")
    try:
        created = await module.create(life)
        assert created.ok and created.detail["adopted"] is False, created
        listed = await _listed(sandbox)
        assert listed["lifecyc1"]["domain"] == "lifecycle.example"
        assert listed["lifecyc1"]["suspended"] == 0

        assert (await module.suspend(life, "Overdue invoice 7")).ok
        listed = await _listed(sandbox)
        assert (listed["lifecyc1"]["suspended"], listed["lifecyc1"]["suspendreason"]) == (
            1, "Overdue invoice 7")
        assert (await module.unsuspend(life)).ok
        assert (await module.suspend(life, "Cancelled")).ok

        terminated = await module.terminate(life)
        assert terminated.ok and terminated.detail["absent"] is False
        assert "lifecyc1" not in await _listed(sandbox)  # a removed account is gone
        summary, header = await _whm(sandbox, "accountsummary", user="lifecyc1")
        assert summary["metadata"]["result"] == 0
        assert "never for production" in header
        # Terminating again converges, as on WHM: the account is absent.
        again = await module.terminate(life)
        assert again.ok and again.detail["absent"] is True
    finally:
        await providers.close()


async def test_a_domain_registered_and_transferred_through_the_epp_registrar(
    sandbox: Running, monkeypatch: pytest.MonkeyPatch,
) -> None:
    providers = _providers(sandbox, monkeypatch)
    registrar = providers.registrar("epp")
    try:
        registered = await registrar.register(domain(1, "sandboxed.com", years=2))
        assert registered.ok and registered.status == "Active", registered
        assert registered.detail["expires"]
        # Again (a lost answer's retry): the registry has it, ours: adopted.
        again = await registrar.register(domain(1, "sandboxed.com"))
        assert again.ok and again.detail["adopted"] is True
        moved = await registrar.transfer(domain(2, "elsewhere.net", epp_code="Code-1234!"))
        assert moved.ok and moved.status == "Active", moved
    finally:
        await providers.close()


async def test_a_name_chosen_to_fail_fails_definitively_once_then_succeeds_on_retry(
    sandbox: Running, monkeypatch: pytest.MonkeyPatch,
) -> None:
    providers = _providers(sandbox, monkeypatch)
    module = providers.module("cpanel", sandbox.server())  # type: ignore[arg-type]
    registrar = providers.registrar("epp")
    chosen = account(f"{MARKER}-host.example", "sbxfail1")
    try:
        first = await module.create(chosen)
        assert not first.ok and not first.transient  # parks at once, as a refusal does
        assert "failed on purpose" in (first.error or "")
        assert "sbxfail1" not in await _listed(sandbox)
        retried = await module.create(chosen)
        assert retried.ok and "sbxfail1" in await _listed(sandbox)

        request = domain(3, f"{MARKER}-name.com")
        failed = await registrar.register(request)
        assert not failed.ok and not failed.transient and "failed on purpose" in (failed.error or "")
        assert (await registrar.register(request)).ok
    finally:
        await providers.close()


async def test_with_fail_times_0_names_fail_until_sigusr1_fixes_the_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    running = _started(_launch(tmp_path, "--fail-times", "0"))
    providers = _providers(running, monkeypatch)
    module = providers.module("cpanel", running.server())  # type: ignore[arg-type]
    chosen = account(f"{MARKER}-broken.example", "sbxbroke")
    try:
        for _ in range(3):
            result = await module.create(chosen)
            assert not result.ok and "SIGUSR1" in (result.error or "")
        running.process.send_signal(signal.SIGUSR1)

        async def created() -> bool:
            return (await module.create(chosen)).ok
        assert await eventually(created)
    finally:
        await providers.close()
        _stop(running.process)


def test_a_taken_port_is_refused_in_one_line(sandbox: Running, tmp_path: Path) -> None:
    port = sandbox.whm_hostname.rpartition(":")[2]
    second = subprocess.run(
        [ORDERMILL, "sandbox", "--whm-port", port, "--epp-port", "0", "--state-dir",
         str(tmp_path)], capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"error: the WHM sandbox cannot listen on 127.0.0.1:{port}: the port is in use"
        " (another sandbox? choose others with --whm-port/--epp-port)"]
    assert not (tmp_path / "env").exists()


def test_the_state_survives_a_restart(tmp_path: Path) -> None:
    """Workers trusting the CA and holding the logins keep working after a restart."""
    first = _started(_launch(tmp_path))
    _stop(first.process)
    assert not (tmp_path / "env").exists()  # gone: nobody mistakes it for a running sandbox
    second = _started(_launch(tmp_path))
    try:
        assert {k: v for k, v in second.env.items() if k != "EPP_PORT"} == {
            k: v for k, v in first.env.items() if k != "EPP_PORT"}
    finally:
        _stop(second.process)


def test_deliberate_failures_are_chosen_by_name_deterministically() -> None:
    names = [f"client{n}.com" for n in range(2000)]
    chosen = [n for n in names if DeliberateFailures(0.1).chosen(n)]
    assert 150 < len(chosen) < 250  # about the rate
    assert chosen == [n for n in names if DeliberateFailures(0.1).chosen(n)]  # the same each run
    assert not any(DeliberateFailures(0.0).chosen(n) for n in names)
    assert DeliberateFailures(0.0).chosen(f"x{MARKER}y.com")


def test_production_settings_never_point_at_a_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("EPP_", "WHM_")):
            monkeypatch.delenv(name)
    providers = Settings().providers
    assert providers.whm.scheme is None  # https, the module's default
    assert (providers.epp.host, providers.epp.cafile, providers.epp.client_id) == (None, None, None)
    # The sample catalog (the one the image ships and compose loads) names real-looking servers.
    for server in tomllib.loads((ROOT / "catalog.example.toml").read_text())["servers"]:
        assert not re.match(r"(127\.|localhost|\[?::1)", server["hostname"]), server
        assert server["token_env"] != "WHM_TOKEN_SANDBOX"
    assert "catalog.sandbox.toml" not in (ROOT / "Dockerfile").read_text()
    # Compose's workers get no sandbox address unless the host's environment says so.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["x-ordermill-env"] if "x-ordermill-env" in compose else {}
    for service_name, spec in compose["services"].items():
        values = {**env, **(spec.get("environment") or {})}
        for key in ("EPP_HOST", "EPP_CAFILE", "WHM_SCHEME"):
            assert "sandbox" not in str(values.get(key, "")).split(":-")[-1], (service_name, key)
    assert "sandbox" not in (ROOT / "docker-compose.prod.yml").read_text()


async def test_a_setup_parked_on_purpose_completes_on_retry_and_a_cancel_removes_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The demo's story through the workers: parked by the sandbox, retried by the operator,
    created; then the order is cancelled and the account is gone from the sandbox WHM."""
    async with SandboxWhm(failures=DeliberateFailures(0.0, times=1)) as whm:
        await harness.pool.execute(
            "UPDATE servers SET hostname = $1, token_env = 'WHM_TOKEN_SANDBOX' WHERE name = 'web1'",
            f"127.0.0.1:{whm.port}")
        monkeypatch.setenv("WHM_TOKEN_SANDBOX", whm.token)
        from test_provisioning import FAST_JOBS
        harness.settings = harness.settings.model_copy(update={**FAST_JOBS, "whm_scheme": "http"})
        failed = await harness.listen("service.failed")
        await start(harness)
        ref = f"{MARKER}-demo"
        order = await place_and_pay(harness, ref)
        parked = await failed.wait_for("service.failed", lambda b: b["order_ref"] == ref)
        assert "failed on purpose" in parked["detail"]["error"]
        row = await service(harness, order["id"])
        assert (row["job_status"], row["attempts"]) == ("parked", 1)
        assert whm.accounts == {}

        await harness.publish("order.retry", {"order_id": order["id"], "order_ref": ref})

        async def active() -> dict[str, Any] | None:
            row = await service(harness, order["id"])
            return row if row["status"] == "Active" and row["live"] else None
        row = await eventually(active)
        assert whm.accounts[row["username"]]["domain"] == f"{ref}.example"

        async with harness.pool.acquire() as conn, conn.transaction():
            locked = await conn.fetchrow("SELECT * FROM orders WHERE id = $1 FOR UPDATE",
                                         order["id"])
            await transition(conn, locked, "Cancelled", actor="alice", action="cancel")
        await harness.publish("order.cancelled", {"order_id": order["id"], "order_ref": ref})

        async def terminated() -> dict[str, Any] | None:
            row = await service(harness, order["id"])
            return row if row["terminated_at"] is not None else None
        await eventually(terminated, timeout=30)
        assert whm.accounts == {} and whm.calls["removeacct"] == 1


def test_the_demo_summary_names_the_setups_parked_on_purpose_and_how_to_retry() -> None:
    from rich.console import Console

    from cli.demo import Tally, _summary

    tally = Tally(published={"r1": 0.0, "r2": 0.0, "r3": 0.0})
    tally.record("service.created", {"order_ref": "r1", "order_id": 11, "service_id": 1})
    on_purpose = DeliberateFailures(0.0).reason("x.com")
    tally.record("service.failed", {"order_ref": "r2", "order_id": 12, "service_id": 2,
                                    "detail": {"error": f"cPanel h: createacct: {on_purpose}"}})
    tally.record("domain.failed", {"order_ref": "r3", "order_id": 13, "domain_id": 3,
                                   "detail": {"error": "[bold]no route[/bold]"}})
    tally.cancelled = [11]
    console = Console(record=True, width=200)
    _summary(console, tally, 3, 1.0)
    text = console.export_text()
    assert "1 hosting accounts created, 0 domains registered, 0 accounts terminated after 1" in text
    assert ("1 setup(s) parked on purpose by the sandbox, in orders 12: see them with `ordermill "
            "failures`, run them again with `ordermill retry 12`") in text
    assert "1 setup(s) parked: [bold]no route[/bold]" in text  # a server's words, not markup
