"""Exceptions that tell the runtime (or the CLI) what kind of failure was met."""

from enum import StrEnum


class RejectKind(StrEnum):
    """Why a message was dead-lettered, as a small closed set: the `reason` label of
    `ordermill_messages_rejected_total` (the reason's text, which quotes the message, is
    the dead letter's header, never a label)."""

    PROPERTIES = "properties"  # a property that cannot be read, stored or sent again
    NO_ROUTE = "no_route"  # no handler for its routing key in this worker
    PUBLISHER = "publisher"  # its sender may not publish it
    MALFORMED = "malformed"  # not JSON, too large, nested too deeply
    INVALID = "invalid"  # JSON, but not the contract's shape
    DUPLICATE_ID = "duplicate_id"  # a message id used before for a different message
    REFUSED = "refused"  # the handler refused it (unknown product, client, order ...)
    PREPARE_FAILED = "prepare_failed"  # the step before the transaction failed
    HANDLER_ERROR = "handler_error"  # the handler failed unexpectedly
    TRANSIENT = "transient"  # a transient error outlived its retries, the database answering


class ConfigurationError(Exception):
    """A setting a worker cannot start with: `ordermill run` says so in one line and stops."""


class Rejected(Exception):
    """Bad input: the message can never succeed as it is. Dead-lettered at once with the reason."""

    def __init__(self, reason: str, *, tell_publisher: bool = True,
                 kind: RejectKind = RejectKind.REFUSED) -> None:
        super().__init__(reason)
        self.reason = reason
        # False where the publisher's rejection event would mislead (its order may exist).
        self.tell_publisher = tell_publisher
        self.kind = kind  # what the runtime counts it as; a handler's refusal by default
