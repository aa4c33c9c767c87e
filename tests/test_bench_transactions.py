"""bench/transactions.py reads the server's log as PostgreSQL 15 writes it (log_statement =
all, log_duration = on; lines as seen in /var/log/postgresql): transactions by kind, and the
server's time of each kind's statements (a parse and a bind are logged before their execute)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_transactions", ROOT / "bench" / "transactions.py")
assert _spec is not None and _spec.loader is not None
transactions = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = transactions  # its dataclasses look their module up
_spec.loader.exec_module(transactions)

T = "2026-12-05 10:17:51.250 UTC"
LOG = f"""{T} [7] postgres@bench LOG:  statement: BEGIN;
{T} [7] postgres@bench LOG:  duration: 0.075 ms
{T} [8] postgres@bench LOG:  statement: SELECT 1
{T} [7] postgres@bench LOG:  duration: 0.238 ms
{T} [7] postgres@bench LOG:  execute __asyncpg_stmt_6d__: WITH claimed AS (SELECT id FROM outbox
\tWHERE published_at IS NULL) UPDATE outbox o SET published_at = now()
{T} [7] postgres@bench DETAIL:  parameters: $1 = '500'
{T} [8] postgres@bench LOG:  duration: 0.500 ms
{T} [7] postgres@bench LOG:  duration: 1.250 ms
{T} [7] postgres@bench LOG:  statement: COMMIT;
{T} [7] postgres@bench LOG:  duration: 0.437 ms
{T} [9] postgres@other LOG:  statement: SELECT 2
{T} [9] postgres@other LOG:  duration: 9.000 ms
"""


def test_transactions_and_their_server_time_by_kind() -> None:
    since = transactions._epoch("2026-12-05 10:17:51")
    counted = transactions.tally(transactions.statements(LOG.splitlines(keepends=True), "bench",
                                                         since, since + 1))
    relay = "relay: a pass, claimed and marked in one statement (shared/outbox.py)"
    assert counted.kinds == {relay: 1, "other": 1}
    assert counted.statements == 2
    assert round(counted.kind_ms[relay], 3) == 0.075 + 0.238 + 1.25 + 0.437
    assert counted.kind_ms["other"] == 0.5  # another backend's; another database's not at all
