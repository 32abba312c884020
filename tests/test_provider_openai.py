"""OpenAICompatProvider (WaddleAI) against a real loopback HTTP server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from config.settings import Settings
from domain.chat import ChatMessage
from domain.provider_names import ProviderName
from providers.base import ChatRequest, CompletionChunk, Provider, collect
from providers.errors import (
    ProviderAuthFailed,
    ProviderBadOutput,
    ProviderBadRequest,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)
from providers.factory import build_provider
from providers.openai_compat import OpenAICompatProvider
from tests.fake_provider import Behaviour, FakeProvider

API_KEY = "sk-waddle-test-0123456789"
REQUEST = ChatRequest(
    messages=[
        ChatMessage("system", "You are a friendly bot"),
        ChatMessage("user", "hello bot how are you"),
    ],
    temperature=0.2,
    max_tokens=80,
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as server:
        yield server


@pytest.fixture
async def provider(fake: FakeProvider) -> AsyncIterator[OpenAICompatProvider]:
    waddle = OpenAICompatProvider(
        base_url=fake.url, api_key=API_KEY, preferred_model="gpt-4o-mini", timeout_s=1.0
    )
    yield waddle
    await waddle.aclose()


async def chunks(
    provider: OpenAICompatProvider, request: ChatRequest = REQUEST
) -> list[CompletionChunk]:
    async with aclosing(provider.stream(request)) as stream:
        return [chunk async for chunk in stream]


def test_is_a_provider(provider: OpenAICompatProvider) -> None:
    assert isinstance(provider, Provider)
    assert provider.name == "waddleai"
    assert provider.default_model == "auto"


async def test_request_body_and_headers(
    fake: FakeProvider, provider: OpenAICompatProvider
) -> None:
    await provider.complete(REQUEST)
    sent = fake.last
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["Authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["X-Preferred-Model"] == "gpt-4o-mini"
    assert sent.json == {
        "model": "auto",
        "messages": [
            {"role": "system", "content": "You are a friendly bot"},
            {"role": "user", "content": "hello bot how are you"},
        ],
        "temperature": 0.2,
        "max_tokens": 80,
        "stream": False,
    }


async def test_no_key_no_preference_no_headers(fake: FakeProvider) -> None:
    bare = OpenAICompatProvider(base_url=fake.url, timeout_s=1.0)
    try:
        completion = await bare.complete(REQUEST)
    finally:
        await bare.aclose()
    assert "Authorization" not in fake.last.headers
    assert "X-Preferred-Model" not in fake.last.headers
    assert completion.model == "llama3.2:latest"  # what "auto" resolved to


async def test_complete_parses_text_usage_model(provider: OpenAICompatProvider) -> None:
    completion = await provider.complete(REQUEST)
    assert completion.text == "Hello there, friend!"
    assert completion.model == "gpt-4o-mini"  # the proxy's choice, not "auto"
    assert completion.provider == "waddleai"
    assert completion.usage.prompt_tokens == 10
    assert completion.usage.completion_tokens == 3
    assert completion.finish_reason == "stop"


async def test_complete_ignores_reasoning_content(
    fake: FakeProvider, provider: OpenAICompatProvider
) -> None:
    fake.thinking = "They greet me, so I greet them."
    completion = await provider.complete(REQUEST)
    assert completion.text == "Hello there, friend!"


async def test_complete_reports_length(provider: OpenAICompatProvider) -> None:
    completion = await provider.complete(ChatRequest([ChatMessage("user", "hi")], max_tokens=1))
    assert completion.text == "Hello"
    assert completion.finish_reason == "length"


async def test_stream_asks_for_usage(fake: FakeProvider, provider: OpenAICompatProvider) -> None:
    await chunks(provider)
    body = fake.last.json
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 80
    assert fake.last.headers["Authorization"] == f"Bearer {API_KEY}"
    assert fake.last.headers["Accept"] == "text/event-stream"


async def test_stream_yields_pieces_then_usage(provider: OpenAICompatProvider) -> None:
    got = await chunks(provider)
    assert [c.text for c in got if c.text] == ["Hello", " there,", " friend!"]
    last = got[-1]
    assert last.done is True
    assert last.finish_reason == "stop"
    assert last.model == "gpt-4o-mini"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (10, 3)
    assert all(not c.done for c in got[:-1])


async def test_stream_ignores_reasoning_content(
    fake: FakeProvider, provider: OpenAICompatProvider
) -> None:
    fake.thinking = "Let me think about a greeting."
    completion = await collect(provider, REQUEST)
    assert completion.text == "Hello there, friend!"
    assert completion.usage.completion_tokens == 3


async def test_timeout(fake: FakeProvider, provider: OpenAICompatProvider) -> None:
    fake.latency_s = 3.0
    with pytest.raises(ProviderTimeout):
        await provider.complete(REQUEST)
    with pytest.raises(ProviderTimeout):
        await chunks(provider)


async def test_stalled_stream_times_out(
    fake: FakeProvider, provider: OpenAICompatProvider
) -> None:
    fake.chunk_delay_s = 3.0
    with pytest.raises(ProviderTimeout):
        await chunks(provider)


@pytest.mark.parametrize("stream", [False, True])
async def test_500_is_unavailable(
    fake: FakeProvider, provider: OpenAICompatProvider, stream: bool
) -> None:
    fake.status = 500
    with pytest.raises(ProviderUnavailable, match="internal server error"):
        await (collect(provider, REQUEST) if stream else provider.complete(REQUEST))


@pytest.mark.parametrize("stream", [False, True])
async def test_429_carries_retry_after(
    fake: FakeProvider, provider: OpenAICompatProvider, stream: bool
) -> None:
    fake.status = 429
    fake.retry_after = "12"
    with pytest.raises(ProviderRateLimited) as caught:
        await (collect(provider, REQUEST) if stream else provider.complete(REQUEST))
    assert caught.value.retry_after_s == 12.0


async def test_429_without_retry_after(fake: FakeProvider, provider: OpenAICompatProvider) -> None:
    fake.status = 429
    with pytest.raises(ProviderRateLimited) as caught:
        await provider.complete(REQUEST)
    assert caught.value.retry_after_s is None


@pytest.mark.parametrize("stream", [False, True])
async def test_400_is_bad_request(
    fake: FakeProvider, provider: OpenAICompatProvider, stream: bool
) -> None:
    fake.status = 400
    with pytest.raises(ProviderBadRequest, match="messages must not be empty") as caught:
        await (collect(provider, REQUEST) if stream else provider.complete(REQUEST))
    assert not caught.value.retryable


async def test_api_key_never_in_error_message(
    fake: FakeProvider, provider: OpenAICompatProvider
) -> None:
    fake.status = 401
    fake.error_message = f"Incorrect API key provided: {API_KEY}"
    with pytest.raises(ProviderAuthFailed) as caught:
        await provider.complete(REQUEST)
    assert API_KEY not in str(caught.value)
    assert "***" in str(caught.value)


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("stream", [False, True])
async def test_refused_credentials_are_the_operators_problem(
    fake: FakeProvider, provider: OpenAICompatProvider, status: int, stream: bool
) -> None:
    """A wrong key is not the caller's bad request: retryable, and it opens the circuit."""
    fake.status = status
    with pytest.raises(ProviderAuthFailed) as caught:
        await (collect(provider, REQUEST) if stream else provider.complete(REQUEST))
    assert not isinstance(caught.value, ProviderBadRequest)
    assert caught.value.retryable
    assert caught.value.opens_circuit
    assert caught.value.error_type == "upstream_auth_failed"
    assert caught.value.status == status


