"""The OpenAI-compatible completions core, shared by the HTTP API and the AMQP RPC.

Both transports must accept the same requests, route the same model names and
fail with the same error bodies, or a client moving from HTTP to RPC would
meet a different API. So everything except bytes-on-the-wire lives here:
request validation and its limits, model routing, calling the providers,
and the OpenAI shapes of answers, stream chunks and errors.

It sits in `consumers/`, above `providers/`: the OpenAI request shapes and
the mapping of provider failures to HTTP statuses are the API's, not a
provider's, and both transports (`worker/completions_api.py` over HTTP,
`consumers/completions.py` over AMQP) import them from here.

Both kinds of answer take the router's one provider-call path
(`ProviderRouter.open_stream`: circuit breakers, fallback chain, metrics):
a non-streamed answer is that stream collected (`ProviderRouter.complete`),
a streamed one is passed on piece by piece. The router may move to the next
provider only until the first piece exists; after that the client has seen
part of one provider's answer, and an error can only end the stream.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from domain.chat import ChatMessage
from domain.provider_names import ProviderName
from observability.metrics import PROVIDER_BUCKETS, Metrics
from providers.base import ChatRequest, TokenUsage
from providers.breaker import CircuitOpen
from providers.errors import (
    ProviderAuthFailed,
    ProviderBadOutput,
    ProviderBadRequest,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
    log_provider_failure,
)
from providers.router import ProviderRouter
from schemas.errors import WaddleError
from schemas.headers import ErrorType

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024
MAX_MESSAGES = 100
MAX_CONTENT_CHARS = 32 * 1024
DEFAULT_MODELS_TTL_S = 3600.0
# A provider whose listing failed is asked again this much sooner than the TTL:
# an Ollama restarted a minute ago should not be missing from /v1/models for an hour.
FAILED_LISTING_RETRY_S = 30.0
# Listing models is a side errand of a completion request; it must not eat its time.
LIST_MODELS_TIMEOUT_S = 10.0
AUTO_MODEL = "auto"
FINISH_REASONS = frozenset({"stop", "length", "content_filter", "tool_calls"})

# Error codes of our own validators; any other pydantic error is `invalid_request`.
# (The set is closed so it can label a metric.)
_CUSTOM_CODES = frozenset({
    "too_many_messages", "content_too_long", "unsupported_n", "unsupported_content",
})


# -- errors ------------------------------------------------------------------


class CompletionError(WaddleError):
    """A failure the client sees as an OpenAI error body with an HTTP status.

    The RPC transport sends the same body and names the status in a header,
    so both transports fail identically.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code,
        }}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def invalid_request(
    message: str, *, code: str = "invalid_request", param: str | None = None, status: int = 400
) -> CompletionError:
    return CompletionError(status, message, type="invalid_request_error", code=code, param=param)


def internal_error() -> CompletionError:
    """For bugs: the client learns nothing of the internals, the log has the traceback."""
    return CompletionError(500, "internal error; see the worker's logs",
                           type="server_error", code=ErrorType.INTERNAL_ERROR.value)


