"""AMQP_URL as a list of a cluster's nodes: settings, the first node that answers, and a worker
moving to another node when its own goes (played by TCP proxies to the local RabbitMQ, each a
"node" the test takes down)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aio_pika
import pytest
from aiormq.exceptions import ChannelPreconditionFailed
from pydantic import ValidationError

from conftest import Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from shared import broker
from shared.failover import FailoverConnection
from shared.runtime import describe_validation_error
from shared.settings import Settings
from shared.settings_parts import amqp_urls, amqp_user, hide_password
from shared.topology import Names, declare_topology
from test_processes import Proxy, _free_port, through

TWO = "amqp://svc:pw1@rmq1:5672/,amqp://svc:pw1@rmq2:5672/"


def test_a_url_list_is_split_checked_and_kept_whole() -> None:
    s = Settings(amqp_url=" amqp://svc:pw1@rmq1:5672/ , amqp://svc:pw1@rmq2:5672/,")
    assert s.amqp_url == TWO
    assert amqp_urls(s.amqp_url) == ["amqp://svc:pw1@rmq1:5672/", "amqp://svc:pw1@rmq2:5672/"]
    assert amqp_user(s.amqp_url) == "svc" and s.publishers.own_user == "svc"
    assert Settings(amqp_url="amqp://a:b@one/").amqp_url == "amqp://a:b@one/"  # one URL, as ever


@pytest.mark.parametrize("value, says", [
    ("amqp://svc:pw@rmq1/,amqp://other:pw@rmq2/", "different users"),
    ("amqp://svc:pw@rmq1/a,amqp://svc:pw@rmq2/b", "different users or virtual hosts"),
    ("amqp://svc:pw@rmq1/,http://svc:pw@rmq2/", "not an amqp"),
    (",", "no URL"),
])
def test_a_bad_url_list_is_one_line_without_the_password(value: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says) as err:
        Settings(amqp_url=value)
    shown = describe_validation_error(err.value, prefix="", env_names=True)  # what is printed
    assert shown.startswith("AMQP_URL: ") and "pw@" not in shown and "\n" not in shown


def test_the_password_file_fills_every_node_and_no_repr_shows_it(tmp_path: Path) -> None:
    secret = tmp_path / "amqp-password"
    secret.write_text("s3cr/t\n")
    s = Settings(amqp_url="amqp://svc@rmq1:5672/vh,amqp://svc:old@rmq2:5672/vh",
                 amqp_password_file=str(secret))
    assert s.amqp_url == "amqp://svc:s3cr%2Ft@rmq1:5672/vh,amqp://svc:s3cr%2Ft@rmq2:5672/vh"
    for shown in (repr(s), str(s), repr(s.broker), repr(s.dead_payments)):
        assert "s3cr" not in shown
    assert hide_password(s.amqp_url) == "amqp://svc:***@rmq1:5672/vh,amqp://svc:***@rmq2:5672/vh"


async def test_connect_takes_the_first_node_that_answers(settings: Settings,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    dead = f"amqp://guest:secret-pw@127.0.0.1:{_free_port()}/"  # nothing listens there
    caplog.set_level(logging.WARNING, "ordermill.broker")
    connection = await broker.connect(f"{dead},{settings.amqp_url}", attempts=1)
    try:
        assert isinstance(connection, FailoverConnection)
        assert connection.url.port == 5672 and connection.index == 1
        channel = await connection.channel()
        assert not channel.is_closed
    finally:
        await connection.close()
    assert "unreachable" in caplog.text and "secret-pw" not in caplog.text
    with pytest.raises(ConnectionError):  # none answers: the last error, after the attempts
        await broker.connect(f"{dead},{dead.replace('secret-pw', 'x')}", attempts=1)


async def test_a_connection_moves_to_the_next_node_when_its_node_goes(settings: Settings) -> None:
    """A consumer on a robust channel keeps receiving after its node goes: aio-pika restores
    the channel and its consumer on the next URL."""
    node1, node2 = Proxy(5672), Proxy(5672)
    await node1.start()
    await node2.start()
    urls = f"{through(settings.amqp_url, node1)},{through(settings.amqp_url, node2)}"
    connection = await broker.connect(urls, attempts=1)
    publisher = await aio_pika.connect(settings.amqp_url)
    try:
        assert isinstance(connection, FailoverConnection) and connection.url.port == node1.port
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{settings.namespace}.failover", durable=True,
                                            arguments={"x-queue-type": "quorum"})
        got: list[bytes] = []

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            got.append(message.body)
            await message.ack()

        await queue.consume(on_message)
        send = await publisher.channel()
        await send.default_exchange.publish(aio_pika.Message(b"one"), routing_key=queue.name)
        await eventually(lambda: asyncio.sleep(0, got == [b"one"]))
        node1.down()  # its node goes: the connection drops, node1 refuses from now on
        await eventually(lambda: asyncio.sleep(0, connection.connected.is_set()
                                               and connection.url.port == node2.port), timeout=20)
        await send.default_exchange.publish(aio_pika.Message(b"two"), routing_key=queue.name)
        await eventually(lambda: asyncio.sleep(0, got == [b"one", b"two"]), timeout=20)
        assert connection.failovers >= 1 and len(node2.writers) > 0
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await publisher.close()
        await connection.close()
        node1.close()
        node2.close()


async def test_a_worker_moves_to_another_node_and_screens_what_comes_after(
    harness: Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    """The runtime (consumers, publisher, outbox relay) over a list: a dead port first, two
    live "nodes"; the one it took goes away mid-stream, the orders after are screened."""
    node1, node2 = Proxy(5672), Proxy(5672)
    await node1.start()
    await node2.start()
    s = harness.settings
    dead = s.amqp_url.replace(":5672/", f":{_free_port()}/")
    urls = ",".join((dead, through(s.amqp_url, node1), through(s.amqp_url, node2)))
    caplog.set_level(logging.WARNING, "ordermill.broker")
    try:
        runtime = await harness.start([placement_worker(s), fraud_worker(s)], amqp_url=urls)
        assert isinstance(runtime.connection, FailoverConnection)
        assert runtime.connection.url.port == node1.port  # the first that answered
        for n in range(20):
            await harness.publish("order.place", order_body(f"fo-a-{n:02d}"))
        for n in range(20):
            await harness.screened(f"fo-a-{n:02d}", timeout=30)
        node1.down()
        for n in range(20):
            await harness.publish("order.place", order_body(f"fo-b-{n:02d}"))
        for n in range(20):
            await harness.screened(f"fo-b-{n:02d}", timeout=60)
        assert runtime.connection.url.port == node2.port
    finally:
        await harness.stop_all()
        node1.close()
        node2.close()
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM orders WHERE order_ref LIKE 'fo-%'") == 40
    assert await harness.pool.fetchval(  # each once: redeliveries after the move deduplicated
        "SELECT count(*) FROM fraud_checks f JOIN orders o ON o.id = f.order_id"
        " WHERE o.order_ref LIKE 'fo-%'") == 40
    assert "trying the next" in caplog.text and "guest:guest" not in caplog.text


async def test_queue_replicas_apply_to_new_queues_and_an_existing_queue_is_kept(
    settings: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    """QUEUE_REPLICAS is the quorum queues' initial group size; a queue declared with another
    one (or none) is kept as it is, with a warning, instead of refusing the worker's start."""
    names = Names(settings.namespace)
    connection = await broker.connect(settings.amqp_url, attempts=1)
    try:
        await declare_topology(connection, names, delivery_limit=20, replicas=1)
        caplog.set_level(logging.WARNING, "ordermill.topology")
        await declare_topology(connection, names, delivery_limit=20, replicas=1)
        assert "replicas" not in caplog.text  # declared with a group size of 1: equivalent
        await declare_topology(connection, names, delivery_limit=20, replicas=3)
        kept = [r for r in caplog.records if "kept with the replicas" in r.getMessage()]
        assert {r.queue for r in kept} == set(names.all_queues())  # type: ignore[attr-defined]
        with pytest.raises(ChannelPreconditionFailed, match="x-delivery-limit"):
            await declare_topology(connection, names, delivery_limit=21, replicas=1)
        await declare_topology(connection, names, delivery_limit=20)  # unset: kept too
    finally:
        await connection.close()


async def test_a_connect_cancelled_mid_attempt_leaves_no_reconnect_behind() -> None:
    """A stop while the broker is still coming up cancels the connect: aio-pika took that
    for a failed attempt and reconnected by itself 5 s later, a task that outlived the
    cancellation and kept the worker process from ending (its event loop waited for it)."""
    attempts = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1  # a TCP connection that never answers the AMQP handshake
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        connecting = asyncio.create_task(broker.connect(f"amqp://guest:guest@127.0.0.1:{port}/"))
        await eventually(lambda: asyncio.sleep(0, attempts == 1), timeout=5)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        await asyncio.sleep(6)  # past aio-pika's 5 s reconnect delay
        assert attempts == 1
    finally:
        server.close()
