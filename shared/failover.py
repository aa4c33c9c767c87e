"""A robust AMQP connection over several URLs (a RabbitMQ cluster's nodes), for AMQP_URL's list.

aio-pika's robust connection reconnects to the one URL it was made with (aio-pika issue #141:
multiple hosts are left to the application). Every reconnection attempt of it, failed or lost,
goes through `_on_connection_close`; this class moves to the next URL there, before the
connection's own loop tries again. So the rest is aio-pika's, unchanged: its channels, their
consumers and declared queues restored on the new node, `reconnect_callbacks`, the pause
between failed attempts (`reconnect_interval`, 5 s, a query parameter of the URL: the first
URL's query parameters apply to every node).

Order: the first connection tries the URLs in their order (shared/broker.connect); a lost
connection goes to the next one in the list at once, a refused one to the next after the
pause, round and round. A worker whose node comes back stays where it is: connections are not
rebalanced (start workers with the list rotated to spread them).

Nothing here logs a password: aio-pika writes a URL with `******`, and the lines below name
the host and port only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aio_pika import RobustConnection
from yarl import URL

log = logging.getLogger("ordermill.broker")


def node_of(url: URL) -> str:
    """host:port, never the credentials: for a log line."""
    return f"{url.host}:{url.port}"


class FailoverConnection(RobustConnection):
    """RobustConnection that, each time a connection to its current URL ends or cannot be
    made, moves to the next of `urls` (starting at `start`)."""

    def __init__(self, urls: Sequence[str | URL], *, start: int = 0, **kwargs: Any) -> None:
        if not urls:
            raise ValueError("no AMQP URL")
        self.urls = [URL(str(url)) for url in urls]
        self.index = start % len(self.urls)
        self.failovers = 0  # moves to another URL after the first connection
        super().__init__(self.urls[self.index], **kwargs)

    @property
    def node(self) -> str:
        """The node this connection is (or will next try to be) connected to: host:port."""
        return node_of(self.url)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if len(self.urls) > 1 and not self._close_called and not self.is_closed:
            was = self.node
            self.index = (self.index + 1) % len(self.urls)
            self.url = self.urls[self.index]
            if self.connection_attempt:  # not while the first connection is being made
                self.failovers += 1
                log.warning("RabbitMQ node lost or unreachable; trying the next",
                            extra={"node": was, "next": self.node})
        await super()._on_connection_close(closing)
