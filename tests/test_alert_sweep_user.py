"""The alerts' dead-letter sweep under the RabbitMQ user `ordermill broker users` makes for the
alerts worker: its least-privilege rights are enough to see a dead letter in another
service's dead-letter queue (a passive declare) and raise the alert, and no more (it may not
read that queue). Users made with a prefix of the test's own, deleted after."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused
from test_alerts import EVERY_TRIGGER, load
from test_cli import cli
from test_parties import _all_exist, _as, _passwords, forget, rabbitmqctl

from conftest import eventually
from services.alerts.raising import Delivery
from services.alerts.store import RuleStore
from services.alerts.sweeper import Sweeper
from shared import db
from shared.settings import Settings
from shared.topology import Names, declare_topology


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl")
async def test_the_dead_letter_sweep_sees_dead_letters_as_the_alerts_own_user(
    settings: Settings, tmp_path: Path,
) -> None:
    s, names = settings, Names(settings.namespace)
    prefix = f"om-{uuid.uuid4().hex[:6]}"
    definitions, secrets = tmp_path / "definitions.json", tmp_path / "secrets"
    code, out, err = await cli(s, "broker", "users", "--prefix", prefix, "--out",
                               str(definitions), "--secrets-dir", str(secrets), "--json")
    assert code == 0, err
    users = [u["name"] for u in json.loads(out)["users"]]
    alerts_user = f"{prefix}-alerts"
    assert alerts_user in users
    # The broker reads the file itself, as its own system user: not from pytest's 0700 folder.
    shared_dir = Path(tempfile.mkdtemp(prefix="om-defs-"))
    shared_dir.chmod(0o755)
    readable = shared_dir / "definitions.json"
    readable.write_text(definitions.read_text())
    readable.chmod(0o644)
    admin = await aio_pika.connect(s.amqp_url)
    pool = await db.create_pool(s.database_url, max_size=4, attempts=3)
    sweeper = None
    try:
        rabbitmqctl("import_definitions", str(readable))
        await eventually(lambda: _all_exist(users), timeout=30, interval=0.5)
        await declare_topology(admin, names, delivery_limit=20)  # as `ordermill migrate` would
        await load(pool, EVERY_TRIGGER)
        url = _as(s.amqp_url, alerts_user, _passwords(secrets)[alerts_user])
        sweeper = Sweeper(RuleStore(ttl=0), Delivery(), amqp_url=url, names=names,
                          every_seconds=60)
        assert await sweeper.once(pool) == 0  # every dead-letter queue read, all empty

        dead = names.dead_queue("placement")
        channel = await admin.channel()
        await channel.default_exchange.publish(aio_pika.Message(b'{"order_ref": "x"}'),
                                               routing_key=dead)
        assert await eventually(lambda: sweeper.once(pool)) == 1
        row = await pool.fetchrow("SELECT * FROM alerts WHERE trigger = 'dead_letter'")
        assert row["cause"] == f"dead:{dead}:1" and row["facts"]["Dead letters"] == "1"
        assert await pool.fetchval("SELECT count(*) FROM emails WHERE template = 'staff_alert'") == 1

        # The rights really are the alerts' own: the placement dead letters are not its to read.
        async with await aio_pika.connect(url) as own:
            with pytest.raises(ChannelAccessRefused, match="ACCESS_REFUSED"):
                queue = await (await own.channel()).declare_queue(dead, passive=True)
                await queue.get(fail=False)
    finally:
        if sweeper is not None:
            await sweeper.close()
        await pool.close()
        await admin.close()
        forget(users)
        shutil.rmtree(shared_dir, ignore_errors=True)
