"""MaxMind minFraud (Score, Insights or Factors) through the official package's AsyncClient,
with WHMCS's rejection options on top of the risk score."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import aiohttp
import minfraud
from minfraud.errors import (
    AuthenticationError,
    HTTPError,
    InsufficientFundsError,
    InvalidRequestError,
    MinFraudError,
    PermissionRequiredError,
)
from minfraud.validation import validate_transaction
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential
from voluptuous import MultipleInvalid

from services.fraud.providers.base import FraudResult, OrderFacts, ProviderError, Reason
from services.fraud.providers.rules import FREE_MAIL_DOMAINS
from shared.errors import ConfigurationError
from shared.scrub import basic_credentials, scrub, scrub_data
from shared.settings_parts import MaxMindSettings

log = logging.getLogger("ordermill.fraud.maxmind")

REPORT_TAGS = ("chargeback", "not_fraud", "suspected_fraud", "spam_or_abuse")
_REGION = re.compile(r"^[0-9A-Z]{1,4}$")
_CART_CATEGORY = {"product": "hosting", "domain": "domain"}


class Misconfigured(ConfigurationError):
    """A setting MaxMind cannot work with: the worker refuses to start."""


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, HTTPError):
        return exc.http_status is not None and exc.http_status >= 500
    return isinstance(exc, aiohttp.ClientError | TimeoutError)


def _describe(exc: BaseException, secrets: tuple[str, ...]) -> str:
    """One line for a failed call, without the account's credentials: a hostile or buggy
    answer (an error page echoing the Authorization header) is quoted in it."""
    match exc:
        case AuthenticationError():
            kind = "authentication failed (check MAXMIND_ACCOUNT_ID and MAXMIND_LICENSE_KEY)"
        case PermissionRequiredError():
            kind = "permission required (the account cannot use this service)"
        case InsufficientFundsError():
            kind = "insufficient funds on the MaxMind account"
        case InvalidRequestError():
            kind = "request refused"
        case HTTPError() if exc.http_status and exc.http_status >= 500:
            kind = f"server error {exc.http_status}"
        case TimeoutError():
            return "minFraud unreachable: no answer in time"
        case aiohttp.ClientError():
            kind = "unreachable"
        case _:
            kind = "error"
    detail = str(exc) or type(exc).__name__
    return scrub(f"minFraud {kind}: {detail}", secrets)


def credentials(settings: MaxMindSettings) -> tuple[str, ...]:
    """The provider's own secrets, as an answer could echo them: the licence key, alone and
    with the account id it is paired with (the Basic credential, in clear and in base64)."""
    if settings.license_key is None:
        return ()
    return basic_credentials(settings.account_id, settings.license_key.get_secret_value())


def client_for(settings: MaxMindSettings) -> minfraud.AsyncClient:
    if settings.account_id is None or settings.license_key is None:
        raise Misconfigured("FRAUD_PROVIDER=maxmind needs MAXMIND_ACCOUNT_ID and MAXMIND_LICENSE_KEY")
    return minfraud.AsyncClient(
        settings.account_id, settings.license_key.get_secret_value(),
        host=settings.host, timeout=settings.timeout,
    )


def _processor(payment_method: str) -> str:
    """The method's name when minFraud knows it by that name, else 'other'."""
    method = payment_method.lower()
    try:
        validate_transaction({"payment": {"processor": method}})
    except MultipleInvalid:
        return "other"
    return method


def _ascii_domain(domain: str) -> str | None:
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def without_refused_fields(request: dict[str, Any]) -> list[str]:
    """The package checks the request before sending it and refuses all of it for one field
    it does not accept (an address its email check rejects, say). Such fields are left out
    instead, so an odd field never costs the order its screening; returns their paths."""
    left_out: list[str] = []
    for _ in range(20):
        try:
            validate_transaction(request)
            return left_out
        except MultipleInvalid as exc:
            path = exc.errors[0].path  # one at a time: removing one may shift another's index
            if not path or not _remove(request, path):
                break
            left_out.append("/" + "/".join(str(key) for key in path))
    raise ProviderError(f"minFraud request refused even without {', '.join(left_out) or 'any field'}")


