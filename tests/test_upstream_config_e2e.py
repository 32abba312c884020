"""Providers as their operators configure them, end to end against the fake servers.

- Ollama's own forms of OLLAMA_HOST and OLLAMA_KEEP_ALIVE reach a server that
  parses `keep_alive` and `think` as strictly as Ollama does (worker as a
  subprocess: the settings are read from the environment, as in production).
- A thinking model answers because `think: false` is sent.
- A reply cut by the token limit keeps its whole sentences, or is not posted.
- A provider refusing the worker's key (401/403) is the operator's problem:
  its circuit opens, fallbacks answer, /readyz and an ERROR line say so, the
  completions API answers 502 `upstream_auth_failed`, and no event is
  dead-lettered as a bad request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from broker.topology import Topology
from config.settings import Settings
from schemas import headers
from tests.conftest import (
    AMQP_URL,
    LONG_DELAY_MS,
    REDIS_URL,
    capture_logs,
    get_dead_letters,
    queue_depth,
    running_worker,
)
from tests.fake_provider import FakeProvider
from tests.worker_process import WorkerLauncher
from worker.app import App
from worker.client import RouterClient, make_event

REPLY_TIMEOUT_S = 20.0
API_KEY = "test-completions-key"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as provider:
        yield provider


@pytest.fixture
async def fallback() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as provider:
        yield provider


async def sidecar_get(app: App, path: str) -> tuple[int, Any]:
    assert app.sidecar is not None
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{app.sidecar.bound_port}{path}",
            headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        return response.status, await response.json()


async def ask_completion(app: App, **body: Any) -> tuple[int, Any]:
    assert app.sidecar is not None
    request = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **body}
    async with aiohttp.ClientSession() as http, http.post(
            f"http://127.0.0.1:{app.sidecar.bound_port}/v1/chat/completions", json=request,
            headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        return response.status, await response.json()


# -- Ollama's forms, through a worker process ----------------------------------


@pytest.mark.parametrize(("host", "extra", "keep_alive", "sent"), [
    # Ollama's docs and CLI: host:port. Once built as http://127.0.0.1:PORT:PORT.
    ("127.0.0.1:{port}", {}, "-1", -1),
    (":{port}", {}, "3600", 3600),
    ("127.0.0.1", {"OLLAMA_PORT": "{port}"}, "1h30m", "1h30m"),
])
async def test_ollama_configured_as_ollama_documents_it_answers(
    fake: FakeProvider, router_client: RouterClient, prefix: str, tmp_path: Path,
    host: str, extra: dict[str, str], keep_alive: str, sent: str | int,
) -> None:
    """A thinking model behind OLLAMA_HOST=host:port, kept loaded with OLLAMA_KEEP_ALIVE=-1.

    The fake refuses `keep_alive: "-1"` as Ollama does (400, missing unit),
    and its model thinks away the whole budget unless told `think: false`.
    """
    fake.thinking_model = True
    fake.reply_text = "Welcome in, friend!"
    port = fake.url.rsplit(":", 1)[1]
    launcher = WorkerLauncher(
        tmp_path, AMQP_URL=AMQP_URL, QUEUE_PREFIX=prefix, REDIS_URL=REDIS_URL,
        AI_PROVIDER="ollama", OLLAMA_HOST=host.format(port=port), OLLAMA_KEEP_ALIVE=keep_alive,
        RETRY_DELAYS_MS="100,200", USER_COOLDOWN_S="0", CHANNEL_COOLDOWN_S="0",
        **{name: value.format(port=port) for name, value in extra.items()})
    try:
        worker = await launcher.start()
        event = make_event("hello everyone")
        await router_client.publish(event)
        reply = await router_client.wait_for(event["event_id"], REPLY_TIMEOUT_S)
        assert reply is not None, worker.log_tail()
    finally:
        await launcher.aclose()
    assert reply["response"] == "🤖 Welcome in, friend!"
    assert reply["provider"] == "ollama"
    chat = [r for r in fake.requests if r.path == "/api/chat"][-1]
    assert chat.json["keep_alive"] == sent
    assert chat.json["think"] is False


async def test_think_is_sent_as_configured(
    make_settings: Callable[..., Settings], fake: FakeProvider, router_client: RouterClient,
    topology: Topology,
) -> None:
    """OLLAMA_THINK=true on a thinking model: its budget goes on reasoning, as the
    operator's report described; the event is dead-lettered `empty_output`, never posted."""
    fake.thinking_model = True
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url, ollama_think="true")
    async with running_worker(settings):
        await router_client.publish(make_event("hello?"))
        [letter] = await get_dead_letters(topology, 1, timeout_s=REPLY_TIMEOUT_S)
    assert fake.last.json["think"] is True
    assert letter.headers[headers.ERROR_TYPE] == "empty_output"
    assert "cut by the token limit" in letter.headers[headers.ERROR]

    settings = make_settings(ai_provider="ollama", ollama_host=fake.url, ollama_think="high")
    fake.thinking_model = False
    async with running_worker(settings):
        await router_client.publish(make_event("hello?"))
        assert await router_client.next_reply(REPLY_TIMEOUT_S)
    assert fake.last.json["think"] == "high"


# -- replies cut by the token limit ---------------------------------------------


