"""The fraud provider interface: the handler scores through it, whichever provider it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol


@dataclass(frozen=True)
class CartLine:
    kind: str  # 'product' or 'domain'
    name: str  # product slug or domain
    amount: Decimal


@dataclass(frozen=True)
class OrderFacts:
    """What a provider may look at; fields the client lacks are None, not faked."""

    order_id: int
    order_number: int
    order_ref: str
    client_id: int
    email: str
    first_name: str
    last_name: str
    company: str | None
    country: str | None
    ip_address: str | None
    total: Decimal
    currency: str
    payment_method: str | None
    cart: tuple[CartLine, ...]
    # No earlier order that went through (Active, or Pending, cleared and paid): one refused as
    # Fraud, cancelled, free or unpaid does not make a client known.
    client_is_new: bool
    orders_from_ip: int  # in the velocity window, this one included
    orders_from_client: int  # in the velocity window, this one included
    placed_at: datetime | None = None
    address1: str | None = None
    address2: str | None = None
    city: str | None = None
    state: str | None = None
    postcode: str | None = None
    phone: str | None = None
    earlier_fraud_orders: int = 0  # this client's earlier orders now Fraud
    earlier_cancelled_orders: int = 0  # this client's earlier orders now Cancelled
    domains: tuple[str, ...] = ()  # the order's domain names (hosting and domain items)
    default_currency: str | None = None  # the catalog's


@dataclass(frozen=True)
class Reason:
    code: str
    description: str
    points: Decimal = Decimal("0")

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "description": self.description, "points": str(self.points)}


@dataclass(frozen=True)
class FraudResult:
    score: Decimal  # MaxMind-style risk: 0.01 to 99
    reasons: tuple[Reason, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)
    # A provider may decide on its own (a disposition 'reject'), whatever the score.
    reject: bool = False
    # A provider may hold the order for a person (FraudLabs Pro's REVIEW): the review band.
    review: bool = False
    # The IP address's country where the provider tells it (ISO 3166-1 alpha-2): the
    # operator rules' `ip_country` reads it.
    ip_country: str | None = None


MIN_SCORE = Decimal("0.01")
MAX_SCORE = Decimal("99")
BASE_SCORE = Decimal("0.10")


def rules_result(provider: str, reasons: list[Reason]) -> FraudResult:
    """The built-in rules' score: a base plus each reason's points, kept to MaxMind's range."""
    total = BASE_SCORE + sum((r.points for r in reasons), Decimal("0"))
    score = max(MIN_SCORE, min(MAX_SCORE, total)).quantize(Decimal("0.01"))
    raw = {"provider": provider, "risk_score": str(score),
           "reasons": [r.as_dict() for r in reasons]}
    return FraudResult(score=score, reasons=tuple(reasons), raw=raw)


class ProviderError(Exception):
    """The provider could not score the order; screening is `error` and an operator looks.
    Its text is stored, logged and shown: a provider scrubs its own credentials from it
    (shared.scrub), as from the raw answer it returns, whatever the remote side echoed."""


class FraudProvider(Protocol):
    name: str
    # A remote provider is called before the order's transaction, so no row lock and no
    # database connection wait on it; a local one scores under the lock, in the same pass.
    remote: bool

    async def score(self, facts: OrderFacts) -> FraudResult: ...

    async def close(self) -> None: ...
