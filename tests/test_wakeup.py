"""The wake-ups of one process share one LISTEN connection (shared/wakeup.py): PostgreSQL
signals every listening backend of the database at each commit that notifies, and each one
reads the queue in a transaction of its own, so one connection per loop multiplied them."""

from __future__ import annotations

import asyncio

import asyncpg

from conftest import eventually
from shared.settings import Settings
from shared.wakeup import Wakeup


async def _listening_backends(conn: asyncpg.Connection) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()"
    )


async def test_wakeups_share_one_connection_and_hear_only_their_channel(db_settings: Settings) -> None:
    url = db_settings.database_url
    jobs, mails = Wakeup(url, "test_jobs"), Wakeup(url, "test_mails")
    conn = await asyncpg.connect(url)
    try:
        await jobs.ensure()
        await mails.ensure()
        assert jobs.listening and mails.listening
        assert await _listening_backends(conn) == 1

        await conn.execute("SELECT pg_notify('test_mails', '')")
        await asyncio.wait_for(mails.event.wait(), 5)
        assert not jobs.event.is_set()

        await conn.execute("SELECT pg_notify('test_jobs', '')")
        await asyncio.wait_for(jobs.event.wait(), 5)

        await jobs.close()  # the other loop still listens
        mails.event.clear()
        await conn.execute("SELECT pg_notify('test_mails', '')")
        await asyncio.wait_for(mails.event.wait(), 5)
        await mails.close()  # the last: the connection goes
        await eventually(lambda: _closed(conn), timeout=5)
    finally:
        await jobs.close()
        await mails.close()
        await conn.close()


async def _closed(conn: asyncpg.Connection) -> bool:
    return await _listening_backends(conn) == 0


async def test_a_lost_connection_is_reopened_and_wakes_every_loop_once(db_settings: Settings) -> None:
    """Commits made while nobody listened were not heard: every loop gets one pass."""
    url = db_settings.database_url
    jobs, mails = Wakeup(url, "test_jobs"), Wakeup(url, "test_mails")
    conn = await asyncpg.connect(url)
    try:
        await jobs.ensure()
        await mails.ensure()
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname ="
            " current_database() AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()"
        )
        await eventually(lambda: _not_listening(jobs), timeout=5)
        assert not jobs.event.is_set() and not mails.event.is_set()

        await jobs.ensure()  # the next loop to come round reopens it, for both channels
        assert jobs.event.is_set() and mails.event.is_set()
        assert mails.listening and await _listening_backends(conn) == 1
        mails.event.clear()
        await conn.execute("SELECT pg_notify('test_mails', '')")
        await asyncio.wait_for(mails.event.wait(), 5)
    finally:
        await jobs.close()
        await mails.close()
        await conn.close()


async def _not_listening(wakeup: Wakeup) -> bool:
    return not wakeup.listening


async def test_no_url_no_listener() -> None:
    wakeup = Wakeup(None, "test_jobs")
    await wakeup.ensure()
    assert not wakeup.listening
    await wakeup.close()
