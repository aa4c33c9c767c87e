"""`ordermill contract`: the message contract as an AsyncAPI 3.0 document and JSON Schemas,
generated from the contract classes (docs/contract.md, section 3 "Routing keys").

The document is built from the code, never written by hand: the routing keys and their
classes (`shared.contracts.EVENTS` and the three commands below), who publishes each
(`shared.parties` for storefronts, gateways and operators; `shared.topology.SERVICE_EMITS` for
the services) and who consumes it (`shared.topology.SERVICE_BINDINGS`). `docs/asyncapi.json` and
`docs/schemas/*.json` are its output, committed; tests/test_contract_docs.py regenerates them
and fails when they differ, so the published contract cannot drift from the code.

Payloads are pydantic's JSON Schema of each class: of what a worker accepts (`validation`) for
the commands that parties send, of what a worker publishes (`serialization`) for its events
(an amount is a decimal string there).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from shared.contracts import (
    EVENTS,
    PaymentReceived,
    PlaceOrder,
    PlaceReply,
    ReviewCommand,
    ReviewReply,
)
from shared.parties import OPERATORS, PAYERS, PLACERS, Party
from shared.topology import SERVICE_BINDINGS, SERVICE_EMITS, Names

# The contract's version (AsyncAPI `info.version`): 1.0.0 was the design as first written;
# 1.1.0 is issue 11's least privilege (docs/contract.md, section 9 "Changes"). Raise it with
# every change listed there.
CONTRACT_VERSION = "1.7.0"
ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
DEFAULT_NAMESPACE = "ordermill"


@dataclass(frozen=True)
class Command:
    """A routing key that a party outside Ordermill sends (docs/contract.md, section 8)."""

    model: type[BaseModel]
    publishers: frozenset[Party]
    summary: str


# The commands, with the parties their worker's route takes them from (the same constants the
# workers pass to `route(..., publishers=...)`).
COMMANDS: dict[str, Command] = {
    "order.place": Command(PlaceOrder, PLACERS, "Place an order (Add New Order)."),
    "payment.received": Command(PaymentReceived, PAYERS, "A payment against an invoice."),
    "review.command": Command(ReviewCommand, OPERATORS,
                              "An operator's action on an order; answered on `reply_to`."),
}

# Events that parties outside Ordermill listen to by binding queues of their own
# (docs/contract.md, section 3): a storefront learns its order's id or its refusal; the
# `ordermill place` command (an operator) waits for the same two.
LISTENERS: dict[Party, tuple[str, ...]] = {
    Party.STOREFRONT: ("order.placed", "order.rejected"),
    Party.OPERATOR: ("order.placed", "order.rejected"),
}

REPLY_CHANNEL = "review.reply"
PLACE_REPLY_CHANNEL = "order.place.reply"
# The answers sent to a command's `reply_to` queue: channel -> (the command, its answer).
REPLY_CHANNELS: dict[str, tuple[str, type[BaseModel]]] = {
    REPLY_CHANNEL: ("review.command", ReviewReply),
    PLACE_REPLY_CHANNEL: ("order.place", PlaceReply),
}


def routing_keys() -> list[str]:
    """Every routing key on the exchange: commands, events, and what a worker is bound to."""
    keys = set(COMMANDS) | set(EVENTS)
    for bound in SERVICE_BINDINGS.values():
        keys.update(bound)
    return sorted(keys)


def model_of(key: str) -> type[BaseModel]:
    if key in REPLY_CHANNELS:
        return REPLY_CHANNELS[key][1]
    if key in COMMANDS:
        return COMMANDS[key].model
    if key in EVENTS:
        return EVENTS[key]
    raise KeyError(f"routing key {key!r} has no contract class")


def mode_of(key: str) -> JsonSchemaMode:
    """Commands as the worker reads them; events as the worker writes them."""
    return "validation" if key in COMMANDS else "serialization"


def json_schema(key: str) -> dict[str, Any]:
    """The stand-alone JSON Schema (2020-12) of a routing key's body (or of the review reply,
    `review.reply`): docs/schemas/<key>.json."""
    model = model_of(key)
    schema = model.model_json_schema(mode=mode_of(key))
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": f"{key}.json", **schema}


def _asyncapi_schema(schema: Any) -> Any:
    """Pydantic's schema in the AsyncAPI Schema dialect: its `discriminator` is the property's
    name (OpenAPI's object with `propertyName` and `mapping` is not valid there)."""
    if isinstance(schema, dict):
        out = {k: _asyncapi_schema(v) for k, v in schema.items()}
        if isinstance(out.get("discriminator"), dict):
            out["discriminator"] = out["discriminator"]["propertyName"]
        return out
    if isinstance(schema, list):
        return [_asyncapi_schema(item) for item in schema]
    return schema


def _publishers(key: str) -> list[str]:
    """Who sends a key: parties (commands) and services (events), as operation owners."""
    if key in COMMANDS:
        # The console acts as an operator: both are named, each is a separate user.
        return sorted(party.value for party in COMMANDS[key].publishers)
    return [service for service, keys in SERVICE_EMITS.items() if key in keys]


def _consumers(key: str) -> list[str]:
    owners = [service for service, keys in SERVICE_BINDINGS.items() if key in keys]
    owners += [party.value for party, keys in LISTENERS.items() if key in keys]
    return owners


def _ref(*parts: str) -> dict[str, str]:
    escaped = (part.replace("~", "~0").replace("/", "~1") for part in parts)
    return {"$ref": "#/" + "/".join(escaped)}


def _message(key: str | None, model: type[BaseModel], description: str,
             channel: str = REPLY_CHANNEL) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": key or channel,
        "title": model.__name__,
        "summary": description,
        "contentType": "application/json",
        "payload": _ref("components", "schemas", model.__name__),
        "correlationId": {
            "description": "A reply echoes the request's correlation_id; an event carries the"
                           " message_id of the message that caused it.",
            "location": "$message.header#/correlation_id",
        },
        "bindings": {"amqp": {"bindingVersion": AMQP_BINDING_VERSION}},
    }
    if key is not None:
        # The AMQP `type` property is the routing key.
        message["bindings"]["amqp"]["messageType"] = key
    return message


