"""The OpenAPI document: valid OpenAPI 3.1, complete, current, and true of the code.

The fuzzing against a live sidecar is tests/test_api_fuzz.py; these are the
checks that need no server (and one that streams, which the fuzzer can only
check event by event): every route the sidecar serves is in the document and
nothing else is, the copy in docs/ is what the code generates, the request
schema says what the validator enforces, and streamed chunks fit their schema.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from openapi_spec_validator import validate

from consumers.completion_service import CompletionError, CompletionService, parse_request
from context.memory_store import MemoryStateStore
from domain.provider_names import ProviderName
from observability.metrics import Metrics
from providers.ollama import OllamaProvider
from providers.router import ProviderRouter
from schemas.completions import ChatCompletionChunk, ErrorResponse
from tests.fake_provider import FakeProvider
from worker.app import sidecar_routes
from worker.completions_api import completion_routes
from worker.openapi import build_openapi
from worker.sidecar import Sidecar

DOCS = Path(__file__).resolve().parents[1] / "docs"
KEY = "sk-openapi-test"
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
# Keywords of JSON Schema 2020-12 and OpenAPI 3.1 that the document may use. A
# keyword outside this list is a typo or a pydantic constraint it could not
# translate (it once wrote `ge` for `minimum`), which validators silently ignore.
SCHEMA_KEYWORDS = {
    "$ref", "$defs", "type", "properties", "required", "additionalProperties", "items",
    "anyOf", "oneOf", "allOf", "enum", "const", "default", "title", "description",
    "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "pattern",
    "format", "if", "then", "else", "contentMediaType", "contentSchema",
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_openapi()


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)  # openapi-spec-validator, against the OpenAPI 3.1 meta-schema


def test_committed_copy_is_current(document: dict[str, Any]) -> None:
    committed = json.loads((DOCS / "openapi.json").read_text())
    assert committed == json.loads(orjson.dumps(document)), (
        "docs/openapi.json is stale: run `.venv/bin/python -m worker.openapi docs/openapi.json`")


def test_schemas_use_only_known_keywords(document: dict[str, Any]) -> None:
    unknown: list[str] = []

    def walk(schema: Any, where: str) -> None:
        if not isinstance(schema, dict):
            return
        for key, value in schema.items():
            if key not in SCHEMA_KEYWORDS:
                unknown.append(f"{where}.{key}")
            if key in {"properties", "$defs"}:
                for name, sub in value.items():
                    walk(sub, f"{where}.{key}.{name}")
            elif key in {"anyOf", "oneOf", "allOf"}:
                for index, sub in enumerate(value):
                    walk(sub, f"{where}.{key}[{index}]")
            elif key in {"items", "additionalProperties", "if", "then", "else",
                         "contentSchema"}:
                walk(value, f"{where}.{key}")

    for name, schema in document["components"]["schemas"].items():
        walk(schema, name)
    assert not unknown, f"keywords that are not JSON Schema: {unknown}"


def test_every_route_is_documented_and_nothing_else(document: dict[str, Any]) -> None:
    sidecar = Sidecar(
        host="127.0.0.1", port=0, metrics=Metrics(), readiness=_ready,
        extra_routes=sidecar_routes(_service(), MemoryStateStore(), [KEY], max_concurrent=1))
    served = set()
    for method, path in sidecar.routes():
        if method in {"HEAD", "OPTIONS"}:
            continue  # aiohttp adds HEAD to every GET
        served.add((method.lower(), path))
    documented = {(method, path) for path, item in document["paths"].items()
                  for method in item if method in METHODS}
    assert served == documented, (
        f"served but not documented: {sorted(served - documented)}; "
        f"documented but not served: {sorted(documented - served)}; "
        "update worker/openapi.py")


def test_request_schema_states_the_validators_limits(document: dict[str, Any]) -> None:
    """The limits the validators enforce with their own error codes are in the schema too."""
    schemas = document["components"]["schemas"]
    request = schemas["CompletionRequest"]["properties"]
    assert request["messages"]["maxItems"] == 100
    assert request["messages"]["minItems"] == 1
    assert {"const": 1} in request["n"]["anyOf"]
    assert {"minimum": 1, "type": "integer"} in request["max_tokens"]["anyOf"]
    content = schemas["RequestMessage"]["properties"]["content"]["anyOf"]
    assert {"maxLength": 32768, "type": "string"} in content
    assert schemas["ContentPart"]["properties"]["type"]["enum"] == ["text"]
    # and the validator agrees with each of them
    for body, code in [
        ({"messages": [{"role": "user", "content": "x"}] * 101}, "too_many_messages"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "unsupported_n"),
        ({"messages": [{"role": "user", "content": "x" * 32769}]}, "content_too_long"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "unsupported_content"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "invalid_request"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": 0}, "invalid_request"),
    ]:
        with pytest.raises(CompletionError) as refused:
            parse_request(orjson.dumps(body))
        assert refused.value.code == code, (body, refused.value)


def test_integral_numbers_are_integers() -> None:
    """JSON Schema's `integer` includes 5.0: the validator accepts it (schemathesis found
    the refusal), and still refuses 5.5 and strings."""
    ok = parse_request(b'{"messages":[{"role":"user","content":"x"}],"max_tokens":5.0}')
    assert ok.max_tokens == 5
    for bad in (b"5.5", b'"5"', b"true"):
        with pytest.raises(CompletionError, match="max_tokens"):
            parse_request(b'{"messages":[{"role":"user","content":"x"}],"max_tokens":' + bad + b"}")


@pytest.fixture
async def api() -> AsyncIterator[str]:
    async with FakeProvider() as fake:
        router = ProviderRouter(
            {ProviderName.OLLAMA: OllamaProvider(base_url=fake.url, model="llama3.2",
                                                 timeout_s=5)}, Metrics())
        service = CompletionService(router, default_chain=[ProviderName.OLLAMA],
                                    default_temperature=0.7, default_max_tokens=50)
        sidecar = Sidecar(host="127.0.0.1", port=0, metrics=Metrics(), readiness=_ready,
                          extra_routes=completion_routes(service, [KEY], max_concurrent=4))
        await sidecar.start()
        try:
            yield f"http://127.0.0.1:{sidecar.bound_port}"
        finally:
            await sidecar.stop()
            await router.aclose()


@pytest.mark.parametrize("include_usage", [False, True])
async def test_streamed_chunks_fit_their_schema(api: str, include_usage: bool) -> None:
    body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}],
            "stream_options": {"include_usage": include_usage}}
    async with aiohttp.ClientSession() as session, session.post(
        f"{api}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        text = (await response.read()).decode()
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(event) for event in events[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (chunks[-1].usage is not None) is include_usage


async def test_stream_error_event_fits_the_error_schema() -> None:
    """A provider failing after the first piece ends the stream with an error event."""
    async with FakeProvider() as fake:
        fake.midstream_error = True
        router = ProviderRouter(
            {ProviderName.OLLAMA: OllamaProvider(base_url=fake.url, model="llama3.2",
                                                 timeout_s=5)}, Metrics())
        service = CompletionService(router, default_chain=[ProviderName.OLLAMA],
                                    default_temperature=0.7, default_max_tokens=50)
        chunks = service.stream(parse_request(
            b'{"stream":true,"messages":[{"role":"user","content":"hi"}]}'))
        seen: list[dict[str, Any]] = []

        async def drain() -> None:
            async for chunk in chunks:
                seen.append(chunk)

        try:
            with pytest.raises(CompletionError) as failed:
                await drain()
        finally:
            await router.aclose()
        ErrorResponse.model_validate(failed.value.body())
        assert seen, "the error came before the first piece"
        for chunk in seen:
            ChatCompletionChunk.model_validate(chunk)


async def _ready() -> tuple[bool, dict[str, Any]]:
    return True, {}


def _service() -> CompletionService:
    router = ProviderRouter({ProviderName.OLLAMA: OllamaProvider(
        base_url="http://127.0.0.1:9", model="llama3.2", timeout_s=1)}, Metrics())
    return CompletionService(router, default_chain=[ProviderName.OLLAMA],
                             default_temperature=0.7, default_max_tokens=50)


async def test_a_crashing_route_answers_json_500_not_a_text_page() -> None:
    """The sidecar's middleware turns any uncaught exception into OpenAI's error JSON."""

    async def crash(_: web.Request) -> web.Response:
        raise RuntimeError("boom")

    sidecar = Sidecar(host="127.0.0.1", port=0, metrics=Metrics(), readiness=_ready,
                      extra_routes=[web.get("/v1/crash", crash)])
    await sidecar.start()
    try:
        async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{sidecar.bound_port}/v1/crash"
        ) as response:
            assert response.status == 500
            assert response.content_type == "application/json"
            body = ErrorResponse.model_validate(await response.json())
    finally:
        await sidecar.stop()
    assert body.error.code == "internal_error"
    assert "boom" not in body.error.message  # internals stay in the log
