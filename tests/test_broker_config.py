"""The RabbitMQ configuration Ordermill ships (deploy/rabbitmq/), taken by a real node: a node
of Debian's package (3.10; compose runs the 3.13 image) started by the test with the file in
its conf.d, as compose mounts it. RabbitMQ refuses to boot on a key it does not know, and the
test asks the running node for the value it runs with, beside a node without the file."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
WAL_CONF = ROOT / "deploy" / "rabbitmq" / "10-quorum-wal.conf"
# The size the quorum queues' Ra system runs with (not only the configured value).
IN_USE = "maps:get(wal_max_size_bytes, ra_system:fetch(quorum_queues))."
NO_SERVER = not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists()


@pytest.mark.slow
@pytest.mark.skipif(NO_SERVER, reason="no RabbitMQ server from Debian's package here")
async def test_a_node_with_the_shipped_file_rolls_its_quorum_log_at_64_mib(
    benches: Callable[[str], ModuleType],
) -> None:
    own = benches("own_servers")
    assert own.SHIPPED_CONF_D == (WAL_CONF,)  # own nodes (chaos, cluster) run with it too
    for conf_d, expected in (([WAL_CONF], 64 * 2**20), ([], 512 * 2**20)):  # RabbitMQ's own
        node = own.OwnRabbit(conf_d=conf_d)
        try:
            await node.start()
            assert await node.eval(IN_USE) == str(expected)
        finally:
            await node.close()


# -- the bench's view of that log (bench/quorum_log.py) -------------------------------------


def test_a_roll_is_a_change_of_the_current_log_file(benches: Callable[[str], ModuleType],
                                                     tmp_path: Path) -> None:
    ql = benches("quorum_log")
    (tmp_path / "00000007.wal").write_bytes(b"")
    answer = f'{{"{tmp_path}",\n 67108864,\n [5672,5673]}}\n'  # Erlang wraps long terms
    log, ports = ql.parse(answer)
    assert (log.directory, log.max_bytes, ports) == (tmp_path, 64 * 2**20, {5672, 5673})
    assert ql.find("amqp://u:p@127.0.0.1:5672/", answer) == log
    assert log.current() == "00000007.wal"
    assert ql.parse("{badrpc,nodedown}") is None
    # Not this node (another port), or not this machine for some URL: rabbitmqctl here would
    # answer for another node.
    assert ql.find("amqp://u:p@127.0.0.1:5699/", answer) is None
    assert ql.find("amqp://u:p@127.0.0.1:5672/,amqp://u:p@rmq2.example:5672/", answer) is None
    # A log directory this process cannot see (a container's, another host's): nothing, not
    # "rolled 0x".
    assert ql.find("amqp://u:p@localhost/", answer.replace(str(tmp_path), "/nowhere")) is None
    samples = [{"t": 0.0, "wal": "00000002.wal"}, {"t": 1.0, "wal": "00000002.wal"},
               {"t": 2.0, "wal": None}, {"t": 3.0, "wal": "00000003.wal"},
               {"t": 4.0, "wal": "00000004.wal"}]
    assert ql.rolls(samples) == [3.0, 4.0]  # a sample that could not read it is no roll
    assert ql.rolls(samples[:2]) == []
    assert ql.rolls([{"t": 0.0, "wal": None}]) is None
    assert "RabbitMQ's default" in ql.describe(512 * 2**20)
    assert "default" not in ql.describe(64 * 2**20)


@pytest.mark.broker
@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="no rabbitmqctl here")
def test_the_bench_finds_this_machines_broker_log(benches: Callable[[str], ModuleType]) -> None:
    ql = benches("quorum_log")
    answer = ql.ask()
    if answer is None:
        pytest.skip("rabbitmqctl cannot reach this machine's node (not root, or no cookie)")
    # It answered: what it said must parse, and name a log that is there.
    found = ql.find("amqp://guest:guest@127.0.0.1:5672/", answer)
    assert found is not None, answer
    assert found.max_bytes >= 2**20
    assert (found.current() or "").endswith(".wal")
