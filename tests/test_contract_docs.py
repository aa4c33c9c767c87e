"""The contract in the repository (docs/contract.md): the committed AsyncAPI document and JSON
Schemas are what `ordermill contract` generates from the code today, and the document holds
together. No server needed (fast tier).

After changing a contract class, a routing key or who sends it, regenerate:
`ordermill contract --out docs`, and list the change in docs/contract.md, section 9."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from cli import contract as spec
from cli.main import app
from services.review.handlers import action_table
from shared.contracts import EVENTS
from shared.states import (
    DomainStatus,
    EmailStatus,
    InvoiceStatus,
    JobStatus,
    OrderStatus,
    PaymentStatus,
    Screening,
    ServiceStatus,
    WaitingFor,
)
from shared.topology import SERVICE_BINDINGS, SERVICE_EMITS

DOCS = Path(__file__).resolve().parent.parent / "docs"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return spec.asyncapi()


def test_the_committed_files_are_what_the_code_generates() -> None:
    wanted = spec.files()
    stale = []
    for relative, text in wanted.items():
        path = DOCS / relative
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(relative)
    extra = sorted(p.name for p in (DOCS / "schemas").glob("*.json")
                   if f"schemas/{p.name}" not in wanted)
    assert not stale and not extra, (
        f"docs/ differs from the code (stale: {stale}, no longer generated: {extra}):"
        " run `ordermill contract --out docs` and commit the result")


def test_the_command_prints_the_document_and_writes_the_files(tmp_path: Path) -> None:
    runner = CliRunner()
    printed = runner.invoke(app, ["contract"], env={"ORDERMILL_NAMESPACE": "ordermill"})
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout) == json.loads(spec.dumps(spec.asyncapi()))

    written = runner.invoke(app, ["contract", "--out", str(tmp_path / "out"),
                                  "--namespace", "shop-test"])
    assert written.exit_code == 0, written.output
    document = json.loads((tmp_path / "out" / "asyncapi.json").read_text())
    assert document["channels"]["order.place"]["bindings"]["amqp"]["exchange"]["name"] == "shop-test"
    for key in [*spec.routing_keys(), *spec.REPLY_CHANNELS]:
        assert (tmp_path / "out" / "schemas" / f"{key}.json").is_file()


def test_the_document_is_asyncapi_3(document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert re.fullmatch(r"\d+\.\d+\.\d+", document["info"]["version"])
    assert document["defaultContentType"] == "application/json"
    assert set(document) <= {"asyncapi", "id", "info", "servers", "defaultContentType",
                             "channels", "operations", "components"}
    for server in document["servers"].values():
        assert server["protocol"] == "amqp"


def test_every_routing_key_has_a_channel_and_a_message(document: dict[str, Any]) -> None:
    bound = {key for keys in SERVICE_BINDINGS.values() for key in keys}
    emitted = {key for keys in SERVICE_EMITS.values() for key in keys}
    keys = bound | emitted | set(EVENTS) | set(spec.COMMANDS)
    assert keys == set(spec.routing_keys())
    for key in keys:
        channel = document["channels"][key]
        assert channel["address"] == key
        amqp = channel["bindings"]["amqp"]
        assert amqp["is"] == "routingKey"
        assert amqp["exchange"] == {"name": "ordermill", "type": "topic", "durable": True,
                                    "autoDelete": False, "vhost": "/"}
        (ref,) = channel["messages"].values()
        message = resolve(document, ref["$ref"])
        assert message["contentType"] == "application/json"
        assert message["name"] == key
        assert message["bindings"]["amqp"]["messageType"] == key
        model = spec.model_of(key)
        assert message["payload"] == {"$ref": f"#/components/schemas/{model.__name__}"}
        # The payload is the class's own JSON Schema, in the document's dialect.
        own = model.model_json_schema(mode=spec.mode_of(key),
                                      ref_template="#/components/schemas/{model}")
        own.pop("$defs", None)
        assert resolve(document, message["payload"]["$ref"]) == spec._asyncapi_schema(own)


def test_each_key_is_sent_and_received_by_whom_the_code_says(document: dict[str, Any]) -> None:
    operations = document["operations"]
    for service, keys in SERVICE_BINDINGS.items():
        for key in keys:
            assert operations[f"{service}.receive.{key}"]["action"] == "receive"
    for service, keys in SERVICE_EMITS.items():
        for key in keys:
            assert operations[f"{service}.send.{key}"]["action"] == "send"
    for key, command in spec.COMMANDS.items():
        for party in command.publishers:
            assert operations[f"{party.value}.send.{key}"]["action"] == "send"
    senders = {op["channel"]["$ref"] for op in operations.values() if op["action"] == "send"}
    for key in spec.routing_keys():
        assert f"#/channels/{key}" in senders, f"nobody sends {key}"
    # Each service sends only what its RabbitMQ user may publish.
    for name, op in operations.items():
        owner = name.split(".", 1)[0]
        key = resolve(document, op["channel"]["$ref"])["address"]
        if op["action"] == "send" and owner in SERVICE_EMITS:
            assert key in SERVICE_EMITS[owner], name
    reply = operations["review.receive.review.command"]["reply"]
    assert resolve(document, reply["channel"]["$ref"])["address"] is None


def test_the_document_is_valid_against_the_asyncapi_3_schema(document: dict[str, Any]) -> None:
    """tests/fixtures/asyncapi-3.0.0.schema.json is the official AsyncAPI 3.0.0 JSON Schema
    (asyncapi/spec-json-schemas, `schemas/3.0.0-without-$id.json`, Apache-2.0, minified): it
    checks the document, its AMQP bindings and its payloads in the AsyncAPI Schema dialect."""
    from jsonschema import Draft7Validator

    schema = json.loads((FIXTURES / "asyncapi-3.0.0.schema.json").read_text(encoding="utf-8"))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
              for e in Draft7Validator(schema).iter_errors(document)]
    assert not errors, errors[:10]
    # The check bites: a wrong action or binding value is an error.
    wrong = json.loads(json.dumps(document))
    wrong["operations"]["placement.receive.order.place"]["action"] = "publish"
    wrong["channels"]["order.place"]["bindings"]["amqp"]["exchange"]["type"] = "bogus"
    assert len(list(Draft7Validator(schema).iter_errors(wrong))) == 2


def test_every_operation_names_messages_of_its_own_channel(document: dict[str, Any]) -> None:
    for name, op in document["operations"].items():
        assert op["action"] in ("send", "receive"), name
        channel_ref = op["channel"]["$ref"]
        for message in op["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), name


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    refs = list(all_refs(document))
    assert len(refs) > 100
    for ref in refs:
        assert ref.startswith("#/"), ref
        resolve(document, ref)
    # Stand-alone schemas: their refs stay inside the file.
    for key in [*spec.routing_keys(), *spec.REPLY_CHANNELS]:
        schema = spec.json_schema(key)
        for ref in all_refs(schema):
            resolve(schema, ref)


def test_every_schema_is_named_by_its_class(document: dict[str, Any]) -> None:
    # pydantic suffixes a name (-Input, -Output) when a class has two schemas: then one name
    # would stand for two shapes.
    schemas = document["components"]["schemas"]
    assert not [name for name in schemas if not re.fullmatch(r"[A-Za-z0-9_]+", name)]
    for schema in schemas.values():
        discriminator = schema.get("discriminator")
        assert discriminator is None or isinstance(discriminator, str)


def test_every_event_has_a_summary() -> None:
    assert set(spec.EVENT_SUMMARIES) == set(EVENTS)
    assert all(issubclass(command.model, BaseModel) for command in spec.COMMANDS.values())


def all_refs(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from all_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_refs(item)


def resolve(document: Any, ref: str) -> Any:
    node = document
    for part in ref.removeprefix("#/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve (at {part!r})"
        node = node[part]
    return node


# -- docs/contract.md against the code -------------------------------------------------------

CONTRACT_MD = DOCS / "contract.md"


def _section(title: str) -> str:
    text = CONTRACT_MD.read_text(encoding="utf-8")
    start = text.index(title)
    end = text.find("\n#", start + len(title))
    return text[start:end if end != -1 else None]


def test_the_page_names_every_routing_key_and_status() -> None:
    keys_table = _section("### Routing keys")
    for key in spec.routing_keys():
        assert f"`{key}`" in keys_table, f"docs/contract.md's routing keys table lacks {key}"
    statuses = _section("### Statuses")
    for enum in (OrderStatus, Screening, ServiceStatus, DomainStatus, InvoiceStatus, JobStatus,
                 EmailStatus, PaymentStatus, WaitingFor):
        for member in enum:
            assert f"`{member.value}`" in statuses, f"docs/contract.md lacks {enum.__name__} {member}"


def test_the_pages_operator_actions_are_the_transition_tables() -> None:
    rows = {}
    for line in _section("### Operator actions").splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    table = action_table()
    assert set(rows) == set(table)
    for action, (allowed, result) in table.items():
        written_from, written_result = rows[action]
        if result is not None:
            assert written_result == result.value, action
        if allowed == frozenset(OrderStatus):
            assert written_from.startswith("any"), action
        else:
            named = {word.strip(" ,") for word in written_from.split(",")[0:len(allowed)]}
            assert {s.value for s in allowed} == {n.split()[0] for n in named}, action


def test_the_schemas_are_json_schemas_and_the_pages_examples_fit_them() -> None:
    from jsonschema import Draft202012Validator

    for key in [*spec.routing_keys(), *spec.REPLY_CHANNELS]:
        Draft202012Validator.check_schema(spec.json_schema(key))
    for title, key in (("### PlaceOrder", "order.place"), ("### PaymentReceived", "payment.received"),
                       ("### ReviewCommand", "review.command")):
        example = json.loads(_section(title).split("```json")[1].split("```")[0])
        validator = Draft202012Validator(spec.json_schema(key))
        assert not [e.message for e in validator.iter_errors(example)], key
        spec.model_of(key).model_validate(example)  # and the class reads it