def _remove(request: dict[str, Any], path: list[Any]) -> bool:
    parent: Any = request
    for key in path[:-1]:
        try:
            parent = parent[key]
        except (KeyError, IndexError, TypeError):
            return False
    last = path[-1]
    if isinstance(parent, dict) and last in parent:
        del parent[last]
        return True
    if isinstance(parent, list) and isinstance(last, int) and 0 <= last < len(parent):
        del parent[last]
        return True
    return False


def transaction(facts: OrderFacts) -> dict[str, Any]:
    """The minFraud request for an order. What the client lacks is left out, not faked."""
    domain = _ascii_domain(facts.email.rsplit("@", 1)[-1])
    billing = {
        "first_name": facts.first_name or None, "last_name": facts.last_name or None,
        "company": facts.company, "address": facts.address1, "address_2": facts.address2,
        "city": facts.city, "postal": facts.postcode,
        # minFraud takes the region only as an ISO 3166-2 subdivision code ("CA", not
        # "California"): a name is left out rather than failing the whole request.
        "region": facts.state if facts.state and _REGION.match(facts.state) else None,
        "country": facts.country, "phone_number": facts.phone,
    }
    request: dict[str, Any] = {
        "event": {"transaction_id": str(facts.order_number), "type": "purchase"}
        | ({"time": facts.placed_at.isoformat()} if facts.placed_at else {}),
        "account": {"user_id": str(facts.client_id)},
        "email": {"address": facts.email} | ({"domain": domain} if domain else {}),
        "billing": {k: v for k, v in billing.items() if v},
        # minFraud's JSON wants numbers; the Decimal is converted only here, at the wire.
        "order": {"currency": facts.currency}
        | ({"amount": float(facts.total)} if facts.total > 0 else {}),  # minFraud refuses 0
        "shopping_cart": [
            {"category": _CART_CATEGORY[line.kind], "item_id": line.name, "quantity": 1,
             "price": float(line.amount)}
            for line in facts.cart if line.amount > 0
        ],
    }
    if facts.ip_address:
        request["device"] = {"ip_address": facts.ip_address}
    if facts.payment_method:
        request["payment"] = {"processor": _processor(facts.payment_method)}
    return request


