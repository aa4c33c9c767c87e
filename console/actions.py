"""The operator actions the console offers, as the review service names them, with what the
confirmation says. Which apply to an order comes from the review service's own transition
table (services/review/handlers.py action_table), so a button is never offered for what it
would refuse."""

from __future__ import annotations

from dataclasses import dataclass

from services.review.handlers import action_table


@dataclass(frozen=True)
class ConsoleAction:
    name: str  # the review command's action
    label: str
    consequence: str  # what the confirmation says will happen
    style: str = "plain"  # primary, danger or plain


ACTIONS: dict[str, ConsoleAction] = {a.name: a for a in (
    ConsoleAction("accept", "Accept", "The order becomes Active; with the options below its"
                  " services are set up, its domains registered and the welcome email sent.",
                  "primary"),
    ConsoleAction("deny", "Deny", "The order is cancelled (denied at review); its unpaid"
                  " invoice is cancelled.", "danger"),
    ConsoleAction("cancel", "Cancel", "The order is cancelled; live hosting accounts are"
                  " terminated.", "danger"),
    ConsoleAction("fraud", "Mark as Fraud", "The order and its items become Fraud; live"
                  " accounts are terminated and the unpaid invoice cancelled.", "danger"),
    ConsoleAction("pending", "Set back to Pending", "The order is Pending again (its cancelled"
                  " unpaid invoice reopened; the screening overridden)."),
    ConsoleAction("delete", "Delete", "The order is hidden from every list; its record is"
                  " kept.", "danger"),
    ConsoleAction("retry", "Retry failed setups", "The order's parked setups run again."),
    ConsoleAction("rescreen", "Re-screen", "The order is screened for fraud again."),
    ConsoleAction("report", "Report to MaxMind", "The order's outcome is reported to MaxMind"
                  " (minFraud report transactions), so its scoring learns from it."),
)}
BULK = ("accept", "cancel", "fraud", "delete")
REPORT_TAGS = {"chargeback": "Chargeback", "not_fraud": "Not fraud",
               "suspected_fraud": "Suspected fraud", "spam_or_abuse": "Spam or abuse"}


def applicable(status: str, *, deleted: bool, parked: bool, screening: str) -> set[str]:
    """The actions the review service would take for an order in this state."""
    if deleted:
        return set()
    table = action_table()
    out = {name for name, (allowed, _) in table.items() if status in allowed}
    if screening == "queued":
        out.discard("accept")
    if not parked:
        out.discard("retry")
    out.add("report")
    return out