@pytest.mark.parametrize("stream", [False, True])
async def test_garbage_is_bad_output(
    fake: FakeProvider, provider: OpenAICompatProvider, stream: bool
) -> None:
    fake.garbage = True
    with pytest.raises(ProviderBadOutput):
        await (collect(provider, REQUEST) if stream else provider.complete(REQUEST))


async def test_midstream_error_is_unavailable(
    fake: FakeProvider, provider: OpenAICompatProvider
) -> None:
    fake.midstream_error = True
    received: list[str] = []

    async def consume() -> None:
        async with aclosing(provider.stream(REQUEST)) as stream:
            async for chunk in stream:
                received.append(chunk.text)

    with pytest.raises(ProviderUnavailable, match="upstream model crashed"):
        await consume()
    assert received == ["Hello"]


async def test_truncated_stream_is_unavailable(
    fake: FakeProvider, provider: OpenAICompatProvider
) -> None:
    fake.truncate_stream = True
    with pytest.raises(ProviderUnavailable, match="ended early"):
        await chunks(provider)


async def test_connection_refused_is_unavailable() -> None:
    closed = FakeProvider()
    url = await closed.start()
    await closed.stop()
    waddle = OpenAICompatProvider(base_url=url, api_key=API_KEY, timeout_s=1.0)
    try:
        # What failed and where, in words (not only aiohttp's exception name).
        with pytest.raises(ProviderUnavailable, match=f"connection refused to {url}") as caught:
            await waddle.complete(REQUEST)
        assert API_KEY not in str(caught.value)
        with pytest.raises(ProviderUnavailable):
            await chunks(waddle)
        with pytest.raises(ProviderUnavailable):
            await waddle.list_models()
    finally:
        await waddle.aclose()