class MaxMindProvider:
    name = "maxmind"
    remote = True  # score before the transaction: no row lock held while MaxMind answers

    def __init__(self, settings: MaxMindSettings) -> None:
        self.service = settings.service
        self.hash_email = settings.hash_email
        self.attempts = settings.attempts
        self.reject_free_email = settings.reject_free_email
        self.reject_country_mismatch = settings.reject_country_mismatch
        self.reject_anonymous_proxy = settings.reject_anonymous_proxy
        self.high_risk_countries = settings.high_risk_countries
        if self.service == "score" and (self.reject_country_mismatch or self.reject_anonymous_proxy):
            raise Misconfigured(
                "MAXMIND_REJECT_COUNTRY_MISMATCH and MAXMIND_REJECT_ANONYMOUS_PROXY need"
                " MAXMIND_SERVICE=insights or factors (Score has no IP location)")
        self.client = client_for(settings)
        self.secrets = credentials(settings)
        self.backoff = 0.5

    async def score(self, facts: OrderFacts) -> FraudResult:
        request = transaction(facts)
        left_out = without_refused_fields(request)
        if left_out:
            log.warning("fields minFraud does not accept left out of the request", extra={
                "order_id": facts.order_id, "fields": left_out})
        call = getattr(self.client, self.service)
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.attempts),
                wait=wait_exponential(multiplier=self.backoff, max=5),
                retry=retry_if_exception(_transient), reraise=True,
                before_sleep=lambda state: log.warning("minFraud call failed; will retry", extra={
                    "order_id": facts.order_id, "attempt": state.attempt_number,
                    "error": _describe(state.outcome.exception(), self.secrets)}),
            ):
                with attempt:
                    response = await call(request, hash_email=self.hash_email)
        except (MinFraudError, aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(_describe(exc, self.secrets)) from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:  # a 200
            # the package cannot read
            raise ProviderError(scrub(f"minFraud answer not understood: {type(exc).__name__}:"
                                      f" {exc}", self.secrets)) from None
        # Scrubbed before anything reads it: the stored raw response, the reasons made of it,
        # the logs and the CLI never carry the account's credentials, whatever MaxMind echoed.
        raw = scrub_data(response.to_dict(), self.secrets)
        raw["service"] = self.service
        if left_out:
            raw["ordermill_left_out"] = left_out
        try:
            score = Decimal(str(raw["risk_score"])).quantize(Decimal("0.01"))
        except (KeyError, ArithmeticError) as exc:
            raise ProviderError(scrub(f"minFraud answer has no usable risk_score: {exc}",
                                      self.secrets)) from None
        rejections = tuple(self._rejections(facts, raw))
        ip_country = raw.get("ip_address", {}).get("country", {}).get("iso_code")
        return FraudResult(score=score, reasons=rejections + tuple(_explanations(raw)), raw=raw,
                           reject=bool(rejections),
                           ip_country=ip_country if isinstance(ip_country, str) else None)

    async def close(self) -> None:
        await self.client.close()

    def _rejections(self, facts: OrderFacts, raw: dict[str, Any]) -> Iterator[Reason]:
        """WHMCS's rejection options, and the account's own custom rules."""
        disposition = raw.get("disposition", {})
        if disposition.get("action") == "reject":
            label = disposition.get("rule_label") or disposition.get("reason") or "custom rule"
            yield Reason("disposition_reject", f"minFraud disposition is reject ({label})")
        domain = facts.email.rsplit("@", 1)[-1].lower()
        is_free = raw.get("email", {}).get("is_free")
        if is_free is None:  # Score does not say: the built-in list does
            is_free = domain in FREE_MAIL_DOMAINS
        if self.reject_free_email and is_free:
            yield Reason("free_email", f"free-mail address ({domain})")
        ip = raw.get("ip_address", {})
        ip_country = ip.get("country", {}).get("iso_code")
        if self.reject_country_mismatch and facts.country and ip_country and (
                raw.get("billing_address", {}).get("is_in_ip_country") is False
                or ip_country != facts.country):
            yield Reason("country_mismatch",
                         f"IP country {ip_country} differs from billing country {facts.country}")
        traits = ip.get("traits", {})
        anonymous = [name for name in ("is_anonymous_proxy", "is_anonymous", "is_anonymous_vpn",
                                       "is_public_proxy", "is_tor_exit_node") if traits.get(name)]
        if self.reject_anonymous_proxy and anonymous:
            yield Reason("anonymous_proxy", f"IP {facts.ip_address} is an anonymous proxy"
                         f" ({', '.join(a.removeprefix('is_') for a in anonymous)})")
        if self.high_risk_countries:
            risky = sorted({c for c in (facts.country, ip_country) if c in self.high_risk_countries})
            if risky:
                yield Reason("high_risk_country", f"high-risk country: {', '.join(risky)}")


def _explanations(raw: dict[str, Any]) -> Iterator[Reason]:
    """What MaxMind says drove the score (Factors) and the IP's own risk reasons (Insights)."""
    for group in raw.get("risk_score_reasons", [])[:5]:
        for reason in group.get("reasons", []):
            yield Reason(reason.get("code", "UNKNOWN"), reason.get("reason", ""),
                         Decimal(str(group.get("multiplier", 0))))
    for reason in raw.get("ip_address", {}).get("risk_reasons", []):
        yield Reason(reason.get("code", "UNKNOWN"), reason.get("reason", ""))


async def report(settings: MaxMindSettings, *, tag: str, ip_address: str | None, minfraud_id: str | None,
                 transaction_id: str, notes: str | None = None) -> None:
    """Report an order's outcome to minFraud's report-transactions endpoint."""
    body = {"tag": tag, "transaction_id": transaction_id, "ip_address": ip_address,
            "minfraud_id": minfraud_id, "notes": notes}
    async with client_for(settings) as client:
        try:
            await client.report({k: v for k, v in body.items() if v})
        except (MinFraudError, aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(_describe(exc, credentials(settings))) from None
