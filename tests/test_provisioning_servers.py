"""Provisioning against servers that speak the real protocols: a WHM API 1 server and an
EPP registry, both local test servers that can fail on demand and count every call."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from fakes.epp import FakeEppServer
from fakes.whm import FakeWhm
from test_provisioning import FAST_JOBS, invoice_of, pay

from conftest import Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.worker import worker as provisioning_worker
from shared.orders import transition
from test_processes import spawn

EPP_CLIENT, EPP_PASSWORD, REGISTRANT = "ordermill", "epp-S3cret", "OM-REG-1"


@pytest.fixture
async def whm(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeWhm]:
    """The catalog's server web1 pointed at a local WHM; the token from the environment."""
    async with FakeWhm() as server:
        await harness.pool.execute(
            "UPDATE servers SET hostname = $1, token_env = 'WHM_TEST_TOKEN' WHERE name = 'web1'",
            f"127.0.0.1:{server.port}")
        monkeypatch.setenv("WHM_TEST_TOKEN", server.token)
        harness.settings = harness.settings.model_copy(update={**FAST_JOBS, "whm_scheme": "http"})
        yield server


def business(ref: str, **overrides: Any) -> dict[str, Any]:
    """A cPanel product, set up on payment, on a .example domain (manual registrar)."""
    return order_body(ref, items=[{"type": "product", "product": "business",
                                   "billing_cycle": "monthly", "domain": f"{ref}.example"}],
                      **overrides)


async def start(h: Harness) -> None:
    s = h.settings
    await h.start([placement_worker(s), fraud_worker(s), provisioning_worker(s)])


async def place_and_pay(h: Harness, ref: str, **overrides: Any) -> dict[str, Any]:
    await h.publish("order.place", business(ref, **overrides))
    order = await h.screened(ref)
    invoice = await invoice_of(h, order["id"])
    await pay(h, str(invoice["total"]), f"txn-{ref}", invoice_id=invoice["id"])
    return dict(order)


async def service(h: Harness, order_id: int) -> dict[str, Any]:
    return dict(await h.pool.fetchrow(
        "SELECT s.*, j.status AS job_status, j.attempts, j.last_error, j.detail FROM services s"
        " LEFT JOIN jobs j ON j.service_id = s.id AND j.kind = 'create'"
        " WHERE s.order_id = $1 ORDER BY j.id DESC LIMIT 1", order_id))


async def active(h: Harness, order_id: int) -> dict[str, Any] | None:
    row = await service(h, order_id)
    return row if row["status"] == "Active" and row["live"] else None


async def test_paid_cpanel_service_is_created_once_on_the_server(
    harness: Harness, whm: FakeWhm,
) -> None:
    store = await harness.listen("service.created")
    await start(harness)
    order = await place_and_pay(harness, "whm-1")
    row = await eventually(lambda: active(harness, order["id"]))
    assert whm.calls["createacct"] == 1
    account = whm.accounts[row["username"]]
    assert account["domain"] == "whm-1.example"
    assert account["email"] == "whm-1@shop.example"
    created = await store.wait_for("service.created", lambda b: b["order_ref"] == "whm-1")
    assert created["detail"]["adopted"] is False
    assert (await harness.order("whm-1"))["status"] == "Pending"
    # Reconciling again (any later event) creates nothing more.
    await harness.publish("order.screened", {"order_id": order["id"], "order_ref": "whm-1"})
    await harness.publish("order.place", order_body("after-whm-1"))
    await harness.screened("after-whm-1")
    assert whm.calls["createacct"] == 1


async def test_transient_server_failures_are_retried_until_it_works(
    harness: Harness, whm: FakeWhm,
) -> None:
    whm.fail_next("accountsummary", times=2, status=503)
    await start(harness)
    order = await place_and_pay(harness, "whm-flaky")
    row = await eventually(lambda: active(harness, order["id"]), timeout=30)
    assert (row["job_status"], row["attempts"]) == ("done", 3)
    assert whm.calls["createacct"] == 1


async def test_a_definitive_failure_is_parked_then_retried_by_order_retry(
    harness: Harness, whm: FakeWhm,
) -> None:
    store = await harness.listen("service.failed")
    whm.reject_next("createacct", "The package “business” does not exist.")
    await start(harness)
    order = await place_and_pay(harness, "whm-parked")
    failed = await store.wait_for("service.failed", lambda b: b["order_ref"] == "whm-parked")
    assert "does not exist" in failed["detail"]["error"]
    row = await service(harness, order["id"])
    assert (row["status"], row["job_status"], row["attempts"]) == ("Pending", "parked", 1)
    await harness.publish("order.retry", {"order_id": order["id"], "order_ref": "whm-parked"})
    await eventually(lambda: active(harness, order["id"]))
    assert whm.calls["createacct"] == 2


