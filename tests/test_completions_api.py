"""The OpenAI-compatible HTTP API, driven by the official `openai` SDK over real loopback HTTP.

The sidecar serves `completion_routes()` on a real port; behind it a
`ProviderRouter` over real Ollama / OpenAI-compatible providers talks to
`FakeProvider` servers. What the fake received (options, counts, paths) is
the evidence that the API honoured the request. Clients run with
`max_retries=0` so that each error status reaches the test as sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from consumers.completion_service import MAX_BODY_BYTES, MAX_CONTENT_CHARS, CompletionService
from domain.provider_names import ProviderName
from observability.metrics import Metrics
from providers.base import Provider
from providers.breaker import DEFAULT_FAILURE_THRESHOLD, DEFAULT_OPEN_S
from providers.errors import ProviderUnavailable
from providers.ollama import OllamaProvider
from providers.openai_compat import OpenAICompatProvider
from providers.router import ProviderRouter
from tests.fake_provider import DEFAULT_REPLY, Behaviour, FakeProvider
from worker.completions_api import completion_routes
from worker.sidecar import Sidecar

KEY = "wk-test-key-0123456789abcdef"
OTHER_KEY = "wk-other-key-fedcba9876543210"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"
OLLAMA = ProviderName.OLLAMA
WADDLEAI = ProviderName.WADDLEAI
HELLO = [{"role": "user", "content": "hello bot"}]
# The fake counts words as tokens: "hello bot" is 2, "Hello there, friend!" is 3.
HELLO_PROMPT_TOKENS = 2
REPLY_TOKENS = 3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Api:
    url: str
    service: CompletionService
    metrics: Metrics
    clock: Clock
    router: ProviderRouter

    def client(self, key: str = KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def metric(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "waddle_ai_completions_total", {"transport": "http", "outcome": outcome})
        return value or 0.0


ApiFactory = Callable[..., contextlib.AbstractAsyncContextManager[Api]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as server:
        yield server


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(models=["gpt-oss:20b", "llama3.2:latest"]) as server:
        yield server


def ollama(fake: FakeProvider, timeout_s: float = 5.0) -> OllamaProvider:
    return OllamaProvider(base_url=fake.url, model="llama3.2", timeout_s=timeout_s)


def waddleai(fake: FakeProvider, timeout_s: float = 5.0) -> OpenAICompatProvider:
    return OpenAICompatProvider(base_url=fake.url, api_key=UPSTREAM_KEY, timeout_s=timeout_s)


@pytest.fixture
def serve() -> ApiFactory:
    """`async with serve({OLLAMA: provider}) as api`: the sidecar with the API, on a real port."""

    @contextlib.asynccontextmanager
    async def build(
        providers: dict[ProviderName, Provider],
        *,
        chain: Sequence[ProviderName] | None = None,
        keys: Sequence[str] = (KEY, OTHER_KEY),
        temperature: float = 0.7,
        max_tokens: int = 500,
        max_concurrent: int = 32,
    ) -> AsyncIterator[Api]:
        metrics = Metrics()
        clock = Clock()
        router = ProviderRouter(providers, metrics, clock=clock)
        service = CompletionService(
            router, default_chain=list(chain or providers), default_temperature=temperature,
            default_max_tokens=max_tokens, metrics=metrics, secrets=[UPSTREAM_KEY, *keys],
            clock=clock)

        async def ready() -> tuple[bool, dict[str, Any]]:
            return True, {}

        sidecar = Sidecar(host="127.0.0.1", port=0, metrics=metrics, readiness=ready,
                          extra_routes=completion_routes(service, keys, metrics,
                                                         max_concurrent=max_concurrent))
        await sidecar.start()
        try:
            yield Api(f"http://127.0.0.1:{sidecar.bound_port}", service, metrics, clock, router)
        finally:
            await sidecar.stop()
            await router.aclose()

    return build


async def post_raw(
    url: str, body: bytes, *, key: str | None = KEY, path: str = "/v1/chat/completions"
) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as session, session.post(
        url + path, data=body, headers=headers
    ) as response:
        return response.status, orjson.loads(await response.read()), dict(response.headers)


async def read_text(stream: AsyncIterator[Any], into: list[str]) -> None:
    """Collect a stream's text as it comes, so what arrived before an error is kept."""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            into.append(chunk.choices[0].delta.content)


def chat_paths(fake: FakeProvider) -> list[str]:
    return [r.path for r in fake.requests if r.path in ("/api/chat", "/v1/chat/completions")]


