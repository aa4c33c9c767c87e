"""Migration 0040 on a database an operator prepared by hand (its comment tells how: build the
new index CONCURRENTLY beforehand): a valid one is taken as it is; an INVALID one, left by a
failed concurrent build, is refused (by `ordermill migrate` in one line), and the old index
stays, so the flagged list never loses its only valid index."""

from __future__ import annotations

import asyncpg
import pytest
from test_cli import cli

from shared import db
from shared.settings import Settings

OLD = ("CREATE INDEX orders_flagged_created_idx ON orders (created_at, id)"
       " WHERE deleted_at IS NULL AND screening IN ('error', 'failed')")


def _migration() -> str:
    return dict(db._migration_files())["0040_flagged_with_status"]


async def _indexes(conn: asyncpg.Connection) -> dict[str, bool]:
    rows = await conn.fetch(
        "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname IN ('orders_flagged_status_idx', 'orders_flagged_created_idx')")
    return {r["relname"]: r["indisvalid"] for r in rows}


async def test_an_invalid_prebuilt_index_is_refused_and_the_old_one_kept(
        db_settings: Settings) -> None:
    conn = await asyncpg.connect(db_settings.database_url)
    try:
        # As before 0040, with a concurrent build of the new index that failed half way.
        await conn.execute(OLD)
        await conn.execute("UPDATE pg_index SET indisvalid = false"
                           " WHERE indexrelid = 'orders_flagged_status_idx'::regclass")
        with pytest.raises(asyncpg.RaiseError, match="INVALID"):
            async with conn.transaction():
                await conn.execute(_migration())
        assert await _indexes(conn) == {"orders_flagged_status_idx": False,
                                        "orders_flagged_created_idx": True}
        # `ordermill migrate` says it in one line, with the server's hint, and applies nothing.
        await conn.execute("DELETE FROM schema_migrations WHERE version = '0040_flagged_with_status'")
        code, out, err = await cli(db_settings, "migrate")
        assert code == 1 and "Traceback" not in out + err
        assert err.strip().splitlines()[-1] == (
            "error: migration 0040_flagged_with_status failed and was rolled back:"
            " orders_flagged_status_idx is INVALID (a failed CREATE INDEX CONCURRENTLY)"
            " (DROP INDEX CONCURRENTLY orders_flagged_status_idx; then run ordermill migrate"
            " again)")
        assert await _indexes(conn) == {"orders_flagged_status_idx": False,
                                        "orders_flagged_created_idx": True}

        # The operator drops it and runs the migration again: built, and the old one gone.
        await conn.execute("DROP INDEX orders_flagged_status_idx")
        async with conn.transaction():
            await conn.execute(_migration())
        assert await _indexes(conn) == {"orders_flagged_status_idx": True}
    finally:
        await conn.close()
