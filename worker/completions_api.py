"""The OpenAI-compatible HTTP API of the sidecar: chat completions (JSON or SSE) and models.

Only transport lives here: bearer-key checks, reading a bounded body, and
writing JSON or server-sent events. What a request means, and how a failure
reads, is `consumers.completion_service`, shared with the AMQP RPC.

Key checks hash both sides and compare every configured key with
`hmac.compare_digest`, always all of them: neither the time an answer takes
nor its text tells a caller how close a guess came or which key matched.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web

from consumers.completion_service import (
    MAX_BODY_BYTES,
    CompletionError,
    CompletionMetrics,
    CompletionRequest,
    CompletionService,
    completion_metrics,
    internal_error,
    invalid_request,
    parse_request,
    request_too_large,
)
from observability.metrics import Metrics

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
CHAT_ALIAS_PATH = "/api/v1/ai/chat/completions"
MODELS_PATH = "/v1/models"
MODEL_PATH = "/v1/models/{model}"
READ_CHUNK_BYTES = 64 * 1024
TRANSPORT = "http"


def completion_routes(
    service: CompletionService,
    api_keys: Sequence[str],
    metrics: Metrics | None = None,
    *,
    max_concurrent: int,
) -> list[web.RouteDef]:
    """The routes to hand to `Sidecar(extra_routes=...)`."""
    api = _CompletionsApi(service, api_keys, metrics, max_concurrent)
    return [
        web.post(CHAT_PATH, api.chat),
        web.post(CHAT_ALIAS_PATH, api.chat),
        web.get(MODELS_PATH, api.models),
        # `.+`: model ids may hold a slash (`org/model`), as OpenAI's do.
        web.get(MODEL_PATH.replace("{model}", "{model:.+}"), api.model),
    ]


class _CompletionsApi:
    def __init__(
        self,
        service: CompletionService,
        api_keys: Sequence[str],
        metrics: Metrics | None,
        max_concurrent: int,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self._service = service
        # The API shares the worker's process, provider pool and circuit
        # breakers with the chat pipeline: a burst of API calls must not
        # starve the chat. Past the limit a caller gets 429 and Retry-After
        # at once, which OpenAI clients retry on their own.
        self._max_concurrent = max_concurrent
        self._in_flight = 0
        # A blank key would let `Authorization: Bearer ` in; it is never a key.
        self._key_digests = [_digest(key.strip()) for key in api_keys if key.strip()]
        self._metrics: CompletionMetrics | None = (
            completion_metrics(metrics) if metrics is not None else None)

    # -- handlers ------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            self._authenticate(request)
            if self._in_flight >= self._max_concurrent:
                raise too_busy(self._max_concurrent)
        except CompletionError as exc:
            return self._error(exc, started)
        self._in_flight += 1
        try:
            return await self._chat(request, started)
        finally:
            self._in_flight -= 1

    async def _chat(self, request: web.Request, started: float) -> web.StreamResponse:
        try:
            parsed = parse_request(await _read_body(request))
            if parsed.streamed:
                return await self._stream(request, parsed, started)
            answer = await self._service.complete(parsed)
        except CompletionError as exc:
            return self._error(exc, started)
        except Exception:
            log.exception("completion request crashed", extra={"action": "completion"})
            return self._error(internal_error(), started)
        self._observe("ok", started)
        return _json(answer)

    async def models(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        listing = await self._listing(request, started)
        return listing if isinstance(listing, web.StreamResponse) else _json(listing)

    async def model(self, request: web.Request) -> web.StreamResponse:
        """One entry of `/v1/models` (OpenAI's "retrieve model"), or a JSON 404."""
        started = time.perf_counter()
        wanted = request.match_info["model"]
        listing = await self._listing(request, started)
        if isinstance(listing, web.StreamResponse):
            return listing
        for entry in listing["data"]:
            if entry["id"] == wanted:
                return _json(entry)
        return self._error(invalid_request(
            f"the model {wanted!r} does not exist: no provider lists it",
            code="model_not_found", param="model", status=404), started, count=False)

    async def _listing(
        self, request: web.Request, started: float
    ) -> dict[str, Any] | web.StreamResponse:
        """The caller's models list, or the error response to send instead."""
        try:
            self._authenticate(request)
            return await self._service.models()
        except CompletionError as exc:
            return self._error(exc, started, count=False)
        except Exception:
            log.exception("model listing crashed", extra={"action": "list_models"})
            return self._error(internal_error(), started, count=False)

    # -- streaming -------------------------------------------------------------

    async def _stream(
        self, request: web.Request, parsed: CompletionRequest, started: float
    ) -> web.StreamResponse:
        """SSE, once the provider has produced its first chunk.

        Until then a failure is still an ordinary HTTP error (status, JSON
        body, Retry-After), which clients handle far better than an error
        event inside a 200 stream.
        """
        chunks = self._service.stream(parsed)
        async with contextlib.aclosing(chunks):
            first = await anext(chunks)  # CompletionError propagates to `chat`
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # a buffering proxy would hold the tokens back
            })
            await response.prepare(request)
            outcome = "ok"
            try:
                await _send(response, first)
                try:
                    async for chunk in chunks:
                        await _send(response, chunk)
                except CompletionError as exc:
                    outcome = exc.code
                    await _send(response, exc.body())
                except ConnectionError:
                    raise
                except Exception:
                    log.exception("completion stream crashed", extra={"action": "completion"})
                    outcome = "internal_error"
                    await _send(response, internal_error().body())
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
            except ConnectionError:
                # The client left; closing `chunks` releases the provider's stream.
                outcome = "client_disconnected"
            self._observe(outcome, started)
            return response

    # -- helpers ---------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> None:
        if not self._key_digests:
            raise _unauthorized("the completions API is disabled until API_KEYS is set")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("missing API key: send `Authorization: Bearer <key>`")
        presented = _digest(token)
        matched = False
        for digest in self._key_digests:
            # `|` and not `or`: every key is compared, whichever matches.
            matched = matched | hmac.compare_digest(presented, digest)
        if not matched:
            raise _unauthorized("invalid API key")

    def _error(
        self, exc: CompletionError, started: float, *, count: bool = True
    ) -> web.Response:
        if count:
            self._observe(exc.code, started)
        headers = exc.headers()
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return _json(exc.body(), status=exc.status, headers=headers)

    def _observe(self, outcome: str, started: float) -> None:
        if self._metrics is not None:
            self._metrics.observe(TRANSPORT, outcome, time.perf_counter() - started)


async def _read_body(request: web.Request) -> bytes:
    """The body, refused with 413 past the cap before it is all read or parsed."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise request_too_large()
    body = bytearray()
    async for piece in request.content.iter_chunked(READ_CHUNK_BYTES):
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise request_too_large()
    return bytes(body)


def _unauthorized(message: str) -> CompletionError:
    return CompletionError(401, message, type="invalid_request_error", code="invalid_api_key")


def too_busy(limit: int) -> CompletionError:
    return CompletionError(
        429, f"this worker is answering {limit} completion requests already; retry shortly",
        type="rate_limit_error", code="too_many_concurrent_requests", retry_after_s=1.0)


def _digest(key: str) -> bytes:
    """Fixed-length digests: `compare_digest` then cannot leak a key's length either."""
    return hashlib.sha256(key.encode("utf-8")).digest()


async def _send(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(b"data: " + orjson.dumps(data) + b"\n\n")


def _json(
    payload: dict[str, Any], *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, headers=headers,
                        content_type="application/json")
