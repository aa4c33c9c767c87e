"""The built-in rules scorer: a MaxMind-style risk score from named, explainable reasons."""

from __future__ import annotations

from decimal import Decimal

from services.fraud.banned import BannedLists, mail_domain
from services.fraud.providers.base import FraudResult, OrderFacts, Reason, rules_result
from shared.settings_parts import RulesSettings

FREE_MAIL_DOMAINS = frozenset({
    "gmail.com", "googlemail.com", "yahoo.com", "ymail.com", "hotmail.com", "outlook.com",
    "live.com", "msn.com", "aol.com", "icloud.com", "me.com", "mail.com", "gmx.com", "gmx.net",
    "gmx.de", "web.de", "yandex.ru", "yandex.com", "mail.ru", "protonmail.com", "proton.me",
    "zoho.com", "qq.com", "163.com", "126.com",
})


class RulesProvider:
    name = "rules"
    remote = False

    def __init__(self, rules: RulesSettings) -> None:
        self.banned = BannedLists(rules.banned)
        self.velocity_max = rules.velocity_max_orders
        self.large_first_order = rules.large_first_order

    async def score(self, facts: OrderFacts) -> FraudResult:
        return rules_result(self.name, list(self._reasons(facts)))

    async def close(self) -> None:
        return None

    def _reasons(self, facts: OrderFacts):  # -> Iterator[Reason]
        domain = mail_domain(facts.email)
        yield from self.banned.reasons(facts)
        if facts.client_is_new and domain in FREE_MAIL_DOMAINS:
            yield Reason("free_email_new_client", f"new client with a free-mail address ({domain})",
                         Decimal("10"))
        if facts.orders_from_ip > self.velocity_max:
            extra = facts.orders_from_ip - self.velocity_max
            yield Reason("ip_velocity", f"{facts.orders_from_ip} orders from {facts.ip_address}"
                         " in the velocity window", min(Decimal("60"), Decimal(10 + 5 * extra)))
        if facts.orders_from_client > self.velocity_max:
            extra = facts.orders_from_client - self.velocity_max
            yield Reason("client_velocity", f"{facts.orders_from_client} orders from this client"
                         " in the velocity window", min(Decimal("60"), Decimal(10 + 5 * extra)))
        if facts.earlier_fraud_orders:
            yield Reason("earlier_fraud", f"{facts.earlier_fraud_orders} earlier order(s) of this"
                         " client marked Fraud", Decimal("30"))
        large = self.large_first_order.get(facts.currency)
        if large is None and facts.currency == facts.default_currency:
            large = self.large_first_order.get("")  # a bare amount: the default currency's
        if facts.client_is_new and large is not None and facts.total >= large:
            yield Reason("large_first_order", f"first order of {facts.total} {facts.currency}",
                         Decimal("15"))
