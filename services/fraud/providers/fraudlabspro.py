"""FraudLabs Pro as a fraud provider: its v2 REST API (`POST /v2/order/screen`, `POST
/v2/order/feedback`), spoken with aiohttp.

Not through the official `fraudlabspro-python` package (3.3.0): it calls a fixed
`https://api.fraudlabspro.com` (no host to set, so neither a sandbox nor a test server), with
blocking `urllib` and no timeout (a slow answer would stop the worker's event loop), and it
returns an error as a string instead of raising. The request and answer are the documented
ones: form fields `key`, `ip`, `email`, `bill_*`, `user_order_id`, `amount`, `currency`...;
an answer with `fraudlabspro_id`, `fraudlabspro_score` (0-100), `fraudlabspro_status`
(APPROVE / REVIEW / REJECT), `fraudlabspro_rules`, `ip_geolocation`; an error as
`{"error": {"error_code", "error_message"}}` (10001 INVALID API KEY, 10006 API KEY EXPIRED,
10007 INSUFFICIENT CREDIT).

The API key travels in the POST body only (never in a URL, so no proxy or access log keeps
it), is a SecretStr in the settings, and is scrubbed from every error, log line and stored
answer, whatever the server echoes.
"""

from __future__ import annotations

import logging
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from services.fraud.banned import mail_domain
from services.fraud.providers.base import (
    MAX_SCORE,
    MIN_SCORE,
    FraudResult,
    OrderFacts,
    ProviderError,
    Reason,
)
from shared.errors import ConfigurationError
from shared.scrub import scrub, scrub_data
from shared.settings_parts import FraudLabsProSettings

log = logging.getLogger("ordermill.fraud.fraudlabspro")

STATUSES = ("APPROVE", "REVIEW", "REJECT")
FEEDBACK_ACTIONS = ("APPROVE", "REJECT", "REJECT_BLACKLIST")
_ACCOUNT_ERRORS = {
    10001: "invalid API key (check FRAUDLABSPRO_API_KEY)",
    10006: "API key expired",
    10007: "insufficient credit on the FraudLabs Pro account",
    101: "invalid API key (check FRAUDLABSPRO_API_KEY)",  # the v1 codes, should one come back
    102: "API key expired",
    103: "insufficient credit on the FraudLabs Pro account",
}


class Misconfigured(ConfigurationError):
    """A setting FraudLabs Pro cannot work with: the worker refuses to start."""