@pytest.mark.parametrize("provider", ["ollama", "waddleai"])
async def test_a_reply_cut_by_the_token_limit_keeps_whole_sentences(
    make_settings: Callable[..., Settings], fake: FakeProvider, router_client: RouterClient,
    topology: Topology, provider: str,
) -> None:
    """`done_reason: length` (Ollama) and `finish_reason: length` (OpenAI): same treatment."""
    settings = make_settings(ai_provider=provider, ollama_host=fake.url,
                             waddleai_base_url=fake.url, ai_max_tokens=6)
    async with running_worker(settings):
        # Six words fit: "Hello there, friend! Nice to see" -> the last whole sentence.
        fake.reply_text = "Hello there, friend! Nice to see you here today."
        first = make_event("hello?")
        await router_client.publish(first)
        reply = await router_client.wait_for(first["event_id"], REPLY_TIMEOUT_S)
        assert reply is not None
        assert reply["response"] == "🤖 Hello there, friend!"

        # No sentence ends within the budget: nothing is posted, mid-word or not.
        fake.reply_text = "Well I think that the answer to your question is forty two."
        second = make_event("what is it?")
        await router_client.publish(second)
        [letter] = await get_dead_letters(topology, 1, timeout_s=REPLY_TIMEOUT_S)
    assert orjson.loads(letter.body)["event_id"] == second["event_id"]
    assert letter.headers[headers.ERROR_TYPE] == "empty_output"
    assert "cut by the token limit" in letter.headers[headers.ERROR]


async def test_an_answer_that_ends_in_time_is_not_trimmed(
    make_settings: Callable[..., Settings], fake: FakeProvider, router_client: RouterClient,
) -> None:
    """Only a cut answer loses its tail: a finished one keeps its last words."""
    fake.reply_text = "Hello there, friend! Nice to see you"
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url)
    async with running_worker(settings):
        await router_client.publish(make_event("hello?"))
        message = await router_client.next_reply(REPLY_TIMEOUT_S)
    assert orjson.loads(message.body)["response"] == "🤖 Hello there, friend! Nice to see you"


# -- the upstream refuses our key -------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_key_opens_the_circuit_and_fallbacks_answer(
    make_settings: Callable[..., Settings], fake: FakeProvider, fallback: FakeProvider,
    router_client: RouterClient, status: int,
) -> None:
    fake.status = status
    fake.error_message = f"Incorrect API key provided: {UPSTREAM_KEY}"
    fallback.reply_text = "The fallback says hi!"
    settings = make_settings(
        ai_provider="waddleai", waddleai_base_url=fake.url, waddleai_api_key=UPSTREAM_KEY,
        ai_fallback_providers="ollama", ollama_host=fallback.url, api_keys=API_KEY)
    with capture_logs(logging.INFO) as logs:
        async with running_worker(settings) as app:
            replies = []
            for text in ("hello?", "anyone there?"):
                event = make_event(text)
                await router_client.publish(event)
                replies.append(await router_client.wait_for(event["event_id"], REPLY_TIMEOUT_S))
            ready_status, ready = await sidecar_get(app, "/readyz")
            api_status, answer = await ask_completion(app)
    chats = [r for r in fake.requests if r.path == "/v1/chat/completions"]
    assert len(chats) == 1, "one refusal opens the circuit: the second event skips waddleai"
    assert [r["provider"] if r else None for r in replies] == ["ollama", "ollama"]
    assert ready_status == 200  # the replica still answers, through its fallback
    entry = ready["providers"]["waddleai"]
    assert entry["circuit"] == "open"
    assert entry["ok"] is False
    assert entry["error_type"] == "upstream_auth_failed"
    assert UPSTREAM_KEY not in orjson.dumps(ready).decode()
    assert api_status == 200
    assert answer["model"] in fallback.models or answer["model"] == "llama3.2"

    records = [orjson.loads(line) for line in logs.getvalue().splitlines()]
    errors = [r for r in records if r.get("severity") == "error"
              and r.get("error_type") == "upstream_auth_failed"]
    assert errors, "an ERROR line names the refused provider"
    assert errors[0]["provider"] == "waddleai"
    assert errors[0]["status"] == status
    assert f"HTTP {status}" in errors[0]["message"]
    assert UPSTREAM_KEY not in logs.getvalue()


async def test_a_refused_key_without_fallback_is_a_502_and_no_bad_request(
    make_settings: Callable[..., Settings], fake: FakeProvider, router_client: RouterClient,
    long_delay_cleanup: Topology,
) -> None:
    """No fallback: the event waits in the delay queue (not the DLQ), the API says 502."""
    fake.status = 401
    settings = make_settings(
        ai_provider="waddleai", waddleai_base_url=fake.url, waddleai_api_key=UPSTREAM_KEY,
        api_keys=API_KEY, retry_delays_ms=[LONG_DELAY_MS])
    topology = long_delay_cleanup
    async with running_worker(settings) as app:
        await router_client.publish(make_event("hello?"))
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            while await queue_depth(topology.retry_queues[0]) < 1:  # noqa: ASYNC110 - a broker count
                await asyncio.sleep(0.05)
        retried = app.metrics.registry.get_sample_value(
            "waddle_ai_retries_total",
            {"delay_ms": str(LONG_DELAY_MS), "error_type": "upstream_auth_failed"})
        # Twice: the first refusal opens the circuit; the second call finds it open
        # and must still say why, not "unavailable".
        first = await ask_completion(app)
        second = await ask_completion(app, stream=True)
        models_status, models = await sidecar_get(app, "/v1/models")
    assert retried == 1
    assert await queue_depth(topology.dead_letter_queue) == 0
    for status, body in (first, second):
        assert status == 502
        assert body["error"]["code"] == "upstream_auth_failed"
        assert body["error"]["type"] == "upstream_auth_failed"
        assert UPSTREAM_KEY not in orjson.dumps(body).decode()
    assert models_status == 502, models
    assert models["error"]["code"] == "upstream_auth_failed"
