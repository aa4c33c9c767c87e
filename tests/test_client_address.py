"""A new client's optional billing address: the contract, placement, `ordermill place` and `show`."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from conftest import Harness, order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from shared.contracts import NewClient

FIELDS = ("address1", "address2", "city", "state", "postcode", "phone")
ADDRESS = {"address1": "1 High Street", "address2": "Unit [i]", "city": "London",
           "state": "Greater London", "postcode": "SW1A 1AA", "phone": "+44 (0)20 7946-0000"}


def _client(ref: str, **address: str) -> dict[str, object]:
    return {"email": f"{ref}@shop.example", "first_name": "Ann", "last_name": "Lee",
            "country": "GB", **address}


async def _stored(h: Harness, ref: str) -> dict[str, object]:
    order = await h.screened(ref)
    row = await h.pool.fetchrow(f"SELECT {', '.join(FIELDS)} FROM clients WHERE id = $1",
                                order["client_id"])
    return dict(row)


def test_the_address_is_optional_bounded_and_blank_is_none() -> None:
    assert NewClient(email="ann@shop.example").model_dump(include=set(FIELDS)) == dict.fromkeys(
        FIELDS)
    # Kept as given (the phone is not reformatted); a blank value is no value.
    client = NewClient(email="ann@shop.example", phone=" +1 555 0100 ", address2="  ", city="")
    assert (client.phone, client.address2, client.city) == (" +1 555 0100 ", None, None)
    NewClient(email="ann@shop.example", phone="1" * 30)
    for field, size in (("phone", 31), ("postcode", 21), ("address1", 201), ("city", 101)):
        with pytest.raises(ValidationError, match=field):
            NewClient(email="ann@shop.example", **{field: "1" * size})


async def test_a_new_client_is_stored_with_its_address_or_with_nulls(harness: Harness) -> None:
    await harness.start([placement_worker(harness.settings), fraud_worker(harness.settings)])
    await harness.publish("order.place", order_body("addr-1", client=_client("addr-1", **ADDRESS)))
    await harness.publish("order.place", order_body("addr-none", client=_client("addr-none")))
    await harness.publish("order.place", order_body(
        "addr-part", client=_client("addr-part", city="Leeds", address2="", phone=None)))

    assert await _stored(harness, "addr-1") == ADDRESS
    assert await _stored(harness, "addr-none") == dict.fromkeys(FIELDS)
    assert await _stored(harness, "addr-part") == dict.fromkeys(FIELDS) | {"city": "Leeds"}


async def test_a_client_reused_by_email_keeps_its_stored_address(harness: Harness) -> None:
    await harness.start([placement_worker(harness.settings), fraud_worker(harness.settings)])
    await harness.publish("order.place", order_body("keep-1", client=_client("keep-1", **ADDRESS)))
    first = await harness.screened("keep-1")
    moved = _client("keep-1", address1="9 Other Road", city="Paris", phone="+33 1 00 00 00 00")
    await harness.publish("order.place", order_body("keep-2", client=moved))
    await harness.publish("order.place", order_body("keep-3", client={"email": "KEEP-1@shop.example"}))
    assert (await harness.screened("keep-2"))["client_id"] == first["client_id"]
    assert (await harness.screened("keep-3"))["client_id"] == first["client_id"]
    assert await _stored(harness, "keep-3") == ADDRESS
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM clients WHERE lower(email) = 'keep-1@shop.example'") == 1


async def test_cli_places_a_new_client_with_an_address_and_shows_it(harness: Harness) -> None:
    from test_cli import cli

    s = harness.settings
    await harness.start([placement_worker(s), fraud_worker(s)])
    options = [arg for field, value in ADDRESS.items() for arg in (f"--{field}", value)]
    code, out, err = await cli(s, "place", "--email", "desk@client.example", "--first-name", "Di",
                               *options, "--product", "starter@desk.example", "--ref", "desk-addr")
    assert code == 0, err
    order = await harness.order("desk-addr")
    assert await _stored(harness, "desk-addr") == ADDRESS

    code, out, err = await cli(s, "show", str(order["id"]), "--json")
    assert code == 0, err
    client = json.loads(out)["client"]
    assert {f: client[f] for f in FIELDS} == ADDRESS
    assert (client["id"], client["email"]) == (order["client_id"], "desk@client.example")
    code, out, err = await cli(s, "show", str(order["id"]))
    assert code == 0, err
    text = " ".join(out.split())  # rich wraps to the terminal's width
    assert ("Address: 1 High Street, Unit [i], London, Greater London, SW1A 1AA"
            " phone +44 (0)20 7946-0000") in text  # brackets shown, not taken as markup

    # Without an address: nulls in --json, no address line.
    code, out, err = await cli(s, "place", "--email", "bare@client.example", "--product",
                               "starter@bare.example", "--ref", "desk-bare")
    assert code == 0, err
    bare = await harness.order("desk-bare")
    code, out, err = await cli(s, "show", str(bare["id"]), "--json")
    assert {f: json.loads(out)["client"][f] for f in FIELDS} == dict.fromkeys(FIELDS)
    code, out, err = await cli(s, "show", str(bare["id"]))
    assert code == 0 and "Client " in out and "Address:" not in out and "phone" not in out


async def test_cli_address_mistakes_print_one_line(harness: Harness) -> None:
    from test_cli import cli

    s = harness.settings
    code, _out, err = await cli(s, "place", "--email", "x@client.example", "--phone", "1" * 31,
                                "--product", "starter")
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert "client.NewClient.phone: String should have at most 30 characters" in err
    # An existing client named by id keeps its details: they are not silently dropped.
    code, _out, err = await cli(s, "place", "--client-id", "1", "--city", "Leeds",
                                "--product", "starter")
    assert (code, err.strip()) == (
        1, "error: --city is a new client's detail: give it with --email, not --client-id")