async def test_a_cancel_during_the_create_call_is_followed_by_a_termination(
    harness: Harness, whm: FakeWhm,
) -> None:
    whm.hang_next("createacct", 1.5)  # the server takes its time; the operator cancels meanwhile
    await start(harness)
    order = await place_and_pay(harness, "whm-race")
    await eventually(lambda: _called(whm, "createacct"))
    async with harness.pool.acquire() as conn, conn.transaction():
        locked = await conn.fetchrow("SELECT * FROM orders WHERE id = $1 FOR UPDATE", order["id"])
        await transition(conn, locked, "Cancelled", actor="alice", action="cancel")
    await harness.publish("order.cancelled", {"order_id": order["id"], "order_ref": "whm-race"})

    async def terminated() -> dict[str, Any] | None:
        row = await service(harness, order["id"])
        return row if row["terminated_at"] is not None else None
    row = await eventually(terminated, timeout=30)
    assert (row["status"], row["live"]) == ("Cancelled", False)
    assert whm.calls["removeacct"] == 1
    assert whm.accounts == {}


async def _called(whm: FakeWhm, function: str) -> bool:
    return whm.calls[function] > 0


async def test_marking_fraud_terminates_the_live_account(harness: Harness, whm: FakeWhm) -> None:
    await start(harness)
    order = await place_and_pay(harness, "whm-fraud")
    await eventually(lambda: active(harness, order["id"]))
    async with harness.pool.acquire() as conn, conn.transaction():
        locked = await conn.fetchrow("SELECT * FROM orders WHERE id = $1 FOR UPDATE", order["id"])
        await transition(conn, locked, "Fraud", actor="alice", action="fraud")
    await harness.publish("order.fraud", {"order_id": order["id"], "order_ref": "whm-fraud",
                                          "source": "operator"})

    async def gone() -> dict[str, Any] | None:
        # The server answers before the runner commits: wait for the commit too.
        row = await service(harness, order["id"])
        return row if whm.calls["removeacct"] == 1 and not whm.accounts and not row["live"] else None
    row = await eventually(gone, timeout=30)
    assert (row["status"], row["live"]) == ("Fraud", False)


