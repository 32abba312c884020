"""Communities end to end: a running worker reading its config from PostgreSQL.

The worker, PostgreSQL, RabbitMQ and Redis are real; two fake providers on
loopback stand for the deployment's Ollama and a community's own
OpenAI-compatible endpoint.
"""

from __future__ import annotations

import asyncio
import io
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aio_pika
import asyncpg
import openai
import orjson
import pytest

from config.database import create_pool
from config.migrate import migrate
from config.repository import ConfigRepository
from config.secrets import KeyBox, generate_key
from config.settings import Settings
from tests.conftest import AMQP_URL, capture_logs, running_worker
from tests.fake_provider import FakeProvider
from worker.app import App
from worker.client import RouterClient, make_event

REPLY_S = 15.0
COMMUNITY_KEY = "sk-community-0123456789abcdef"


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeProvider, FakeProvider]]:
    async with FakeProvider() as default, FakeProvider() as own:
        default.reply_text = "default provider here"
        own.reply_text = "community endpoint here"
        yield default, own


@pytest.fixture
def encryption_key() -> str:
    return generate_key()


@pytest.fixture
async def repository(schema_dsn: str, encryption_key: str) -> AsyncIterator[ConfigRepository]:
    pool = await create_pool(schema_dsn, max_size=2)
    await migrate(pool)
    try:
        yield ConfigRepository(pool, KeyBox.from_setting(encryption_key))
    finally:
        await pool.close()


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """At DEBUG: a provider key must not appear at any level."""
    with capture_logs(logging.DEBUG) as stream:
        yield stream


@pytest.fixture
def community_settings(
    make_settings: Callable[..., Settings], schema_dsn: str, encryption_key: str,
    fakes: tuple[FakeProvider, FakeProvider],
) -> Settings:
    default, _ = fakes
    return make_settings(ai_provider="ollama", ollama_host=default.url, database_url=schema_dsn,
                         config_encryption_key=encryption_key, api_keys="key-one,key-two")


async def reply_for(client: RouterClient, event: dict[str, Any]) -> dict[str, Any]:
    await client.publish(event)
    reply = await client.wait_for(event["event_id"], REPLY_S)
    assert reply is not None, f"no reply to {event['message_content']!r}"
    return reply


async def no_reply(client: RouterClient, event: dict[str, Any], seconds: float = 1.0) -> bool:
    await client.publish(event)
    return await client.wait_for(event["event_id"], seconds) is None


def no_reply_count(app: App, reason: str) -> float:
    value = app.metrics.registry.get_sample_value("waddle_ai_no_reply_total", {"reason": reason})
    return value or 0.0


async def test_a_community_gets_its_persona_endpoint_key_and_model(
    community_settings: Settings, repository: ConfigRepository, router_client: RouterClient,
    fakes: tuple[FakeProvider, FakeProvider], captured_logs: io.StringIO,
) -> None:
    default, own = fakes
    await repository.upsert("penguins", {
        "provider": "waddleai", "base_url": own.url, "api_key": COMMUNITY_KEY,
        "system_prompt": "You are Pingu, a penguin who loves fish.",
        "response_prefix": "🐧 ", "model_by_trigger": {"question": "big-model"},
    })
    async with running_worker(community_settings):
        mine = await reply_for(router_client, make_event("what's up?", community="penguins"))
        other = await reply_for(router_client, make_event("what's up?", community="others"))

    assert mine["response"] == "🐧 community endpoint here"
    assert mine["provider"] == "waddleai"
    sent = own.last
    assert sent.headers["Authorization"] == f"Bearer {COMMUNITY_KEY}"
    assert sent.json["model"] == "big-model"
    assert "Pingu" in sent.json["messages"][0]["content"]
    # Everyone else keeps the environment's defaults, and never gets the community's key.
    assert other["response"] == "🤖 default provider here"
    assert other["provider"] == "ollama"
    assert all("Authorization" not in r.headers for r in default.requests)
    # The key never reaches a log line, at any level.
    assert captured_logs.getvalue()
    assert COMMUNITY_KEY not in captured_logs.getvalue()


