"""Who may publish what (docs/contract.md, section 8; README "Production deployment").

Every message a worker acts on names its publisher in the AMQP `user_id` property, which
RabbitMQ checks against the connection's user. Each route declares the parties that may
send it; the runtime looks the validated user up here before it reads the body, so a
storefront's forged `review.command`, `email.send` or `order.screened` is dead-lettered
with the reason instead of being carried out.

Closed by default: a worker whose route no configured user may send refuses to start,
unless `TRUST_ANY_PUBLISHER` (development only) lets anyone send anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from shared.errors import ConfigurationError
from shared.settings_parts import PublisherSettings
from shared.settings_parts import amqp_user as amqp_user  # its home before the parts

# An operator's tool (the CLI's dead-letter replay) republishes a message for its first
# publisher: the consumer honours this header only from an operator, and then checks the
# first publisher's own rights (a storefront's replayed order is still a storefront's).
REPLAY_OF_HEADER = "x-ordermill-replay-of"


class Party(StrEnum):
    STOREFRONT = "storefront"
    GATEWAY = "gateway"
    OPERATOR = "operator"
    CONSOLE = "console"  # the web console's own user: vouches for the operator signed in
    SERVICE = "service"  # an Ordermill worker

    @property
    def setting(self) -> str:
        return _SETTING[self]


_SETTING = {
    Party.STOREFRONT: "STOREFRONT_USERS",
    Party.GATEWAY: "PAYMENT_PUBLISHERS",
    Party.OPERATOR: "OPERATOR_USERS",
    Party.CONSOLE: "CONSOLE_USERS",
    Party.SERVICE: "SERVICE_USERS",
}

# The parties a route takes when it names none: Ordermill's own events and commands.
INTERNAL = frozenset({Party.SERVICE})
PLACERS = frozenset({Party.STOREFRONT, Party.OPERATOR, Party.CONSOLE})
OPERATORS = frozenset({Party.OPERATOR, Party.CONSOLE})
PAYERS = frozenset({Party.GATEWAY, Party.OPERATOR})  # an operator records a payment by hand
_NONE: frozenset[Party] = frozenset()


@dataclass(frozen=True)
class Verdict:
    user: str | None  # the publisher the message acts for (validated, or vouched for)
    parties: frozenset[Party]
    allowed: bool
    reason: str = ""
    replayed_by: str | None = None


class UnknownPublishers(ConfigurationError):
    """A worker would serve a route no configured user may send: a one-line start error."""


@dataclass(frozen=True)
class Publishers:
    users: Mapping[Party, frozenset[str]]
    trust_any: bool = False
    # Each configured user's parties, worked out once: every message is checked against them.
    _by_user: Mapping[str, frozenset[Party]] = field(init=False, repr=False, compare=False)
    # A verdict is a function of (user, route's publishers) when nothing is replayed: kept for
    # the configured users (and none), a bounded set, so most messages cost one lookup.
    _verdicts: dict[tuple[str | None, frozenset[Party]], Verdict] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        everyone = set().union(*self.users.values())
        object.__setattr__(self, "_by_user", {user: frozenset(
            party for party, users in self.users.items() if user in users) for user in everyone})
        object.__setattr__(self, "_verdicts", {})

    @classmethod
    def from_settings(cls, settings: PublisherSettings) -> Publishers:
        own = settings.own_user
        return cls({
            Party.STOREFRONT: frozenset(settings.storefront_users),
            Party.GATEWAY: frozenset(settings.payment_publishers),
            Party.OPERATOR: frozenset(settings.operator_users),
            Party.CONSOLE: frozenset(settings.console_users),
            # A worker always trusts its own user: the all-in-one process publishes as one.
            Party.SERVICE: frozenset(settings.service_users) | ({own} if own else set()),
        }, trust_any=settings.trust_any_publisher)

    def parties_of(self, user: str | None) -> frozenset[Party]:
        if user is None:
            return _NONE
        return self._by_user.get(user, _NONE)

    def may_replay(self, user_id: str | None, allowed: frozenset[Party]) -> bool:
        """Whose replay (`x-ordermill-replay-of`) is believed: an operator's, for any route;
        the console's only on a route the console may send itself (order.place,
        review.command), so replaying never lends it a gateway's or a service's rights."""
        parties = self.parties_of(user_id)
        return Party.OPERATOR in parties or (Party.CONSOLE in parties and Party.CONSOLE in allowed)

    def check(self, user_id: str | None, allowed: frozenset[Party], *,
              replay_of: str | None = None) -> Verdict:
        if replay_of:
            return self._judge(user_id, allowed, replay_of)
        verdict = self._verdicts.get((user_id, allowed))
        if verdict is None:
            verdict = self._judge(user_id, allowed, None)
            if user_id is None or user_id in self._by_user:
                self._verdicts[user_id, allowed] = verdict
        return verdict

    def _judge(self, user_id: str | None, allowed: frozenset[Party],
               replay_of: str | None) -> Verdict:
        user, replayed_by = user_id, None
        if replay_of and self.may_replay(user_id, allowed):
            user, replayed_by = replay_of, user_id
        parties = self.parties_of(user)
        if self.trust_any or parties & allowed:
            return Verdict(user, parties, True, replayed_by=replayed_by)
        if user is None:
            reason = ("publisher unknown: the message has no user_id (publish with user_id set"
                      " to your RabbitMQ user)")
        else:
            who = " or ".join(sorted(p.value for p in allowed))
            reason = f"publisher {user!r} may not send this: it needs a {who} user"
        return Verdict(user, parties, False, reason, replayed_by)

    def require(self, service: str, routes: Iterable[tuple[str, frozenset[Party]]]) -> None:
        """Closed by default: every route needs at least one user who may send it."""
        if self.trust_any:
            return
        for key, allowed in routes:
            if not any(self.users.get(party) for party in allowed):
                names = ", ".join(sorted(party.setting for party in allowed))
                raise UnknownPublishers(
                    f"{service}: no user may publish {key}: set {names}"
                    " (comma-separated RabbitMQ users), or TRUST_ANY_PUBLISHER=true for development")


def operator_named(user: str | None, parties: frozenset[Party], named: str | None) -> str | None:
    """Who history names for an operator's message (docs/contract.md, section 8): the
    broker-validated user; for a console user that is not also an operator user, the operator
    signed in to the console, whom the body names (`named`) and the console vouches for; the
    body's name too where nobody is validated (development with TRUST_ANY_PUBLISHER). None
    when neither is known: the caller falls back to its own actor."""
    if named and (user is None or (Party.CONSOLE in parties and Party.OPERATOR not in parties)):
        return named
    return user
