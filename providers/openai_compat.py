"""OpenAI-compatible chat completions, as served by the WaddleAI proxy.

The proxy picks the real model itself (`model: "auto"`), optionally steered by
`X-Preferred-Model`. Reasoning models behind it send `reasoning_content`
alongside the answer; only `content` is ever the reply. The parsing functions
are module-level because the embedded model speaks the same format.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from providers.base import ChatRequest, Completion, CompletionChunk, TokenUsage
from providers.errors import ProviderBadOutput, ProviderUnavailable
from providers.http import (
    HttpClient,
    as_int,
    bad_shape,
    drain,
    error_message,
    excerpt,
    iter_sse,
    parse_json,
)

if TYPE_CHECKING:
    from config.settings import Settings


class OpenAICompatProvider:
    """One OpenAI-compatible endpoint behind one pooled HTTP client."""

    def __init__(
        self,
        *,
        name: str = "waddleai",
        base_url: str,
        api_key: str | None = None,
        model: str = "auto",
        preferred_model: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self._name = name
        self._model = model
        # Kept only to blank it out of error messages a proxy might echo.
        self._secrets: tuple[str, ...] = (api_key,) if api_key else ()
        headers: dict[str, str] = {}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        if preferred_model:
            headers["X-Preferred-Model"] = preferred_model
        self._client = HttpClient(base_url, timeout_s, headers=headers)

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAICompatProvider:
        return cls(
            name="waddleai",
            base_url=settings.waddleai_base_url,
            api_key=settings.waddleai_api_key,
            model=settings.waddleai_model,
            preferred_model=settings.waddleai_preferred_model,
            timeout_s=settings.waddleai_timeout,
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def default_model(self) -> str:
        return self._model

    def _body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model or self._model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(self, request: ChatRequest) -> Completion:
        body = self._body(request, stream=False)
        data = await self._client.request_json(
            self.name, "POST", "/v1/chat/completions", body=body, secrets=self._secrets
        )
        if isinstance(data, dict) and "error" in data:
            # An error object under a 2xx status: the upstream failed after
            # the proxy had already committed to success.
            raise ProviderUnavailable(self.name, excerpt(str(error_message(data)), self._secrets))
        return parse_completion(self.name, data, body["model"])

    async def stream(self, request: ChatRequest) -> AsyncGenerator[CompletionChunk, None]:
        body = self._body(request, stream=True)
        parser = ChunkParser(self.name, body["model"])
        done = False
        async with self._client.send(
            self.name,
            "POST",
            "/v1/chat/completions",
            body=body,
            accept="text/event-stream",
            secrets=self._secrets,
        ) as response:
            async with aclosing(iter_sse(self.name, response)) as events:
                async for event in events:
                    if not event.data.strip():
                        continue
                    if event.data.strip() == "[DONE]":
                        done = True
                        break
                    data = parse_json(self.name, event.data, self._secrets)
                    if event.event == "error" or (isinstance(data, dict) and "error" in data):
                        message = error_message(data) or event.data
                        raise ProviderUnavailable(
                            self.name, f"error mid-stream: {excerpt(message, self._secrets)}"
                        )
                    chunk = parser.feed(data)
                    if chunk is not None:
                        yield chunk
            if done:
                await drain(response)
        if not done and parser.finish_reason is None:
            raise ProviderUnavailable(self.name, "stream ended early (no [DONE], no finish_reason)")
        # Some servers omit `[DONE]`; a finish_reason already says the answer is whole.
        yield parser.final()

    async def list_models(self) -> list[str]:
        data = await self._models()
        entries = data.get("data")
        if not isinstance(entries, list):
            raise bad_shape(self.name, "/v1/models has no data list", data, self._secrets)
        return [e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]

    async def check_health(self) -> None:
        await self._models()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _models(self) -> dict[str, Any]:
        data = await self._client.request_json(
            self.name, "GET", "/v1/models", secrets=self._secrets
        )
        if not isinstance(data, dict):
            raise bad_shape(self.name, "/v1/models answer is not an object", data, self._secrets)
        return data


def parse_completion(provider: str, data: Any, fallback_model: str) -> Completion:
    """A `chat.completion` object; `reasoning_content`/`reasoning` are left out of the text."""
    if not isinstance(data, dict):
        raise bad_shape(provider, "answer is not an object", data)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise bad_shape(provider, "answer has no choices", data)
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise bad_shape(provider, "choice has no message", data)
    return Completion(
        text=_text(provider, message.get("content")),
        model=_model(data, fallback_model),
        provider=provider,
        usage=_usage(data.get("usage")) or TokenUsage(),
        finish_reason=_reason(choice.get("finish_reason")),
    )


class ChunkParser:
    """Turns `chat.completion.chunk` objects into `CompletionChunk`s.

    finish_reason and usage arrive in different chunks (usage last, with empty
    choices), so they are kept here and handed out together by `final()`.
    """

    def __init__(self, provider: str, fallback_model: str) -> None:
        self._provider = provider
        self.model = fallback_model
        self.finish_reason: str | None = None
        self.usage: TokenUsage | None = None

    def feed(self, data: Any) -> CompletionChunk | None:
        """The text piece this chunk carries, or None when it carries none."""
        if not isinstance(data, dict):
            raise bad_shape(self._provider, "stream chunk is not an object", data)
        self.model = _model(data, self.model)
        usage = _usage(data.get("usage"))
        if usage is not None:
            self.usage = usage
        choices = data.get("choices")
        if choices is None or choices == []:
            return None
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise bad_shape(self._provider, "stream chunk has malformed choices", data)
        choice = choices[0]
        reason = _reason(choice.get("finish_reason"))
        if reason is not None:
            self.finish_reason = reason
        delta = choice.get("delta")
        if delta is None:
            return None
        if not isinstance(delta, dict):
            raise bad_shape(self._provider, "stream chunk delta is not an object", data)
        text = _text(self._provider, delta.get("content"))
        return CompletionChunk(text=text, model=self.model) if text else None

    def final(self) -> CompletionChunk:
        return CompletionChunk(
            model=self.model,
            usage=self.usage or TokenUsage(),
            finish_reason=self.finish_reason,
            done=True,
        )


def _text(provider: str, content: Any) -> str:
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ProviderBadOutput(provider, "content is not a string")
    return content


def _model(data: dict[str, Any], fallback: str) -> str:
    model = data.get("model")
    return model if isinstance(model, str) and model else fallback


def _usage(usage: Any) -> TokenUsage | None:
    if not isinstance(usage, dict):
        return None
    return TokenUsage(
        prompt_tokens=as_int(usage.get("prompt_tokens")),
        completion_tokens=as_int(usage.get("completion_tokens")),
    )


def _reason(reason: Any) -> str | None:
    return reason if isinstance(reason, str) and reason else None
