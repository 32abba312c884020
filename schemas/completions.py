"""What the completions API answers (HTTP and AMQP RPC), and what the sidecar's probes say.

The request is validated by `consumers.completion_service.CompletionRequest`; the
answers are built as plain dicts on the hot path. These models are their
published shape: the OpenAPI document (`worker.openapi`) and the AsyncAPI
document (docs/asyncapi.yaml) are derived from them, and the tests hold the
dicts the code really sends against them. They forbid extra fields, so a key
added to an answer without being added here fails the schemathesis run and
the streaming test instead of slipping out undocumented.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorDetail(_Strict):
    message: str
    type: str
    param: str | None = Field(description="the offending request field, when one is to blame")
    code: str


class ErrorResponse(_Strict):
    """OpenAI's error body, on every 4xx/5xx of the API and in the RPC's failed answers."""

    error: ErrorDetail


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str


class Choice(_Strict):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class CompletionUsage(_Strict):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class ChatCompletion(_Strict):
    """A whole answer (`stream` false)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str = Field(description="the model that really answered")
    choices: list[Choice]
    usage: CompletionUsage


class ChunkDelta(_Strict):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Strict):
    index: int
    delta: ChunkDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Strict):
    """One server-sent event of a streamed answer (`data: {...}`); the stream ends with
    `data: [DONE]`. An error after the first chunk arrives as an `ErrorResponse` event."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = Field(
        default=None, description="present (null, then the totals) with "
        "`stream_options.include_usage`")


class Model(_Strict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str = Field(description="the provider that lists it")


class ModelList(_Strict):
    object: Literal["list"]
    data: list[Model]


class Health(_Strict):
    status: Literal["ok"]


class StateHealth(BaseModel):
    """Where conversation state lives. `degraded` is true whenever it is in this
    process's memory (no `REDIS_URL`, or Redis unreachable): dedupe, cooldowns and
    history are then per replica."""

    model_config = ConfigDict(extra="allow", frozen=True)

    backend: str
    degraded: bool
    ok: bool


class Readiness(BaseModel):
    """`/readyz`: 200 with `ready` while the consumer is attached and both broker
    connections are up, else 503 with `not_ready`; every dependency is detailed."""

    model_config = ConfigDict(extra="allow", frozen=True)

    status: Literal["ready", "not_ready"]
    consumer: dict[str, bool]
    broker: dict[str, bool]
    state: StateHealth
    postgres: dict[str, object]
    providers: dict[str, dict[str, object]]
    completions_rpc: dict[str, bool]
