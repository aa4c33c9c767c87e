"""From the events already on the exchange to alert causes, and which rules they match.

Each handler is a plain function of (event, uow): it reads the rule set in force and, when
a rule of the event's trigger matches, raises its alert in the consuming transaction. With
no rule for the trigger it returns at once (no query beyond the cached rule set): alerts
cost the pipeline nothing when nobody asked for them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import asyncpg

from services.alerts.facts import OrderFacts, order_facts
from services.alerts.raising import Cause, Delivery, raise_alert
from services.alerts.rules import AlertRules, Rule
from services.alerts.store import RuleStore
from shared.contracts import (
    DomainFailed,
    OrderFraud,
    OrderPlaced,
    OrderScreened,
    PaymentUnapplied,
    ServiceFailed,
)
from shared.states import AlertTrigger, Screening
from shared.uow import UnitOfWork


def new_order_matches(rule: Rule, facts: OrderFacts) -> bool:
    """Every condition given holds: total over (in its currency), a product, first order."""
    when = rule.when
    if when.total_over is not None:
        if when.currency is not None and facts.currency != when.currency:
            return False
        if not facts.total > when.total_over:
            return False
    if when.product is not None and not set(when.product) & set(facts.products):
        return False
    return when.first_order is None or facts.first_order == when.first_order


def _detail(detail: dict[str, object]) -> str | None:
    """A setup's failure as the job runner recorded it (`error`, else the whole detail)."""
    if not detail:
        return None
    error = detail.get("error")
    return str(error if error is not None else detail)[:500]


# The trigger each event may fire (order.screened only with screening `error`).
TRIGGER_OF: dict[str, AlertTrigger] = {
    "order.placed": AlertTrigger.NEW_ORDER,
    "order.fraud": AlertTrigger.FRAUD,
    "order.screened": AlertTrigger.SCREENING_ERROR,
    "service.failed": AlertTrigger.SETUP_PARKED,
    "domain.failed": AlertTrigger.SETUP_PARKED,
    "payment.unapplied": AlertTrigger.PAYMENT_UNAPPLIED,
}


def may_alert(triggers: set[AlertTrigger], key: str, event: object) -> bool:
    """Whether a rule in force (of `triggers`, the set's) could alert on this event: a rule of
    its trigger exists (whether a fraud rule's source or a new-order rule's conditions hold
    is the handler's to say). False for most events of a burst: no rule, or a screening that
    did not end in `error`. A key the map does not know is left to its handler (True): a
    route added without its trigger here must not be acked unhandled."""
    trigger = TRIGGER_OF.get(key)
    if trigger is None:
        return True
    if trigger not in triggers:
        return False
    return not isinstance(event, OrderScreened) or event.screening == Screening.ERROR