async def test_each_trigger_is_answered_by_its_own_model(
    community_settings: Settings, repository: ConfigRepository, router_client: RouterClient,
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    """`model_by_trigger`: a greeting, a question and an event to one community each
    reach the provider with the model set for their trigger (or the community's
    `model` for a trigger without one)."""
    _, own = fakes
    await repository.upsert("owls", {
        "provider": "waddleai", "base_url": own.url, "api_key": COMMUNITY_KEY,
        "model": "owl-default",
        "model_by_trigger": {"greeting": "owl-small", "question": "owl-large"},
    })
    async with running_worker(community_settings):
        greeting = await reply_for(router_client, make_event(
            "hello everyone", community="owls", user="a"))
        greeting_model = own.last.json["model"]
        question = await reply_for(router_client, make_event(
            "what game is this?", community="owls", user="b"))
        question_model = own.last.json["model"]
        event = await reply_for(router_client, make_event(
            "", community="owls", user="c", message_type="follow"))
        event_model = own.last.json["model"]
    assert (greeting["trigger"], greeting_model) == ("greeting", "owl-small")
    assert (question["trigger"], question_model) == ("question", "owl-large")
    assert (event["trigger"], event_model) == ("event", "owl-default")
    assert own.calls == 3


async def test_a_config_change_reaches_the_worker_within_a_second(
    community_settings: Settings, repository: ConfigRepository, router_client: RouterClient,
) -> None:
    await repository.upsert("c1", {"response_prefix": "[old] "})
    async with running_worker(community_settings):
        first = await reply_for(router_client, make_event("hi?", community="c1", user="a"))
        await repository.upsert("c1", {"response_prefix": "[new] "})
        await asyncio.sleep(1.0)
        second = await reply_for(router_client, make_event("hi?", community="c1", user="b"))
        await repository.upsert("c1", {"enabled": False})
        await asyncio.sleep(1.0)
        assert await no_reply(router_client, make_event("hi?", community="c1", user="c"))
    assert first["response"].startswith("[old] ")
    assert second["response"].startswith("[new] ")


async def test_a_rate_limited_event_gives_its_cooldowns_back(
    make_settings: Callable[..., Settings], schema_dsn: str, encryption_key: str,
    repository: ConfigRepository, router_client: RouterClient,
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    """An event refused by a rate limit was never answered: the channel cooldown it
    claimed on admission must not silence the channel for everyone else."""
    default, _ = fakes
    settings = make_settings(ai_provider="ollama", ollama_host=default.url,
                             database_url=schema_dsn, config_encryption_key=encryption_key,
                             channel_cooldown_s=60)
    await repository.upsert("limited", {"user_rate_limit": 1, "user_rate_window_s": 60})
    async with running_worker(settings) as app:
        await reply_for(router_client, make_event("why?", community="limited",
                                                  user="v1", channel="a"))
        assert await no_reply(router_client, make_event("why?", community="limited",
                                                        user="v1", channel="b"))
        assert no_reply_count(app, "rate_limited_user") == 1
        # Channel b said nothing, so it is not cooling down: v2 is answered there...
        await reply_for(router_client, make_event("why?", community="limited",
                                                  user="v2", channel="b"))
        # ...while channel a, which did answer, is.
        assert await no_reply(router_client, make_event("why?", community="limited",
                                                        user="v3", channel="a"))
        assert no_reply_count(app, "channel_cooldown") == 1


async def test_rate_limits_blocked_words_and_proactive_chatter(
    community_settings: Settings, repository: ConfigRepository, router_client: RouterClient,
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    default, _ = fakes
    await repository.upsert("limited", {"user_rate_limit": 2, "user_rate_window_s": 60})
    await repository.upsert("strict", {"blocked_words": ["spoiler", "darn"]})
    await repository.upsert("chatty", {
        "proactive_enabled": True, "proactive_probability": 1.0, "proactive_min_length": 10,
        "proactive_rate_limit": 1, "proactive_rate_window_s": 60})
    async with running_worker(community_settings) as app:
        # Two questions a minute for one viewer; a third is refused, another viewer is not.
        for channel in ("a", "b"):
            await reply_for(router_client, make_event("why?", community="limited",
                                                      user="v1", channel=channel))
        assert await no_reply(router_client, make_event("why?", community="limited",
                                                        user="v1", channel="c"))
        await reply_for(router_client, make_event("why?", community="limited", user="v2",
                                                  channel="d"))
        assert no_reply_count(app, "rate_limited_user") == 1

        # A blocked word in the message: no reply; in the answer: masked.
        assert await no_reply(router_client, make_event("any spoiler?", community="strict"))
        default.reply_text = "oh darn, no idea"
        masked = await reply_for(router_client, make_event("ok?", community="strict",
                                                           user="v3", channel="e"))
        assert masked["response"] == "🤖 oh ***, no idea"
        assert no_reply_count(app, "blocked_word") == 1

        # Ordinary chat gets a proactive reply, once per its own limit.
        chat = await reply_for(router_client, make_event(
            "just vibing with the music tonight", community="chatty", user="v4"))
        assert chat["trigger"] == "proactive"
        assert await no_reply(router_client, make_event(
            "still vibing with the music tonight", community="chatty", user="v5", channel="f"))
        assert await no_reply(router_client, make_event("short", community="chatty",
                                                        user="v6", channel="g"))
        assert no_reply_count(app, "rate_limited_proactive") == 1


async def test_turns_are_archived_only_for_communities_that_opt_in(
    community_settings: Settings, repository: ConfigRepository, router_client: RouterClient,
    schema_dsn: str,
) -> None:
    await repository.upsert("keeps", {"persist_context": True})
    await repository.upsert("forgets", {"persist_context": False})
    async with running_worker(community_settings):
        await reply_for(router_client, make_event("remember me?", community="keeps"))
        await reply_for(router_client, make_event("forget me?", community="forgets"))
    connection = await asyncpg.connect(schema_dsn)
    try:
        rows = await connection.fetch(
            "select community_id, role, content from ai_conversation_context order by id")
    finally:
        await connection.close()
    assert [(r["community_id"], r["role"]) for r in rows] == [
        ("keeps", "user"), ("keeps", "assistant")]
    assert rows[0]["content"] == "remember me?"


async def test_the_completions_api_of_a_running_worker(
    community_settings: Settings, router_client: RouterClient,
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    default, _ = fakes
    async with running_worker(community_settings) as app:
        assert app.sidecar is not None
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{app.sidecar.bound_port}/v1", api_key="key-two",
            max_retries=0)
        completion = await client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "say hi"}],
            temperature=0.2, max_tokens=42)
        chunks = [c async for c in await client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "say hi"}], stream=True)]
        wrong = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{app.sidecar.bound_port}/v1", api_key="nope",
            max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "hi"}])
        rpc = await rpc_round_trip(app, {"model": "auto",
                                         "messages": [{"role": "user", "content": "rpc hi"}]})
    assert completion.choices[0].message.content == "default provider here"
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "default provider here")
    assert default.requests[0].json["options"] == {"temperature": 0.2, "num_predict": 42}
    assert rpc["object"] == "chat.completion"
    assert rpc["choices"][0]["message"]["content"] == "default provider here"


async def rpc_round_trip(app: App, request: dict[str, Any]) -> dict[str, Any]:
    """As another service would: publish to `ai.completions` with reply_to, await the answer."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        correlation_id = uuid.uuid4().hex
        await channel.default_exchange.publish(
            aio_pika.Message(orjson.dumps(request), content_type="application/json",
                             reply_to=replies.name, correlation_id=correlation_id),
            routing_key=app.topology.completions_queue)
        async with replies.iterator() as messages:
            async with asyncio.timeout(REPLY_S):
                async for message in messages:
                    await message.ack()
                    if message.correlation_id == correlation_id:
                        answer: dict[str, Any] = orjson.loads(message.body)
                        return answer
    finally:
        await connection.close()
    raise AssertionError("no RPC answer")
