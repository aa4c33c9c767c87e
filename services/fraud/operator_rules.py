"""Operator fraud rules (issue 16): named rules, loaded from TOML (`ordermill fraud rules load
FILE`, see fraud-rules.example.toml), that match on an order's facts and add a score, send the
order to review, or make it Fraud outright.

A rule's conditions (`when`) must all hold; a list condition holds when any of its values
does. A rule that needs the provider's answer (`ip_country`) is checked after the provider;
every other rule before it, so a `fraud` rule decides without a remote lookup being paid for.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.fraud.banned import mail_domain
from services.fraud.providers.base import OrderFacts
from shared.runtime import describe_validation_error
from shared.states import RuleAction

WORD_FIELDS = ("name", "company", "email", "domains")
MAX_RULES = 500


class RulesError(ValueError):
    """A rules file Ordermill cannot use: one line saying where and why."""


class Conditions(BaseModel):
    """What a rule matches on; every condition given must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    client_country: list[str] | None = None  # ISO 3166-1 alpha-2, the client's country
    ip_country: list[str] | None = None  # the IP's country, where the provider tells it
    email_domain: list[str] | None = None  # a domain and its subdomains
    ip: list[str] | None = None  # addresses or networks (CIDR)
    words: list[str] | None = None  # case-insensitive, anywhere in `words_in`
    words_in: list[str] = Field(default_factory=lambda: list(WORD_FIELDS))
    earlier_fraud_orders: int | None = Field(None, ge=1)  # at least this many, this client
    earlier_cancelled_orders: int | None = Field(None, ge=1)
    orders_per_client: int | None = Field(None, ge=1)  # at least, in window_minutes (this one too)
    orders_per_ip: int | None = Field(None, ge=1)
    window_minutes: int = Field(60, ge=1, le=60 * 24 * 366)
    total_at_least: Decimal | None = Field(None, ge=0)
    total_under: Decimal | None = Field(None, gt=0)
    currency: str | None = Field(None, pattern=r"^[A-Z]{3}$")  # the totals' currency only
    product: list[str] | None = None  # catalog product slugs in the cart
    new_client: bool | None = None  # no earlier order that went through

    @field_validator("client_country", "ip_country")
    @classmethod
    def _countries(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        codes = [code.strip().upper() for code in value]
        for code in codes:
            if len(code) != 2 or not code.isalpha() or not code.isascii():
                raise ValueError(f"{code!r} is not a two-letter country code")
        return codes

    @field_validator("email_domain")
    @classmethod
    def _domains(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [mail_domain("@" + d) for d in value]

    @field_validator("ip")
    @classmethod
    def _networks(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        out = []
        for entry in value:
            try:
                out.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return out

    @field_validator("words")
    @classmethod
    def _words(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        words = [w.strip().casefold() for w in value]
        if not all(words):
            raise ValueError("a word cannot be blank")
        return words

    @field_validator("words_in")
    @classmethod
    def _word_fields(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(WORD_FIELDS))
        if unknown or not value:
            raise ValueError(f"words_in takes {', '.join(WORD_FIELDS)}")
        return value

    @field_validator("product")
    @classmethod
    def _slugs(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [slug.strip().lower() for slug in value]

    def given(self) -> list[str]:
        """The conditions set (the options `words_in`, `window_minutes`, `currency` aside)."""
        options = {"words_in", "window_minutes", "currency"}
        return [name for name in type(self).model_fields
                if name not in options and getattr(self, name) is not None]


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    action: RuleAction
    points: Decimal = Field(Decimal("0"), ge=0, le=99)
    description: str = Field("", max_length=500)
    when: Conditions

    @model_validator(mode="after")
    def _sensible(self) -> Rule:
        if not self.when.given():
            raise ValueError("a rule needs at least one condition in `when`")
        if self.action == RuleAction.SCORE and self.points == 0:
            raise ValueError("a `score` rule needs points")
        if (self.when.total_at_least is not None or self.when.total_under is not None) and (
                self.when.currency is None):
            raise ValueError("a rule on the total needs its `currency`")
        return self

    @property
    def after_provider(self) -> bool:
        """Needs what only the provider tells (the IP's country)."""
        return self.when.ip_country is not None


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list, max_length=MAX_RULES)

    @model_validator(mode="after")
    def _unique(self) -> RuleFile:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}")
            seen.add(rule.name)
        return self


@dataclass(frozen=True)
class RuleMatch:
    name: str
    action: RuleAction
    points: Decimal
    detail: str  # what matched, for operators

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "action": self.action, "points": str(self.points),
                "detail": self.detail}


@dataclass(frozen=True)
class RuleFacts:
    """What the rules read beyond OrderFacts: the IP's country (from the provider) and the
    order counts in each rule's window."""

    ip_country: str | None = None
    per_client: Mapping[int, int] | None = None  # window minutes -> orders, this one included
    per_ip: Mapping[int, int] | None = None


@dataclass(frozen=True)
class RuleSet:
    id: int | None
    rules: tuple[Rule, ...]

    @property
    def windows(self) -> list[int]:
        """The velocity windows the rules count orders in (minutes)."""
        return sorted({r.when.window_minutes for r in self.rules
                       if r.when.orders_per_client is not None or r.when.orders_per_ip is not None})

    def matches(self, facts: OrderFacts, extra: RuleFacts, *,
                after_provider: bool) -> list[RuleMatch]:
        found = []
        for rule in self.rules:
            if rule.after_provider != after_provider:
                continue
            detail = _match(rule.when, facts, extra)
            if detail is not None:
                found.append(RuleMatch(rule.name, rule.action, rule.points,
                                       rule.description or detail))
        return found

    def as_json(self) -> list[dict[str, Any]]:
        return [rule.model_dump(mode="json", exclude_none=True) for rule in self.rules]


EMPTY = RuleSet(None, ())


def parse_toml(text: str) -> RuleSet:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"not TOML: {exc}") from None
    return parse(data)


def parse(data: Any, rule_set_id: int | None = None) -> RuleSet:
    """Rules from their TOML (or stored JSON) form; RulesError names the rule at fault."""
    try:
        parsed = RuleFile.model_validate(data)
    except ValidationError as exc:
        raise RulesError(describe_validation_error(exc, prefix="")) from None
    return RuleSet(rule_set_id, tuple(parsed.rules))


def _match(when: Conditions, facts: OrderFacts, extra: RuleFacts) -> str | None:
    """What matched, in words, or None when a condition does not hold."""
    said: list[str] = []
    if when.client_country is not None:
        if (facts.country or "").upper() not in when.client_country:
            return None
        said.append(f"client country {facts.country}")
    if when.ip_country is not None:
        if not extra.ip_country or extra.ip_country.upper() not in when.ip_country:
            return None
        said.append(f"IP country {extra.ip_country}")
    if when.email_domain is not None:
        domain = mail_domain(facts.email)
        labels = domain.split(".")
        if not any(".".join(labels[i:]) in when.email_domain for i in range(len(labels))):
            return None
        said.append(f"email domain {domain}")
    if when.ip is not None:
        if not facts.ip_address or not _in_networks(facts.ip_address, when.ip):
            return None
        said.append(f"IP {facts.ip_address}")
    if when.words is not None:
        hit = _word(when.words, _word_texts(facts, when.words_in))
        if hit is None:
            return None
        said.append(f"the word {hit[0]!r} in {hit[1]}")
    if when.earlier_fraud_orders is not None:
        if facts.earlier_fraud_orders < when.earlier_fraud_orders:
            return None
        said.append(f"{facts.earlier_fraud_orders} earlier Fraud order(s)")
    if when.earlier_cancelled_orders is not None:
        if facts.earlier_cancelled_orders < when.earlier_cancelled_orders:
            return None
        said.append(f"{facts.earlier_cancelled_orders} earlier Cancelled order(s)")
    if when.orders_per_client is not None:
        count = (extra.per_client or {}).get(when.window_minutes, facts.orders_from_client)
        if count < when.orders_per_client:
            return None
        said.append(f"{count} orders from this client in {when.window_minutes} min")
    if when.orders_per_ip is not None:
        count = (extra.per_ip or {}).get(when.window_minutes, facts.orders_from_ip)
        if not facts.ip_address or count < when.orders_per_ip:
            return None
        said.append(f"{count} orders from {facts.ip_address} in {when.window_minutes} min")
    if when.total_at_least is not None or when.total_under is not None:
        if facts.currency != when.currency:
            return None
        if when.total_at_least is not None and facts.total < when.total_at_least:
            return None
        if when.total_under is not None and facts.total >= when.total_under:
            return None
        said.append(f"total {facts.total} {facts.currency}")
    if when.product is not None:
        slugs = sorted({line.name.lower() for line in facts.cart if line.kind == "product"}
                       & set(when.product))
        if not slugs:
            return None
        said.append(f"product {', '.join(slugs)}")
    if when.new_client is not None:
        if facts.client_is_new != when.new_client:
            return None
        said.append("a new client" if facts.client_is_new else "a known client")
    return "; ".join(said)


def _in_networks(ip: str, networks: Iterable[str]) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in ipaddress.ip_network(n) for n in networks)


def _word_texts(facts: OrderFacts, fields: list[str]) -> dict[str, str]:
    texts = {
        "name": f"{facts.first_name} {facts.last_name}",
        "company": facts.company or "",
        "email": facts.email,
        "domains": " ".join(facts.domains),
    }
    return {field: texts[field].casefold() for field in fields}


def _word(words: list[str], texts: dict[str, str]) -> tuple[str, str] | None:
    for word in words:
        for field, text in texts.items():
            if word in text:
                return word, field
    return None