class Triggers:
    def __init__(self, store: RuleStore, delivery: Delivery) -> None:
        self.store, self.delivery = store, delivery

    async def wanted(self, events: Sequence[tuple[str, object]],
                     conn: asyncpg.Connection) -> list[bool]:
        """WorkerSpec.wanted: the rule set in force read afresh, once a batch, before its
        transaction; only the events a rule could alert on get one (with no rule loaded, or
        none about these events, none does)."""
        triggers = (await self.store.refresh(conn)).triggers
        return [may_alert(triggers, key, event) for key, event in events]

    async def _rules(self, uow: UnitOfWork, trigger: AlertTrigger) -> tuple[AlertRules, list[Rule]]:
        rules = await self.store.current(uow.conn)
        return rules, rules.for_trigger(trigger)

    async def _raise(self, uow: UnitOfWork, rules: AlertRules, matching: Iterable[Rule],
                     cause: Cause) -> None:
        for rule in matching:
            await raise_alert(uow.conn, rules, rule, cause, self.delivery)

    async def on_placed(self, event: OrderPlaced, uow: UnitOfWork) -> None:
        rules, candidates = await self._rules(uow, AlertTrigger.NEW_ORDER)
        if not candidates:
            return
        facts = await order_facts(uow.conn, event.order_id)
        if facts is None:
            return  # an order that is not (yet) in this database: nothing to tell
        matching = [rule for rule in candidates if new_order_matches(rule, facts)]
        # One alert per order and rule, whatever event carried it.
        await self._raise(uow, rules, matching, Cause(
            AlertTrigger.NEW_ORDER, f"order:{facts.id}",
            f"New order #{facts.number}: {facts.total} {facts.currency} from {facts.client}",
            facts.lines(), facts.id))

    async def on_fraud(self, event: OrderFraud, uow: UnitOfWork) -> None:
        rules, candidates = await self._rules(uow, AlertTrigger.FRAUD)
        matching = [r for r in candidates if r.when.source in (None, event.source)]
        if not matching:
            return
        facts = await order_facts(uow.conn, event.order_id)
        lines = facts.lines() if facts else {"Order": event.order_ref}
        if event.source == "operator":
            how = f"by operator {event.operator}" if event.operator else "by an operator"
        else:
            how = "by screening" + (f" (score {event.score})" if event.score is not None else "")
        lines = {"Set to Fraud": how, **lines}
        number = f"#{facts.number}" if facts else event.order_ref
        # Each time the order is set to Fraud (it may be set back to Pending, then again).
        await self._raise(uow, rules, matching, Cause(
            AlertTrigger.FRAUD, f"fraud:{event.order_id}:{uow.context.message_id}",
            f"Order {number} set to Fraud {how}", lines, event.order_id))

    async def on_screened(self, event: OrderScreened, uow: UnitOfWork) -> None:
        if event.screening != Screening.ERROR:
            return
        rules, matching = await self._rules(uow, AlertTrigger.SCREENING_ERROR)
        if not matching:
            return
        facts = await order_facts(uow.conn, event.order_id)
        lines = {"Provider": event.provider, **(facts.lines() if facts else {})}
        number = f"#{facts.number}" if facts else event.order_ref
        await self._raise(uow, rules, matching, Cause(
            AlertTrigger.SCREENING_ERROR, f"screening:{event.order_id}:{uow.context.message_id}",
            f"Screening of order {number} could not complete: the order is held Pending",
            lines, event.order_id))

    async def on_service_failed(self, event: ServiceFailed, uow: UnitOfWork) -> None:
        await self.on_setup_failed(event, uow)

    async def on_domain_failed(self, event: DomainFailed, uow: UnitOfWork) -> None:
        await self.on_setup_failed(event, uow)

    async def on_setup_failed(self, event: ServiceFailed | DomainFailed, uow: UnitOfWork) -> None:
        rules, matching = await self._rules(uow, AlertTrigger.SETUP_PARKED)
        if not matching:
            return
        facts = await order_facts(uow.conn, event.order_id)
        what = (f"service {event.service_id}" if isinstance(event, ServiceFailed)
                else f"domain {event.domain_id}")
        lines = {"Setup": f"{what}, job {event.job_id}"}
        if (error := _detail(event.detail)) is not None:
            lines["Error"] = error
        lines |= facts.lines() if facts else {"Order": event.order_ref}
        number = f"#{facts.number}" if facts else event.order_ref
        # Per job and park: a job retried by an operator and parked again alerts again.
        await self._raise(uow, rules, matching, Cause(
            AlertTrigger.SETUP_PARKED, f"job:{event.job_id}:{uow.context.message_id}",
            f"Setup parked: {what} of order {number} needs an operator (module queue)",
            lines, event.order_id))

    async def on_unapplied(self, event: PaymentUnapplied, uow: UnitOfWork) -> None:
        rules, matching = await self._rules(uow, AlertTrigger.PAYMENT_UNAPPLIED)
        if not matching:
            return
        row = await uow.conn.fetchrow(
            "SELECT amount, raw_amount, currency, gateway, transaction_id FROM payments"
            " WHERE id = $1", event.payment_id)
        lines = {"Reason": event.reason}
        if row is not None:
            lines["Amount"] = f"{row['amount'] if row['amount'] is not None else row['raw_amount']}" \
                              f" {row['currency'] or ''}".rstrip()
            if row["gateway"]:
                lines["Gateway"] = f"{row['gateway']} {row['transaction_id'] or ''}".rstrip()
        if event.order_ref:
            lines["Order ref"] = event.order_ref
        if event.invoice_id is not None:
            lines["Invoice"] = str(event.invoice_id)
        order_id = None
        if event.invoice_id is not None:
            order_id = await uow.conn.fetchval("SELECT order_id FROM invoices WHERE id = $1",
                                               event.invoice_id)
        await self._raise(uow, rules, matching, Cause(
            AlertTrigger.PAYMENT_UNAPPLIED, f"payment:{event.payment_id}",
            f"Payment {event.payment_id} left unapplied: {event.reason}", lines, order_id))
