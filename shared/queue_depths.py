"""Queue depth by passive declares (docs/contract.md, section 3: the management plugin is not
assumed). Here rather than in cli/ because a service reads it too: the alerts worker's sweep
watches the dead-letter queues, as `ordermill queues`, the console and the exporter show them.

A passive declare needs no permission on the queue, so any worker's RabbitMQ user reads the
depths of every queue of its namespace, and changes nothing."""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractConnection
from aiormq.exceptions import ChannelNotFoundEntity

from shared.topology import Names


async def queue_depths(connection: AbstractConnection, names: Names,
                       queues: list[str] | None = None) -> list[dict[str, Any]]:
    """Depth and consumers of each queue (every work and dead-letter queue by default); a
    queue not declared yet is `missing` (a refused passive declare closes its channel, so
    each queue gets a channel of its own)."""
    depths = []
    for queue_name in names.all_queues() if queues is None else queues:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
            result = queue.declaration_result
            depths.append({"queue": queue_name, "messages": result.message_count,
                           "consumers": result.consumer_count})
        except ChannelNotFoundEntity:
            depths.append({"queue": queue_name, "messages": None, "consumers": None,
                           "missing": True})
        finally:
            if not channel.is_closed:
                await channel.close()
    return depths


def dead_queues(names: Names) -> list[str]:
    return [q for q in names.all_queues() if q.endswith(".dead")]
