"""Raising an alert: once per (rule, cause), and in the caller's transaction, its messages
queued for each channel of the rule — never sent inline, so a slow Slack or SMTP server
never holds an event or an order:

- email: a mail per staff address on the mail queue (`emails`, template `staff_alert`,
  its context kept with it), sent by the notify worker's sender;
- slack: a row of `alert_deliveries`, sent by the alerts worker's sender (sender.py);
- webhook: a delivery to that endpoint (`alert.<trigger>`), sent by the webhooks worker.

The alert row's unique (rule, cause) is the deduplication: a redelivered event, a re-run
handler or a second sweeper writes nothing twice (ON CONFLICT DO NOTHING)."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from services.alerts import slack
from services.alerts.rules import AlertRules, EmailChannel, Rule, SlackChannel, WebhookChannel
from services.notify.mail import STAFF_TEMPLATE, message_id_for
from services.webhooks.outbound import enqueue_to_endpoint
from shared.states import AlertTrigger

_NEW_ALERT = (
    "INSERT INTO alerts (rule_set_id, rule, trigger, cause, order_id, title, facts)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (rule, cause) DO NOTHING RETURNING id")


@dataclass(frozen=True)
class Cause:
    """What an alert is about: `key` is its identity for deduplication (with the rule)."""

    trigger: AlertTrigger
    key: str
    title: str
    facts: dict[str, str] = field(default_factory=dict)  # label -> plain text
    order_id: int | None = None


@dataclass(frozen=True)
class Delivery:
    """Where alerts go beyond their channels' settings: the console's order page, the mail
    domain for Message-IDs."""

    console_url: str | None = None
    mail_domain: str = "ordermill.local"

    def link(self, order_id: int | None) -> str | None:
        if not self.console_url or order_id is None:
            return None
        return f"{self.console_url.rstrip('/')}/orders/{order_id}"


def _one_line(text: str) -> str:
    """A title goes into a mail's Subject: no line break or control character."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())[:300]


async def raise_alert(conn: asyncpg.Connection, rules: AlertRules, rule: Rule, cause: Cause,
                      delivery: Delivery) -> int | None:
    """The alert's id, or None if this rule already alerted on this cause."""
    assert rules.id is not None, "alerts are raised under a stored rule set"
    title = _one_line(cause.title)
    alert_id = await conn.fetchval(
        _NEW_ALERT, rules.id, rule.name, str(cause.trigger), cause.key, cause.order_id, title,
        cause.facts)
    if alert_id is None:
        return None
    link = delivery.link(cause.order_id)
    for name in rule.channels:
        channel = rules.channels[name]
        if isinstance(channel, EmailChannel):
            context = {"subject": title, "facts": cause.facts, "link": link, "rule": rule.name,
                       "description": rule.description}
            for address in channel.to:
                key = f"alert:{alert_id}:{name}:{address}"
                await conn.execute(
                    "INSERT INTO emails (dedupe_key, template, recipient, message_id, context)"
                    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (dedupe_key) DO NOTHING",
                    key, STAFF_TEMPLATE, address, message_id_for(key, delivery.mail_domain),
                    context)
        elif isinstance(channel, SlackChannel):
            await conn.execute(
                "INSERT INTO alert_deliveries (alert_id, channel, body) VALUES ($1, $2, $3)"
                " ON CONFLICT (alert_id, channel) DO NOTHING", alert_id, name,
                slack.body(title, cause.facts, rule=rule.name, link=link))
        elif isinstance(channel, WebhookChannel):
            await enqueue_to_endpoint(
                conn, channel.endpoint, f"alert.{cause.trigger}",
                {"alert_id": alert_id, "rule": rule.name, "trigger": str(cause.trigger),
                 "title": title, "order_id": cause.order_id, "facts": cause.facts, "link": link},
                event_id=f"alert:{alert_id}")
    return alert_id
