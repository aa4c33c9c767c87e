"""bench/transactions.py reads the server's log as PostgreSQL 15 writes it (log_statement =
all, log_duration = on; lines as seen in /var/log/postgresql): transactions by kind, and the
server's time of each kind's statements (a parse and a bind are logged before their execute)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_transactions", ROOT / "bench" / "transactions.py")
assert _spec is not None and _spec.loader is not None
transactions = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = transactions  # its dataclasses look their module up
_spec.loader.exec_module(transactions)

T = "2026-12-05 10:17:51.250 UTC"
CLAIM = "WITH claimed AS (SELECT id FROM outbox WHERE published_at IS NULL) UPDATE outbox o"
# log_statement = all: statements, no times.
COUNTED = f"""{T} [7] postgres@bench LOG:  statement: BEGIN;
{T} [8] postgres@bench LOG:  statement: SELECT 1
{T} [7] postgres@bench LOG:  execute __asyncpg_stmt_6d__: WITH claimed AS (SELECT id FROM outbox
\tWHERE published_at IS NULL) UPDATE outbox o
{T} [7] postgres@bench DETAIL:  parameters: $1 = '500'
{T} [7] postgres@bench LOG:  statement: COMMIT;
{T} [9] postgres@other LOG:  statement: SELECT 2
"""
# log_min_duration_statement = 0: each statement once, with its time; a prepared statement's
# parse and bind before its execute.
TIMED = f"""{T} [7] postgres@bench LOG:  duration: 0.075 ms  statement: BEGIN;
{T} [7] postgres@bench LOG:  duration: 0.250 ms  parse __asyncpg_stmt_6d__: {CLAIM}
{T} [8] postgres@bench LOG:  duration: 0.500 ms  statement: SELECT 1
{T} [7] postgres@bench LOG:  duration: 2.000 ms  bind s6d: WITH claimed AS (SELECT id FROM outbox
\tWHERE published_at IS NULL) UPDATE outbox o
{T} [7] postgres@bench DETAIL:  parameters: $1 = '500'
{T} [7] postgres@bench LOG:  duration: 1.250 ms  execute s6d: WITH claimed AS (SELECT id FROM outbox
\tWHERE published_at IS NULL) UPDATE outbox o
{T} [7] postgres@bench DETAIL:  parameters: $1 = '500'
{T} [7] postgres@bench LOG:  duration: 0.125 ms  statement: COMMIT;
{T} [9] postgres@other LOG:  duration: 9.000 ms  statement: SELECT 2
"""
RELAY = "relay: a pass, claimed and marked in one statement (shared/outbox.py)"


def _tally(log: str) -> object:
    since = transactions._epoch("2026-12-05 10:17:51")
    return transactions.tally(transactions.statements(log.splitlines(keepends=True), "bench",
                                                      since, since + 1))


def test_transactions_are_counted_by_kind() -> None:
    for log in (COUNTED, TIMED):
        counted = _tally(log)
        assert counted.kinds == {RELAY: 1, "other": 1}  # another database's not at all
        assert counted.statements == 2


def test_each_kind_has_its_statements_time_with_their_parse_and_bind() -> None:
    timed = _tally(TIMED)
    assert timed.kind_ms == {RELAY: pytest.approx(3.7), "other": 0.5}
    assert timed.text_ms[CLAIM] == pytest.approx(3.5)  # parse 0.25, bind 2, execute 1.25
    assert _tally(COUNTED).kind_ms == {}


def _stats(pid: int, user: str, system: str) -> str:
    return (f"{T} [{pid}] postgres@bench LOG:  EXECUTOR STATISTICS\n"
            f"{T} [{pid}] postgres@bench DETAIL:  ! system usage stats:\n"
            "\t!\t0.000003 s user, 0.000003 s system, 0.000006 s elapsed\n"
            f"\t!\t[{user} s user, {system} s system total]\n"
            "\t!\t16700 kB max resident size\n"
            f"{T} [{pid}] postgres@bench STATEMENT:  SELECT 1\n")


# log_executor_stats: after each plannable statement, the backend's CPU since it started.
WITH_CPU = (_stats(7, "0.001000", "0.001000")  # the first reading: a start, nothing counted
            + f"{T} [7] postgres@bench LOG:  duration: 0.100 ms  statement: SELECT 1\n"
            + f"{T} [7] postgres@bench LOG:  duration: 0.075 ms  statement: BEGIN;\n"
            + _stats(7, "0.001500", "0.001250")
            + f"{T} [7] postgres@bench LOG:  duration: 1.250 ms  execute s6d: {CLAIM}\n"
            + f"{T} [7] postgres@bench LOG:  duration: 0.125 ms  statement: COMMIT;\n"
            + _stats(7, "0.001600", "0.001400")
            + f"{T} [7] postgres@bench LOG:  duration: 0.500 ms  statement: SELECT 2\n")


def test_each_kind_has_its_backends_cpu_read_between_two_statements() -> None:
    used = _tally(WITH_CPU)
    assert used.kinds == {RELAY: 1, "other": 2}
    assert used.kind_cpu == {RELAY: pytest.approx(0.75), "other": pytest.approx(0.25)}
    assert used.text_cpu[CLAIM] == pytest.approx(0.75)


def test_a_new_backend_with_a_pid_seen_before_starts_its_own_count() -> None:
    reused = (_stats(7, "1.000000", "1.000000")
              + f"{T} [7] postgres@bench LOG:  duration: 0.100 ms  statement: SELECT 1\n"
              + _stats(7, "0.003000", "0.003000")  # another backend, same pid: a new start
              + f"{T} [7] postgres@bench LOG:  duration: 0.100 ms  statement: SELECT 1\n"
              + _stats(7, "0.003500", "0.003000")
              + f"{T} [7] postgres@bench LOG:  duration: 0.100 ms  statement: SELECT 1\n")
    assert _tally(reused).kind_cpu == {"other": pytest.approx(0.5)}