async def test_worker_killed_between_the_servers_create_and_the_commit(
    harness: Harness, whm: FakeWhm, tmp_path: Path,
) -> None:
    whm.hang_after_next("createacct", 120)  # created on the server; the answer never comes
    log = tmp_path / "worker.log"
    env = {"WHM_SCHEME": "http", "WHM_TEST_TOKEN": whm.token, "JOB_LEASE_SECONDS": "3",
           "JOB_POLL_SECONDS": "0.5", "JOB_BACKOFF_SECONDS": "0.2"}
    process = await spawn(harness.settings, log, **env)
    try:
        order = await place_and_pay(harness, "whm-kill")

        async def created_on_server() -> bool:
            return bool(whm.accounts)
        await eventually(created_on_server, timeout=30)
        process.kill()  # between the server's create and our commit
        await process.wait()
        assert (await service(harness, order["id"]))["status"] == "Pending"
        process = await spawn(harness.settings, log, **env)
        row = await eventually(lambda: active(harness, order["id"]), timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()
    assert whm.calls["createacct"] == 1  # exactly once on the server
    assert row["detail"]["adopted"] is True  # the restarted worker found it and adopted it
    assert row["attempts"] == 2


@pytest.fixture
async def epp(harness: Harness, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeEppServer]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    async with FakeEppServer(server_ctx, client_id=EPP_CLIENT, password=EPP_PASSWORD) as server:
        server.add_contact(REGISTRANT, EPP_CLIENT)
        monkeypatch.setenv("EPP_PASSWORD", EPP_PASSWORD)
        harness.settings = harness.settings.model_copy(update={
            **FAST_JOBS, "epp_host": "127.0.0.1", "epp_port": server.port,
            "epp_client_id": EPP_CLIENT, "epp_registrant_id": REGISTRANT,
            "epp_cafile": str(cafile)})
        yield server


async def test_an_auto_registering_tld_is_registered_over_epp_when_paid(
    harness: Harness, epp: FakeEppServer,
) -> None:
    store = await harness.listen("domain.registered")
    await start(harness)
    body = order_body("epp-1", items=[
        {"type": "domain", "domain": "epp-one.com", "action": "register", "years": 2},
        {"type": "domain", "domain": "epp-two.example", "action": "register"}])
    await harness.publish("order.place", body)
    order = await harness.screened("epp-1")
    await asyncio.sleep(0.5)
    assert epp.calls["domain:create"] == 0  # never before the invoice is paid
    invoice = await invoice_of(harness, order["id"])
    await pay(harness, str(invoice["total"]), "epp-txn", invoice_id=invoice["id"])
    event = await store.wait_for("domain.registered", lambda b: b["domain"] == "epp-one.com")
    assert event["status"] == "Active"
    assert epp.domains["epp-one.com"].owner == EPP_CLIENT
    assert epp.domains["epp-one.com"].years == 2
    statuses = dict(await harness.pool.fetch(
        "SELECT domain, status FROM domains WHERE order_id = $1", order["id"]))
    # .example does not auto-register (manual, on Accept): it stays Pending.
    assert statuses == {"epp-one.com": "Active", "epp-two.example": "Pending"}


@pytest.mark.parametrize("run_module_create", [True, False])
async def test_on_accept_and_never_wait_for_accept_whatever_is_paid(
    harness: Harness, whm: FakeWhm, run_module_create: bool,
) -> None:
    await start(harness)
    ref = f"accept-{run_module_create}"
    body = order_body(ref, items=[
        {"type": "product", "product": "reseller", "billing_cycle": "monthly",
         "domain": f"{ref}.example"},  # on_accept, cPanel
        {"type": "product", "product": "dedicated", "billing_cycle": "monthly"}])  # never
    await harness.publish("order.place", body)
    order = await harness.screened(ref)
    invoice = await invoice_of(harness, order["id"])
    await pay(harness, str(invoice["total"]), f"txn-{ref}", invoice_id=invoice["id"])

    async def paid() -> bool:
        return (await invoice_of(harness, order["id"]))["status"] == "Paid"
    await eventually(paid)
    await asyncio.sleep(1.0)  # give a wrong setup every chance to happen
    assert await harness.pool.fetchval("SELECT count(*) FROM jobs") == 0
    assert whm.calls["createacct"] == 0
    # Accept, as the review service will: the options are stored on the order.
    await harness.pool.execute(
        "UPDATE orders SET status = 'Active', accept_options = $2 WHERE id = $1", order["id"],
        {"run_module_create": run_module_create, "send_welcome_email": True,
         "register_domains": True})
    await harness.publish("order.accepted", {"order_id": order["id"], "order_ref": ref})

    async def settled() -> dict[str, str] | None:
        rows = await harness.pool.fetch(
            "SELECT p.slug, s.status FROM services s JOIN products p ON p.id = s.product_id"
            " WHERE s.order_id = $1", order["id"])
        statuses = {r["slug"]: r["status"] for r in rows}
        return statuses if statuses["reseller"] == "Active" else None
    statuses = await eventually(settled)
    await asyncio.sleep(0.5)
    statuses = await settled()
    # on_accept is set up on Accept; 'never' only when Accept says "run module create".
    assert statuses == {"reseller": "Active",
                        "dedicated": "Active" if run_module_create else "Pending"}
    assert whm.calls["createacct"] == 1


async def test_a_slow_server_does_not_hold_back_the_others(harness: Harness, whm: FakeWhm) -> None:
    whm.delay = 2.0  # every answer of this server takes 2 s
    harness.settings = harness.settings.model_copy(
        update={"job_concurrency": 4, "job_lane_concurrency": 2})
    await start(harness)
    # Each order from its own address: the velocity rule would take a burst from one for fraud.
    slow = [await place_and_pay(harness, f"slow-{n}", ip_address=f"198.18.0.{n + 1}")
            for n in range(6)]

    async def slow_calls_in_flight() -> bool:
        return whm.calls["accountsummary"] >= 2
    await eventually(slow_calls_in_flight)
    fast = []
    for n in range(3):
        await harness.publish("order.place", order_body(f"fast-{n}", items=[
            {"type": "product", "product": "starter", "billing_cycle": "monthly",
             "domain": f"fast-{n}.example"}], ip_address=f"198.18.1.{n + 1}"))
        order = await harness.screened(f"fast-{n}")
        invoice = await invoice_of(harness, order["id"])
        await pay(harness, str(invoice["total"]), f"fast-txn-{n}", invoice_id=invoice["id"])
        fast.append(order)
    for order in fast:
        await eventually(lambda o=order: active(harness, o["id"]), timeout=30)
    slow_active = [await active(harness, o["id"]) for o in slow]
    # The autorelease services did not wait behind the slow server's creates (4 s each).
    assert not any(slow_active)
    for order in slow:
        await eventually(lambda o=order: active(harness, o["id"]), timeout=60)
    # At most its lane's share of calls was ever in flight on the slow server.
    assert whm.calls["createacct"] == len(slow)


def test_the_autorelease_lane_is_bounded_by_the_runner_alone_a_servers_by_its_lane(
        settings: Any) -> None:
    """Autorelease calls no server: JOB_CONCURRENCY bounds its lane, not JOB_LANE_CONCURRENCY
    (a server's lane, and a module's on a server, keep theirs)."""
    from services.provisioning.jobs import JobRunner
    from services.provisioning.providers import Providers

    s = settings.model_copy(update={"job_concurrency": 40, "job_lane_concurrency": 3})
    runner = JobRunner(Providers(s.providers), s.jobs, None).runner
    assert runner.lane_limit("autorelease") == 40
    assert runner.lane_limit("cpanel:1") == 3
    assert runner.lane_limit("autorelease:1") == 3