# -- answers -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ollama", "waddleai"])
async def test_plain_completion(serve: ApiFactory, fake: FakeProvider, kind: str) -> None:
    provider = ollama(fake) if kind == "ollama" else waddleai(fake)
    name = OLLAMA if kind == "ollama" else WADDLEAI
    async with serve({name: provider}) as api, api.client() as client:
        first = await client.chat.completions.create(model="auto", messages=HELLO)
        second = await client.chat.completions.create(model="auto", messages=HELLO)

    assert first.object == "chat.completion"
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content == DEFAULT_REPLY
    assert first.choices[0].finish_reason == "stop"
    # The model that answered: Ollama echoes what it was asked, the proxy resolves `auto`.
    assert first.model == ("llama3.2" if kind == "ollama" else "llama3.2:latest")
    assert first.usage is not None
    assert (first.usage.prompt_tokens, first.usage.completion_tokens,
            first.usage.total_tokens) == (HELLO_PROMPT_TOKENS, REPLY_TOKENS,
                                          HELLO_PROMPT_TOKENS + REPLY_TOKENS)
    assert first.id.startswith("chatcmpl-")
    assert second.id.startswith("chatcmpl-")
    assert first.id != second.id
    assert api.metric("ok") == 2


@pytest.mark.parametrize("kind", ["ollama", "waddleai"])
async def test_streamed_completion(serve: ApiFactory, fake: FakeProvider, kind: str) -> None:
    provider = ollama(fake) if kind == "ollama" else waddleai(fake)
    name = OLLAMA if kind == "ollama" else WADDLEAI
    async with serve({name: provider}) as api, api.client() as client:
        stream = await client.chat.completions.create(
            model="auto", messages=HELLO, stream=True)
        chunks = [chunk async for chunk in stream]

        with_usage = await client.chat.completions.create(
            model="auto", messages=HELLO, stream=True,
            stream_options={"include_usage": True})
        usage_chunks = [chunk async for chunk in with_usage]

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_REPLY
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == REPLY_TOKENS
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.usage is None for c in chunks)

    last = usage_chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        HELLO_PROMPT_TOKENS, REPLY_TOKENS)
    assert usage_chunks[-2].choices[0].finish_reason == "stop"
    assert usage_chunks[0].id != chunks[0].id
    assert api.metric("ok") == 2


async def test_stream_goes_over_the_wire_as_sse(serve: ApiFactory, fake: FakeProvider) -> None:
    async with serve({OLLAMA: ollama(fake)}) as api, aiohttp.ClientSession() as session:
        body = orjson.dumps({"messages": HELLO, "stream": True})
        async with session.post(f"{api.url}/v1/chat/completions", data=body,
                                headers={"Authorization": f"Bearer {KEY}"}) as response:
            raw = (await response.read()).decode()
            content_type = response.headers["Content-Type"]
    assert content_type.startswith("text/event-stream")
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert raw.endswith("data: [DONE]\n\n")


async def test_alias_path_answers_the_same(serve: ApiFactory, fake: FakeProvider) -> None:
    async with serve({OLLAMA: ollama(fake)}) as api:
        status, body, _ = await post_raw(
            api.url, orjson.dumps({"model": "auto", "messages": HELLO}),
            path="/api/v1/ai/chat/completions")
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == DEFAULT_REPLY
    assert body["usage"]["total_tokens"] == HELLO_PROMPT_TOKENS + REPLY_TOKENS


