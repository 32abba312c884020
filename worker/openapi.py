"""The sidecar's OpenAPI 3.1 document, generated from the models the code uses.

Generated rather than written by hand, so it cannot drift: the request schema
is the JSON Schema of `CompletionRequest`, the very model that validates every
request, and the answers' schemas are those of `schemas.completions`, which
the tests hold the real answers against (schemathesis fuzzes a running
sidecar with this document; the streaming test checks each chunk). What is
left by hand here is only what no model knows: paths, statuses, headers and
security, and `tests/test_openapi.py` checks those against the sidecar's real
routes.

`GET /openapi.json` serves it; `python -m worker.openapi docs/openapi.json`
refreshes the copy in the repository (a test says when it is stale).
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from consumers.completion_service import MAX_BODY_BYTES, CompletionRequest
from schemas.completions import (
    ChatCompletion,
    ChatCompletionChunk,
    ErrorResponse,
    Health,
    Model,
    ModelList,
    Readiness,
)
from schemas.outcomes import OutcomeRecord
from worker.completions_api import CHAT_ALIAS_PATH, CHAT_PATH, MODEL_PATH, MODELS_PATH

OPENAPI_PATH = "/openapi.json"
OUTCOMES_PATH = "/outcomes/{event_id}"
STREAM_EVENT = "ChatCompletionStreamEvent"
REF_TEMPLATE = "#/components/schemas/{model}"

_ERROR_STATUSES = {
    "400": "the request is not valid (`param` names the field) or the provider refused it",
    "401": "no API key, or not one of `API_KEYS` (also when `API_KEYS` is empty)",
    "413": f"the body is larger than {MAX_BODY_BYTES} bytes",
    "429": "too many requests at once (`COMPLETIONS_MAX_CONCURRENT`), or the provider "
           "is rate limited",
    "500": "a bug in the worker; its log has the traceback",
    "502": "the provider answered something that is not its protocol, or failed",
    "503": "the provider is unavailable (down, or its circuit is open)",
    "504": "the provider timed out",
}


def package_version() -> str:
    try:
        return version("waddle-ai")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def build_openapi(api_version: str | None = None) -> dict[str, Any]:
    """The whole document as a dict (JSON-ready)."""
    schemas = _component_schemas()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "waddle-ai sidecar",
            "version": api_version or package_version(),
            "description": (
                "Health, readiness and metrics of a waddle-ai worker, and its "
                "OpenAI-compatible completions API. Every error, unknown routes and "
                "methods included, is OpenAI's `{\"error\": {...}}` JSON."),
        },
        "paths": {
            "/healthz": {"get": _probe("healthz", "the process and its event loop answer",
                                       {"200": _json_response("alive", "Health")})},
            "/readyz": {"get": _probe("readyz", "whether this replica takes work", {
                "200": _json_response("ready", "Readiness"),
                "503": _json_response("not ready; the body says why", "Readiness"),
            })},
            "/metrics": {"get": _probe("metrics", "Prometheus metrics", {"200": {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }})},
            OPENAPI_PATH: {"get": _probe("openapi", "this document", {"200": {
                "description": "the OpenAPI document",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }})},
            OUTCOMES_PATH: {"get": {
                **_probe("getOutcome", "what became of one event (`waddle-ai explain`)", {
                    "200": _json_response("the event's outcome", "OutcomeRecord"),
                    "404": _json_response(
                        "no outcome known (never seen, or older than OUTCOME_TTL_S)",
                        "ErrorResponse"),
                }),
                "parameters": [{
                    "name": "event_id", "in": "path", "required": True,
                    "schema": {"type": "string"}, "description": "the event's `event_id`",
                }],
            }},
            CHAT_PATH: {"post": _chat("createChatCompletion")},
            CHAT_ALIAS_PATH: {"post": _chat("createChatCompletionAlias")},
            MODELS_PATH: {"get": {
                "operationId": "listModels",
                "summary": "the models of every provider that answers, each once",
                "tags": ["completions"],
                "security": [{"bearerAuth": []}],
                "responses": {
                    "200": _json_response("the model list", "ModelList"),
                    **_errors("401", "500", "502", "503", "504"),
                },
            }},
            MODEL_PATH: {"get": {
                "operationId": "retrieveModel",
                "summary": "one model of the list",
                "tags": ["completions"],
                "security": [{"bearerAuth": []}],
                "parameters": [{
                    "name": "model", "in": "path", "required": True,
                    "schema": {"type": "string"},
                    "description": "a model id as `GET /v1/models` lists it",
                }],
                "responses": {
                    "200": _json_response("the model", "Model"),
                    **_errors("401", "404", "500"),
                },
            }},
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "one of the keys in `API_KEYS`",
            }},
            "headers": {"Retry-After": {
                "description": "seconds to wait before trying again",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }},
        },
    }


def openapi_route(document: dict[str, Any]) -> web.RouteDef:
    """`GET /openapi.json`, serving `document` (serialised once)."""
    body = orjson.dumps(document)

    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return web.get(OPENAPI_PATH, serve)


def _component_schemas() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = [
        (CompletionRequest, "validation"),
        *((model, "serialization") for model in (
            ChatCompletion, ChatCompletionChunk, ErrorResponse, Model, ModelList, Health,
            Readiness, OutcomeRecord)),
    ]
    _, top = models_json_schema(models, ref_template=REF_TEMPLATE)
    schemas: dict[str, Any] = top.get("$defs", {})
    schemas[STREAM_EVENT] = _stream_event_schema()
    return schemas


def _stream_event_schema() -> dict[str, Any]:
    """One server-sent event of a streamed answer (OpenAPI 3.1: `schema` of an event
    stream describes each event): its `data` is a JSON chunk or error, or `[DONE]`."""
    return {
        "type": "object",
        "description": "`data: <chunk or error JSON>`; the last event is `data: [DONE]`",
        "required": ["data"],
        "properties": {"data": {
            "type": "string",
            "if": {"const": "[DONE]"},
            "else": {
                "contentMediaType": "application/json",
                "contentSchema": {"anyOf": [
                    {"$ref": REF_TEMPLATE.format(model="ChatCompletionChunk")},
                    {"$ref": REF_TEMPLATE.format(model="ErrorResponse")},
                ]},
            },
        }},
    }


def _probe(operation_id: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"operationId": operation_id, "summary": summary, "tags": ["operations"],
            "security": [], "responses": responses}


def _chat(operation_id: str) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": "an OpenAI chat completion, whole or streamed (SSE)",
        "tags": ["completions"],
        "security": [{"bearerAuth": []}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {
                "schema": {"$ref": REF_TEMPLATE.format(model="CompletionRequest")}}},
        },
        "responses": {
            "200": {
                "description": (
                    "`application/json`: the whole answer. With `stream: true`, "
                    "`text/event-stream`: one `data: <ChatCompletionChunk>` event a piece, "
                    "an `ErrorResponse` event if the provider fails after the first piece, "
                    "then `data: [DONE]`. A failure before the first piece is an "
                    "ordinary error status."),
                "content": {
                    "application/json": {
                        "schema": {"$ref": REF_TEMPLATE.format(model="ChatCompletion")}},
                    "text/event-stream": {
                        "schema": {"$ref": REF_TEMPLATE.format(model=STREAM_EVENT)}},
                },
            },
            **_errors(*_ERROR_STATUSES),
        },
    }


def _errors(*statuses: str) -> dict[str, Any]:
    described = {**_ERROR_STATUSES, "404": "no such model"}
    out: dict[str, Any] = {}
    for status in statuses:
        response = _json_response(described[status], "ErrorResponse")
        if status == "429":
            response["headers"] = {
                "Retry-After": {"$ref": "#/components/headers/Retry-After"}}
        if status == "401":
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        out[status] = response
    return out


def _json_response(description: str, model: str) -> dict[str, Any]:
    return {"description": description, "content": {
        "application/json": {"schema": {"$ref": REF_TEMPLATE.format(model=model)}}}}


def main(argv: list[str] | None = None) -> None:
    """`python -m worker.openapi [FILE]`: the document, to FILE or stdout."""
    args = sys.argv[1:] if argv is None else argv
    text = orjson.dumps(build_openapi(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    if args:
        with open(args[0], "wb") as out:
            out.write(text + b"\n")
    else:
        sys.stdout.buffer.write(text + b"\n")


if __name__ == "__main__":
    main()
