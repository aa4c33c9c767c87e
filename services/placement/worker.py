"""The placement worker: its queue, routes and rejection event."""

from __future__ import annotations

from functools import partial

from services.placement.handlers import place_order
from services.placement.pricing import load_catalog
from shared.contracts import OrderRejected, PlaceOrder, PlaceReply
from shared.epp_codes import EppCodes, warn_if_plain
from shared.parties import OPERATORS, PLACERS
from shared.runtime import WorkerSpec, route
from shared.settings import Settings
from shared.uow import UnitOfWork


def worker(settings: Settings) -> WorkerSpec:
    # Development with no operator named (TRUST_ANY_PUBLISHER): anyone is taken at its word.
    open_desk = settings.trust_any_publisher and not (settings.operator_users
                                                      or settings.console_users)
    # Who may name any client (the console places orders for the operator signed in).
    operators = frozenset(settings.operator_users) | frozenset(settings.console_users)
    epp_codes = EppCodes.from_environ()  # a bad EPP_CODE_KEY stops the worker at start

    async def place(cmd: PlaceOrder, uow: UnitOfWork) -> None:
        if not cmd.generate_invoice and not (open_desk or uow.context.parties & OPERATORS):
            # Orders from storefronts always get an invoice; only an operator (a
            # broker-validated user in OPERATOR_USERS or CONSOLE_USERS) may place one without.
            cmd = cmd.model_copy(update={"generate_invoice": True})
        # Storefronts are separate (docs/contract.md, section 8): the order's ref and its client are the
        # publisher's own; an operator may name any client.
        await place_order(cmd, uow, operators=operators, epp_codes=epp_codes)

    return WorkerSpec(
        service="placement",
        # The batch's catalog rows (prices, TLDs, promotions) are read once for its orders.
        routes={"order.place": route(place, publishers=PLACERS, load=load_catalog)},
        rejection_event=OrderRejected,
        rejection_reply=PlaceReply,
        on_start=(partial(warn_if_plain, epp_codes),),
    )