# What each event says (docs/contract.md, section 3 "Routing keys"); a test checks that every
# event has one.
EVENT_SUMMARIES: dict[str, str] = {
    "order.placed": "An order is stored, Pending: its id, number, client, invoice, total and"
                    " items. Storefronts keep the events whose `storefront` is theirs.",
    "order.rejected": "An order was refused (bad input): its order_ref and the reason.",
    "fraud.redrive": "order.placed again, to the fraud queue only: the screening sweeper's"
                     " re-drive of an order left `queued`.",
    "order.screened": "Screening cleared the order (`passed`, `skipped`) or could not score it"
                      " (`error`).",
    "order.fraud": "The order is Fraud: from screening (with the score) or from an operator"
                   " (with the operator).",
    "order.accepted": "An operator accepted the order (with the Accept options).",
    "order.cancelled": "An operator denied or cancelled the order.",
    "order.pending": "An operator set the order back to Pending.",
    "order.deleted": "An operator deleted (hid) a Cancelled or Fraud order; its record is kept.",
    "order.retry": "An operator asked for the order's parked setups to run again.",
    "order.rescreen": "An operator asked for the order to be screened again.",
    "invoice.paid": "An invoice is paid in full (or was 0.00).",
    "payment.unapplied": "A payment was stored but could not be applied: the reason.",
    "service.created": "A hosting account (service) was created or adopted.",
    "service.terminated": "A hosting account was terminated.",
    "service.failed": "A create or termination was parked after its retries: an operator must"
                      " look.",
    "domain.registered": "A domain was registered or transferred (or submitted: `Pending"
                         " Registration`, `Pending Transfer`).",
    "domain.failed": "A registration or transfer was parked after its retries.",
    "email.send": "A request for one customer email (sent once per dedupe key).",
}


def _summary(key: str) -> str:
    if key in COMMANDS:
        return COMMANDS[key].summary
    return EVENT_SUMMARIES[key]


