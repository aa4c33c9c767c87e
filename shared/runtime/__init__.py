"""The worker runtime, written once for every service: an AMQP transport and a pipeline of
middleware, each in its own small module.

    routes.py       Route, route(), WorkerSpec: what a worker serves; handlers take (message, uow)
    process.py      Runtime: one process's pool and connection, its workers' start and clean stop
    transport.py    AmqpTransport: consume, prefetch, ack, requeue, dead-letter a copy
    batching.py     batchers: one message when idle, many under load
    chain.py        Middleware and Chain: the onion every concern is written against
    pipeline.py     Pipeline: the declared order, and a failed batch's fallback to one by one
    middleware/     one concern each: property checks, routing, publisher check, parse,
                    dead letter, outage hold, transient retry, prepare, transaction,
                    inbox dedupe, outbox flush, load (a batch's shared reads), handler
    work.py         Work and Batch (what flows through), the Transport protocol
    text.py         reasons, dead-letter headers, redaction
    testing.py      a broker-free harness: the same pipeline, in memory, on a real database
"""

from shared.runtime.chain import Middleware
from shared.runtime.pipeline import Pipeline
from shared.runtime.process import Runtime
from shared.runtime.routes import Handler, Load, Prepare, Route, WorkerSpec, route
from shared.runtime.text import (
    REASON_HEADER,
    REASON_LIMIT,
    REDACTED,
    REPLAYS_HEADER,
    SECRET_KEYS,
    describe_validation_error,
    redact,
)

__all__ = [
    "REASON_HEADER",
    "REASON_LIMIT",
    "REDACTED",
    "REPLAYS_HEADER",
    "SECRET_KEYS",
    "Handler",
    "Load",
    "Middleware",
    "Pipeline",
    "Prepare",
    "Route",
    "Runtime",
    "WorkerSpec",
    "describe_validation_error",
    "redact",
    "route",
]
