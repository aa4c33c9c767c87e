"""The provider's banned lists (FRAUD_BANNED_EMAIL_DOMAINS, FRAUD_BANNED_IPS): checked before any
provider is asked, MaxMind included, so a banned client costs no lookup and is never let through
on a remote score."""

from __future__ import annotations

import ipaddress

from services.fraud.providers.base import MAX_SCORE, FraudResult, OrderFacts, Reason, rules_result
from shared.settings_parts import BannedSettings


def mail_domain(address: str) -> str:
    """An address's domain as the mail to it travels: IDNA-mapped (full-width letters, soft
    hyphens and case folded away, as the mailer's encoding does), without a final dot: the
    domain its mail reaches, whatever look-alike spelling the order used."""
    domain = address.rpartition("@")[2].strip().rstrip(".")
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError:  # not a name IDNA can write (the contract refuses most of these)
        return domain.lower()


class BannedLists:
    def __init__(self, banned: BannedSettings) -> None:
        self.domains = frozenset(mail_domain(d) for d in banned.email_domains)
        self.networks = tuple(
            ipaddress.ip_network(entry, strict=False) for entry in banned.ips)

    def reasons(self, facts: OrderFacts) -> list[Reason]:
        found = []
        domain = mail_domain(facts.email)
        labels = domain.split(".")
        # 'mail.spam.example' is banned when 'spam.example' is.
        if any(".".join(labels[i:]) in self.domains for i in range(len(labels) - 1)):
            found.append(Reason("banned_email_domain", f"email domain {domain} is banned",
                                MAX_SCORE))
        if facts.ip_address and self._ip_banned(facts.ip_address):
            found.append(Reason("banned_ip", f"IP address {facts.ip_address} is banned",
                                MAX_SCORE))
        return found

    def result(self, facts: OrderFacts) -> FraudResult | None:
        """The rules' result for a banned client (99), or None when nothing is banned."""
        found = self.reasons(facts)
        return rules_result("rules", found) if found else None

    def _ip_banned(self, ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped  # ::ffff:192.0.2.1 is 192.0.2.1
        return any(address in network for network in self.networks)
