"""order.placed / order.rescreen: score the order; Fraud over the threshold, else it stays Pending."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from decimal import Decimal
from functools import cached_property

import asyncpg

from services.fraud.banned import BannedLists
from services.fraud.facts import lock_many_with_facts, lock_with_facts, read_facts, velocity
from services.fraud.operator_rules import RuleFacts, RuleMatch, RuleSet
from services.fraud.providers.base import (
    MAX_SCORE,
    MIN_SCORE,
    FraudProvider,
    FraudResult,
    OrderFacts,
    ProviderError,
    Reason,
)
from services.fraud.rule_store import RuleStore
from shared.contracts import OrderFraud, OrderPlaced, OrderRescreen, OrderScreened
from shared.errors import Rejected
from shared.orders import ask_for_order_emails, transition
from shared.settings_parts import FraudSettings
from shared.states import CLEARED, OrderStatus, RuleAction, Screening
from shared.uow import UnitOfWork

log = logging.getLogger("ordermill.fraud")

Facts = tuple[asyncpg.Record, OrderFacts]  # the order (locked) and what the rules read


@dataclass(frozen=True)
class Verdict:
    screening: Screening
    provider: str
    score: Decimal | None = None
    reasons: tuple[Reason, ...] = ()
    raw: dict | None = None
    error: str | None = None
    fraud: bool = False  # the order becomes Fraud
    matches: tuple[RuleMatch, ...] = ()  # the operator rules that matched
    review_reasons: tuple[Reason, ...] = ()  # why it waits for a person (screening `review`)
    rule_set_id: int | None = None


@dataclass(frozen=True)
class Scored:
    """A remote provider's answer, obtained before the order's transaction."""

    result: FraudResult | None = None
    error: str | None = None


@dataclass(frozen=True)
class Rules:
    """The operator rules for one screening: the set in force and the facts they read."""

    rule_set: RuleSet
    facts: RuleFacts

    def before(self, facts: OrderFacts) -> tuple[RuleMatch, ...]:
        return tuple(self.rule_set.matches(facts, self.facts, after_provider=False))

    def after(self, facts: OrderFacts, ip_country: str | None) -> tuple[RuleMatch, ...]:
        # Most screenings learn no country (the rules provider): the facts as they were.
        rule_facts = (self.facts if ip_country == self.facts.ip_country
                      else replace(self.facts, ip_country=ip_country))
        return tuple(self.rule_set.matches(facts, rule_facts, after_provider=True))


def deciding(matches: tuple[RuleMatch, ...]) -> bool:
    """A rule that makes the order Fraud on its own: no provider is asked."""
    return any(m.action == RuleAction.FRAUD for m in matches)


@dataclass(frozen=True)
class Screener:
    settings: FraudSettings
    provider: FraudProvider
    rule_store: RuleStore = field(default_factory=RuleStore)

    @cached_property
    def banned(self) -> BannedLists:
        return BannedLists(self.settings.banned)

    @property
    def _window(self) -> timedelta:
        return timedelta(minutes=self.settings.velocity_window_minutes)

    # With a remote provider, `uow.prepared` is what score_* asked it before the transaction;
    # `uow.loaded` is the order, locked, and its facts, read with the batch's (load_facts).
    async def on_placed(self, event: OrderPlaced, uow: UnitOfWork) -> None:
        await self.screen(uow, event.order_id, rescreen=False, scored=uow.prepared,
                          loaded=uow.loaded)

    async def on_rescreen(self, event: OrderRescreen, uow: UnitOfWork) -> None:
        await self.screen(uow, event.order_id, rescreen=True, scored=uow.prepared,
                          loaded=uow.loaded)

    async def load_facts(self, events: Sequence[OrderPlaced | OrderRescreen],
                         conn: asyncpg.Connection) -> list[Facts | None]:
        """The routes' load step: every order of the batch locked and its facts read in one
        statement (its rule set's id too), in the batch's transaction, so no order is screened
        under rules older than those committed before that transaction began.

        Read before any of the batch's handlers wrote, so a fact another screening of the batch
        may change is not shared: only the first order of each client gets its facts from here
        (the client's earlier Fraud, Cancelled and cleared orders, and the order's own status
        and screening when it comes twice); the others are read by their handler, after the
        earlier ones wrote, as one transaction each would have read them."""
        found = await lock_many_with_facts(conn, [e.order_id for e in events], self._window)
        clients: set[int] = set()
        loaded: list[Facts | None] = []
        for event in events:
            facts = found.get(event.order_id)
            if facts is not None and facts[0]["client_id"] not in clients:
                clients.add(facts[0]["client_id"])
                loaded.append(facts)
            else:
                loaded.append(None)
        return loaded

    async def score_placed(self, event: OrderPlaced, pool: asyncpg.Pool) -> Scored | None:
        return await self._score_outside(pool, event.order_id, rescreen=False)

    async def score_rescreen(self, event: OrderRescreen, pool: asyncpg.Pool) -> Scored | None:
        return await self._score_outside(pool, event.order_id, rescreen=True)

    async def _score_outside(self, pool: asyncpg.Pool, order_id: int, *,
                             rescreen: bool) -> Scored | None:
        """A remote provider is asked before the transaction, so a slow MaxMind holds no row
        lock (operators and payments wait on it) and no pooled connection."""
        if not self.provider.remote:
            return None
        found = await read_facts(pool, order_id, self._window)
        if found is None:
            return None  # the handler refuses it
        order, facts = found
        if (not _needs_screening(order, rescreen) or self._skip(order) is not None
                or self.banned.reasons(facts)):
            return None  # no lookup: the handler decides without the provider
        rules = await self._rules(pool, order, facts)
        if deciding(rules.before(facts)):
            return None  # an operator rule makes it Fraud: no lookup is paid for
        return await self._ask(facts)

    async def _rules(self, conn: asyncpg.Connection | asyncpg.Pool, order: asyncpg.Record,
                     facts: OrderFacts) -> Rules:
        rule_set = await self.rule_store.current(conn, order["rule_set_id"])
        per_client, per_ip = await velocity(conn, facts.order_id, rule_set.windows)
        return Rules(rule_set, RuleFacts(per_client=per_client, per_ip=per_ip))

    async def _ask(self, facts: OrderFacts) -> Scored:
        try:
            return Scored(result=await self.provider.score(facts))
        except ProviderError as exc:
            return Scored(error=str(exc))

    async def screen(self, uow: UnitOfWork, order_id: int, *, rescreen: bool,
                     scored: Scored | None = None, loaded: Facts | None = None) -> None:
        conn = uow.conn
        found = (loaded if loaded is not None and loaded[0]["id"] == order_id
                 else await lock_with_facts(conn, order_id, self._window))
        if found is None:
            raise Rejected(f"order {order_id} does not exist")
        order, facts = found
        if not _needs_screening(order, rescreen):
            # Already screened (a re-drive or a duplicate), or an operator acted first.
            log.info("screening not needed", extra={
                "order_id": order_id, "order_ref": order["order_ref"],
                "status": order["status"], "screening": order["screening"]})
            return
        verdict = await self._verdict(conn, order, facts, scored)
        failed = verdict.fraud
        matched = [m.name for m in verdict.matches]
        # The check (every screening is a row of its own: the history), the order's screening
        # and (unless a transition writes it) the order's history in one statement.
        await conn.execute(
            "WITH fc AS (INSERT INTO fraud_checks (order_id, provider, result, score, threshold,"
            "  reasons, raw, error, rule_set_id, rule_matches, review_threshold, review_reasons,"
            "  rescreen) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $13, $14, $15, $16, $17)),"
            " o AS (UPDATE orders SET screening = $3, updated_at = now() WHERE id = $1)"
            " INSERT INTO order_history (order_id, actor, action, detail)"
            " SELECT $1, $9, $10, $11 WHERE NOT $12",
            order_id, verdict.provider, verdict.screening, verdict.score,
            self.settings.threshold, [r.as_dict() for r in verdict.reasons], verdict.raw,
            verdict.error, uow.actor, "rescreened" if rescreen else "screened",
            {"screening": verdict.screening, "score": str(verdict.score), "error": verdict.error}
            | ({"rules": matched} if matched else {})
            | ({"review_reasons": [r.code for r in verdict.review_reasons]}
               if verdict.review_reasons else {}),
            failed, verdict.rule_set_id, [m.as_dict() for m in verdict.matches],
            self.settings.review_threshold, [r.as_dict() for r in verdict.review_reasons],
            rescreen,
        )
        log_extra = {"order_id": order_id, "order_ref": order["order_ref"],
                     "screening": verdict.screening, "score": str(verdict.score),
                     "provider": verdict.provider, "rules": matched,
                     "reasons": [r.code for r in verdict.reasons]}
        if failed:
            await transition(conn, order, OrderStatus.FRAUD, actor=uow.actor, action="screening",
                             detail={"score": str(verdict.score), "error": verdict.error,
                                     "reasons": [r.code for r in verdict.reasons]}
                             | ({"rules": matched} if matched else {}))
            uow.emit(OrderFraud(
                order_id=order_id, order_ref=order["order_ref"], source="screening",
                score=verdict.score))
            log.warning("order is Fraud", extra=log_extra)
            return
        review = verdict.screening == Screening.REVIEW
        uow.emit(OrderScreened(
            order_id=order_id, order_ref=order["order_ref"],
            # `review` travels as `passed` (not Fraud) with needs_review: consumers that know
            # only the first three values keep working (docs/contract.md, section 9, 1.3.0).
            screening=Screening.PASSED if review else verdict.screening,
            score=verdict.score, threshold=self.settings.threshold,
            provider=verdict.provider, needs_review=review,
            review_reasons=[r.code for r in verdict.review_reasons]))
        if verdict.screening in CLEARED:
            ask_for_order_emails(uow, order)
        if review:
            log.warning("order needs review", extra=log_extra | {
                "review_reasons": [r.code for r in verdict.review_reasons]})
        else:
            log.info("order screened", extra=log_extra)

    def _skip(self, order: asyncpg.Record) -> Verdict | None:
        if self.settings.threshold == 0:
            return Verdict(Screening.SKIPPED, "none",
                           reasons=(Reason("disabled", "threshold is 0"),))
        if (self.settings.skip_existing_clients and order["client_named_by_id"]
                and order["active_orders"] and self._own_client(order)):
            return Verdict(Screening.SKIPPED, "none", reasons=(
                Reason("existing_client", f"client has {order['active_orders']} Active order(s)"),))
        return None

    def _own_client(self, order: asyncpg.Record) -> bool:
        """The order's client is its storefront's own (created by it or linked to it by an
        operator), or an operator placed it: someone else's client id, whatever its Active
        orders, is no reason to skip screening (placement refuses one already; this holds for
        any order stored otherwise)."""
        return order["own_client"] or (order["placed_by"] is not None
                                       and order["placed_by"] in self.settings.operator_users)

    async def _verdict(self, conn: asyncpg.Connection, order: asyncpg.Record,
                       facts: OrderFacts, scored: Scored | None) -> Verdict:
        skip = self._skip(order)
        if skip is not None:
            return skip
        banned = self.banned.result(facts)
        if banned is not None:  # whatever the provider: a banned client is not let through
            return self._judged("rules", banned)
        rules = await self._rules(conn, order, facts)
        before = rules.before(facts)
        if deciding(before):  # Fraud outright: the provider is not asked
            return self._by_rules(before, rules.rule_set.id)
        if scored is None:  # a local provider, or a remote one whose early look saw no need
            scored = await self._ask(facts)
        if scored.result is None:
            return replace(self._on_error(order, scored.error or "no result"),
                           matches=before, rule_set_id=rules.rule_set.id)
        matches = before + rules.after(facts, scored.result.ip_country)
        return self._judged(self.provider.name, scored.result, matches, rules.rule_set.id)

    def _by_rules(self, matches: tuple[RuleMatch, ...], rule_set_id: int | None) -> Verdict:
        """An operator rule decided: Fraud, scored 99 like a banned client."""
        reasons = tuple(_rule_reason(m) for m in matches)
        raw = {"provider": "rules", "risk_score": str(MAX_SCORE),
               "rules": [m.as_dict() for m in matches]}
        return Verdict(Screening.FAILED, "rules", MAX_SCORE, reasons, raw, fraud=True,
                       matches=matches, rule_set_id=rule_set_id)

    def _judged(self, provider: str, result: FraudResult, matches: tuple[RuleMatch, ...] = (),
                rule_set_id: int | None = None) -> Verdict:
        """The provider's answer with the rules' points added, against the two thresholds."""
        points = sum((m.points for m in matches if m.action == RuleAction.SCORE), Decimal("0"))
        score = result.score
        if points:
            score = max(MIN_SCORE, min(MAX_SCORE, score + points)).quantize(Decimal("0.01"))
        failed = result.reject or deciding(matches) or score > self.settings.threshold
        review: list[Reason] = []
        if not failed:
            if result.review:
                review.append(Reason("provider_review", f"{provider} says the order needs review"))
            review += [Reason(f"rule:{m.name}", m.detail) for m in matches
                       if m.action == RuleAction.REVIEW]
            floor = self.settings.review_threshold
            if floor is not None and score > floor:
                review.append(Reason("review_band", f"score {score} is over the review"
                                     f" threshold {floor} (Fraud over {self.settings.threshold})"))
        screening = (Screening.FAILED if failed
                     else Screening.REVIEW if review else Screening.PASSED)
        return Verdict(screening, provider, score,
                       result.reasons + tuple(_rule_reason(m) for m in matches), result.raw,
                       fraud=failed, matches=matches, review_reasons=tuple(review),
                       rule_set_id=rule_set_id)

    def _on_error(self, order: asyncpg.Record, error: str) -> Verdict:
        """FRAUD_ON_ERROR: hold for review (the default), Fraud, or let it through unscreened."""
        policy = self.settings.on_error
        log.error("order could not be screened", extra={
            "order_id": order["id"], "order_ref": order["order_ref"], "error": error,
            "policy": policy})
        reason = Reason("screening_error", f"could not be screened (FRAUD_ON_ERROR={policy})")
        if policy == "pass":
            return Verdict(Screening.SKIPPED, self.provider.name, reasons=(reason,), error=error)
        return Verdict(Screening.ERROR, self.provider.name, reasons=(reason,), error=error,
                       fraud=policy == "fraud")


def _rule_reason(match: RuleMatch) -> Reason:
    return Reason(f"rule:{match.name}", match.detail,
                  match.points if match.action == RuleAction.SCORE else Decimal("0"))


def _needs_screening(order: asyncpg.Record, rescreen: bool) -> bool:
    return order["status"] == OrderStatus.PENDING and (
        rescreen or order["screening"] == Screening.QUEUED)
