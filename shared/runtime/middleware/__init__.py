"""The pipeline's middleware, one concern per module, in the order a delivery meets them
(see shared/runtime/pipeline.py for how they are chained)."""

from shared.runtime.middleware.checks import PropertyChecks
from shared.runtime.middleware.dead_letter import DeadLetter, dead_letter_copy
from shared.runtime.middleware.handler import CallHandler
from shared.runtime.middleware.inbox import InboxDedupe, OncePerBatch
from shared.runtime.middleware.load import Load
from shared.runtime.middleware.metrics import MessageMetrics
from shared.runtime.middleware.outage import OutageHold
from shared.runtime.middleware.outbox import OutboxFlush
from shared.runtime.middleware.parse import Parse
from shared.runtime.middleware.prepare import Prepare
from shared.runtime.middleware.publishers import PublisherCheck
from shared.runtime.middleware.retry import TransientRetry
from shared.runtime.middleware.routing import Routing
from shared.runtime.middleware.transaction import Transaction
from shared.runtime.middleware.wanted import Wanted

__all__ = [
    "CallHandler",
    "DeadLetter",
    "InboxDedupe",
    "Load",
    "MessageMetrics",
    "OncePerBatch",
    "OutageHold",
    "OutboxFlush",
    "Parse",
    "Prepare",
    "PropertyChecks",
    "PublisherCheck",
    "Routing",
    "Transaction",
    "TransientRetry",
    "Wanted",
    "dead_letter_copy",
]
