"""The console's warm-up (console/warm_up.py): when it starts, and when its pool reconnects to
a database server it has not warmed, it reads what the dashboard and the pending list's first
page read, in the background; a reconnect to the same server reads nothing again."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import asyncpg
import pytest
from jinja2 import FileSystemLoader

from conftest import eventually, order_body
from console import order_list
from console import warm_up as warm_up_module
from console.app import build_app, close_state, open_state
from console.testing import FlowPublisher
from console.warm_up import WarmUp
from console.web import compile_all, templates
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from shared import db
from shared.runtime.testing import InMemoryFlow
from shared.settings import Settings


async def _place(s: Settings, refs: list[str]) -> None:
    pool = await db.create_pool(s.database_url, max_size=2, attempts=3)
    try:
        flow = InMemoryFlow(s, pool).add(placement_worker(s), fraud_worker(s))
        for ref in refs:
            await flow.send("order.place", order_body(ref))
        await flow.run()
    finally:
        await pool.close()


async def _reconnect(pool: asyncpg.Pool, url: str) -> None:
    """Ends every connection the pool holds (as a server restart would) and makes it open one
    again."""
    async with pool.acquire() as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
    admin = await asyncpg.connect(url)
    try:
        await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    await asyncio.sleep(0.3)  # the client sees the socket closed
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT pg_backend_pid()") != pid


async def test_the_console_warms_its_first_pages_at_start_and_after_a_new_server(
        db_settings: Settings) -> None:
    await _place(db_settings, ["w-1", "w-2", "w-3"])
    servers = itertools.count()
    server = {"now": next(servers)}

    async def server_of(conn: asyncpg.Connection) -> int:
        return server["now"]

    warm_up = WarmUp(server_of=server_of)
    state = await open_state(db_settings, publisher=FlowPublisher(None, "c"),  # type: ignore[arg-type]
                             warm_up=warm_up)
    try:
        # At start: what the list's first page shows, read (the three orders, screened).
        await eventually(lambda: _true(warm_up.runs == 1))
        async with state.pool.acquire() as conn:
            listed = len((await order_list.order_list(conn, order_list.OrderFilters()))["orders"])
        assert listed == 3
        assert warm_up.shown == {"awaiting": 3, "listed": 3}

        # The pool reconnects to the same server (a dropped connection): its buffers are as
        # they were, nothing is read again.
        await _reconnect(state.pool, db_settings.database_url)
        await asyncio.sleep(0.3)
        assert warm_up.runs == 1

        # The server restarted (or another took its address): warmed again.
        server["now"] = next(servers)
        await _reconnect(state.pool, db_settings.database_url)
        await eventually(lambda: _true(warm_up.runs == 2))
        assert warm_up.shown["listed"] == 3
    finally:
        await close_state(state)


async def test_no_warm_up_when_switched_off(db_settings: Settings) -> None:
    s = db_settings.model_copy(update={"console_warm_up": False})
    state = await open_state(s, publisher=FlowPublisher(None, "c"))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.3)
        assert state.warm_up.runs == 0 and not state.warm_up.enabled
    finally:
        await close_state(state)


async def test_every_template_is_compiled_when_the_app_is_built(db_settings: Settings) -> None:
    """build_app compiles every page's template before the server starts (and before its
    heap is settled), whatever CONSOLE_WARM_UP says; an editor's backup beside them is no
    template."""
    s = db_settings.model_copy(update={"console_warm_up": False})
    app = build_app(s)
    async with app.router.lifespan_context(app):
        env = app.state.console.env
        names = env.list_templates(extensions=["html"])
        assert "order.html" in names and len(names) > 10
        assert {name for _, name in (env.cache or {}).keys()} == set(names)


def test_only_html_files_are_compiled(tmp_path: Path) -> None:
    (tmp_path / "page.html").write_text("{{ 1 + 1 }}")
    (tmp_path / "page.html.orig").write_bytes(b"\xff{% broken")
    env = templates()
    env.loader = FileSystemLoader(tmp_path)
    assert compile_all(env) == 1


async def test_a_failed_warm_up_is_one_log_line_and_is_tried_again(
        db_settings: Settings, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    async def broken(conn: asyncpg.Connection) -> dict[str, int]:
        raise asyncpg.QueryCanceledError("canceling statement due to statement timeout")

    monkeypatch.setattr(warm_up_module, "read_first_pages", broken)
    warm_up = WarmUp(server_of=lambda conn: _true(True))
    state = await open_state(db_settings, publisher=FlowPublisher(None, "c"),  # type: ignore[arg-type]
                             warm_up=warm_up)
    try:
        await eventually(lambda: _true(warm_up.runs == 1))
        assert "console warm-up stopped" in caplog.text
        async with state.pool.acquire() as conn:  # the console goes on
            assert await conn.fetchval("SELECT 1") == 1
        monkeypatch.undo()
        await _reconnect(state.pool, db_settings.database_url)  # the same server: tried again
        await eventually(lambda: _true(warm_up.runs == 2))
        assert warm_up.shown == {"awaiting": 0, "listed": 0}
    finally:
        await close_state(state)


async def test_a_warm_up_that_keeps_failing_is_given_up_for_that_server(
        db_settings: Settings, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Failing every time (a permission the console's role lacks, a disk too slow), it is not
    run again on each new connection (up to 20 s of reads on one of the console's five):
    WARM_UP_TRIES tries a server, then one line saying it gave up."""
    calls: list[int] = []

    async def broken(conn: asyncpg.Connection) -> dict[str, int]:
        calls.append(1)
        raise asyncpg.InsufficientPrivilegeError("permission denied for table orders")

    monkeypatch.setattr(warm_up_module, "read_first_pages", broken)
    warm_up = WarmUp(server_of=lambda conn: _true(True))
    state = await open_state(db_settings, publisher=FlowPublisher(None, "c"),  # type: ignore[arg-type]
                             warm_up=warm_up)
    try:
        for tried in range(1, warm_up_module.WARM_UP_TRIES + 1):
            await eventually(lambda tried=tried: _true(warm_up.runs == tried))
            await _reconnect(state.pool, db_settings.database_url)
        await asyncio.sleep(0.5)  # a further try would have started by now
        assert len(calls) == warm_up_module.WARM_UP_TRIES
        assert "console warm-up given up" in caplog.text
    finally:
        await close_state(state)


async def _true(value: bool) -> bool:
    return value
