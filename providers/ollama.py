"""Ollama's native chat API (`/api/chat`), not its OpenAI shim.

The native API is the one that honours `keep_alive` (so the model stays in
memory between chat bursts) and reports token counts on every answer. Its
sampling settings live in `options`: a top-level `temperature` is silently
ignored by Ollama, which is why the body is built in one place.

`think` is always sent: Ollama turns thinking on by default for a model that
can think, and such a model then spends the whole `num_predict` on reasoning
and answers nothing. `keep_alive` goes as a JSON number when it is a number
of seconds: Ollama reads a string only as a duration with a unit.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from providers.base import ChatRequest, Completion, CompletionChunk, TokenUsage
from providers.errors import (
    ProviderBadOutput,
    ProviderBadRequest,
    ProviderError,
    ProviderUnavailable,
)
from providers.http import (
    HttpClient,
    as_int,
    bad_shape,
    drain,
    excerpt,
    iter_lines,
    parse_json,
)

if TYPE_CHECKING:
    from config.ollama_env import ThinkValue
    from config.settings import Settings


class OllamaProvider:
    """Talks to one Ollama server through one pooled HTTP client."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        timeout_s: float = 30.0,
        keep_alive: str | int = "30m",
        think: ThinkValue = False,
        verify: bool | str = True,
    ) -> None:
        self._model = model
        self._keep_alive = keep_alive
        self._think = think
        self._client = HttpClient(base_url, timeout_s, verify=verify)

    @classmethod
    def from_settings(cls, settings: Settings) -> OllamaProvider:
        verify: bool | str = settings.ollama_cert_path or settings.ollama_verify_ssl
        return cls(
            base_url=settings.ollama_base_url,
            model=settings.ollama_model,
            timeout_s=settings.ollama_timeout,
            keep_alive=settings.ollama_keep_alive_value,
            think=settings.ollama_think,
            verify=verify,
        )

    @property
    def name(self) -> str:
        return "ollama"

    @property
    def default_model(self) -> str:
        return self._model

    def _body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        return {
            "model": request.model or self._model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": stream,
            "options": {"temperature": request.temperature, "num_predict": request.max_tokens},
            "keep_alive": self._keep_alive,
            "think": self._think,
        }

    async def complete(self, request: ChatRequest) -> Completion:
        body = self._body(request, stream=False)
        data = await self._client.request_json(self.name, "POST", "/api/chat", body=body)
        if not isinstance(data, dict):
            raise bad_shape(self.name, "answer is not an object", data)
        if "error" in data:
            raise self._error(data["error"])
        return Completion(
            text=_content(self.name, data),
            model=_model(data, body["model"]),
            provider=self.name,
            usage=_usage(data),
            finish_reason=_finish_reason(data),
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[CompletionChunk, None]:
        body = self._body(request, stream=True)
        final: CompletionChunk | None = None
        async with self._client.send(self.name, "POST", "/api/chat", body=body) as response:
            async with aclosing(iter_lines(self.name, response)) as lines:
                async for line in lines:
                    if not line.strip():
                        continue
                    data = parse_json(self.name, line)
                    if not isinstance(data, dict):
                        raise bad_shape(self.name, "stream line is not an object", data)
                    if "error" in data:
                        raise self._error(data["error"])
                    model = _model(data, body["model"])
                    text = _content(self.name, data)
                    if text:
                        yield CompletionChunk(text=text, model=model)
                    if data.get("done") is True:
                        final = CompletionChunk(
                            model=model,
                            usage=_usage(data),
                            finish_reason=_finish_reason(data),
                            done=True,
                        )
                        break
            if final is not None:
                await drain(response)
        if final is None:
            raise ProviderUnavailable(self.name, "stream ended early (no line with done=true)")
        yield final

    async def list_models(self) -> list[str]:
        data = await self._tags()
        models = data.get("models")
        if not isinstance(models, list):
            raise bad_shape(self.name, "/api/tags has no models list", data)
        names: list[str] = []
        for entry in models:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                names.append(entry["name"])
        return names

    async def check_health(self) -> None:
        await self._tags()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _tags(self) -> dict[str, Any]:
        data = await self._client.request_json(self.name, "GET", "/api/tags")
        if not isinstance(data, dict):
            raise bad_shape(self.name, "/api/tags answer is not an object", data)
        return data

    def _error(self, error: Any) -> ProviderError:
        """An `{"error": ...}` in a 200 answer: the model failed while running.

        An unknown model will fail again on retry; anything else (the runner
        crashed, ran out of memory) may well succeed on another attempt.
        """
        message = excerpt(str(error))
        if "not found" in message.lower():
            return ProviderBadRequest(self.name, message)
        return ProviderUnavailable(self.name, message)


def _content(provider: str, data: dict[str, Any]) -> str:
    """`message.content` only: `message.thinking` is reasoning, never part of the reply."""
    message = data.get("message")
    if message is None and data.get("done") is True:
        return ""
    if not isinstance(message, dict):
        raise bad_shape(provider, "answer has no message", data)
    content = message.get("content", "")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ProviderBadOutput(provider, "message.content is not a string")
    return content


def _model(data: dict[str, Any], fallback: str) -> str:
    model = data.get("model")
    return model if isinstance(model, str) and model else fallback


def _usage(data: dict[str, Any]) -> TokenUsage:
    return TokenUsage(
        prompt_tokens=as_int(data.get("prompt_eval_count")),
        completion_tokens=as_int(data.get("eval_count")),
    )


def _finish_reason(data: dict[str, Any]) -> str | None:
    reason = data.get("done_reason")
    return reason if isinstance(reason, str) else None
