"""What every AI provider offers the pipeline and the completions API.

A provider turns a list of chat messages into text. Two calls:
`complete()` makes one non-streamed request; `stream()` yields the text as it
is generated. The interaction pipeline streams (a stalled generation times out
between chunks, a slow but steady one does not), the completions API uses
whichever the client asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from domain.chat import ChatMessage


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: Sequence[ChatMessage]
    temperature: float = 0.7
    max_tokens: int = 500
    # None: the provider's configured default model.
    model: str | None = None


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished answer. Reasoning ("thinking") output is never part of `text`."""

    text: str
    model: str
    provider: str
    usage: TokenUsage = field(default_factory=TokenUsage)
    finish_reason: str | None = None

    @property
    def truncated(self) -> bool:
        """Cut by the token limit: Ollama's `done_reason`, OpenAI's and llama.cpp's
        `finish_reason` all say `length`. The text may end mid-sentence, even mid-word.
        """
        return self.finish_reason in TRUNCATED_REASONS


# Finish reasons that mean "stopped by the token limit", not "done".
TRUNCATED_REASONS = frozenset({"length", "max_tokens"})


@dataclass(frozen=True, slots=True)
class CompletionChunk:
    """One piece of a streamed answer; the last one carries usage and finish_reason."""

    text: str = ""
    model: str | None = None
    usage: TokenUsage | None = None
    finish_reason: str | None = None
    done: bool = False


@runtime_checkable
class Provider(Protocol):
    """An AI backend. Implementations hold one pooled client, opened once."""

    @property
    def name(self) -> str:
        """The provider's name as the reply's `provider` field shows it."""
        ...

    @property
    def default_model(self) -> str: ...

    async def complete(self, request: ChatRequest) -> Completion: ...

    def stream(self, request: ChatRequest) -> AsyncIterator[CompletionChunk]: ...

    async def list_models(self) -> list[str]: ...

    async def check_health(self) -> None:
        """Return when the backend answers; raise a `ProviderError` when it does not."""
        ...

    async def aclose(self) -> None: ...


async def collect(provider: Provider, request: ChatRequest) -> Completion:
    """Stream a request and join the pieces into one `Completion`."""
    model = provider.default_model if request.model is None else request.model
    return await join_chunks(provider.stream(request), provider=provider.name, model=model)


async def join_chunks(
    chunks: AsyncIterator[CompletionChunk], *, provider: str, model: str
) -> Completion:
    """One `Completion` from a stream's pieces: the text joined, the last model,
    usage and finish reason reported (`model` until a piece names one)."""
    parts: list[str] = []
    usage = TokenUsage()
    finish_reason: str | None = None
    async for chunk in chunks:
        if chunk.text:
            parts.append(chunk.text)
        if chunk.model:
            model = chunk.model
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.finish_reason is not None:
            finish_reason = chunk.finish_reason
    return Completion(text="".join(parts), model=model, provider=provider, usage=usage,
                      finish_reason=finish_reason)


async def close_stream(chunks: AsyncIterator[CompletionChunk]) -> None:
    """Close a provider's stream so its HTTP response is released now, not at GC."""
    close = getattr(chunks, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()