def asyncapi(namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the exchange `namespace`."""
    names = Names(namespace)
    keys = routing_keys()
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (model_of(key), mode_of(key)) for key in keys]
    models += [(model, "serialization") for _, model in REPLY_CHANNELS.values()]
    refs, defs = models_json_schema(
        models, ref_template="#/components/schemas/{model}")
    schemas = _asyncapi_schema(defs.get("$defs", {}))
    for (model, _mode), ref in refs.items():
        # A message's payload is named by its class. pydantic suffixes a name (-Input, -Output)
        # when one class has two different schemas: give the event a class of its own then.
        if ref != _ref("components", "schemas", model.__name__):
            raise TypeError(f"{model.__name__} has two JSON Schemas ({ref['$ref']})")

    exchange = {"name": names.exchange, "type": "topic", "durable": True, "autoDelete": False,
                "vhost": "/"}
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    for key in keys:
        model = model_of(key)
        name = model.__name__  # FraudRedrive has OrderPlaced's shape but is its own message
        messages[name] = _message(key, model, _summary(key))
        channels[key] = {
            "address": key,
            "title": key,
            "summary": _summary(key),
            "messages": {name: _ref("components", "messages", name)},
            "bindings": {"amqp": {"is": "routingKey", "exchange": dict(exchange),
                                  "bindingVersion": AMQP_BINDING_VERSION}},
        }
        channel_message = [_ref("channels", key, "messages", name)]
        for owner in _publishers(key):
            operations[f"{owner}.send.{key}"] = {
                "action": "send",
                "channel": _ref("channels", key),
                "messages": channel_message,
                "summary": f"{owner} publishes `{key}` on the exchange `{names.exchange}`.",
                "tags": [{"name": owner}],
                "bindings": {"amqp": {"deliveryMode": 2, "mandatory": True,
                                      "bindingVersion": AMQP_BINDING_VERSION}},
            }
        for owner in _consumers(key):
            if owner in SERVICE_BINDINGS:
                where = (f"from the quorum queue `{names.queue(owner)}` (dead letters:"
                         f" `{names.dead_queue(owner)}`)")
            else:
                where = "from a queue of its own bound to the key"
            operation: dict[str, Any] = {
                "action": "receive",
                "channel": _ref("channels", key),
                "messages": channel_message,
                "summary": f"{owner} consumes `{key}` {where}.",
                "tags": [{"name": owner}],
                "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
            }
            replies = [(c, m) for c, (command, m) in REPLY_CHANNELS.items() if command == key]
            for channel, reply in replies:
                operation["reply"] = {
                    "address": {"location": "$message.header#/reply_to",
                                "description": "The sender's own reply queue (`amq.gen-...`"
                                               " or `amq.rabbitmq.reply-to`)."},
                    "channel": _ref("channels", channel),
                    "messages": [_ref("channels", channel, "messages", reply.__name__)],
                }
            operations[f"{owner}.receive.{key}"] = operation

    # The answers (review's, placement's): sent through the default exchange to `reply_to`.
    for channel, (command, reply) in REPLY_CHANNELS.items():
        name = reply.__name__
        messages[name] = _message(None, reply, " ".join((reply.__doc__ or "").split()),
                                  channel)
        channels[channel] = {
            "address": None,
            "title": f"{command} replies",
            "summary": f"The answer to a {command}, sent to its `reply_to` queue with the"
                       " request's correlation_id.",
            "messages": {name: _ref("components", "messages", name)},
        }

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Ordermill",
            "version": CONTRACT_VERSION,
            "description": (
                "The order back office's message contract (docs/contract.md). One durable topic"
                f" exchange `{names.exchange}` carries commands and events; each channel is a"
                " routing key. Dead letters go to the direct exchange"
                f" `{names.dead_letter_exchange}`, into `<queue>.dead`. Publish JSON,"
                " persistent, with a unique message_id, `type` set to the routing key and"
                " `user_id` set to your RabbitMQ user. Generated by `ordermill contract`."),
            "license": {"name": "MIT"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": "127.0.0.1:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "RabbitMQ (AMQP_URL; the local default shown). Names carry the"
                               " namespace ORDERMILL_NAMESPACE.",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def dumps(document: Any) -> str:
    """JSON as committed: indented, keys in the order built, a final newline."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def files(namespace: str = DEFAULT_NAMESPACE, *, yaml: bool = False) -> dict[str, str]:
    """Every file `ordermill contract --out DIR` writes, by path relative to DIR."""
    document = asyncapi(namespace)
    out = {("asyncapi.yaml" if yaml else "asyncapi.json"): render(document, yaml=yaml)}
    for key in [*routing_keys(), *REPLY_CHANNELS]:
        out[f"schemas/{key}.json"] = dumps(json_schema(key))
    return out


def render(document: Any, *, yaml: bool = False) -> str:
    if not yaml:
        return dumps(document)
    try:
        import yaml as pyyaml
    except ImportError:
        raise RuntimeError("YAML needs PyYAML (pip install pyyaml); JSON needs nothing") from None
    # Through JSON first: objects the document shares would be YAML anchors (&id001).
    return pyyaml.safe_dump(json.loads(dumps(document)), sort_keys=False, allow_unicode=True,
                            width=100)


def write(out_dir: Path, namespace: str = DEFAULT_NAMESPACE, *, yaml: bool = False) -> list[Path]:
    """Write the files, removing schemas of keys that no longer exist; the paths written."""
    wanted = files(namespace, yaml=yaml)
    schemas = out_dir / "schemas"
    schemas.mkdir(parents=True, exist_ok=True)
    stale: Iterable[Path] = (p for p in schemas.glob("*.json")
                             if f"schemas/{p.name}" not in wanted)
    for path in list(stale):
        path.unlink()
    written = []
    for relative, text in wanted.items():
        path = out_dir / relative
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
