"""Parked Slack messages of the staff alerts, listed and sent again (`ordermill notify
deliveries` and `replay`), on a real database with a fake Slack on 127.0.0.1: the URL is a
secret in every listing, even when Slack's answer quotes it; a mistake is one line."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest
from fakes.receiver import Answer, Receiver
from test_alerts import fast, load, slack_sending

from conftest import eventually
from services.alerts import deliveries as ops
from services.alerts.raising import Cause, Delivery, raise_alert
from services.alerts.rules import AlertRules
from shared.settings import Settings
from shared.states import AlertTrigger

SECRET_PATH = "/services/T0/B0/s3cr3tTOKEN"


async def rules_for(pool: asyncpg.Pool, url: str) -> AlertRules:
    return await load(pool, f'[channels.ops-slack]\ntype = "slack"\nurl = "{url}"\n'
                            '[[rules]]\nname = "dead"\ntrigger = "dead_letter"\n'
                            'channels = ["ops-slack"]')


async def alert(pool: asyncpg.Pool, rules: AlertRules, cause: str) -> int:
    async with pool.acquire() as conn, conn.transaction():
        alert_id = await raise_alert(conn, rules, rules.rules[0], Cause(
            AlertTrigger.DEAD_LETTER, cause, f"dead letters ({cause})"), Delivery())
    assert alert_id is not None
    return alert_id


async def parked_messages(pool: asyncpg.Pool, db_settings: Settings, receiver: Receiver,
                          count: int) -> list[dict[str, object]]:
    """`count` alerts whose Slack message Slack refused (404, quoting the URL back): parked."""
    receiver.default = Answer(404, f"no_service: {receiver.url(SECRET_PATH)}".encode())
    rules = await rules_for(pool, receiver.url(SECRET_PATH))
    for n in range(count):
        await alert(pool, rules, f"c{n}")
    async with slack_sending(fast(db_settings), pool):
        async def all_parked() -> bool:
            return await pool.fetchval("SELECT count(*) FROM alert_deliveries"
                                       " WHERE status = 'parked'") == count
        await eventually(all_parked, timeout=20)
    async with pool.acquire() as conn:
        return await ops.deliveries(conn, state="parked")


async def test_parked_slack_messages_are_listed_without_the_url_and_replayed(
    pool: asyncpg.Pool, db_settings: Settings,
) -> None:
    async with Receiver() as receiver:
        parked = await parked_messages(pool, db_settings, receiver, 2)
        assert [d["status"] for d in parked] == ["parked", "parked"]
        first = parked[-1]  # newest first
        assert (first["channel"], first["host"], first["status_code"]) == (
            "ops-slack", "127.0.0.1", 404)
        assert first["rule"] == "dead" and first["trigger"] == "dead_letter"
        # Slack's answer quoted the URL: the stored error, and so the listing, does not.
        assert "no_service" in str(first["last_error"])
        assert "s3cr3t" not in json.dumps(parked)
        async with pool.acquire() as conn:
            assert await ops.deliveries(conn, state="delivered") == []
            assert len(await ops.deliveries(conn, limit=1)) == 1
            with pytest.raises(ops.AlertDeliveryError, match="no state 'lost'"):
                await ops.deliveries(conn, state="lost")
            with pytest.raises(ops.AlertDeliveryError, match="no Slack delivery 999"):
                await ops.replay(conn, 999)

        # Slack works again: one replayed, then the other with --all-parked.
        receiver.default = Answer(200, b"ok")
        receiver.received.clear()
        async with pool.acquire() as conn:
            again = await ops.replay(conn, int(str(first["id"])))
            assert (again["status"], again["attempts"], again["last_error"]) == ("pending", 0, None)
            with pytest.raises(ops.AlertDeliveryError, match="is pending already"):
                await ops.replay(conn, int(str(first["id"])))
        async with slack_sending(fast(db_settings), pool):
            row = await eventually(lambda: pool.fetchrow(
                "SELECT * FROM alert_deliveries WHERE id = $1 AND status = 'delivered'",
                first["id"]), timeout=20)
        assert row["attempts"] == 1 and row["status_code"] == 200
        assert [r.path for r in receiver.received] == [SECRET_PATH]
        async with pool.acquire() as conn:
            assert await ops.replay_parked(conn) == 1
            assert await ops.replay_parked(conn) == 0  # none parked now
        async with slack_sending(fast(db_settings), pool):
            async def both() -> bool:
                return await pool.fetchval("SELECT count(*) FROM alert_deliveries"
                                           " WHERE status = 'delivered'") == 2
            await eventually(both, timeout=20)
        # The message sent again is the one stored with the alert, byte for byte.
        bodies = await pool.fetch("SELECT body FROM alert_deliveries ORDER BY id")
        assert sorted(r.body.decode() for r in receiver.received) == sorted(
            r["body"] for r in bodies)


@pytest.mark.slow  # runs `ordermill` a few times
async def test_notify_deliveries_and_replay_through_the_cli(
    pool: asyncpg.Pool, db_settings: Settings, tmp_path: Path,
) -> None:
    from test_cli import cli

    s = db_settings
    async with Receiver() as receiver:
        parked = await parked_messages(pool, db_settings, receiver, 2)
    newest = parked[0]["id"]
    code, out, err = await cli(s, "notify", "deliveries", "--state", "parked", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [d["id"] for d in listed] == [d["id"] for d in parked]
    code, out, err = await cli(s, "notify", "deliveries", COLUMNS="200")
    assert code == 0 and "ops-slack (127.0.0.1)" in out and "parked" in out
    assert "s3cr3t" not in out + err

    for args, says in ((("replay", "999"), "no Slack delivery 999"),
                       (("replay",), "name a DELIVERY_ID or --all-parked"),
                       (("replay", str(newest), "--all-parked"), "name a DELIVERY_ID or"),
                       (("deliveries", "--state", "lost"), "no state 'lost'")):
        code, out, err = await cli(s, "notify", *args)
        assert code != 0 and says in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:")

    code, out, err = await cli(s, "notify", "replay", str(newest))
    assert code == 0 and f"Slack delivery {newest} (alert" in out, err
    code, out, err = await cli(s, "notify", "replay", "--all-parked")
    assert code == 0 and "1 parked Slack delivery(ies) queued again" in out, err
    assert await pool.fetchval("SELECT count(*) FROM alert_deliveries WHERE status = 'pending'"
                               " AND attempts = 0") == 2


@pytest.mark.parametrize("quoted", [
    "https://hooks.slack.com/services/T0/B0/s3cr3t",
    "https:\\/\\/hooks.slack.com\\/services\\/T0\\/B0\\/s3cr3t",  # in a JSON answer
    "https%3A%2F%2Fhooks.slack.com%2Fservices%2FT0%2FB0%2Fs3cr3t",  # percent-encoded
])
def test_a_slack_url_quoted_in_any_form_is_never_kept_or_shown(quoted: str) -> None:
    """The sender's scrub (what is stored and logged) and the listing's redaction (rows stored
    before the scrub) both take the secret out, whatever form the answer quoted it in."""
    from services.alerts.sender import _scrubbed
    from services.alerts.slack import redact
    answer = f'{{"error":"invalid_token","url":"{quoted}"}}'
    assert "s3cr3t" not in _scrubbed(answer, "https://hooks.slack.com/services/T0/B0/s3cr3t")
    assert "s3cr3t" not in (redact(answer) or "")
    assert "hooks.slack.com" in (redact(answer) or "")  # which service it was stays readable
