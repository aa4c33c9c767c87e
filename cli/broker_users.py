"""Least privilege on the broker: a RabbitMQ user per party, with exactly the rights it needs.

`ordermill broker users` writes a definitions file for `rabbitmqctl import_definitions`
(users with salted SHA-256 password hashes, vhost permissions and topic permissions on the
namespace's exchange) and each new user's password to a file of its own, readable by its
owner only: no password is printed. RabbitMQ's permission table (configure, write, read):
a publish needs write on the exchange, a consume or `basic.get` read on the queue, a bind
write on the queue and read on the exchange; topic permissions limit the routing keys a
user may publish to the topic exchange.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.parties import Party
from shared.topology import SERVICE_BINDINGS, SERVICE_EMITS, Names

NOTHING = "^$"
SERVER_NAMED = r"amq\.gen-.*"  # exclusive reply and listening queues the broker names
# What storefronts may hear about their orders (each binds a queue of its own).
STOREFRONT_EVENTS = (r"order\.(placed|rejected|screened|fraud|accepted|cancelled|pending)"
                     r"|invoice\.paid|payment\.unapplied|service\..*|domain\..*")


@dataclass(frozen=True)
class BrokerUser:
    name: str
    party: Party | None  # None: the administrator that runs `ordermill migrate`
    configure: str
    write: str
    read: str
    topic_write: str
    topic_read: str
    service: str | None = None


def _any(*patterns: str) -> str:
    return "^(" + "|".join(patterns) + ")$"


def _keys(keys: tuple[str, ...]) -> str:
    return _any(*(re.escape(k) for k in keys)) if keys else NOTHING


def plan_users(names: Names, *, storefronts: list[str], gateways: list[str],
               operators: list[str], consoles: list[str], prefix: str,
               admin: str | None = None) -> list[BrokerUser]:
    ns, dlx = re.escape(names.exchange), re.escape(names.dead_letter_exchange)
    dead = re.escape(names.namespace) + r"\.[^.]+\.dead"
    users = [
        BrokerUser(name, Party.STOREFRONT, _any(SERVER_NAMED), _any(ns, SERVER_NAMED),
                   _any(ns, SERVER_NAMED), _keys(("order.place",)), f"^({STOREFRONT_EVENTS})$")
        for name in storefronts
    ]
    users += [BrokerUser(name, Party.GATEWAY, NOTHING, _any(ns), NOTHING,
                         _keys(("payment.received",)), NOTHING) for name in gateways]
    # Operators and the console: commands and orders; reply queues; dead letters (listed with
    # basic.get and replayed with their own routing keys, hence any key on the exchange).
    for party, group in ((Party.OPERATOR, operators), (Party.CONSOLE, consoles)):
        users += [BrokerUser(name, party, _any(SERVER_NAMED), _any(ns, SERVER_NAMED, dead),
                             _any(ns, SERVER_NAMED, dead), ".*", NOTHING) for name in group]
    for service, keys in SERVICE_BINDINGS.items():
        own = re.escape(names.queue(service))
        queues = (own, own + r"\.dead")
        # Review answers commands, placement an order.place that named a reply queue: both
        # through the default exchange, to the sender's amq.gen-* queue.
        replies = service in ("review", "placement")
        writes = (ns, dlx, *queues) + (("amq\\.default",) if replies else ())
        users.append(BrokerUser(
            f"{prefix}-{service}", Party.SERVICE, _any(ns, dlx, *queues), _any(*writes),
            _any(ns, dlx, *queues), _keys(SERVICE_EMITS[service]), _keys(keys), service))
    if admin:
        # `ordermill migrate` declares every queue and exchange of the namespace; nothing else
        # runs as this user.
        ours = re.escape(names.namespace) + r"(\..*)?"
        users.append(BrokerUser(admin, None, _any(ours), _any(ours), _any(ours), NOTHING,
                                NOTHING))
    return users


def readable_keys(pattern: str) -> str:
    """A topic permission as an operator reads it: the routing keys, not the regex."""
    if pattern == ".*":
        return "any key"
    if pattern == NOTHING:
        return "nothing"
    return pattern.removeprefix("^(").removesuffix(")$").replace("\\.", ".").replace("|", ", ")


def password_hash(password: str) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(users: list[BrokerUser], passwords: dict[str, str], *, vhost: str,
                exchange: str) -> dict[str, Any]:
    return {
        "users": [{"name": u.name, "password_hash": password_hash(passwords[u.name]),
                   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []}
                  for u in users],
        "permissions": [{"user": u.name, "vhost": vhost, "configure": u.configure,
                         "write": u.write, "read": u.read} for u in users],
        "topic_permissions": [{"user": u.name, "vhost": vhost, "exchange": exchange,
                               "write": u.topic_write, "read": u.topic_read} for u in users],
    }


def settings_for(users: list[BrokerUser]) -> dict[str, str]:
    """The settings every worker needs to know who is who."""
    return {party.setting: ",".join(u.name for u in users if u.party is party)
            for party in Party}


def write_secrets(folder: Path, passwords: dict[str, str]) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, password in passwords.items():
        path = folder / f"{name}.password"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(password + "\n")