def provider_error(exc: ProviderError, secrets: Sequence[str] = ()) -> CompletionError:
    """Map a provider's typed failure to what an OpenAI client expects.

    Only the refusals (bad request, rate limit) carry the backend's text, since
    the client can act on it; outages say which provider and what kind, and
    leave hosts and bodies to the log.
    """
    detail = scrub(str(exc), secrets)
    if isinstance(exc, ProviderAuthFailed):
        # Not the client's fault (not a 400) and not an outage that passes by
        # itself (not a 503): the worker's key for that provider is wrong.
        return CompletionError(
            502, f"the AI provider {exc.provider!r} refused the worker's credentials "
            f"(HTTP {exc.status}); the operator must fix its API key",
            type=ErrorType.UPSTREAM_AUTH_FAILED.value, code=ErrorType.UPSTREAM_AUTH_FAILED.value)
    if isinstance(exc, ProviderBadRequest):
        return CompletionError(400, f"the AI provider refused the request: {detail}",
                               type="invalid_request_error",
                               code=ErrorType.PROVIDER_BAD_REQUEST.value)
    if isinstance(exc, ProviderRateLimited):
        return CompletionError(429, f"the AI provider is rate limited: {detail}",
                               type="rate_limit_error", code="rate_limit_exceeded",
                               retry_after_s=exc.retry_after_s)
    if isinstance(exc, ProviderTimeout):
        return CompletionError(504, f"the AI provider {exc.provider!r} timed out",
                               type="server_error", code=ErrorType.PROVIDER_TIMEOUT.value)
    if isinstance(exc, ProviderBadOutput):
        return CompletionError(502, f"the AI provider {exc.provider!r} sent an answer "
                               "that does not follow its protocol",
                               type="api_error", code=ErrorType.PROVIDER_BAD_OUTPUT.value)
    if isinstance(exc, ProviderUnavailable):
        return CompletionError(503, f"the AI provider {exc.provider!r} is unavailable; "
                               "try again later",
                               type="server_error", code=ErrorType.PROVIDER_UNAVAILABLE.value)
    return CompletionError(502, f"the AI provider {exc.provider!r} failed",
                           type="api_error", code=ErrorType.PROVIDER_FAILED.value)


def scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# -- the request ---------------------------------------------------------------