async def test_fallback_answers_when_the_primary_is_down(
    serve: ApiFactory, fake: FakeProvider, fake_openai: FakeProvider
) -> None:
    fake.status = 500
    async with serve({OLLAMA: ollama(fake), WADDLEAI: waddleai(fake_openai)}) as api, \
            api.client() as client:
        plain = await client.chat.completions.create(model="auto", messages=HELLO)
        stream = await client.chat.completions.create(
            model="auto", messages=HELLO, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert plain.choices[0].message.content == DEFAULT_REPLY
    assert plain.model == "gpt-oss:20b"
    assert text == DEFAULT_REPLY
    assert len(chat_paths(fake)) == 2  # one failed call each, then the fallback answered
    fallbacks = api.metrics.registry.get_sample_value(
        "waddle_ai_fallbacks_total", {"primary": "ollama", "fallback": "waddleai"})
    assert fallbacks == 2


# -- what the provider is asked --------------------------------------------------


async def test_temperature_and_max_tokens_reach_ollama(
    serve: ApiFactory, fake: FakeProvider
) -> None:
    async with serve({OLLAMA: ollama(fake)}, temperature=0.4, max_tokens=321) as api, \
            api.client() as client:
        limited = await client.chat.completions.create(
            model="auto", messages=HELLO, temperature=1.3, max_tokens=2)
        asked = fake.last.json
        await client.chat.completions.create(
            model="auto", messages=HELLO, max_completion_tokens=7)
        newer = fake.last.json
        await client.chat.completions.create(model="auto", messages=HELLO)
        defaults = fake.last.json

    assert asked["options"] == {"temperature": 1.3, "num_predict": 2}
    assert limited.choices[0].finish_reason == "length"
    assert limited.choices[0].message.content == "Hello there,"
    assert limited.usage is not None
    assert limited.usage.completion_tokens == 2
    assert newer["options"] == {"temperature": 0.4, "num_predict": 7}
    assert defaults["options"] == {"temperature": 0.4, "num_predict": 321}


async def test_temperature_and_max_tokens_reach_an_openai_backend(
    serve: ApiFactory, fake: FakeProvider
) -> None:
    async with serve({WADDLEAI: waddleai(fake)}) as api, api.client() as client:
        stream = await client.chat.completions.create(
            model="auto", messages=HELLO, temperature=0.0, max_tokens=1,
            stream=True)
        chunks = [c async for c in stream]
    asked = fake.last.json
    assert (asked["temperature"], asked["max_tokens"]) == (0.0, 1)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"


async def test_message_forms_reach_the_provider(serve: ApiFactory, fake: FakeProvider) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello "},
                                     {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "how are you?"},
    ]
    async with serve({OLLAMA: ollama(fake)}) as api:
        status, _, _ = await post_raw(api.url, orjson.dumps(
            {"messages": messages, "user": "alice", "community_id": "penguin-club",
             "some_future_field": {"ignored": True}, "n": 1}))
    assert status == 200
    assert fake.last.json["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "how are you?"},
    ]


async def test_model_routing(
    serve: ApiFactory, fake: FakeProvider, fake_openai: FakeProvider
) -> None:
    async with serve({OLLAMA: ollama(fake), WADDLEAI: waddleai(fake_openai)}) as api, \
            api.client() as client:
        listed_by_second = await client.chat.completions.create(
            model="gpt-oss:20b", messages=HELLO)
        listed_by_both = await client.chat.completions.create(
            model="qwen3:0.6b", messages=HELLO)
        unknown = await client.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO)
        short_name = await client.chat.completions.create(
            model="llama3.2", messages=HELLO)

    # A model only the second provider lists goes there, with that name.
    assert listed_by_second.model == "gpt-oss:20b"
    assert fake_openai.requests[-1].json["model"] == "gpt-oss:20b"
    assert len(chat_paths(fake_openai)) == 1
    # The primary listed it (the fake Ollama lists qwen3:0.6b): the primary answers.
    assert listed_by_both.model == "qwen3:0.6b"
    # An unknown model: the default chain with its default model.
    assert unknown.model == "llama3.2"
    # The primary's default model name needs no listing.
    assert short_name.model == "llama3.2"
    assert [r.json["model"] for r in fake.requests if r.path == "/api/chat"] == [
        "qwen3:0.6b", "llama3.2", "llama3.2"]


# -- models --------------------------------------------------------------------------


async def test_models_are_listed_and_cached(
    serve: ApiFactory, fake: FakeProvider, fake_openai: FakeProvider
) -> None:
    async with serve({OLLAMA: ollama(fake), WADDLEAI: waddleai(fake_openai)}) as api, \
            api.client() as client:
        first = await client.models.list()
        second = await client.models.list()
        calls_before_expiry = (
            [r.path for r in fake.health_requests],
            [r.path for r in fake_openai.health_requests])
        api.clock.now += 3601
        await client.models.list()

    ids = [model.id for model in first.data]
    assert ids == ["llama3.2:latest", "qwen3:0.6b", "gpt-oss:20b"]  # each model once
    assert {m.id: m.owned_by for m in first.data} == {
        "llama3.2:latest": "ollama", "qwen3:0.6b": "ollama", "gpt-oss:20b": "waddleai"}
    assert all(m.object == "model" and m.created > 0 for m in first.data)
    assert [m.id for m in second.data] == ids
    assert calls_before_expiry == (["/api/tags"], ["/v1/models"])
    assert [r.path for r in fake.health_requests] == ["/api/tags", "/api/tags"]