class _ServerError(Exception):
    """A 5xx: FraudLabs Pro is having trouble; worth another try."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"server error {status}: {text}")
        self.status = status


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, _ServerError | aiohttp.ClientError | TimeoutError)


def api_key(settings: FraudLabsProSettings) -> str:
    if settings.api_key is None or not settings.api_key.get_secret_value():
        raise Misconfigured("FRAUD_PROVIDER=fraudlabspro needs FRAUDLABSPRO_API_KEY")
    return settings.api_key.get_secret_value()


def screen_request(facts: OrderFacts) -> dict[str, str]:
    """The screen order form for an order: what the client lacks is left out, not faked."""
    fields: dict[str, str | None] = {
        "ip": facts.ip_address,
        "first_name": facts.first_name or None, "last_name": facts.last_name or None,
        "email": facts.email, "email_domain": mail_domain(facts.email) or None,
        "user_phone": facts.phone,
        "bill_addr": " ".join(filter(None, (facts.address1, facts.address2))) or None,
        "bill_city": facts.city, "bill_state": facts.state, "bill_zip_code": facts.postcode,
        "bill_country": facts.country,
        "user_order_id": str(facts.order_number),  # at most 15 characters: 10 digits
        "user_order_memo": facts.order_ref[:200],
        "amount": str(facts.total), "currency": facts.currency,
        "quantity": str(max(1, len(facts.cart))),
        "payment_gateway": facts.payment_method, "department": "hosting",
    }
    return {k: v for k, v in fields.items() if v}


class FraudLabsProProvider:
    name = "fraudlabspro"
    remote = True  # scored before the transaction: no row lock held while it answers

    def __init__(self, settings: FraudLabsProSettings) -> None:
        self.key = api_key(settings)
        self.base = f"https://{settings.host}/v2/order"
        self.timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self.attempts = settings.attempts
        self.backoff = 0.5
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    def _scrub(self, text: str) -> str:
        return scrub(text, (self.key,))

    async def score(self, facts: OrderFacts) -> FraudResult:
        if not facts.ip_address:
            raise ProviderError("FraudLabs Pro needs the order's IP address; the order has none")
        form = screen_request(facts)
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.attempts),
                wait=wait_exponential(multiplier=self.backoff, max=5),
                retry=retry_if_exception(_transient), reraise=True,
                before_sleep=lambda state: log.warning(
                    "FraudLabs Pro call failed; will retry", extra={
                        "order_id": facts.order_id, "attempt": state.attempt_number,
                        "error": self._describe(state.outcome.exception())}),
            ):
                with attempt:
                    answer = await self._post("screen", form)
        except (_ServerError, aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(self._describe(exc)) from None
        return self._result(answer)

    async def feedback(self, transaction_id: str, action: str, notes: str | None = None) -> None:
        """Tell FraudLabs Pro what the order turned out to be (APPROVE, REJECT or
        REJECT_BLACKLIST), to train its screening."""
        if action not in FEEDBACK_ACTIONS:
            raise ProviderError(f"FraudLabs Pro feedback action must be one of"
                                f" {', '.join(FEEDBACK_ACTIONS)}")
        form = {"id": transaction_id, "action": action} | ({"notes": notes} if notes else {})
        try:
            await self._post("feedback", form)
        except (_ServerError, aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(self._describe(exc)) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _post(self, call: str, form: dict[str, str]) -> dict[str, Any]:
        """One call; an account or request error raises ProviderError (not retried)."""
        data = {"key": self.key, "format": "json"} | form
        async with self.session.post(f"{self.base}/{call}", data=data) as response:
            text = await response.text(errors="replace")
            if response.status >= 500:
                raise _ServerError(response.status, _snippet(text))
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
        if not isinstance(body, dict):
            raise ProviderError(self._scrub(
                f"FraudLabs Pro answer not understood (HTTP {response.status}): {_snippet(text)}"))
        error = body.get("error")
        if error or response.status >= 400:
            raise ProviderError(self._scrub(_error_text(error, response.status)))
        return body

    def _result(self, answer: dict[str, Any]) -> FraudResult:
        raw = scrub_data(answer, (self.key,))
        raw["provider"] = self.name
        status = str(raw.get("fraudlabspro_status", "")).upper()
        try:
            flp_score = Decimal(str(raw["fraudlabspro_score"]))
        except (KeyError, InvalidOperation):
            raise ProviderError("FraudLabs Pro answer has no usable fraudlabspro_score") from None
        if status not in STATUSES or not flp_score.is_finite():
            raise ProviderError(self._scrub(
                f"FraudLabs Pro answer not understood: status {status or '-'!r},"
                f" score {raw.get('fraudlabspro_score')!r}"))
        # Its 0-100 risk on Ordermill's (MaxMind's) 0.01-99 scale.
        score = max(MIN_SCORE, min(MAX_SCORE, flp_score)).quantize(Decimal("0.01"))
        reasons = [Reason(f"fraudlabspro_{status.lower()}",
                          f"FraudLabs Pro status {status}, score {flp_score}")]
        for rule in raw.get("fraudlabspro_rules") or []:
            text = rule if isinstance(rule, str) else ", ".join(map(str, rule)) \
                if isinstance(rule, list) else str(rule)
            reasons.append(Reason("fraudlabspro_rule", text))
        geo = raw.get("ip_geolocation") or {}
        country = geo.get("country_code") if isinstance(geo, dict) else None
        return FraudResult(score=score, reasons=tuple(reasons), raw=raw,
                           reject=status == "REJECT", review=status == "REVIEW",
                           ip_country=country if isinstance(country, str) and country != "-"
                           else None)

    def _describe(self, exc: BaseException | None) -> str:
        match exc:
            case TimeoutError():
                return "FraudLabs Pro unreachable: no answer in time"
            case _ServerError():
                return self._scrub(f"FraudLabs Pro {exc}")
            case aiohttp.ClientError():
                return self._scrub(f"FraudLabs Pro unreachable: {exc or type(exc).__name__}")
            case _:
                return self._scrub(f"FraudLabs Pro error: {exc}")


def _error_text(error: Any, status: int) -> str:
    if isinstance(error, dict):
        code, message = error.get("error_code"), error.get("error_message")
    else:
        code, message = None, error
    try:
        kind = _ACCOUNT_ERRORS.get(int(code)) if code is not None else None
    except (TypeError, ValueError):
        kind = None
    detail = f"{code} {message}".strip() if code is not None else str(message or "")
    return f"FraudLabs Pro {kind or f'refused the request (HTTP {status})'}: {detail}"


def _snippet(text: str) -> str:
    return " ".join(text.split())[:200]
