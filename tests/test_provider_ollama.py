"""OllamaProvider against a real loopback HTTP server (tests.fake_provider)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from config.settings import Settings
from domain.chat import ChatMessage
from domain.provider_names import ProviderName
from providers.base import ChatRequest, CompletionChunk, Provider, collect
from providers.errors import (
    ProviderBadOutput,
    ProviderBadRequest,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)
from providers.factory import build_provider
from providers.http import parse_retry_after
from providers.ollama import OllamaProvider
from tests.fake_provider import Behaviour, FakeProvider

REQUEST = ChatRequest(
    messages=[
        ChatMessage("system", "You are a friendly bot"),
        ChatMessage("user", "hello bot how are you"),
    ],
    temperature=0.3,
    max_tokens=64,
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as server:
        yield server


@pytest.fixture
async def provider(fake: FakeProvider) -> AsyncIterator[OllamaProvider]:
    ollama = OllamaProvider(base_url=fake.url, model="llama3.2", timeout_s=1.0, keep_alive="15m")
    yield ollama
    await ollama.aclose()


async def chunks(provider: OllamaProvider, request: ChatRequest = REQUEST) -> list[CompletionChunk]:
    async with aclosing(provider.stream(request)) as stream:
        return [chunk async for chunk in stream]


def test_is_a_provider(provider: OllamaProvider) -> None:
    assert isinstance(provider, Provider)
    assert provider.name == "ollama"
    assert provider.default_model == "llama3.2"


async def test_request_body_puts_sampling_in_options(
    fake: FakeProvider, provider: OllamaProvider
) -> None:
    await provider.complete(REQUEST)
    sent = fake.last
    assert sent.method == "POST"
    assert sent.path == "/api/chat"
    assert sent.json == {
        "model": "llama3.2",
        "messages": [
            {"role": "system", "content": "You are a friendly bot"},
            {"role": "user", "content": "hello bot how are you"},
        ],
        "stream": False,
        "options": {"temperature": 0.3, "num_predict": 64},
        "keep_alive": "15m",
        "think": False,
    }
    assert "temperature" not in sent.json
    assert "num_predict" not in sent.json
    assert "max_tokens" not in sent.json


async def test_request_model_overrides_default(
    fake: FakeProvider, provider: OllamaProvider
) -> None:
    request = ChatRequest(messages=[ChatMessage("user", "hi")], model="qwen3:0.6b")
    completion = await provider.complete(request)
    assert fake.last.json["model"] == "qwen3:0.6b"
    assert completion.model == "qwen3:0.6b"


async def test_complete_parses_text_usage_and_reason(provider: OllamaProvider) -> None:
    completion = await provider.complete(REQUEST)
    assert completion.text == "Hello there, friend!"
    assert completion.model == "llama3.2"
    assert completion.provider == "ollama"
    assert completion.usage.prompt_tokens == 10  # words of both messages
    assert completion.usage.completion_tokens == 3
    assert completion.finish_reason == "stop"


async def test_complete_reports_length_when_cut(provider: OllamaProvider) -> None:
    request = ChatRequest(messages=[ChatMessage("user", "hi")], max_tokens=2)
    completion = await provider.complete(request)
    assert completion.text == "Hello there,"
    assert completion.finish_reason == "length"


async def test_complete_ignores_thinking(fake: FakeProvider, provider: OllamaProvider) -> None:
    fake.thinking = "The user greets me. I should greet back."
    completion = await provider.complete(REQUEST)
    assert completion.text == "Hello there, friend!"


async def test_reply_may_depend_on_messages(fake: FakeProvider, provider: OllamaProvider) -> None:
    fake.reply_text = lambda messages: f"you said {messages[-1]['content']}"
    completion = await provider.complete(REQUEST)
    assert completion.text == "you said hello bot how are you"


async def test_stream_sends_stream_true(fake: FakeProvider, provider: OllamaProvider) -> None:
    await chunks(provider)
    assert fake.last.json["stream"] is True
    assert fake.last.json["options"] == {"temperature": 0.3, "num_predict": 64}
    assert fake.last.json["keep_alive"] == "15m"


async def test_stream_yields_pieces_then_usage(provider: OllamaProvider) -> None:
    got = await chunks(provider)
    assert [c.text for c in got if c.text] == ["Hello", " there,", " friend!"]
    last = got[-1]
    assert last.done is True
    assert last.finish_reason == "stop"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (10, 3)
    assert all(not c.done for c in got[:-1])


async def test_stream_ignores_thinking(fake: FakeProvider, provider: OllamaProvider) -> None:
    fake.thinking = "Let me think about a greeting."
    completion = await collect(provider, REQUEST)
    assert completion.text == "Hello there, friend!"
    assert completion.usage.completion_tokens == 3


async def test_collect_joins_the_stream(provider: OllamaProvider) -> None:
    completion = await collect(provider, REQUEST)
    assert completion.text == "Hello there, friend!"
    assert completion.model == "llama3.2"
    assert completion.finish_reason == "stop"


async def test_timeout(fake: FakeProvider, provider: OllamaProvider) -> None:
    fake.latency_s = 3.0
    with pytest.raises(ProviderTimeout) as caught:
        await provider.complete(REQUEST)
    assert caught.value.retryable


async def test_stream_timeout(fake: FakeProvider, provider: OllamaProvider) -> None:
    fake.latency_s = 3.0
    with pytest.raises(ProviderTimeout):
        await chunks(provider)


async def test_stalled_stream_times_out_between_chunks(
    fake: FakeProvider, provider: OllamaProvider
) -> None:
    fake.chunk_delay_s = 3.0
    with pytest.raises(ProviderTimeout):
        await chunks(provider)


async def test_slow_but_steady_stream_does_not_time_out(
    fake: FakeProvider, provider: OllamaProvider
) -> None:
    fake.chunk_delay_s = 0.4  # 3 chunks: 1.2 s in all, more than the 1 s timeout
    completion = await collect(provider, REQUEST)
    assert completion.text == "Hello there, friend!"


@pytest.mark.parametrize("stream", [False, True])
async def test_500_is_unavailable(
    fake: FakeProvider, provider: OllamaProvider, stream: bool
) -> None:
    fake.status = 500
    with pytest.raises(ProviderUnavailable, match="internal server error"):
        await (collect(provider, REQUEST) if stream else provider.complete(REQUEST))


@pytest.mark.parametrize("stream", [False, True])
async def test_429_carries_retry_after(
    fake: FakeProvider, provider: OllamaProvider, stream: bool
) -> None:
    fake.status = 429
    fake.retry_after = "7"
    with pytest.raises(ProviderRateLimited) as caught:
        await (collect(provider, REQUEST) if stream else provider.complete(REQUEST))
    assert caught.value.retry_after_s == 7.0
    assert caught.value.retryable


async def test_429_retry_after_as_http_date(fake: FakeProvider, provider: OllamaProvider) -> None:
    fake.status = 429
    fake.retry_after = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    with pytest.raises(ProviderRateLimited) as caught:
        await provider.complete(REQUEST)
    assert caught.value.retry_after_s is not None
    assert 25 <= caught.value.retry_after_s <= 31


@pytest.mark.parametrize("stream", [False, True])
async def test_400_is_bad_request(
    fake: FakeProvider, provider: OllamaProvider, stream: bool
) -> None:
    fake.status = 400
    with pytest.raises(ProviderBadRequest, match="messages must not be empty") as caught:
        await (collect(provider, REQUEST) if stream else provider.complete(REQUEST))
    assert not caught.value.retryable


async def test_unknown_model_is_bad_request(fake: FakeProvider, provider: OllamaProvider) -> None:
    fake.status = 404
    with pytest.raises(ProviderBadRequest, match="not found"):
        await provider.complete(REQUEST)


async def test_error_body_is_cut_short(fake: FakeProvider, provider: OllamaProvider) -> None:
    fake.status = 400
    fake.error_message = "x" * 5000
    with pytest.raises(ProviderBadRequest) as caught:
        await provider.complete(REQUEST)
    assert len(str(caught.value)) < 260


@pytest.mark.parametrize("stream", [False, True])
async def test_garbage_is_bad_output(
    fake: FakeProvider, provider: OllamaProvider, stream: bool
) -> None:
    fake.garbage = True
    with pytest.raises(ProviderBadOutput):
        await (collect(provider, REQUEST) if stream else provider.complete(REQUEST))


async def test_midstream_error_is_unavailable(fake: FakeProvider, provider: OllamaProvider) -> None:
    fake.midstream_error = True
    received: list[str] = []

    async def consume() -> None:
        async with aclosing(provider.stream(REQUEST)) as stream:
            async for chunk in stream:
                received.append(chunk.text)

    with pytest.raises(ProviderUnavailable, match="error was encountered"):
        await consume()
    assert received == ["Hello"]


async def test_truncated_stream_is_unavailable(
    fake: FakeProvider, provider: OllamaProvider
) -> None:
    fake.truncate_stream = True
    with pytest.raises(ProviderUnavailable, match="ended early"):
        await chunks(provider)


async def test_connection_refused_is_unavailable() -> None:
    closed = FakeProvider()
    url = await closed.start()
    await closed.stop()
    ollama = OllamaProvider(base_url=url, model="llama3.2", timeout_s=1.0)
    try:
        with pytest.raises(ProviderUnavailable, match=f"connection refused to {url}"):
            await ollama.complete(REQUEST)
        with pytest.raises(ProviderUnavailable):
            await chunks(ollama)
        with pytest.raises(ProviderUnavailable):
            await ollama.check_health()
    finally:
        await ollama.aclose()


async def test_script_fails_then_recovers(fake: FakeProvider, provider: OllamaProvider) -> None:
    fake.script = [Behaviour(status=503), Behaviour(garbage=True)]
    with pytest.raises(ProviderUnavailable):
        await provider.complete(REQUEST)
    with pytest.raises(ProviderBadOutput):
        await provider.complete(REQUEST)
    completion = await provider.complete(REQUEST)
    assert completion.text == "Hello there, friend!"
    assert fake.calls == 3


async def test_list_models(fake: FakeProvider, provider: OllamaProvider) -> None:
    assert await provider.list_models() == ["llama3.2:latest", "qwen3:0.6b"]
    assert fake.health_requests[-1].path == "/api/tags"
    assert fake.health_requests[-1].method == "GET"


async def test_health(fake: FakeProvider, provider: OllamaProvider) -> None:
    await provider.check_health()
    fake.status = 503
    with pytest.raises(ProviderUnavailable):
        await provider.check_health()


async def test_hundreds_of_concurrent_requests(fake: FakeProvider) -> None:
    fake.latency_s = 0.2
    ollama = OllamaProvider(base_url=fake.url, model="llama3.2", timeout_s=10.0)
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*(ollama.complete(REQUEST) for _ in range(300)))
        elapsed = time.perf_counter() - started
    finally:
        await ollama.aclose()
    assert {r.text for r in results} == {"Hello there, friend!"}
    assert fake.calls == 300
    assert elapsed < 5.0  # in parallel, not queued behind a small pool (300 x 0.2 s = 60 s)


async def test_from_settings_maps_ollama_variables(fake: FakeProvider) -> None:
    settings = Settings(
        _env_file=None,
        ollama_host=fake.url,  # a full URL is accepted, as Ollama's CLI does
        ollama_model="qwen3:8b",
        ollama_timeout=12.0,
        ollama_keep_alive="5m",
    )
    ollama = OllamaProvider.from_settings(settings)
    try:
        await ollama.complete(REQUEST)
    finally:
        await ollama.aclose()
    assert ollama.default_model == "qwen3:8b"
    assert fake.last.json["model"] == "qwen3:8b"
    assert fake.last.json["keep_alive"] == "5m"
    assert ollama._client.timeout.read == 12.0
    assert ollama._client.timeout.connect == 5.0


async def test_from_settings_builds_url_from_host_and_port() -> None:
    settings = Settings(_env_file=None, ollama_host="gpu-box", ollama_port=11500)
    ollama = OllamaProvider.from_settings(settings)
    await ollama.aclose()
    assert ollama._client.base_url == "http://gpu-box:11500"


def test_from_settings_rejects_unreadable_ca_file() -> None:
    settings = Settings(_env_file=None, ollama_cert_path="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="CA certificate"):
        OllamaProvider.from_settings(settings)


async def test_factory_builds_ollama() -> None:
    provider = build_provider(ProviderName.OLLAMA, Settings(_env_file=None))
    await provider.aclose()
    assert isinstance(provider, OllamaProvider)


def test_parse_retry_after() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("nan") is None
