"""Staff alert rules, read from TOML (`ordermill notify load FILE`, alerts.example.toml).

A file names its **channels** (where alerts go: staff email addresses through the mail queue,
a Slack incoming webhook, a webhook endpoint of services/webhooks by id) and its **rules**
(a trigger, the conditions that narrow it, the channels to tell). Everything is checked when
the file is loaded, so a mistake is one line naming the rule or channel at fault, never an
alert that silently goes nowhere.

A Slack incoming-webhook URL is a secret (whoever holds it posts to the channel): it is kept
sealed with WEBHOOK_SECRET_KEY, never logged, and shown only by its host.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.webhooks.addresses import AddressRefused, Policy, literal, parse
from shared.runtime import describe_validation_error
from shared.states import AlertTrigger

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_RULES = 200
MAX_CHANNELS = 50
MAX_RECIPIENTS = 20
# An address a staff mail may go to: one mailbox, no display name, nothing a header could
# be broken with (the mail is written by hand: services/notify/mail.py).
_MAILBOX = re.compile(r"^[^@\s<>,;\"'()\\]{1,64}@[^@\s<>,;\"'()\\]{1,253}$")


class RulesError(ValueError):
    """A rules file Ordermill cannot use: one line saying where and why."""


class EmailChannel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["email"]
    to: list[str] = Field(min_length=1, max_length=MAX_RECIPIENTS)

    @field_validator("to")
    @classmethod
    def _mailboxes(cls, value: list[str]) -> list[str]:
        out = [address.strip() for address in value]
        for address in out:
            if not _MAILBOX.match(address) or not address.isprintable():
                raise ValueError(f"{address[:60]!r} is not an email address")
        return out


class SlackChannel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["slack"]
    url: str = Field(repr=False)  # the incoming webhook's URL: a secret

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            parse(value)
        except ValueError as exc:
            # The reason never quotes the URL: it is a secret.
            raise ValueError(f"the Slack URL is not usable: {exc}") from None
        return value

    @property
    def host(self) -> str:
        return parse(self.url)[1]


class WebhookChannel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["webhook"]
    endpoint: int = Field(ge=1, le=2**63 - 1)  # `ordermill webhooks list` shows the ids


Channel = Annotated[EmailChannel | SlackChannel | WebhookChannel, Field(discriminator="type")]

# Which conditions each trigger takes; anything else is a mistake in the file.
_CONDITIONS: dict[AlertTrigger, frozenset[str]] = {
    AlertTrigger.NEW_ORDER: frozenset({"total_over", "currency", "product", "first_order"}),
    AlertTrigger.FRAUD: frozenset({"source"}),
    AlertTrigger.REVIEW_WAITING: frozenset({"waiting_hours"}),
}


class Conditions(BaseModel):
    """What narrows a rule; every condition given must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    total_over: Decimal | None = Field(None, ge=0)  # the order's total is more than this
    currency: str | None = Field(None, pattern=r"^[A-Z]{3}$")  # ... in this currency only
    product: list[str] | None = Field(None, min_length=1)  # a catalog product slug in the order
    first_order: bool | None = None  # the client's first order (true) or not (false)
    source: Literal["screening", "operator"] | None = None  # who set the order to Fraud
    waiting_hours: Decimal | None = Field(None, gt=0, le=24 * 366)

    @field_validator("product")
    @classmethod
    def _slugs(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [slug.strip().lower() for slug in value]

    def given(self) -> set[str]:
        return {name for name in type(self).model_fields if getattr(self, name) is not None}


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME)
    trigger: AlertTrigger
    channels: list[str] = Field(min_length=1, max_length=MAX_CHANNELS)
    description: str = Field("", max_length=500)
    when: Conditions = Conditions()

    @model_validator(mode="after")
    def _fits_the_trigger(self) -> Rule:
        allowed = _CONDITIONS.get(self.trigger, frozenset())
        wrong = sorted(self.when.given() - allowed)
        if wrong:
            takes = ", ".join(sorted(allowed)) or "no condition"
            raise ValueError(f"{', '.join(wrong)} does not apply to {self.trigger}"
                             f" (it takes {takes})")
        if self.trigger == AlertTrigger.REVIEW_WAITING and self.when.waiting_hours is None:
            raise ValueError("a review_waiting rule needs `waiting_hours`")
        if self.when.currency is not None and self.when.total_over is None:
            raise ValueError("`currency` narrows `total_over`: give both")
        return self


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channels: dict[Annotated[str, Field(pattern=NAME)], Channel] = Field(
        default_factory=dict, max_length=MAX_CHANNELS)
    rules: list[Rule] = Field(default_factory=list, max_length=MAX_RULES)

    @model_validator(mode="after")
    def _consistent(self) -> RuleFile:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}")
            seen.add(rule.name)
            unknown = [c for c in rule.channels if c not in self.channels]
            if unknown:
                raise ValueError(f"rule {rule.name!r} names the channel {unknown[0]!r},"
                                 " which [channels] does not define")
        return self


