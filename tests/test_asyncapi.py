"""docs/asyncapi.yaml, the AMQP interface in machine-readable form, held to the code.

The document is written by hand (its prose, bindings and operations are for
people), so these tests are what keep it true:

- it is a valid AsyncAPI 3.0 document (the `asyncapi3` object model, offline:
  no package on PyPI ships AsyncAPI's own JSON Schema), every `$ref` resolves,
  and every operation's messages belong to its channel;
- every message payload has the fields, required fields, types, enums and
  formats of the pydantic model the code uses (`model_json_schema()`), both
  ways: a field added to a model and not to the document, or the reverse,
  fails with the field's name and what to write;
- the headers are those of schemas/headers.py, and the addresses, exchange
  types and queue arguments those of broker/topology.py.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from broker.topology import Topology
from consumers.completion_service import CompletionRequest
from consumers.completions import STATUS_HEADER
from schemas import headers
from schemas.completions import ChatCompletion, ErrorResponse
from schemas.events import InteractionEvent
from schemas.replies import Reply

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # its models shadow `schema`; harmless
    from asyncapi3 import AsyncAPI3

SPEC_PATH = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml"
SPEC_NAME = "docs/asyncapi.yaml"

# component schema in the document -> the model whose JSON Schema it must match
PAYLOADS: dict[str, type[BaseModel]] = {
    "InteractionEvent": InteractionEvent,
    "Reply": Reply,
    "CompletionRequest": CompletionRequest,
    "ChatCompletion": ChatCompletion,
    "ErrorResponse": ErrorResponse,
}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
    return loaded


# -- the document itself -------------------------------------------------------------


def test_is_a_valid_asyncapi_3_document(spec: dict[str, Any]) -> None:
    assert spec["asyncapi"].startswith("3.")
    AsyncAPI3.model_validate(spec)


@pytest.mark.parametrize("breakage", ["unknown_field", "bad_binding", "bad_action"])
def test_the_validator_refuses_a_broken_document(spec: dict[str, Any], breakage: str) -> None:
    """The validation above is not a no-op: each of these mistakes is refused."""
    broken = copy.deepcopy(spec)
    if breakage == "unknown_field":
        broken["channels"]["interaction"]["adress"] = "typo"
    elif breakage == "bad_binding":
        broken["channels"]["responses"]["bindings"]["amqp"]["exchange"]["type"] = "fanoutt"
    else:
        broken["operations"]["sendReply"]["action"] = "publish"  # AsyncAPI 2 wording
    with pytest.raises(ValidationError):
        AsyncAPI3.model_validate(broken)


def test_every_reference_resolves(spec: dict[str, Any]) -> None:
    dangling = [f"{where}: {ref}" for where, ref in _refs(spec, "#")
                if _resolve(spec, ref) is None]
    assert not dangling, f"{SPEC_NAME}: unresolved $ref: {dangling}"


def test_operations_use_their_own_channels_messages(spec: dict[str, Any]) -> None:
    for name, operation in spec["operations"].items():
        channel_ref = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), (
                f"{SPEC_NAME}: operation {name} sends/receives {message['$ref']}, "
                f"which is not a message of {channel_ref}")


# -- payloads against the models -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_payload_schema_matches_the_model(spec: dict[str, Any], name: str) -> None:
    model = PAYLOADS[name]
    model_schema = model.model_json_schema()
    documented = spec["components"]["schemas"][name]
    problems = _compare(
        _shape(documented, lambda ref: _resolve(spec, ref)),
        _shape(model_schema, lambda ref: _resolve(model_schema, ref)),
        name)
    assert not problems, (
        f"{SPEC_NAME} disagrees with {model.__module__}.{model.__qualname__} "
        f"(update components.schemas.{name} and what it references):\n  "
        + "\n  ".join(problems))


def test_the_comparison_catches_a_missing_field(spec: dict[str, Any]) -> None:
    """What a developer adding `Reply.age_ms` without the document would see."""
    trimmed = copy.deepcopy(spec)
    del trimmed["components"]["schemas"]["Reply"]["properties"]["processing_time_ms"]
    trimmed["components"]["schemas"]["Reply"]["properties"]["surprise"] = {"type": "string"}
    model_schema = Reply.model_json_schema()
    problems = _compare(
        _shape(trimmed["components"]["schemas"]["Reply"], lambda ref: _resolve(trimmed, ref)),
        _shape(model_schema, lambda ref: _resolve(model_schema, ref)), "Reply")
    assert any("processing_time_ms" in p and "the model has it" in p for p in problems), problems
    assert any("surprise" in p and "the model has no such field" in p for p in problems)


def test_message_payloads_point_at_the_checked_schemas(spec: dict[str, Any]) -> None:
    messages = spec["components"]["messages"]
    payload_of = {name: message["payload"] for name, message in messages.items()}
    assert payload_of["InteractionEvent"] == {"$ref": "#/components/schemas/InteractionEvent"}
    assert payload_of["RetryCopy"] == {"$ref": "#/components/schemas/InteractionEvent"}
    assert payload_of["Reply"] == {"$ref": "#/components/schemas/Reply"}
    assert payload_of["CompletionRequest"] == {"$ref": "#/components/schemas/CompletionRequest"}
    assert payload_of["CompletionAnswer"] == {"oneOf": [
        {"$ref": "#/components/schemas/ChatCompletion"},
        {"$ref": "#/components/schemas/ErrorResponse"}]}


# -- headers ----------------------------------------------------------------------------


def test_dead_letter_headers_are_the_codes(spec: dict[str, Any]) -> None:
    documented = spec["components"]["schemas"]["DeadLetterHeaders"]
    code = {*headers.RETRY_HEADERS, headers.TRACEPARENT}
    assert set(documented["properties"]) == code, (
        f"{SPEC_NAME} DeadLetterHeaders: missing {sorted(code - set(documented['properties']))}, "
        f"unknown {sorted(set(documented['properties']) - code)} (schemas/headers.py)")
    assert set(documented["required"]) == {
        headers.ERROR, headers.ERROR_TYPE, headers.RETRY_COUNT, headers.FIRST_FAILED_AT,
        headers.LAST_FAILED_AT, headers.ORIGINAL_QUEUE}
    error_types = set(documented["properties"][headers.ERROR_TYPE]["examples"])
    from schemas.headers import ErrorType
    missing = {e.value for e in ErrorType} - error_types
    assert not missing, f"{SPEC_NAME}: x-error-type examples lack {sorted(missing)}"


def test_event_and_answer_headers(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert set(schemas["EventHeaders"]["properties"]) == {
        headers.TRACEPARENT, headers.FIRST_RECEIVED_AT, headers.REPLAYED_AT}
    assert set(schemas["ReplyHeaders"]["properties"]) == {headers.TRACEPARENT}
    assert schemas["CompletionAnswerHeaders"]["required"] == [STATUS_HEADER]


# -- topology -------------------------------------------------------------------------


def test_addresses_and_arguments_are_the_topology(spec: dict[str, Any]) -> None:
    topology = Topology()  # the defaults: prefix `ai`, five delays, delivery limit 10
    channels = spec["channels"]

    def queue(name: str) -> str:
        return str(channels[name]["bindings"]["amqp"]["queue"]["name"])

    def exchange(name: str) -> dict[str, Any]:
        found: dict[str, Any] = channels[name]["bindings"]["amqp"]["exchange"]
        return found

    assert channels["interaction"]["address"] == queue("interaction") == (
        topology.interaction_queue)
    assert channels["interaction"]["x-arguments"] == topology.interaction_arguments()
    assert exchange("responses")["name"] == topology.responses_exchange
    assert exchange("responses")["type"] == "topic"
    assert channels["responses"]["address"] == "{platform}.{community_id}"
    assert channels["completions"]["address"] == topology.completions_queue
    assert queue("deadLetterQueue") == channels["deadLetterQueue"]["address"] == (
        topology.dead_letter_queue)
    assert exchange("deadLetters") == {**exchange("deadLetters"),
                                       "name": topology.dead_letter_exchange, "type": "direct"}
    # the DLQ is bound with the name of the queue its letters come from
    assert channels["deadLetters"]["address"] == topology.interaction_queue
    for delay in topology.retry_delays_ms:
        address = channels["retry"]["address"].replace("{delay_ms}", str(delay))
        assert address == topology.retry_queue(delay)
        documented = {key: (delay if value == "{delay_ms}" else value)
                      for key, value in channels["retry"]["x-arguments"].items()}
        assert documented == topology.retry_arguments(delay)
    described = {row["name"] for row in topology.describe()}
    named = {channels[c]["address"] for c in ("interaction", "completions", "deadLetterQueue")}
    named |= {exchange(c)["name"] for c in ("responses", "deadLetters")}
    named |= set(topology.retry_queues)
    assert described == named, f"the topology declares {sorted(described - named)} too"


def test_platform_parameter_is_the_platform_enum(spec: dict[str, Any]) -> None:
    from schemas.events import Platform
    assert spec["channels"]["responses"]["parameters"]["platform"]["enum"] == [
        p.value for p in Platform]


# -- helpers ------------------------------------------------------------------------------


def _refs(node: Any, where: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.append((where, value))
            else:
                found += _refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _refs(value, f"{where}/{index}")
    return found


def _resolve(document: dict[str, Any], ref: str) -> Any:
    if not ref.startswith("#/"):
        return None
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


Shape = dict[str, Any]


def _shape(schema: Any, resolve: Any, depth: int = 0) -> Shape:
    """What the comparison looks at: JSON types (null included), enum/const values,
    format, and for objects their properties (recursively), required ones and
    whether others are allowed; for arrays their items. Titles, descriptions,
    defaults, examples and length/range limits are left out."""
    assert depth < 20, "schema too deep (a recursive $ref?)"
    shape: Shape = {"types": set(), "values": None, "formats": set(), "properties": {},
                    "required": set(), "items": None, "closed": False}
    if not isinstance(schema, dict):
        return shape
    if "$ref" in schema:
        return _merge(shape, _shape(resolve(schema["$ref"]), resolve, depth + 1))
    for branch in schema.get("anyOf", []) + schema.get("oneOf", []):
        shape = _merge(shape, _shape(branch, resolve, depth + 1))
    declared = schema.get("type")
    if isinstance(declared, str):
        shape["types"].add(declared)
    elif isinstance(declared, list):
        shape["types"].update(declared)
    values: set[Any] | None = None
    if "enum" in schema:
        values = {_hashable(v) for v in schema["enum"]}
    if "const" in schema:
        values = {_hashable(schema["const"])}
        if not declared:
            shape["types"].add(_json_type(schema["const"]))
    if values is not None:
        shape["values"] = values | (shape["values"] or set())
    if "format" in schema:
        shape["formats"].add(schema["format"])
    for name, sub in schema.get("properties", {}).items():
        shape["properties"][name] = _shape(sub, resolve, depth + 1)
    shape["required"] |= set(schema.get("required", []))
    if schema.get("additionalProperties") is False:
        shape["closed"] = True
    if "items" in schema:
        shape["items"] = _shape(schema["items"], resolve, depth + 1)
    if shape["properties"]:
        shape["types"].add("object")
    return shape


def _merge(a: Shape, b: Shape) -> Shape:
    merged: Shape = {
        "types": a["types"] | b["types"],
        "values": None if a["values"] is None and b["values"] is None
        else (a["values"] or set()) | (b["values"] or set()),
        "formats": a["formats"] | b["formats"],
        "properties": {**a["properties"], **b["properties"]},
        "required": a["required"] | b["required"],
        "items": b["items"] if a["items"] is None else a["items"],
        "closed": a["closed"] or b["closed"],
    }
    return merged


def _compare(documented: Shape, model: Shape, where: str) -> list[str]:
    problems: list[str] = []
    if documented["types"] != model["types"]:
        problems.append(f"{where}: type {_types(documented)} in the document, "
                        f"{_types(model)} in the model")
    if documented["values"] != model["values"]:
        problems.append(f"{where}: values {_values(documented)} in the document, "
                        f"{_values(model)} in the model")
    if documented["formats"] != model["formats"]:
        problems.append(f"{where}: format {sorted(documented['formats'])} in the document, "
                        f"{sorted(model['formats'])} in the model")
    if documented["closed"] != model["closed"]:
        problems.append(f"{where}: additionalProperties is "
                        f"{'false' if documented['closed'] else 'allowed'} in the document, "
                        f"{'false' if model['closed'] else 'allowed'} in the model")
    for name in sorted(model["properties"].keys() - documented["properties"].keys()):
        problems.append(f"{where}.{name}: the model has it, the document does not: add it "
                        f"({_types(model['properties'][name])}"
                        f"{', required' if name in model['required'] else ', optional'})")
    for name in sorted(documented["properties"].keys() - model["properties"].keys()):
        problems.append(f"{where}.{name}: in the document, but the model has no such field")
    for name in sorted(documented["properties"].keys() & model["properties"].keys()):
        problems += _compare(documented["properties"][name], model["properties"][name],
                             f"{where}.{name}")
    if documented["required"] != model["required"]:
        problems.append(f"{where}: required {sorted(documented['required'])} in the document, "
                        f"{sorted(model['required'])} in the model")
    if (documented["items"] is None) != (model["items"] is None):
        problems.append(f"{where}: items differ (array in one, not the other)")
    elif documented["items"] is not None:
        problems += _compare(documented["items"], model["items"], f"{where}[]")
    return problems


def _types(shape: Shape) -> str:
    return " | ".join(sorted(shape["types"])) or "any"


def _values(shape: Shape) -> str:
    return "any" if shape["values"] is None else str(sorted(map(str, shape["values"])))


def _hashable(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else repr(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string" if isinstance(value, str) else "object"
