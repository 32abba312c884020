"""The HTTP plumbing under both providers: line and event-stream parsing,
connection reuse, and what a misbehaving server gets, over real loopback HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager

import pytest
from aiohttp import web

from domain.chat import ChatMessage
from providers.base import ChatRequest, Provider, collect
from providers.errors import ProviderBadOutput
from providers.http import LineSplitter, ServerSentEvent, SSEDecoder
from providers.ollama import OllamaProvider
from providers.openai_compat import OpenAICompatProvider
from tests.fake_provider import FakeProvider

REQUEST = ChatRequest(messages=[ChatMessage("user", "hello bot")], max_tokens=40)


def split(*chunks: bytes) -> list[str]:
    splitter = LineSplitter()
    lines: list[str] = []
    for chunk in chunks:
        lines += splitter.feed(chunk)
    return lines + splitter.close()


def test_lines_end_with_lf_crlf_or_a_lone_cr() -> None:
    assert split(b"a\nb\r\nc\rd") == ["a", "b", "c", "d"]


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    assert split(b"a\r", b"\nb\n") == ["a", "b"]
    assert split(b"a\r", b"b\n") == ["a", "b"]


def test_utf8_split_across_chunks() -> None:
    encoded = "pingüino 🐧\n".encode()
    assert split(encoded[:9], encoded[9:14], encoded[14:]) == ["pingüino 🐧"]


def test_blank_lines_are_kept_for_the_event_stream() -> None:
    assert split(b"data: x\n\n") == ["data: x", ""]


def decode(*lines: str) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return [event for line in lines if (event := decoder.decode(line)) is not None]


def test_event_stream_fields_as_the_spec_reads_them() -> None:
    events = decode(
        "\ufeff: keep-alive comment",
        "data: first",
        "data:second line, no space",
        "",
        "event: error",
        "data:  two spaces keep one",
        "id: 7",
        "retry: 100",
        "",
        "event: ignored without data",
        "",
        "data",
        "",
    )
    assert events == [
        ServerSentEvent("message", "first\nsecond line, no space"),
        ServerSentEvent("error", " two spaces keep one"),
        ServerSentEvent("message", ""),
    ]


def test_an_event_without_its_blank_line_is_not_dispatched() -> None:
    assert decode("data: half") == []


@asynccontextmanager
async def serve(
    path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def endless_line(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    for _ in range(40):
        await response.write(b"x" * 65536)  # 2.5 MiB, never a newline
    await response.write_eof()
    return response


async def test_a_line_without_end_is_bad_output_not_unbounded_memory() -> None:
    async with serve("/api/chat", endless_line) as url:
        ollama = OllamaProvider(base_url=url, model="m", timeout_s=5.0)
        try:
            with pytest.raises(ProviderBadOutput, match="longer than"):
                await collect(ollama, REQUEST)
        finally:
            await ollama.aclose()


async def json_not_sse(request: web.Request) -> web.StreamResponse:
    return web.json_response({"choices": []})


async def test_a_stream_answered_without_an_event_stream_is_bad_output() -> None:
    async with serve("/v1/chat/completions", json_not_sse) as url:
        waddle = OpenAICompatProvider(base_url=url, timeout_s=5.0)
        try:
            with pytest.raises(ProviderBadOutput, match="not an event stream"):
                await collect(waddle, REQUEST)
        finally:
            await waddle.aclose()


async def open_after_done(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(
        b'data: {"choices":[{"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n'
    )
    await response.write(b"data: [DONE]\n\n: and then the body is never ended\n")
    await asyncio.sleep(30)
    return response


async def test_a_body_left_open_after_done_still_answers() -> None:
    """The rest of a body is read only so its connection can be pooled: a server
    that never ends it costs that connection, not the reply (timeout 10 s)."""
    async with serve("/v1/chat/completions", open_after_done) as url:
        waddle = OpenAICompatProvider(base_url=url, timeout_s=10.0)
        try:
            async with asyncio.timeout(5):
                completion = await collect(waddle, REQUEST)
        finally:
            await waddle.aclose()
    assert completion.text == "hi"
    assert completion.finish_reason == "stop"


@pytest.fixture(params=["ollama", "waddleai"])
async def provider_on_fake(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[Provider, FakeProvider]]:
    async with FakeProvider() as fake:
        provider: Provider
        if request.param == "ollama":
            provider = OllamaProvider(base_url=fake.url, model="m", timeout_s=5.0)
        else:
            provider = OpenAICompatProvider(base_url=fake.url, timeout_s=5.0)
        try:
            yield provider, fake
        finally:
            await provider.aclose()


async def test_streams_reuse_one_pooled_connection(
    provider_on_fake: tuple[Provider, FakeProvider],
) -> None:
    """A stream read to its end hands its connection back: five replies, one TCP connection."""
    provider, fake = provider_on_fake
    for _ in range(5):
        async with aclosing(provider.stream(REQUEST)) as stream:
            chunks = [chunk async for chunk in stream]
        assert chunks[-1].done
    assert fake.calls == 5
    assert len(fake.peers) == 1


async def test_completions_reuse_one_pooled_connection(
    provider_on_fake: tuple[Provider, FakeProvider],
) -> None:
    provider, fake = provider_on_fake
    for _ in range(5):
        await provider.complete(REQUEST)
    await provider.check_health()
    assert len(fake.peers) == 1