@dataclass(frozen=True)
class AlertRules:
    """A loaded rule set (`id` None: not stored yet)."""

    id: int | None
    channels: dict[str, EmailChannel | SlackChannel | WebhookChannel]
    rules: tuple[Rule, ...]

    def for_trigger(self, trigger: AlertTrigger) -> list[Rule]:
        return [rule for rule in self.rules if rule.trigger == trigger]

    @property
    def triggers(self) -> set[AlertTrigger]:
        return {rule.trigger for rule in self.rules}

    def endpoints(self) -> list[int]:
        return sorted({c.endpoint for c in self.channels.values() if isinstance(c, WebhookChannel)})

    def check_addresses(self, policy: Policy) -> None:
        """A Slack URL written as an address must be one a webhook may go to (SSRF; names
        are checked on every address they resolve to, when each message is sent)."""
        for name, channel in self.channels.items():
            if isinstance(channel, SlackChannel):
                scheme, host, _ = parse(channel.url)
                ip = literal(host)
                try:
                    if ip is not None:
                        policy.check(ip, host=host, scheme=scheme)
                    elif scheme != "https":
                        raise AddressRefused(f"{host}: plain http goes only to"
                                             " WEBHOOK_ALLOW_NETWORKS; use https")
                except AddressRefused as exc:
                    raise RulesError(f"channel {name!r}: {exc}") from None

    def shown(self) -> dict[str, Any]:
        """What `ordermill notify show` prints: everything but the Slack URLs (their host)."""
        channels: dict[str, Any] = {}
        for name, channel in self.channels.items():
            if isinstance(channel, SlackChannel):
                channels[name] = {"type": "slack", "host": channel.host}
            else:
                channels[name] = channel.model_dump(mode="json")
        return {"channels": channels,
                "rules": [rule.model_dump(mode="json", exclude_defaults=True) | {
                    "trigger": str(rule.trigger), "channels": rule.channels}
                    for rule in self.rules]}


EMPTY = AlertRules(None, {}, ())


def parse_toml(text: str) -> AlertRules:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"not TOML: {exc}") from None
    return parse_rules(data)


def parse_rules(data: Any, rule_set_id: int | None = None) -> AlertRules:
    """Rules from their TOML (or stored JSON) form; RulesError says where, in one line."""
    try:
        parsed = RuleFile.model_validate(data)
    except ValidationError as exc:
        raise RulesError(_one_line(describe_validation_error(exc, prefix=""), data)) from None
    return AlertRules(rule_set_id, dict(parsed.channels), tuple(parsed.rules))


def _one_line(text: str, data: Any) -> str:
    """Name the rule by its name, not only its index (`rules.2` -> `rules.2 (big-order)`);
    and never quote a Slack URL back (pydantic's messages quote the input)."""
    rules = data.get("rules") if isinstance(data, dict) else None

    def named(match: re.Match[str]) -> str:
        n = int(match.group(1))
        if isinstance(rules, list) and n < len(rules) and isinstance(rules[n], dict):
            name = rules[n].get("name")
            if isinstance(name, str) and re.match(NAME, name):
                return f"rules.{n} ({name})"
        return match.group(0)

    text = re.sub(r"\brules\.(\d+)", named, text.removeprefix("body: "))
    channels = data.get("channels") if isinstance(data, dict) else None
    if isinstance(channels, dict):
        for channel in channels.values():
            url = channel.get("url") if isinstance(channel, dict) else None
            if isinstance(url, str) and url:
                text = text.replace(url, "<the Slack URL>")
    return " ".join(text.split())