async def test_a_failing_provider_is_left_out_of_the_models(
    serve: ApiFactory, fake: FakeProvider, fake_openai: FakeProvider
) -> None:
    fake.status = 500
    async with serve({OLLAMA: ollama(fake), WADDLEAI: waddleai(fake_openai)}) as api, \
            api.client() as client:
        models = await client.models.list()
        fake.status = None
        still_cached = await client.models.list()
        api.clock.now += 31  # a failed listing is retried well before the hour
        recovered = await client.models.list()
    assert [m.id for m in models.data] == ["gpt-oss:20b", "llama3.2:latest"]
    assert [m.id for m in still_cached.data] == ["gpt-oss:20b", "llama3.2:latest"]
    assert [m.id for m in recovered.data] == ["llama3.2:latest", "qwen3:0.6b", "gpt-oss:20b"]


# -- keys ---------------------------------------------------------------------------


async def test_wrong_or_missing_key_is_refused(serve: ApiFactory, fake: FakeProvider) -> None:
    async with serve({OLLAMA: ollama(fake)}) as api:
        async with api.client("wk-wrong-key") as client:
            with pytest.raises(openai.AuthenticationError) as refused:
                await client.chat.completions.create(model="auto", messages=HELLO)
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        async with api.client(OTHER_KEY) as client:  # every configured key works
            answer = await client.chat.completions.create(model="auto", messages=HELLO)
        status, body, headers = await post_raw(api.url, orjson.dumps({"messages": HELLO}),
                                               key=None)
    assert refused.value.code == "invalid_api_key"
    assert "wk-wrong-key" not in str(refused.value.body)
    assert answer.choices[0].message.content == DEFAULT_REPLY
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert headers["WWW-Authenticate"] == "Bearer"
    assert len(chat_paths(fake)) == 1  # refused requests never reach a provider


async def test_without_configured_keys_everything_is_refused(
    serve: ApiFactory, fake: FakeProvider
) -> None:
    async with serve({OLLAMA: ollama(fake)}, keys=["", "  "]) as api:
        async with api.client("anything") as client:
            with pytest.raises(openai.AuthenticationError) as refused:
                await client.chat.completions.create(model="auto", messages=HELLO)
        # A blank key in the settings must not make an empty bearer token valid.
        status, _, _ = await post_raw(api.url, orjson.dumps({"messages": HELLO}), key="")
    assert refused.value.code == "invalid_api_key"
    assert "API_KEYS" in refused.value.message
    assert status == 401
    assert fake.calls == 0


# -- limits and bad requests ------------------------------------------------------------


async def test_request_limits(serve: ApiFactory, fake: FakeProvider) -> None:
    async with serve({OLLAMA: ollama(fake)}) as api:
        big = orjson.dumps({"messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]})
        too_big = await post_raw(api.url, big)
        many = [{"role": "user", "content": "hi"}] * 101
        too_many = await post_raw(api.url, orjson.dumps({"messages": many}))
        hundred = await post_raw(api.url, orjson.dumps({"messages": many[:100]}))
        long_text = [{"role": "user", "content": "x" * (MAX_CONTENT_CHARS + 1)}]
        too_long = await post_raw(api.url, orjson.dumps({"messages": long_text}))
        async with api.client() as client:
            with pytest.raises(openai.BadRequestError) as sdk_refused:
                await client.chat.completions.create(model="auto", messages=many)

    assert too_big[0] == 413
    assert too_big[1]["error"]["code"] == "request_too_large"
    assert too_big[1]["error"]["type"] == "invalid_request_error"
    assert too_many[0] == 400
    assert too_many[1]["error"]["code"] == "too_many_messages"
    assert too_many[1]["error"]["param"] == "messages"
    assert hundred[0] == 200
    assert too_long[0] == 400
    assert too_long[1]["error"]["code"] == "content_too_long"
    assert sdk_refused.value.code == "too_many_messages"
    assert len(chat_paths(fake)) == 1


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_request"),
    (b'{"model": "auto"}', "invalid_request"),
    (b'{"messages": []}', "invalid_request"),
    (b'{"messages": [{"role": "tool", "content": "x"}]}', "invalid_request"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     "unsupported_content"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "unsupported_n"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}',
     "invalid_request"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "invalid_request"),
])
async def test_bad_requests_get_openai_errors(
    serve: ApiFactory, fake: FakeProvider, body: bytes, code: str
) -> None:
    async with serve({OLLAMA: ollama(fake)}) as api:
        status, answer, _ = await post_raw(api.url, body)
        counted = api.metric(code)
    assert status == 400
    assert set(answer["error"]) >= {"message", "type", "code"}
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["code"] == code
    assert answer["error"]["message"]
    assert counted == 1
    assert fake.calls == 0


