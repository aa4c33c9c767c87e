"""The RabbitMQ configuration Ordermill ships (deploy/rabbitmq/), taken by a real node: a node
of Debian's package started by the test with the file in its conf.d, as compose mounts it.
RabbitMQ refuses to boot on a key it does not know, and ignores nothing silently here: the
test asks the running node for the value."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
WAL_CONF = ROOT / "deploy" / "rabbitmq" / "10-quorum-wal.conf"


@pytest.mark.slow
async def test_a_node_with_the_shipped_file_rolls_its_quorum_log_at_64_mib(
    benches: Callable[[str], ModuleType],
) -> None:
    own = benches("own_servers")
    node = own.OwnRabbit(conf_d=[WAL_CONF])
    try:
        await node.start()
        # RabbitMQ's default is 512 MiB ({ok,536870912}): a file not read fails here.
        assert await node.app_env("ra", "wal_max_size_bytes") == f"{{ok,{64 * 2**20}}}"
    finally:
        await node.close()


# -- the bench's view of that log (bench/quorum_log.py) -------------------------------------


def test_a_roll_is_a_change_of_the_current_log_file(benches: Callable[[str], ModuleType]) -> None:
    ql = benches("quorum_log")
    found = ql.parse('{"/var/lib/rabbitmq/mnesia/r@h/quorum/r@h",67108864}\n')
    assert (found.directory, found.max_bytes) == (Path("/var/lib/rabbitmq/mnesia/r@h/quorum/r@h"),
                                                   64 * 2**20)
    assert ql.parse("{badrpc,nodedown}") is None
    samples = [{"t": 0.0, "wal": "00000002.wal"}, {"t": 1.0, "wal": "00000002.wal"},
               {"t": 2.0, "wal": None}, {"t": 3.0, "wal": "00000003.wal"},
               {"t": 4.0, "wal": "00000004.wal"}]
    assert ql.rolls(samples) == [3.0, 4.0]  # a sample that could not read it is no roll
    assert "RabbitMQ's default" in ql.QuorumLog(Path(), 512 * 2**20).describe()
    assert "default" not in ql.QuorumLog(Path(), 64 * 2**20).describe()
    # A broker on another machine: rabbitmqctl here would answer for another node.
    assert ql.find("amqp://u:p@rmq1.example:5672/,amqp://u:p@127.0.0.1:5672/") is None


@pytest.mark.broker
def test_the_bench_finds_this_machines_broker_log(benches: Callable[[str], ModuleType]) -> None:
    ql = benches("quorum_log")
    found = ql.find("amqp://guest:guest@127.0.0.1:5672/")
    if found is None:
        pytest.skip("rabbitmqctl cannot reach this machine's node (not root, or no cookie)")
    assert found.max_bytes >= 2**20
    assert (found.current() or "").endswith(".wal")
