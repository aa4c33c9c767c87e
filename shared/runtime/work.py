"""What travels through the pipeline: one delivery (`Work`), a batch of them, and what the
pipeline needs from a transport (`Transport`): the broker's side of settling a message."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel

from shared.errors import RejectKind
from shared.parties import Verdict
from shared.runtime.routes import Route, WorkerSpec
from shared.runtime.text import body_id
from shared.uow import MessageContext, UnitOfWork


class Transport(Protocol):
    """Settling a delivery: the pipeline decides, the transport does it (AMQP or in memory)."""

    async def ack(self, message: AbstractIncomingMessage) -> None: ...

    async def ack_all(self, messages: list[AbstractIncomingMessage]) -> None:
        """A committed batch's messages (in one frame where the transport can)."""

    async def requeue(self, messages: list[AbstractIncomingMessage]) -> None:
        """Back to the queue, unsettled messages only, never raising."""

    async def dead_letter(self, queue: str, message: AbstractIncomingMessage,
                          copy: aio_pika.Message) -> None:
        """Publish `copy` to the dead-letter exchange with confirms, then ack `message`."""


class Outcome(StrEnum):
    """How a delivery was settled (what the metrics middleware counts)."""

    ACKED = "acked"
    DEAD = "dead"  # dead-lettered, with a RejectKind
    REQUEUED = "requeued"  # handed back to the broker (stopping, a failure outside any handler)


class StepFailed(Exception):
    """A step outside the handler failed (a prepare call): dead-lettered with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False, init=False)
class Work:
    """One delivery, filled in as it passes the middleware: its id and properties, its route,
    the publisher's verdict, the parsed message, the prepared result.

    Made with the message and the worker only: every other field reads its default from the
    class until a middleware sets it (two stores per delivery, not eighteen), and
    `message_id` is a plain attribute once the property checks set it."""

    message: AbstractIncomingMessage
    spec: WorkerSpec
    key: str = ""
    route: Route | None = None
    verdict: Verdict | None = None
    expires_at: datetime | None = None
    data: Any = None  # the JSON as read, for the dead letter and the rejection event
    payload: BaseModel | None = None
    context: MessageContext | None = None
    prepared: Any = None
    has_prepared: bool = False
    loaded: Any = None  # what the route's load step read for it, in this transaction
    settled: bool = False  # dead-lettered or requeued: nothing more to do with it
    # Recorded as it is settled, for the metrics: how, why it was rejected, and how often it
    # ran again in process (a transient retry, the database back after an outage).
    outcome: Outcome | None = None
    rejected_as: RejectKind | None = None
    retries: int = 0

    if TYPE_CHECKING:
        message_id: str
    else:
        def __getattr__(self, name: str) -> Any:
            """Only for what is not set: `message_id` before the property checks set it is the
            body's (a SHA-256), computed only if read (a rejection's dead letter): most
            messages bring an id of their own, and hashing every body cost more than the
            checks themselves."""
            if name == "message_id":
                self.message_id = body_id(self.message.body)
                return self.message_id
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __init__(self, message: AbstractIncomingMessage, spec: WorkerSpec) -> None:
        self.message = message
        self.spec = spec

    @classmethod
    def of(cls, message: AbstractIncomingMessage, spec: WorkerSpec) -> Work:
        return cls(message, spec)

    @property
    def body_hash(self) -> bytes:
        """Of what the handler reads, not of the bytes: a re-send formatted otherwise, or with
        fields the contract ignores (a storefront's `sent_at`), is the same message."""
        assert self.payload is not None
        return hashlib.blake2b(self.payload.model_dump_json().encode(), digest_size=16).digest()


@dataclass(eq=False)
class Batch:
    """Deliveries sharing one transaction (one, unless under load)."""

    items: list[Work]
    conn: asyncpg.Connection | None = None
    todo: list[Work] = field(default_factory=list)  # not handled before (the inbox says)
    uows: list[UnitOfWork] = field(default_factory=list)

    @property
    def messages(self) -> list[AbstractIncomingMessage]:
        return [item.message for item in self.items]
