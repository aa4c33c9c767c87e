"""Message contracts (docs/contract.md, section 3): the bodies storefronts, gateways and operators send,
and the events the workers publish. A handler's parameter type is its contract."""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal
from ipaddress import IPv4Address, IPv6Address
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from shared.errors import Rejected
from shared.states import DomainStatus, OrderStatus, Screening

BillingCycle = Literal[
    "monthly", "quarterly", "semiannually", "annually", "biennially", "triennially", "onetime"
]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
Money = Annotated[Decimal, Field(max_digits=12, decimal_places=2)]
# Every id is a PostgreSQL bigint: a larger number is bad input, not a database error.
BIGINT_MAX = 2**63 - 1
Id = Annotated[int, Field(gt=0, le=BIGINT_MAX)]

_DOMAIN = re.compile(r"^(?=.{4,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
# A mailbox as storefronts send it: no spaces, controls, quotes or the characters that end or
# split an address in a header (a quoted local part is refused rather than mis-sent).
_MAILBOX_PART = r'[^@\s\x00-\x1f\x7f<>(),;:"\[\]\\]+'
_EMAIL = re.compile(rf"^{_MAILBOX_PART}@{_MAILBOX_PART}\.{_MAILBOX_PART}$")


def shown(value: str, limit: int = 60) -> str:
    """A value quoted in an error: a reason travels in logs, headers and order.rejected, so a
    megabyte of bad input is not repeated in it."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} chars)"


def _email_address(value: str) -> str:
    value = value.strip()
    if len(value) > 254 or not _EMAIL.match(value):
        raise ValueError(f"{shown(value)} is not an email address")
    try:  # the domain goes into RCPT TO as IDNA (bücher.example: xn--bcher-kva.example)
        value.rpartition("@")[2].encode("idna")
    except UnicodeError:
        raise ValueError(f"{shown(value)} is not an email address (its domain)") from None
    return value


def _domain(value: str) -> str:
    value = value.strip().lower().rstrip(".")
    if not _DOMAIN.match(value):
        raise ValueError(f"{shown(value)} is not a domain name")
    return value


def _texts(value: object) -> Iterator[str]:
    """Every text in parsed JSON, keys too, walked without recursion: a body nested deeper than
    Python's recursion limit (JSON allows it) must not turn a check into a RecursionError."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


# A lone surrogate (JSON's "\ud800" without its pair) is not text: it cannot be encoded as
# UTF-8, so it cannot be stored, serialised or published.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# How JSON writes one: a body without this is passed at a glance (a pair, an emoji, matches too).
MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def has_nul(value: object) -> bool:
    """Whether a text in parsed JSON holds U+0000, which PostgreSQL's text cannot store."""
    return any("\x00" in text for text in _texts(value))


def has_lone_surrogate(value: object) -> bool:
    """Whether a text in parsed JSON holds half a surrogate pair, which is not text."""
    return any(_LONE_SURROGATE.search(text) for text in _texts(value))


def _storable(text: str) -> str:
    return _LONE_SURROGATE.sub("\ufffd", text.replace("\x00", "\ufffd"))


def _without_unstorable(value: Any) -> Any:
    """A copy with every NUL and lone surrogate replaced by U+FFFD, built without recursion."""
    if isinstance(value, str):
        return _storable(value)
    if not isinstance(value, dict | list):
        return value
    root: list[Any] = [None]
    # (container the copy goes in, its key or index, the original value)
    stack: list[tuple[Any, Any, Any]] = [(root, 0, value)]
    while stack:
        into, where, item = stack.pop()
        if isinstance(item, dict):
            copy: Any = {}
            into[where] = copy
            for k, v in item.items():
                key = _storable(k) if isinstance(k, str) else k
                copy[key] = None
                stack.append((copy, key, v))
        elif isinstance(item, list):
            copy = [None] * len(item)
            into[where] = copy
            stack.extend((copy, i, v) for i, v in enumerate(item))
        else:
            into[where] = _storable(item) if isinstance(item, str) else item
    return root[0]


class Contract(BaseModel):
    # Storefronts may send more than we read (prices, notes): extra fields are ignored.
    model_config = ConfigDict(extra="ignore", frozen=True)

    @classmethod
    def without_nul(cls, data: Any) -> Any:
        """A body holding U+0000 (the runtime looks): refused as bad input, not met later as a
        database error that dead-letters the message as a handler failure."""
        raise Rejected("a text value holds a NUL character (\\u0000), which cannot be stored")

    @classmethod
    def without_lone_surrogates(cls, data: Any) -> Any:
        """A body holding half a surrogate pair ("\\ud800"): refused as bad input, not met
        later as a serialisation error that dead-letters it as a handler failure."""
        raise Rejected("a text value holds a lone surrogate (such as \\ud800), which is not text")


class ExistingClient(Contract):
    id: Id


class NewClient(Contract):
    email: str = Field(max_length=254)
    first_name: str = Field("", max_length=100)
    last_name: str = Field("", max_length=100)
    country: str | None = Field(None, pattern=r"^[A-Z]{2}$")
    company: str | None = Field(None, max_length=200)
    # The billing address (optional; a fraud provider may be sent it). Stored as given,
    # except that a blank value is no value.
    address1: str | None = Field(None, max_length=200)
    address2: str | None = Field(None, max_length=200)
    city: str | None = Field(None, max_length=100)
    state: str | None = Field(None, max_length=100)
    postcode: str | None = Field(None, max_length=20)
    phone: str | None = Field(None, max_length=30)

    @field_validator("address1", "address2", "city", "state", "postcode", "phone", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    _check_email = field_validator("email")(lambda cls, v: _email_address(v))


class ProductItem(Contract):
    type: Literal["product"]
    product: str = Field(min_length=1, max_length=100)
    billing_cycle: BillingCycle = "monthly"
    domain: str | None = None

    _check_domain = field_validator("domain")(lambda cls, v: v if v is None else _domain(v))


class DomainItem(Contract):
    type: Literal["domain"]
    domain: str
    action: Literal["register", "transfer"] = "register"
    years: int = Field(1, ge=1, le=10)
    epp_code: SecretStr | None = None

    _check_domain = field_validator("domain")(lambda cls, v: _domain(v))


OrderItem = Annotated[ProductItem | DomainItem, Field(discriminator="type")]


class PlaceOrder(Contract):
    order_ref: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    client: ExistingClient | NewClient
    items: list[OrderItem] = Field(min_length=1, max_length=100)
    currency: Currency | None = None
    payment_method: str | None = Field(None, max_length=50)
    promo_code: str | None = Field(None, max_length=50)
    ip_address: IPv4Address | IPv6Address | None = None
    send_confirmation: bool = True
    generate_invoice: bool = True
    # The operator signed in to the console who placed it (contract 1.7.0): the placement
    # history names them, believed only from a console user as for review.command (section 8);
    # anyone else's order is recorded as its publisher's.
    operator: str | None = Field(None, min_length=1, max_length=100)

    @field_validator("ip_address")
    @classmethod
    def _plain_ipv4(cls, value: IPv4Address | IPv6Address | None) -> IPv4Address | IPv6Address | None:
        # A dual-stack storefront writes 192.0.2.1 as ::ffff:192.0.2.1: one client, one address
        # (for the banned list and for velocity).
        if isinstance(value, IPv6Address) and value.ipv4_mapped is not None:
            return value.ipv4_mapped
        return value

    @model_validator(mode="after")
    def _each_domain_once(self) -> PlaceOrder:
        # Registered (and billed) twice otherwise: a storefront's double click, not a wish.
        seen: set[str] = set()
        for item in self.items:
            if isinstance(item, DomainItem):
                if item.domain in seen:
                    raise ValueError(f"domain {item.domain} is ordered twice")
                seen.add(item.domain)
        return self


class PaymentReceived(Contract):
    """A gateway's payment. Read leniently on purpose: money is never dropped, so anything
    short of "not a payment at all" (no amount) is stored, unapplied if need be, with the
    reason; the provisioning service decides, not the schema."""

    # A gateway may send its transaction id as a number: kept as text, not refused.
    model_config = ConfigDict(extra="ignore", frozen=True, coerce_numbers_to_str=True)

    amount: Decimal | str
    invoice_id: int | str | None = None
    order_ref: str | None = None
    currency: str | None = None
    gateway: str | None = None
    transaction_id: str | None = None

    @classmethod
    def without_nul(cls, data: Any) -> Any:
        # Not refused: a payment is never dropped. U+FFFD marks where the NUL was.
        return _without_unstorable(data)

    @classmethod
    def without_lone_surrogates(cls, data: Any) -> Any:
        # Likewise: U+FFFD marks where the half surrogate pair was.
        return _without_unstorable(data)


ReviewAction = Literal["accept", "deny", "cancel", "fraud", "pending", "delete", "retry", "rescreen",
                       "note", "report", "resolve"]
# What an order turned out to be, as minFraud's report-transactions endpoint names it.
ReportTag = Literal["chargeback", "not_fraud", "suspected_fraud", "spam_or_abuse"]
NOTE_MAX_LENGTH = 2000


class AcceptOptions(Contract):
    run_module_create: bool = True
    send_welcome_email: bool = True
    register_domains: bool = True


class ReviewCommand(Contract):
    order_id: Id
    action: ReviewAction
    operator: str = Field("operator", max_length=100)
    options: AcceptOptions = AcceptOptions()
    # `note`: the operator's note, kept with the order; `report`: the notes sent to MaxMind.
    note: str | None = Field(None, max_length=NOTE_MAX_LENGTH)
    tag: ReportTag | None = None  # `report`: what the order turned out to be
    # `retry`: only this parked job (default: every parked job of the order); `resolve`: the
    # parked job an operator resolved by hand (required).
    job_id: Id | None = None


# Events published by the workers ------------------------------------------------------------
#
# Every event on the exchange has a class here, and the class names its routing key:
# `uow.emit(OrderPlaced(...))` publishes `order.placed`. EVENTS maps each key to its class.

EVENTS: dict[str, type[Event]] = {}


class Event(Contract):
    """A body the workers publish on the exchange (or answer with, for a reply)."""

    # The routing key it is published with; a class without one (a base, a consumer's view
    # such as OrderEvent) cannot be emitted.
    routing_key: ClassVar[str]
    # Optional fields left out of the body unless given: one event, two publishers (review's
    # order.fraud has an operator and no score; fraud's has a score and no operator).
    omit_unset: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        key = cls.__dict__.get("routing_key")
        if key is not None:
            if key in EVENTS:
                raise TypeError(f"{key} has two contract classes: {EVENTS[key].__name__}, "
                                f"{cls.__name__}")
            EVENTS[key] = cls

    def payload(self) -> dict[str, Any]:
        """The JSON body, as written to the outbox."""
        if not self.omit_unset:  # most events: nothing to leave out
            return self.model_dump(mode="json")
        omitted = {name for name in self.omit_unset if name not in self.model_fields_set}
        return self.model_dump(mode="json", exclude=omitted or None)


class ItemRef(Contract):
    type: Literal["product", "domain"]
    id: Id


class OrderPlaced(Event):
    routing_key = "order.placed"

    order_id: Id
    order_number: Id
    order_ref: str
    client_id: Id
    invoice_id: Id | None
    total: Money
    currency: Currency
    items: list[ItemRef]
    # The storefront (the publisher's broker user) that placed it; None: no user_id. Two
    # storefronts may use the same order_ref: a storefront's listener keeps only its own.
    storefront: str | None = None


class FraudRedrive(OrderPlaced):
    """order.placed again, to the fraud queue only: the sweeper's re-drive of an order left
    `queued` (storefronts bound to order.placed are not told twice)."""

    routing_key = "fraud.redrive"


class OrderRejected(Event):
    routing_key = "order.rejected"

    order_ref: str
    reason: str


class OrderEvent(Event):
    """Any event about an order: what a consumer that re-reads the order's state needs."""

    order_id: Id
    order_ref: str


class OperatorAction(OrderEvent):
    """An operator's action on an order (review)."""

    operator: str = "operator"


class OrderAccepted(OperatorAction):
    routing_key = "order.accepted"

    options: AcceptOptions


class OrderCancelled(OperatorAction):
    """Denied or cancelled."""

    routing_key = "order.cancelled"


class OrderSetPending(OperatorAction):
    routing_key = "order.pending"


class OrderDeleted(OperatorAction):
    routing_key = "order.deleted"


class OrderRetry(OperatorAction):
    routing_key = "order.retry"
    omit_unset = frozenset({"job_id"})

    job_id: Id | None = None  # only this parked job runs again (None: every parked job)


class OrderRescreen(OperatorAction):
    routing_key = "order.rescreen"


class OrderScreened(Event):
    routing_key = "order.screened"

    order_id: Id
    order_ref: str
    screening: Literal[Screening.PASSED, Screening.SKIPPED, Screening.ERROR]
    score: Decimal | None
    threshold: Decimal
    provider: str
    # 1.3.0 (issue 16): the order is not Fraud but waits for a person (the review band, an
    # operator rule, the provider's REVIEW): a storefront tells the customer it is being
    # checked. Its `screening` is then `passed`; the stored screening is `review`.
    needs_review: bool = False
    review_reasons: list[str] = Field(default_factory=list)  # codes: review_band, rule:NAME, ...


class OrderFraud(Event):
    routing_key = "order.fraud"
    omit_unset = frozenset({"operator", "score"})

    order_id: Id
    order_ref: str
    # From review: the operator (no score); from screening: the score (no operator).
    operator: str | None = None
    source: Literal["screening", "operator"]
    score: Decimal | None = None


class InvoicePaid(Event):
    routing_key = "invoice.paid"

    invoice_id: Id
    order_id: Id
    order_ref: str
    amount: Money


class PaymentUnapplied(Event):
    routing_key = "payment.unapplied"

    payment_id: Id
    reason: str
    order_ref: str | None = None
    invoice_id: Id | None = None


# The job runner's events (services/provisioning/jobs.py): the item, its order, the job, and
# what the module or registrar answered (`detail`; on a failure, `{"error": ...}`).

class ServiceEvent(Event):
    service_id: Id
    order_id: Id
    order_ref: str
    job_id: Id
    detail: dict[str, Any] = {}


class ServiceCreated(ServiceEvent):
    routing_key = "service.created"


class ServiceTerminated(ServiceEvent):
    routing_key = "service.terminated"


class ServiceFailed(ServiceEvent):
    """A create or termination parked after its retries: an operator must look."""

    routing_key = "service.failed"


class DomainRegistered(Event):
    """Registered or transferred (or submitted: `Pending Registration`, `Pending Transfer`)."""

    routing_key = "domain.registered"

    domain_id: Id
    domain: str
    status: DomainStatus
    order_id: Id
    order_ref: str
    job_id: Id
    detail: dict[str, Any] = {}


class DomainFailed(Event):
    routing_key = "domain.failed"

    domain_id: Id
    order_id: Id
    order_ref: str
    job_id: Id
    detail: dict[str, Any] = {}


class EmailSend(Event):
    routing_key = "email.send"

    template: str
    recipient: str
    # Any service may ask for a mail: the address becomes a header line, so it is checked here.
    _check_recipient = field_validator("recipient")(lambda cls, v: _email_address(v))
    order_id: Id
    order_ref: str
    dedupe_key: str


class PlaceReply(Event):
    """The answer to an `order.place` that named a `reply_to` queue (the console's Add New
    Order), sent there once the order is stored or refused:
    `{"ok": true, "order_ref": "console-1a2b", "order_id": 42, "order_number": 7319}` or
    `{"ok": false, "order_ref": "console-1a2b", "error": "unknown product 'gold'"}`."""

    omit_unset = frozenset({"order_id", "order_number", "error"})

    ok: bool
    order_ref: str
    order_id: int | None = None
    order_number: int | None = None
    error: str | None = None


class ReviewReply(Event):
    """The answer to a review command, sent to its `reply_to` queue (not on the exchange):
    `{"ok": true, "order_id": 42, "status": "Active"}` or
    `{"ok": false, "order_id": 42, "error": "..."}`."""

    omit_unset = frozenset({"status", "error"})

    ok: bool
    order_id: int
    status: OrderStatus | None = None
    error: str | None = None