# -- provider failures ---------------------------------------------------------------------


async def test_provider_server_error_is_a_gateway_error(
    serve: ApiFactory, fake: FakeProvider
) -> None:
    fake.status = 500
    async with serve({OLLAMA: ollama(fake)}) as api, api.client() as client:
        with pytest.raises(openai.APIStatusError) as plain:
            await client.chat.completions.create(model="auto", messages=HELLO)
        # Before the first chunk a streamed request still gets a real status.
        with pytest.raises(openai.APIStatusError) as streamed:
            await client.chat.completions.create(
                model="auto", messages=HELLO, stream=True)
        fake.status = None
        fake.garbage = True
        with pytest.raises(openai.APIStatusError) as garbled:
            await client.chat.completions.create(model="auto", messages=HELLO)

    for error in (plain.value, streamed.value):
        assert error.status_code == 503
        assert error.body == {
            "message": "the AI provider 'ollama' is unavailable; try again later",
            "type": "server_error", "param": None, "code": "provider_unavailable"}
    assert garbled.value.status_code == 502
    assert garbled.value.code == "provider_bad_output"
    assert garbled.value.type == "api_error"


async def test_rate_limit_passes_through_with_retry_after(
    serve: ApiFactory, fake: FakeProvider
) -> None:
    fake.status = 429
    fake.retry_after = "7"
    async with serve({WADDLEAI: waddleai(fake)}) as api, api.client() as client:
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="auto", messages=HELLO)
    assert limited.value.status_code == 429
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.code == "rate_limit_exceeded"
    assert "rate limit exceeded" in limited.value.message


async def test_requests_past_the_concurrency_limit_get_429_at_once(
    serve: ApiFactory, fake: FakeProvider
) -> None:
    fake.latency_s = 1.0
    async with serve({OLLAMA: ollama(fake)}, max_concurrent=2) as api:
        async def ask() -> tuple[int, dict[str, Any], dict[str, str]]:
            return await post_raw(api.url, orjson.dumps({"model": "auto", "messages": HELLO}))

        first = asyncio.create_task(ask())
        second = asyncio.create_task(ask())
        while fake.in_flight < 2:  # noqa: ASYNC110 - polling the fake's own counter
            await asyncio.sleep(0.01)
        status, body, headers = await ask()
        assert status == 429
        assert headers["Retry-After"] == "1"
        assert body["error"]["code"] == "too_many_concurrent_requests"
        # Meanwhile a caller without a key learns nothing about the load.
        assert (await post_raw(api.url, b"{}", key=None))[0] == 401
        assert [(await first)[0], (await second)[0]] == [200, 200]
        assert (await ask())[0] == 200  # the slots are free again
    assert fake.calls == 3
    assert api.metric("too_many_concurrent_requests") == 1


async def test_streams_go_through_the_circuit_breaker(
    serve: ApiFactory, fake: FakeProvider
) -> None:
    """Failed streams open the provider's circuit, as failed chat replies do; while it is
    open a stream is refused at once, without calling the provider."""
    fake.status = 500
    async with serve({OLLAMA: ollama(fake)}) as api, api.client() as client:
        router = api.router
        threshold = DEFAULT_FAILURE_THRESHOLD
        for _ in range(threshold):
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(model="auto", messages=HELLO, stream=True)
        assert router.breaker_state(OLLAMA) == "open"
        fake.status = None
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(model="auto", messages=HELLO, stream=True)
        assert refused.value.status_code == 503
    assert fake.calls == threshold


