"""The console's Jinja filters that need no server: when an order was placed, as read in a list."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from console.filters import RECENT_DAYS, _ago


def test_recent_times_read_as_ages_and_older_ones_as_their_day() -> None:
    now = datetime.now(UTC)
    assert _ago(now - timedelta(hours=3, minutes=5)) == "3 h ago"
    assert _ago(now - timedelta(days=RECENT_DAYS - 1)) == f"{RECENT_DAYS - 1} d ago"
    old = datetime(2015, 3, 2, 23, 30, tzinfo=UTC)
    assert _ago(old) == "2015-03-02"  # not "4,000 d ago"
    # The day is UTC's, whatever zone the value came in (as the list's hover title says).
    assert _ago(old.astimezone(timezone(timedelta(hours=5)))) == "2015-03-02"
    assert _ago(old.isoformat()) == "2015-03-02"
    assert _ago(None) == "\u2013"
