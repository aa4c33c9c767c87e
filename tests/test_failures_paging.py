"""`ordermill failures` pages what it prints (issue 15: at a million orders the seeded
history's 2,000 unapplied payments took 73.5 ms to read and far longer to print): 50 of each
section unless told, then how many more and how to see them; `--json` lists everything as it
always did unless `--limit` is given, and then says how many each section left out."""

from __future__ import annotations

import json

from test_cli import cli

from shared import db
from shared.settings import Settings


async def _unapplied(settings: Settings, n: int) -> None:
    pool = await db.create_pool(settings.database_url, max_size=1, attempts=3)
    try:
        await pool.executemany(
            "INSERT INTO payments (gateway, transaction_id, amount, raw_amount, currency,"
            " order_ref, status, reason, message_id) VALUES ('stripe', $1, 12.95, '12.95', 'USD',"
            " 'nowhere', 'unapplied', 'order not placed yet: nowhere', $1)",
            [(f"ch_paging_{i:03d}",) for i in range(n)])
    finally:
        await pool.close()


async def test_failures_prints_a_page_of_each_section_and_says_how_many_more(
    db_settings: Settings,
) -> None:
    s = db_settings
    await _unapplied(s, 53)
    code, out, err = await cli(s, "failures", COLUMNS="200")
    assert code == 0, err
    shown = [f"ch_paging_{i:03d}" for i in range(53) if f"ch_paging_{i:03d}" in out]
    assert shown == [f"ch_paging_{i:03d}" for i in range(50)]  # the oldest 50
    assert "3 more — use --limit N or --all to list them" in out
    assert out.count("more — use") == 1  # only the section that has more

    code, out, _ = await cli(s, "failures", "--limit", "10", COLUMNS="200")
    assert "ch_paging_009" in out and "ch_paging_010" not in out
    assert "43 more — use --limit N or --all" in out
    code, out, _ = await cli(s, "failures", "--all", COLUMNS="200")
    assert "ch_paging_052" in out and "more — use" not in out

    # --json: everything, as before (the contract's keys, no more); with --limit, `more`.
    code, out, _ = await cli(s, "failures", "--json")
    whole = json.loads(out)
    assert set(whole) == {"screening_errors", "stuck_in_screening", "parked_setups",
                          "unapplied_payments", "parked_emails"}
    assert len(whole["unapplied_payments"]) == 53
    code, out, _ = await cli(s, "failures", "--json", "--limit", "5")
    page = json.loads(out)
    assert page["unapplied_payments"] == whole["unapplied_payments"][:5]
    assert page["more"] == {"screening_errors": 0, "stuck_in_screening": 0, "parked_setups": 0,
                            "unapplied_payments": 48, "parked_emails": 0}

    code, out, err = await cli(s, "failures", "--all", "--limit", "5")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, (out, err)
    assert "--limit N or --all, not both" in err