async def test_script_fails_twice_then_succeeds(
    fake: FakeProvider, provider: OpenAICompatProvider
) -> None:
    fake.script = [Behaviour(status=502), Behaviour(status=429, retry_after="1")]
    with pytest.raises(ProviderUnavailable):
        await collect(provider, REQUEST)
    with pytest.raises(ProviderRateLimited):
        await collect(provider, REQUEST)
    completion = await collect(provider, REQUEST)
    assert completion.text == "Hello there, friend!"
    assert fake.calls == 3


async def test_list_models(fake: FakeProvider, provider: OpenAICompatProvider) -> None:
    assert await provider.list_models() == ["llama3.2:latest", "qwen3:0.6b"]
    last = fake.health_requests[-1]
    assert (last.method, last.path) == ("GET", "/v1/models")
    assert last.headers["Authorization"] == f"Bearer {API_KEY}"


async def test_health(fake: FakeProvider, provider: OpenAICompatProvider) -> None:
    await provider.check_health()
    fake.status = 401
    with pytest.raises(ProviderAuthFailed):
        await provider.check_health()
    fake.status = None
    fake.garbage = True
    with pytest.raises(ProviderBadOutput):
        await provider.check_health()


async def test_from_settings_maps_waddleai_variables(fake: FakeProvider) -> None:
    settings = Settings(
        _env_file=None,
        waddleai_base_url=fake.url + "/",
        waddleai_api_key="sk-from-env",
        waddleai_model="auto",
        waddleai_preferred_model="claude-haiku",
        waddleai_timeout=9.0,
    )
    waddle = OpenAICompatProvider.from_settings(settings)
    try:
        completion = await waddle.complete(REQUEST)
    finally:
        await waddle.aclose()
    assert waddle.name == "waddleai"
    assert fake.last.path == "/v1/chat/completions"
    assert fake.last.json["model"] == "auto"
    assert fake.last.headers["Authorization"] == "Bearer sk-from-env"
    assert fake.last.headers["X-Preferred-Model"] == "claude-haiku"
    assert completion.model == "claude-haiku"
    assert waddle._client.timeout.read == 9.0


async def test_factory_builds_waddleai() -> None:
    provider = build_provider(ProviderName.WADDLEAI, Settings(_env_file=None))
    await provider.aclose()
    assert isinstance(provider, OpenAICompatProvider)
