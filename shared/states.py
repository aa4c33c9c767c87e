"""Every state Ordermill stores, as a type.

The values are contract words (docs/contract.md, section 1 "Statuses"): operators read them, events
carry them, the tables' CHECK constraints hold them. A value is never changed; a member is
only ever added (with a migration that widens its CHECK). A test compares each enum with
its table's CHECK constraint.

StrEnum members are `str`: they compare equal to the text read from PostgreSQL, pass as
query parameters and serialise to JSON as their value.
"""

from __future__ import annotations

from enum import StrEnum


class OrderStatus(StrEnum):
    PENDING = "Pending"
    ACTIVE = "Active"
    CANCELLED = "Cancelled"
    FRAUD = "Fraud"


# An ended order: nothing of it is set up, what is live is terminated, a payment waits for
# an operator to set it back to Pending.
ENDED = frozenset({OrderStatus.CANCELLED, OrderStatus.FRAUD})


class ServiceStatus(StrEnum):
    """A product item (a hosting account or other service)."""

    PENDING = "Pending"
    ACTIVE = "Active"
    SUSPENDED = "Suspended"
    TERMINATED = "Terminated"
    CANCELLED = "Cancelled"
    FRAUD = "Fraud"


class DomainStatus(StrEnum):
    PENDING = "Pending"
    PENDING_REGISTRATION = "Pending Registration"
    PENDING_TRANSFER = "Pending Transfer"
    ACTIVE = "Active"
    CANCELLED = "Cancelled"
    FRAUD = "Fraud"


class InvoiceStatus(StrEnum):
    UNPAID = "Unpaid"
    PAID = "Paid"
    CANCELLED = "Cancelled"


class Screening(StrEnum):
    """An order's fraud screening: `queued` until scored."""

    QUEUED = "queued"
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    ERROR = "error"
    # Not Fraud, but held for a person: scored in the review band (FRAUD_REVIEW_THRESHOLD),
    # sent to review by an operator rule or by the provider. Not cleared: nothing is set up
    # automatically and no mail goes out until an operator accepts the order.
    REVIEW = "review"


# Screening that lets the order be set up automatically (or an operator's override).
CLEARED = frozenset({Screening.PASSED, Screening.SKIPPED})


class RuleAction(StrEnum):
    """What an operator fraud rule does when it matches (services/fraud/rules.py)."""

    SCORE = "score"  # adds its points to the provider's score
    REVIEW = "review"  # the order waits for an operator (needs review)
    FRAUD = "fraud"  # the order is Fraud outright, before any remote provider is asked


class JobStatus(StrEnum):
    """A provisioning job (module create, termination, registration, transfer)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    PARKED = "parked"
    CANCELLED = "cancelled"
    RESOLVED = "resolved"  # a parked job an operator resolved by hand (review `resolve`)


# Jobs that may still run: what reconcile cancels, what an operator's retry looks at.
WAITING_JOBS = frozenset({JobStatus.PENDING, JobStatus.PARKED})


class EmailStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    PARKED = "parked"


class PaymentStatus(StrEnum):
    APPLIED = "applied"
    UNAPPLIED = "unapplied"


class WaitingFor(StrEnum):
    """What an unapplied payment waits for (payments.waiting_for; NULL: nothing, a person
    must look): its order to be placed, or an operator to set its ended order back to
    Pending."""

    ORDER = "order"
    REVIEW = "review"


class AlertTrigger(StrEnum):
    """What a staff alert rule fires on (alerts.trigger; README "Staff alerts")."""

    NEW_ORDER = "new_order"  # order.placed, with conditions
    FRAUD = "fraud"  # order.fraud: by screening or by an operator
    SCREENING_ERROR = "screening_error"  # order.screened with screening `error`
    SETUP_PARKED = "setup_parked"  # service.failed / domain.failed: a job parked
    PAYMENT_UNAPPLIED = "payment_unapplied"  # payment.unapplied
    DEAD_LETTER = "dead_letter"  # a dead-letter queue no longer empty (the sweep)
    REVIEW_WAITING = "review_waiting"  # an order awaiting review longer than N hours (the sweep)


class AlertDeliveryStatus(StrEnum):
    """A Slack message of an alert on the leased queue (alert_deliveries.status)."""

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    PARKED = "parked"