async def test_a_good_stream_closes_a_half_open_circuit(
    serve: ApiFactory, fake: FakeProvider
) -> None:
    async with serve({OLLAMA: ollama(fake)}) as api, api.client() as client:
        router = api.router
        breaker = router.breaker(OLLAMA)
        for _ in range(DEFAULT_FAILURE_THRESHOLD):
            ticket = breaker.allow()
            assert ticket is not None
            ticket.record_failure(ProviderUnavailable("ollama", "down"))
        assert router.breaker_state(OLLAMA) == "open"
        api.clock.now += DEFAULT_OPEN_S  # its open time is over: the next call probes
        stream = await client.chat.completions.create(model="auto", messages=HELLO, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Hello there, friend!"
        assert router.breaker_state(OLLAMA) == "closed"


async def test_timeout_is_a_gateway_timeout(serve: ApiFactory, fake: FakeProvider) -> None:
    fake.latency_s = 2.0
    async with serve({OLLAMA: ollama(fake, timeout_s=0.3)}) as api, api.client() as client:
        with pytest.raises(openai.APIStatusError) as timed_out:
            await client.chat.completions.create(model="auto", messages=HELLO)
    assert timed_out.value.status_code == 504
    assert timed_out.value.code == "provider_timeout"


async def test_refused_request_is_a_bad_request_and_keys_never_leak(
    serve: ApiFactory, fake: FakeProvider
) -> None:
    fake.status = 400
    fake.error_message = f"model not found for key {UPSTREAM_KEY} / {KEY}"
    async with serve({WADDLEAI: waddleai(fake)}) as api:
        async with api.client() as client:
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(model="auto", messages=HELLO)
        status, body, _ = await post_raw(api.url, orjson.dumps({"messages": HELLO}))
    assert refused.value.code == "provider_bad_request"
    assert "model not found" in refused.value.message
    raw = orjson.dumps(body).decode()
    assert status == 400
    assert UPSTREAM_KEY not in raw
    assert KEY not in raw
    assert UPSTREAM_KEY not in refused.value.message


async def test_error_mid_stream_is_an_error_event(serve: ApiFactory, fake: FakeProvider) -> None:
    fake.reply_text = "one two three four five six"
    fake.midstream_error = True
    async with serve({OLLAMA: ollama(fake)}) as api:
        async with api.client() as client:
            stream = await client.chat.completions.create(
                model="auto", messages=HELLO, stream=True)
            received: list[str] = []
            with pytest.raises(openai.APIError) as broken:
                await read_text(stream, received)

        async with aiohttp.ClientSession() as session, session.post(
            f"{api.url}/v1/chat/completions",
            data=orjson.dumps({"messages": HELLO, "stream": True}),
            headers={"Authorization": f"Bearer {KEY}"},
        ) as response:
            status = response.status
            events = [e for e in (await response.read()).decode().split("\n\n") if e]
        counted = api.metric("provider_unavailable")

    assert "".join(received) == "one two three"  # what came before the error
    assert broken.value.body == {
        "message": "the AI provider 'ollama' is unavailable; try again later",
        "type": "server_error", "param": None, "code": "provider_unavailable"}
    assert status == 200
    assert orjson.loads(events[-2].removeprefix("data: "))["error"]["code"] == (
        "provider_unavailable")
    assert events[-1] == "data: [DONE]"
    assert counted == 2


async def test_stream_is_released_when_the_client_leaves(
    serve: ApiFactory, fake: FakeProvider
) -> None:
    fake.default = Behaviour(reply_text="word " * 200, chunk_delay_s=0.01)
    async with serve({OLLAMA: ollama(fake)}) as api:
        async with api.client() as client:
            stream = await client.chat.completions.create(
                model="auto", messages=HELLO, stream=True)
            async for _ in stream:
                break
            await stream.close()
        # The whole answer takes 2 s; the provider's stream is closed long before.
        async with asyncio.timeout(1.0):
            while True:
                if fake.in_flight == 0:
                    break
                await asyncio.sleep(0.02)
        # The next request is served normally: nothing was left holding the provider.
        fake.default = Behaviour()
        status, body, _ = await post_raw(api.url, orjson.dumps({"messages": HELLO}))
    assert status == 200
    assert body["choices"][0]["message"]["content"] == DEFAULT_REPLY
    assert api.metric("client_disconnected") == 1


async def test_metrics_count_http_completions(serve: ApiFactory, fake: FakeProvider) -> None:
    async with serve({OLLAMA: ollama(fake)}) as api:
        async with api.client() as client:
            await client.chat.completions.create(model="auto", messages=HELLO)
        async with api.client("nope") as client:
            with pytest.raises(openai.AuthenticationError):
                await client.chat.completions.create(model="auto", messages=HELLO)
        async with aiohttp.ClientSession() as session, session.get(
                f"{api.url}/metrics") as response:
            text = await response.text()
    assert 'waddle_ai_completions_total{outcome="ok",transport="http"} 1.0' in text
    assert 'waddle_ai_completions_total{outcome="invalid_api_key",transport="http"} 1.0' in text
    assert "waddle_ai_completion_seconds_bucket" in text
