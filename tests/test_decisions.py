"""Ordermill's pure decisions, with no server at all: prices and promotions, the order status
transitions, the auto-setup table, payment matching, the fraud rules' banned lists and the
pipeline's checks of a message's properties. (The rules scorer's table is test_fraud's.)"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from services.fraud.banned import mail_domain
from services.placement.pricing import PricedProduct, Promotion
from services.provisioning.payments import (
    Problem,
    _amount,
    _application_problem,
    _fitted,
    int_or_none,
)
from services.provisioning.reconcile import OrderState, username_for
from shared.contracts import PaymentReceived, ProductItem
from shared.errors import Rejected
from shared.orders import ORDER_STATUSES, TRANSITIONS, TransitionRefused, transition
from shared.runtime.middleware.checks import checked_message_id, checked_properties
from shared.states import WaitingFor

# -- pricing ----------------------------------------------------------------------------------


def line(product: str, price: str) -> PricedProduct:
    return PricedProduct(ProductItem(type="product", product=product), 1, product,
                         Decimal(price), Decimal("0"))


@pytest.mark.parametrize(("kind", "value", "products", "price", "off"), [
    ("percent", "10", (), "4.95", "0.50"),  # rounded to the cent
    ("percent", "33.3", (), "10.00", "3.33"),
    ("fixed", "2.00", (), "4.95", "2.00"),
    ("fixed", "20.00", (), "4.95", "4.95"),  # never more than the line
    ("percent", "100", (), "4.95", "4.95"),
    ("percent", "10", ("business",), "4.95", "0.00"),  # not one of the promotion's products
    ("percent", "10", ("starter",), "4.95", "0.50"),
])
def test_a_promotion_discounts_its_products_lines_up_to_their_price(
    kind: str, value: str, products: tuple[str, ...], price: str, off: str,
) -> None:
    promotion = Promotion("CODE", kind, Decimal(value), products)
    assert promotion.discount(line("starter", price)) == Decimal(off)


# -- the transition table (docs/contract.md, section 1, operator actions) ----------------------------------

ACTIONS = {  # action: (allowed from, result)
    "accept": ({"Pending"}, "Active"),
    "deny": ({"Pending"}, "Cancelled"),
    "cancel": ({"Pending", "Active"}, "Cancelled"),
    "fraud": ({"Pending", "Active", "Cancelled"}, "Fraud"),
    "pending": ({"Cancelled", "Fraud"}, "Pending"),
}


def test_the_transition_table_is_the_operator_actions_table() -> None:
    by_operators = {(start, to, action) for (start, to), actions in TRANSITIONS.items()
                    for action in actions if action != "screening"}
    assert by_operators == {(start, to, action) for action, (starts, to) in ACTIONS.items()
                            for start in starts}
    # Screening's only move: a Pending order found to be fraud.
    assert {pair for pair, actions in TRANSITIONS.items() if "screening" in actions} == {
        ("Pending", "Fraud")}
    assert {s for pair in TRANSITIONS for s in pair} == set(ORDER_STATUSES)
    assert not any(start == to for start, to in TRANSITIONS)  # "already so" is answered ok


@pytest.mark.parametrize("start", ORDER_STATUSES)
@pytest.mark.parametrize("to", ORDER_STATUSES)
async def test_a_transition_not_in_the_table_is_refused_before_any_write(
    start: str, to: str,
) -> None:
    if (start, to) in TRANSITIONS:
        return
    # No connection: a refusal must not touch the database at all.
    with pytest.raises(TransitionRefused, match=f"order 7 is {start}; x cannot make it {to}"):
        await transition(None, {"id": 7, "status": start}, to, actor="a", action="x")  # type: ignore[arg-type]


# -- reconcile's item decisions (docs/contract.md, section 1, the auto-setup table) -----------------------

def state(**overrides: Any) -> OrderState:
    row = {"id": 1, "order_ref": "r", "status": "Pending", "screening": "passed",
           "screening_override": False, "invoice_status": "Unpaid", "accept_options": None}
    row.update(overrides)
    return OrderState.of(row)  # type: ignore[arg-type]


@pytest.mark.parametrize(("order", "on_order", "on_payment", "on_accept", "never"), [
    ({}, True, False, False, False),
    ({"invoice_status": "Paid"}, True, True, False, False),
    ({"screening": "queued", "invoice_status": "Paid"}, False, False, False, False),
    ({"screening": "error", "invoice_status": "Paid"}, False, False, False, False),
    ({"screening": "error", "screening_override": True, "invoice_status": "Paid"},
     True, True, False, False),
    ({"screening": "skipped", "invoice_status": "Paid"}, True, True, False, False),
    ({"invoice_status": None}, False, False, False, False),  # no invoice: waits for Accept
    # Accept with "run module create" sets up every service, whatever its option.
    ({"status": "Active"}, True, True, True, True),
    ({"status": "Active", "accept_options": {"run_module_create": False}},
     True, False, True, False),
    ({"status": "Fraud", "invoice_status": "Paid"}, False, False, False, False),
    ({"status": "Cancelled", "invoice_status": "Paid"}, False, False, False, False),
])
def test_which_services_are_set_up(order: dict, on_order: bool, on_payment: bool,
                                   on_accept: bool, never: bool) -> None:
    s = state(**order)
    assert [s.wants_setup(option) for option in ("on_order", "on_payment", "on_accept", "never")
            ] == [on_order, on_payment, on_accept, never]


@pytest.mark.parametrize(("order", "auto", "manual"), [
    ({}, False, False),  # never before the invoice is paid
    ({"invoice_status": "Paid"}, True, False),
    ({"invoice_status": "Paid", "screening": "queued"}, False, False),
    ({"status": "Active"}, True, True),  # Accept with "register domains"
    ({"status": "Active", "accept_options": {"register_domains": False}}, False, False),
    ({"status": "Fraud", "invoice_status": "Paid"}, False, False),
])
def test_which_domains_are_registered(order: dict, auto: bool, manual: bool) -> None:
    s = state(**order)
    assert (s.wants_registration(True), s.wants_registration(False)) == (auto, manual)


def test_a_cpanel_username_is_valid_and_the_same_on_every_attempt() -> None:
    assert username_for("Ann-Lee.example", "x", 35) == "annleeez"
    assert username_for(None, "1234", 1) == "svc1"
    name = username_for("a" * 40 + ".example", "x", 36**9)
    assert len(name) <= 16 and name[0].isalpha() and name == name.lower()


# -- payment matching ---------------------------------------------------------------------------

def payment(**overrides: Any) -> dict[str, Any]:
    return {"requested_invoice_id": 17, "order_ref": None, "currency": "USD"} | overrides


def invoice(**overrides: Any) -> dict[str, Any]:
    return {"id": 17, "order_ref": "shop-1", "currency": "USD", "order_status": "Pending",
            "status": "Unpaid"} | overrides


REVIEW = WaitingFor.REVIEW  # applied if an operator sets the order back to Pending


@pytest.mark.parametrize(("p", "target", "problem"), [
    (payment(), invoice(), None),
    (payment(), Problem("unknown invoice 17", WaitingFor.ORDER),
     Problem("unknown invoice 17", WaitingFor.ORDER)),
    (payment(order_ref="shop-2"), invoice(),
     Problem("invoice 17 belongs to order shop-1, not shop-2")),
    (payment(requested_invoice_id=None, order_ref="shop-1"), invoice(), None),
    (payment(currency="EUR"), invoice(), Problem("currency EUR does not match invoice 17 in USD")),
    (payment(), invoice(order_status="Fraud"), Problem("order shop-1 is Fraud", REVIEW)),
    (payment(), invoice(order_status="Cancelled"), Problem("order shop-1 is Cancelled", REVIEW)),
    (payment(), invoice(status="Cancelled"), Problem("invoice 17 is Cancelled", REVIEW)),
])
def test_a_payment_applies_to_its_invoice_or_says_why_not(p: dict, target: Any,
                                                          problem: Problem | None) -> None:
    assert _application_problem(p, target) == problem  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "amount", "problem"), [
    ("12.95", Decimal("12.95"), None),
    ("12.9", Decimal("12.9"), None),
    ("0", None, "is not a positive amount"),
    ("-1", None, "is not a positive amount"),
    ("NaN", None, "is not a positive amount"),
    ("1e3", Decimal("1000"), None),
    ("12.955", None, "has more than two decimal places"),
    ("1e10", None, "is too large"),
    ("twelve", None, "is not a number"),
])
def test_an_amount_is_a_positive_number_of_cents(raw: str, amount: Decimal | None,
                                                  problem: str | None) -> None:
    got, why = _amount(raw)
    assert got == amount
    assert (why is None) if problem is None else (problem in why)


def test_over_long_payment_texts_are_kept_shortened_and_distinct() -> None:
    body = {"invoice_id": 1, "amount": "1.00", "currency": "USD", "gateway": "stripe"}
    one = PaymentReceived.model_validate(body | {"transaction_id": "t" * 300 + "1"})
    two = PaymentReceived.model_validate(body | {"transaction_id": "t" * 300 + "2"})
    (fitted_one, why), (fitted_two, _) = _fitted(one), _fitted(two)
    assert len(fitted_one.transaction_id) <= 255
    assert fitted_one.transaction_id != fitted_two.transaction_id
    assert why == "transaction_id over 255 characters (kept shortened)"
    short = PaymentReceived.model_validate(body | {"transaction_id": "ch_1"})
    assert _fitted(short) == (short, None)


@pytest.mark.parametrize(("value", "expected"), [
    (17, 17), ("17", 17), (" 17 ", 17), ("\u00b9\u00b2", None), (0, None), (-3, None),
    (2**63, None), ("x", None), (None, None), ("9" * 4301, None), ("0" * 30 + "17", None),
])
def test_an_id_is_one_a_bigint_holds(value: Any, expected: int | None) -> None:
    assert int_or_none(value) == expected


# -- fraud: the banned lists' view of an address -----------------------------------------------

@pytest.mark.parametrize(("address", "domain"), [
    ("ann@Example.COM", "example.com"),
    ("ann@example.com.", "example.com"),
    ("ann@spam.exam\u00adple", "spam.example"),  # a soft hyphen is no different domain
    ("ann@\uff53pam.example", "spam.example"),  # nor a full-width letter
])
def test_a_mail_domain_is_the_one_its_mail_reaches(address: str, domain: str) -> None:
    assert mail_domain(address) == domain


# -- the pipeline's property checks ----------------------------------------------------------

def message(**properties: Any) -> SimpleNamespace:
    base = {"body": b"{}", "message_id": "m-1", "timestamp": None, "expiration": None,
            "correlation_id": None, "reply_to": None, "type": None, "user_id": None,
            "content_type": None, "content_encoding": None, "app_id": None, "routing_key": "k"}
    return SimpleNamespace(**(base | properties))


def test_a_message_without_an_id_is_known_by_its_body() -> None:
    assert checked_message_id(message(message_id=None)).startswith("sha256:")
    assert checked_message_id(message()) == "m-1"
    with pytest.raises(Rejected, match="message_id holds a NUL character"):
        checked_message_id(message(message_id="a\x00"))
    with pytest.raises(Rejected, match="message_id is not valid UTF-8"):
        checked_message_id(message(message_id="a\udcff"))


def test_properties_are_checked_and_the_expiry_computed() -> None:
    sent = datetime(2030, 1, 1, tzinfo=UTC)
    expires = checked_properties(message(timestamp=sent.replace(tzinfo=None), expiration=30.0))
    assert expires == datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)
    assert checked_properties(message(timestamp=sent)) is None  # no expiration: never expires
    with pytest.raises(Rejected, match="reply_to holds a NUL character"):
        checked_properties(message(reply_to="amq.gen-\x00"))
    with pytest.raises(Rejected, match="user_id is not valid UTF-8"):
        checked_properties(message(user_id="\udcff"))
    with pytest.raises(Rejected, match="timestamp and expiration do not make a valid time"):
        checked_properties(message(timestamp=datetime(9999, 12, 31, tzinfo=UTC),
                                   expiration=86400.0))