def _integral(value: Any) -> Any:
    """JSON has one number type: `5.0` is the integer 5 (JSON Schema agrees), `5.5` is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# A positive integer field of a strict model that still takes `5.0` (schemathesis
# found the refusal). The bound comes before the validator, or pydantic leaves it
# out of the JSON Schema as an unknown `ge` keyword.
PositiveJsonInt = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
JsonInt = Annotated[int, BeforeValidator(_integral)]


def _text_parts_only(schema: dict[str, Any]) -> None:
    # What `RequestMessage` enforces, said in the published schema (OpenAPI).
    schema["properties"]["type"]["enum"] = ["text"]
    schema["properties"]["text"] = {"type": "string"}
    schema["required"] = ["type", "text"]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_text_parts_only)

    type: str
    text: str | None = None


def _bounded_content(schema: dict[str, Any]) -> None:
    # The validator's limit on a message's text, said in the published schema.
    for branch in schema["properties"]["content"]["anyOf"]:
        if branch.get("type") == "string":
            branch["maxLength"] = MAX_CONTENT_CHARS


class RequestMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_bounded_content)

    # `developer` is what newer OpenAI clients send in place of `system`.
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    @field_validator("content")
    @classmethod
    def _text_only_and_bounded(cls, value: str | list[ContentPart]) -> str | list[ContentPart]:
        if isinstance(value, list):
            for part in value:
                if part.type != "text" or part.text is None:
                    raise PydanticCustomError(
                        "unsupported_content",
                        "only text content parts are supported (got a {kind!r} part)",
                        {"kind": part.type})
        length = len(value) if isinstance(value, str) else sum(len(p.text or "") for p in value)
        if length > MAX_CONTENT_CHARS:
            raise PydanticCustomError(
                "content_too_long",
                "message content is {length} characters; the limit is {limit}",
                {"length": length, "limit": MAX_CONTENT_CHARS})
        return value

    def to_chat(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(
            part.text or "" for part in self.content)
        return ChatMessage("system" if self.role == "developer" else self.role, text)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool | None = False


class CompletionRequest(BaseModel):
    """An OpenAI chat-completions request; fields we do not implement are ignored.

    Strict, as OpenAI's API is: `"stream": 0` or `"max_tokens": "5"` is a 400, not
    silently coerced (schemathesis found the coercion: the published schema
    says boolean and integer).
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(default=None, max_length=256)
    # The limits the validators below enforce with their own error codes are
    # also stated in the schema (`json_schema_extra`), so the published API
    # document (worker/openapi.py) tells clients the truth.
    messages: list[RequestMessage] = Field(
        min_length=1, json_schema_extra={"maxItems": MAX_MESSAGES})
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: PositiveJsonInt | None = None
    max_completion_tokens: PositiveJsonInt | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    n: JsonInt | None = Field(
        default=None, json_schema_extra={"anyOf": [{"const": 1}, {"type": "null"}]})
    community_id: str | None = Field(default=None, min_length=1, max_length=255)

    @field_validator("messages", mode="before")
    @classmethod
    def _bounded_count(cls, value: Any) -> Any:
        # Before validation: 10,000 messages are refused without building 10,000 models.
        if isinstance(value, list) and len(value) > MAX_MESSAGES:
            raise PydanticCustomError(
                "too_many_messages", "{count} messages; the limit is {limit}",
                {"count": len(value), "limit": MAX_MESSAGES})
        return value

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise PydanticCustomError("unsupported_n", "only n=1 is supported")
        return value

    @property
    def streamed(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def parse_request(raw: bytes) -> CompletionRequest:
    """Bytes off the wire to a request, or the 400/413 the client should get."""
    if len(raw) > MAX_BODY_BYTES:
        raise request_too_large()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid_request(f"the body is not valid JSON: {exc}",
                              code=ErrorType.INVALID_JSON.value) from None
    if not isinstance(data, dict):
        raise invalid_request("the body must be a JSON object")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def request_too_large() -> CompletionError:
    return invalid_request(f"the request body is larger than {MAX_BODY_BYTES} bytes",
                           code="request_too_large", status=413)


def _validation_error(exc: ValidationError) -> CompletionError:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    code = first["type"] if first["type"] in _CUSTOM_CODES else "invalid_request"
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return invalid_request(message, code=code, param=param)


# -- metrics ---------------------------------------------------------------------


class CompletionMetrics:
    """Counters of the completions API, by transport (`http` / `rpc`) and outcome.

    Registered on the app's own registry the first time a transport asks, so
    the shared `Metrics` class needs no change and tests stay isolated.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "waddle_ai_completions", "Completion API requests, by transport and outcome "
            "(`ok` or the error code).", ["transport", "outcome"], registry=registry)
        self.duration = Histogram(
            "waddle_ai_completion_seconds", "From request to the last byte of the answer.",
            ["transport"], buckets=PROVIDER_BUCKETS, registry=registry)

    def observe(self, transport: str, outcome: str, seconds: float) -> None:
        self.requests.labels(transport, outcome).inc()
        self.duration.labels(transport).observe(seconds)


_COMPLETION_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, CompletionMetrics] = (
    weakref.WeakKeyDictionary())


def completion_metrics(metrics: Metrics) -> CompletionMetrics:
    """One `CompletionMetrics` per registry: HTTP and RPC share its series."""
    found = _COMPLETION_METRICS.get(metrics.registry)
    if found is None:
        found = _COMPLETION_METRICS[metrics.registry] = CompletionMetrics(metrics.registry)
    return found


# -- the service -------------------------------------------------------------------


@dataclass(slots=True)
class _Listing:
    models: list[str]
    created: int  # unix time of the listing, shown as each model's `created`
    expires_at: float  # on the service's monotonic clock
    # Why the listing is empty: a provider that could not be asked.
    error: ProviderError | TimeoutError | None = None


class CompletionService:
    """Answers OpenAI-shaped requests with the worker's providers."""

    def __init__(
        self,
        router: ProviderRouter,
        *,
        default_chain: Sequence[ProviderName],
        default_temperature: float,
        default_max_tokens: int,
        models_ttl_s: float = DEFAULT_MODELS_TTL_S,
        metrics: Metrics | None = None,
        secrets: Sequence[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not default_chain:
            raise ValueError("the default chain needs at least one provider")
        for name in default_chain:
            router.get(name)  # LookupError now rather than on the first request
        self._router = router
        self._default_chain = list(default_chain)
        self._temperature = default_temperature
        self._max_tokens = default_max_tokens
        self._models_ttl_s = models_ttl_s
        self._metrics = metrics
        self._secrets = tuple(s for s in secrets if s)
        router.hide(self._secrets)
        self._clock = clock
        self._listings: dict[ProviderName, _Listing] = {}
        self._listing_lock = asyncio.Lock()

    # -- public ------------------------------------------------------------

    async def complete(self, request: CompletionRequest) -> dict[str, Any]:
        """A `chat.completion` object; raises `CompletionError`."""
        chain, model = await self.resolve(request.model)
        chat = self._chat_request(request, model)
        try:
            completion = await self._router.complete(chain, chat)
        except ProviderError as exc:
            raise self._failed(exc, request) from exc
        usage = _usage(completion.usage)
        log.info("completion answered", extra={
            "action": "completion", "provider": completion.provider, "model": completion.model,
            "community": request.community_id, "user": request.user,
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"]})
        return {
            "id": new_completion_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": completion.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "logprobs": None,
                "finish_reason": _finish_reason(completion.finish_reason),
            }],
            "usage": usage,
        }

    async def stream(
        self, request: CompletionRequest
    ) -> AsyncGenerator[dict[str, Any], None]:
        """`chat.completion.chunk` objects; raises `CompletionError`.

        Nothing is yielded until the provider has produced its first piece, so
        a failure before that is raised from the first `anext()`: the HTTP
        transport can still answer it with a proper error status.
        """
        chain, model = await self.resolve(request.model)
        chat = self._chat_request(request, model)
        try:
            opened = await self._router.open_stream(chain, chat)
        except ProviderError as exc:
            raise self._failed(exc, request) from exc
        ident, created = new_completion_id(), int(time.time())
        include_usage = request.include_usage
        answered_by = opened.model

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {
                "id": ident, "object": "chat.completion.chunk", "created": created,
                "model": answered_by,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}],
            }
            if include_usage:
                out["usage"] = None
            return out

        usage = TokenUsage()
        finish_reason: str | None = None
        pieces = opened.pieces()
        try:
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for piece in pieces:
                    if piece.text:
                        yield chunk({"content": piece.text})
                    if piece.usage is not None:
                        usage = piece.usage
                    if piece.finish_reason is not None:
                        finish_reason = piece.finish_reason
            except ProviderError as exc:
                raise self._failed(exc, request) from exc
            yield chunk({}, _finish_reason(finish_reason))
            if include_usage:
                yield {
                    "id": ident, "object": "chat.completion.chunk", "created": created,
                    "model": answered_by, "choices": [], "usage": _usage(usage),
                }
            log.info("completion streamed", extra={
                "action": "completion", "provider": opened.provider.name, "model": answered_by,
                "community": request.community_id, "user": request.user,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens})
        finally:
            # A client that left mid-stream judged nothing about the provider.
            await pieces.aclose()
            await opened.aclose()

    async def models(self) -> dict[str, Any]:
        """The OpenAI model list of every provider that answers, each model once."""
        data: list[dict[str, Any]] = []
        seen: set[str] = set()
        catalogue = await self._catalogue()
        for name, listing in catalogue:
            owner = self._router.get(name).name
            for model in listing.models:
                if model in seen:
                    continue
                seen.add(model)
                data.append({"id": model, "object": "model", "created": listing.created,
                             "owned_by": owner})
        if not data:
            # An empty list would read as "no models here"; the truth is that
            # no provider could be asked, and the client should hear why.
            errors = [listing.error for _, listing in catalogue if listing.error is not None]
            if errors:
                raise self._listing_failed(errors)
        return {"object": "list", "data": data}

    async def resolve(self, model: str | None) -> tuple[list[ProviderName], str | None]:
        """Which providers to ask, and with which model (None: each one's default).

        `auto`, nothing, or a name no provider knows goes to the default chain:
        clients that hard-code `gpt-4o-mini` still get an answer, and the
        answer's `model` says which one really replied. A name a provider
        lists (or has as its default) goes to that provider alone: whoever
        names a model wants that model, not a silent substitute.
        """
        wanted = (model or "").strip()
        if not wanted or wanted.lower() == AUTO_MODEL:
            return list(self._default_chain), None
        ordered = self._ordered_providers()
        for name in ordered:
            if self._router.get(name).default_model == wanted:
                return [name], wanted
        for name, listing in await self._catalogue():
            if wanted in listing.models:
                return [name], wanted
            # Ollama answers `llama3.2` with `llama3.2:latest`; so do we.
            if ":" not in wanted and f"{wanted}:latest" in listing.models:
                return [name], f"{wanted}:latest"
        log.debug("unknown model; using the default chain", extra={
            "action": "resolve_model", "model": wanted})
        return list(self._default_chain), None

    # -- internals -----------------------------------------------------------

    def _ordered_providers(self) -> list[ProviderName]:
        """The default chain first, so a model two providers list goes to the primary."""
        rest = [name for name in self._router.providers if name not in self._default_chain]
        return [*self._default_chain, *rest]

    def _chat_request(self, request: CompletionRequest, model: str | None) -> ChatRequest:
        max_tokens = request.max_tokens or request.max_completion_tokens or self._max_tokens
        temperature = self._temperature if request.temperature is None else request.temperature
        return ChatRequest(
            messages=[message.to_chat() for message in request.messages],
            temperature=temperature, max_tokens=max_tokens, model=model,
        )

    def _listing_failed(self, errors: Sequence[ProviderError | TimeoutError]) -> CompletionError:
        for error in errors:
            if isinstance(error, ProviderAuthFailed):
                return provider_error(error, self._secrets)
        first = errors[0]
        if isinstance(first, ProviderError):
            return provider_error(first, self._secrets)
        return CompletionError(504, "listing the providers' models timed out",
                               type="server_error", code=ErrorType.PROVIDER_TIMEOUT.value)

    def _cause(self, exc: ProviderError) -> ProviderError:
        """An open circuit stands for the failure that opened it, when that is our key.

        While a provider whose credentials were refused is skipped, its
        clients keep hearing `upstream_auth_failed`, not a vague outage.
        """
        if not isinstance(exc, CircuitOpen):
            return exc
        for name, provider in self._router.providers.items():
            if provider.name == exc.provider:
                opened_by = self._router.breaker(name).opened_by
                if isinstance(opened_by, ProviderAuthFailed):
                    return opened_by
        return exc

    def _failed(self, exc: ProviderError, request: CompletionRequest) -> CompletionError:
        exc = self._cause(exc)
        error = provider_error(exc, self._secrets)
        log.warning("completion failed", extra={
            "action": "completion", "provider": exc.provider, "error_type": exc.error_type,
            "error": scrub(str(exc), self._secrets), "status": error.status,
            "community": request.community_id, "user": request.user})
        return error

    async def _catalogue(self) -> list[tuple[ProviderName, _Listing]]:
        """Every provider's model list, fetched at most once per TTL (one fetch at a time)."""
        async with self._listing_lock:
            now = self._clock()
            ordered = self._ordered_providers()
            stale = [n for n in ordered if n not in self._listings
                     or self._listings[n].expires_at <= now]
            if stale:
                fetched = await asyncio.gather(*(self._list(name) for name in stale))
                self._listings.update(zip(stale, fetched, strict=True))
            return [(name, self._listings[name]) for name in ordered]

    async def _list(self, name: ProviderName) -> _Listing:
        provider = self._router.get(name)
        try:
            async with asyncio.timeout(LIST_MODELS_TIMEOUT_S):
                models = await provider.list_models()
        except (ProviderError, TimeoutError) as exc:
            if isinstance(exc, ProviderError):
                log_provider_failure(log, "could not list a provider's models; skipped for now",
                                     exc, self._secrets, action="list_models")
            else:
                log.warning("could not list a provider's models; skipped for now", extra={
                    "action": "list_models", "provider": provider.name,
                    "error": "timed out"})
            retry_in = min(self._models_ttl_s, FAILED_LISTING_RETRY_S)
            return _Listing([], int(time.time()), self._clock() + retry_in, exc)
        return _Listing(list(models), int(time.time()), self._clock() + self._models_ttl_s)


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _usage(usage: TokenUsage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _finish_reason(reason: str | None) -> str:
    """OpenAI clients know four reasons; a backend's own (or none) reads as `stop`."""
    return reason if reason in FINISH_REASONS else "stop"
