"""End to end: events into the real `ai.interaction`, replies out of the real `ai.responses`.

The worker runs in-process with real RabbitMQ and Redis; the AI is the fake
Ollama/OpenAI server on loopback, so every failure can be injected at the
HTTP level.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest

from broker.topology import Topology
from config.settings import Settings
from context.store import AdmitRequest
from domain.conversation import ConversationKey
from schemas import headers
from schemas.events import Platform
from schemas.replies import Reply, Trigger
from tests.conftest import get_dead_letters, queue_depth, running_worker
from tests.fake_provider import Behaviour, FakeProvider
from worker.app import App
from worker.client import RouterClient, make_event

REPLY_TIMEOUT_S = 15.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as provider:
        yield provider


@pytest.fixture
def ollama_settings(make_settings: Callable[..., Settings], fake: FakeProvider) -> Settings:
    return make_settings(ai_provider="ollama", ollama_host=fake.url, ollama_timeout=2)


async def no_reply_within(client: RouterClient, seconds: float) -> bool:
    try:
        await client.next_reply(seconds)
    except TimeoutError:
        return True
    return False


async def wait_until(condition: Callable[[], bool], timeout_s: float = REPLY_TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polling a plain attribute of the fake
            await asyncio.sleep(0.02)


async def metric_value(app: App, name: str, **labels: str) -> float:
    value = app.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def wait_for_metric(
    app: App, name: str, value: float, timeout_s: float = REPLY_TIMEOUT_S, **labels: str
) -> None:
    """Until the in-process worker's `name` reaches `value` (settled work, not time)."""
    try:
        async with asyncio.timeout(timeout_s):
            while await metric_value(app, name, **labels) < value:  # noqa: ASYNC110 - a metric
                await asyncio.sleep(0.02)
    except TimeoutError:
        current = await metric_value(app, name, **labels)
        raise AssertionError(f"{name}{labels or ''} is {current}, expected {value} "
                             f"within {timeout_s:g} s") from None
    assert await metric_value(app, name, **labels) == value


async def test_hello_gets_one_reply_that_follows_the_contract(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider
) -> None:
    fake.reply_text = "Hey Alice, welcome to the stream!"
    event = make_event("hello everyone", community="c1", platform="twitch", channel="ch1",
                       user="u1", display_name="Alice")
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with running_worker(ollama_settings):
        await router_client.publish(event, headers={headers.TRACEPARENT: traceparent})
        message = await router_client.next_reply(REPLY_TIMEOUT_S)

    reply = orjson.loads(message.body)
    assert message.routing_key == "twitch.c1"
    assert message.correlation_id == event["event_id"]
    assert message.message_id == f"reply:{event['event_id']}"
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2
    assert message.headers[headers.TRACEPARENT] == traceparent
    assert reply["schema_version"] == 1
    assert reply["event_id"] == event["event_id"]
    assert reply["session_id"] == event["event_id"]  # defaults to the event id
    assert (reply["community_id"], reply["platform"], reply["channel_id"], reply["user_id"]) == (
        "c1", "twitch", "ch1", "u1")
    assert reply["response_action"] == "chat"
    assert reply["response"] == "🤖 Hey Alice, welcome to the stream!"
    assert reply["trigger"] == "greeting"
    assert reply["provider"] == "ollama"
    assert reply["model"] == "llama3.2"
    assert reply["usage"]["completion_tokens"] > 0
    assert reply["usage"]["prompt_tokens"] > 0
    assert reply["processing_time_ms"] >= 0
    assert datetime.fromisoformat(reply["created_at"].replace("Z", "+00:00"))

    sent = fake.last.json
    assert sent["options"]["temperature"] == 0.7
    # No more tokens than Twitch's 500 characters can show (500 // 3 + 16).
    assert sent["options"]["num_predict"] == 182
    user_turn = sent["messages"][-1]
    assert user_turn["role"] == "user"
    assert "hello everyone" in user_turn["content"]
    assert "<chat_message" in user_turn["content"]
    assert "hello everyone" not in sent["messages"][0]["content"]


async def test_messages_without_a_trigger_are_acked_with_no_reply(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider,
    topology: Topology,
) -> None:
    async with running_worker(ollama_settings) as app:
        for text in ("this is fine", "which one", "they support it", "!so someone"):
            await router_client.publish(make_event(text))
        await router_client.publish(make_event("hi", user="bot", metadata={"is_bot": True}))
        await router_client.publish(make_event("hi", user="nightbot"))
        assert await no_reply_within(router_client, 1.5)
        assert await metric_value(app, "waddle_ai_no_reply_total", reason="no_trigger") == 3
        assert await metric_value(app, "waddle_ai_no_reply_total", reason="command") == 1
        assert await metric_value(app, "waddle_ai_no_reply_total", reason="bot_message") == 2
    assert fake.calls == 0
    assert await queue_depth(topology.interaction_queue) == 0


@pytest.mark.parametrize(
    ("body", "error_type"),
    [
        (b"not json at all", "invalid_json"),
        (b"\xff\xfe\x00garbage", "invalid_json"),
        (b"[1, 2, 3]", "invalid_schema"),
        (orjson.dumps({"event_id": "x", "platform": "myspace"}), "invalid_schema"),
        (b'{"schema_version": 1}' + b" " * 300_000, "invalid_schema"),
    ],
)
async def test_bad_bodies_are_dead_lettered_at_once_with_the_reason(
    ollama_settings: Settings, router_client: RouterClient, topology: Topology,
    body: bytes, error_type: str,
) -> None:
    async with running_worker(ollama_settings) as app:
        await router_client.publish(body, message_id="bad-1")
        letters = await get_dead_letters(topology, 1)
        # The worker is still answering afterwards.
        await router_client.publish(make_event("hello there"))
        await router_client.next_reply(REPLY_TIMEOUT_S)
        assert await metric_value(app, "waddle_ai_dead_letters_total",
                                  error_type=error_type) == 1
    [letter] = letters
    assert letter.body == body
    assert letter.headers[headers.ERROR_TYPE] == error_type
    assert letter.headers[headers.ERROR]
    assert letter.headers[headers.RETRY_COUNT] == 0
    assert letter.headers[headers.ORIGINAL_QUEUE] == topology.interaction_queue
    assert letter.headers[headers.FIRST_FAILED_AT]
    assert letter.headers[headers.LAST_FAILED_AT]
    assert letter.message_id == "bad-1"


async def test_an_event_delivered_twice_is_answered_once(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider
) -> None:
    event = make_event("hello friends")
    async with running_worker(ollama_settings) as app:
        await router_client.publish(event)
        await router_client.next_reply(REPLY_TIMEOUT_S)
        assert await app.store.was_answered(event["event_id"])  # the marker, recorded
        await router_client.publish(event)
        await router_client.publish(event)
        # Settled as duplicates by the marker (not deferred behind a lease, not
        # republished from the outbox), however long a lease would last.
        await wait_for_metric(app, "waddle_ai_dedupe_hits_total", 2)
        assert await metric_value(app, "waddle_ai_no_reply_total", reason="duplicate") == 2
        assert await metric_value(app, "waddle_ai_replies_republished_total") == 0
        assert await no_reply_within(router_client, 0.2)
    assert fake.calls == 1


async def test_concurrent_copies_of_one_event_give_one_reply(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider
) -> None:
    fake.latency_s = 0.5
    event = make_event("hello friends")
    async with running_worker(ollama_settings) as app:
        for _ in range(3):
            await router_client.publish(event)
        await router_client.next_reply(REPLY_TIMEOUT_S)
        # The two other copies waited (in_flight_elsewhere), then found the marker.
        await wait_for_metric(app, "waddle_ai_dedupe_hits_total", 2)
        assert await metric_value(app, "waddle_ai_replies_republished_total") == 0
        assert await no_reply_within(router_client, 0.2)
    assert fake.calls == 1


async def test_a_copy_held_by_a_dead_workers_lease_waits_in_long_steps(
    make_settings: Callable[..., Settings], fake: FakeProvider, router_client: RouterClient,
) -> None:
    """A worker died while answering: its lease holds the redelivered copy back. The copy
    waits in the longest delay step that ends before the lease does, not in the shortest
    one again and again, and is answered once the lease is gone."""
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url,
                             retry_delays_ms=[100, 200, 400, 800])
    event = make_event("hello everyone", community="c1", channel="ch1", user="u1")
    key = ConversationKey(community_id="c1", channel_id="ch1", user_id="u1", platform="twitch")
    async with running_worker(settings) as app:
        dead = await app.store.admit(AdmitRequest(
            event_id=event["event_id"], attempt_id="dead-worker", key=key,
            user_cooldown_ms=0, channel_cooldown_ms=0, lease_ms=1_500, history_turns=0))
        assert dead.admitted
        await router_client.publish(event)
        message = await router_client.next_reply(REPLY_TIMEOUT_S)
        waits = {delay: await metric_value(app, "waddle_ai_retries_total", delay_ms=str(delay),
                                           error_type="in_flight_elsewhere")
                 for delay in (100, 200, 400, 800)}
    assert orjson.loads(message.body)["event_id"] == event["event_id"]
    assert waits[800] == 1  # 1.5 s of lease left: the 800 ms step first
    # Then what the lease has left picks the step: a handful in all, not 15 of 100 ms.
    assert sum(waits.values()) <= 4
    assert fake.calls == 1


async def test_transient_provider_failures_are_retried_until_answered(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider,
    topology: Topology,
) -> None:
    fake.script = [Behaviour(status=500), Behaviour(garbage=True)]
    async with running_worker(ollama_settings) as app:
        await router_client.publish(make_event("hello?"))
        message = await router_client.next_reply(REPLY_TIMEOUT_S)
        assert await metric_value(app, "waddle_ai_retries_total", delay_ms="100",
                                  error_type="provider_unavailable") == 1
        assert await metric_value(app, "waddle_ai_retries_total", delay_ms="200",
                                  error_type="provider_bad_output") == 1
    assert orjson.loads(message.body)["response"].endswith("Hello there, friend!")
    assert fake.calls == 3
    assert await queue_depth(topology.dead_letter_queue) == 0


async def test_a_stream_that_breaks_midway_is_retried(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider
) -> None:
    fake.script = [Behaviour(midstream_error=True), Behaviour(truncate_stream=True)]
    fake.reply_text = "All good now, welcome back everyone to the show"
    async with running_worker(ollama_settings):
        await router_client.publish(make_event("hey"))
        message = await router_client.next_reply(REPLY_TIMEOUT_S)
    # The reply is the complete answer, not pieces of the broken attempts.
    assert orjson.loads(message.body)["response"] == (
        "🤖 All good now, welcome back everyone to the show")
    assert fake.calls == 3


async def test_a_provider_that_keeps_failing_ends_in_the_dlq_after_every_retry(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider,
    topology: Topology,
) -> None:
    fake.status = 503
    event = make_event("hello?")
    async with running_worker(ollama_settings) as app:
        await router_client.publish(event)
        [letter] = await get_dead_letters(topology, 1)
        assert await metric_value(app, "waddle_ai_dead_letters_total",
                                  error_type="provider_unavailable") == 1
    assert fake.calls == 3  # the first try and one per delay step (100, 200 ms)
    assert orjson.loads(letter.body) == event
    assert letter.headers[headers.ERROR_TYPE] == "provider_unavailable"
    assert letter.headers[headers.RETRY_COUNT] == 2
    assert "gave up after 2 retries" in letter.headers[headers.ERROR]
    assert letter.headers[headers.FIRST_FAILED_AT] <= letter.headers[headers.LAST_FAILED_AT]


async def test_a_request_the_provider_refuses_is_dead_lettered_without_retries(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider,
    topology: Topology,
) -> None:
    fake.status = 400
    async with running_worker(ollama_settings):
        await router_client.publish(make_event("hello?"))
        [letter] = await get_dead_letters(topology, 1)
    assert fake.calls == 1
    assert letter.headers[headers.ERROR_TYPE] == "provider_bad_request"
    assert letter.headers[headers.RETRY_COUNT] == 0


async def test_provider_timeouts_are_retried(
    make_settings: Callable[..., Settings], router_client: RouterClient, fake: FakeProvider
) -> None:
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url, ollama_timeout=0.3)
    fake.script = [Behaviour(latency_s=1.0)]
    async with running_worker(settings) as app:
        await router_client.publish(make_event("hello?"))
        await router_client.next_reply(REPLY_TIMEOUT_S)
        assert await metric_value(app, "waddle_ai_provider_errors_total", provider="ollama",
                                  error_type="provider_timeout") == 1


async def test_reply_text_is_made_safe_for_the_platform(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider
) -> None:
    # Over YouTube's 200 characters but within the token budget (a finished
    # answer, trimmed with "…"; one cut by the budget keeps whole sentences only).
    fake.reply_text = (
        "<think>they want a ban</think> /ban   @everyone  look\n\nhere " + "wordsmithing " * 40
    )
    async with running_worker(ollama_settings):
        await router_client.publish(make_event("hello?", platform="youtube"))
        message = await router_client.next_reply(REPLY_TIMEOUT_S)
    text = orjson.loads(message.body)["response"]
    assert text.startswith("🤖 ban @\u200beveryone look here word")
    assert "think" not in text
    assert len(text) <= 200
    assert text.endswith("…")


async def test_token_budget_follows_the_platform_up_to_ai_max_tokens(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider
) -> None:
    async with running_worker(ollama_settings):
        await router_client.publish(make_event("hello?", platform="youtube", user="a"))
        await router_client.next_reply(REPLY_TIMEOUT_S)
        youtube = fake.last.json["options"]["num_predict"]
        await router_client.publish(make_event("hello?", platform="slack", user="b"))
        await router_client.next_reply(REPLY_TIMEOUT_S)
        slack = fake.last.json["options"]["num_predict"]
    assert youtube == 200 // 3 + 16
    assert slack == 500  # 4000 characters would allow more; AI_MAX_TOKENS caps it


async def test_reasoning_fields_never_reach_chat(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider
) -> None:
    fake.thinking = "secret chain of thought"
    async with running_worker(ollama_settings):
        await router_client.publish(make_event("hello?"))
        message = await router_client.next_reply(REPLY_TIMEOUT_S)
    assert "secret" not in orjson.loads(message.body)["response"]


async def test_an_answer_with_nothing_left_after_the_filter_is_dead_lettered(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider,
    topology: Topology,
) -> None:
    fake.reply_text = "<think>only thoughts, no answer</think>   "
    async with running_worker(ollama_settings):
        await router_client.publish(make_event("hello?"))
        [letter] = await get_dead_letters(topology, 1)
        assert await no_reply_within(router_client, 0.5)
    assert letter.headers[headers.ERROR_TYPE] == "empty_output"


async def test_an_event_that_failed_for_good_does_not_silence_the_channel(
    make_settings: Callable[..., Settings], router_client: RouterClient, fake: FakeProvider,
    topology: Topology,
) -> None:
    """Nothing was said, so the channel cooldown the dead-lettered event claimed goes back."""
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url, channel_cooldown_s=60)
    fake.reply_text = "<think>only thoughts, no answer</think>   "
    async with running_worker(settings):
        await router_client.publish(make_event("hello?", channel="ch1", user="u1"))
        await get_dead_letters(topology, 1)
        fake.reply_text = "Hey there!"
        await router_client.publish(make_event("hello?", channel="ch1", user="u2"))
        message = await router_client.next_reply(REPLY_TIMEOUT_S)
    assert orjson.loads(message.body)["user_id"] == "u2"


async def test_a_raid_of_greetings_costs_one_provider_call_per_cooldown(
    make_settings: Callable[..., Settings], router_client: RouterClient, fake: FakeProvider
) -> None:
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url,
                             channel_cooldown_s=30, user_cooldown_s=30)
    async with running_worker(settings) as app:
        for viewer in range(200):
            await router_client.publish(make_event("hi", user=f"raider{viewer}"))
        first = orjson.loads((await router_client.next_reply(REPLY_TIMEOUT_S)).body)
        # Whichever raider the channel answered (events run concurrently, so not
        # necessarily the first published) is now in their own cooldown: their
        # second message gets no reply either, for that reason.
        winner = first["user_id"]
        assert winner.startswith("raider")
        await router_client.publish(make_event("hi again?", user=winner))
        # A mention is answered despite the busy channel (its user is not in cooldown).
        await router_client.publish(make_event("@waddlebot hi!", user="fan"))
        mention = await router_client.next_reply(REPLY_TIMEOUT_S)
        assert await no_reply_within(router_client, 1.0)

        def no_reply(reason: str) -> float:
            value = app.metrics.registry.get_sample_value(
                "waddle_ai_no_reply_total", {"reason": reason})
            return value or 0.0

        # Every one of the 200 cooled-down events is settled before counting.
        await wait_until(lambda: no_reply("channel_cooldown") + no_reply("user_cooldown") >= 200)
        cooled, user_cooled = no_reply("channel_cooldown"), no_reply("user_cooldown")
    assert orjson.loads(mention.body)["trigger"] == "mention"
    assert fake.calls == 2
    assert cooled == 199
    assert user_cooled == 1


async def test_the_conversation_is_remembered_per_user(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider
) -> None:
    fake.reply_text = lambda messages: f"answer number {len(messages)}"
    async with running_worker(ollama_settings):
        await router_client.publish(make_event("what game is this?", user="ann"))
        first = orjson.loads((await router_client.next_reply(REPLY_TIMEOUT_S)).body)
        await router_client.publish(make_event("and who made it?", user="ann"))
        await router_client.next_reply(REPLY_TIMEOUT_S)
        await router_client.publish(make_event("what is this?", user="bob"))
        await router_client.next_reply(REPLY_TIMEOUT_S)

    ann_second, bob_first = fake.requests[1].json["messages"], fake.requests[2].json["messages"]
    roles = [m["role"] for m in ann_second]
    assert roles == ["system", "user", "assistant", "user"]
    assert "what game is this?" in ann_second[1]["content"]
    assert ann_second[2]["content"] == first["response"].removeprefix("🤖 ")
    assert "and who made it?" in ann_second[3]["content"]
    assert [m["role"] for m in bob_first] == ["system", "user"]


async def test_events_are_celebrated_with_their_details(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider
) -> None:
    async with running_worker(ollama_settings):
        await router_client.publish(make_event("", message_type="raid", user="bigstreamer",
                                               metadata={"viewers": 420}))
        message = await router_client.next_reply(REPLY_TIMEOUT_S)
    assert orjson.loads(message.body)["trigger"] == "event"
    system = fake.last.json["messages"][0]["content"]
    assert "420" in system


async def test_stale_events_get_no_reply_and_are_acked(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider,
    topology: Topology,
) -> None:
    event = make_event("hello?")
    event["sent_at"] = (datetime.now(UTC) - timedelta(minutes=10)).isoformat()
    async with running_worker(ollama_settings) as app:
        await router_client.publish(event)
        assert await no_reply_within(router_client, 1.0)
        assert await metric_value(app, "waddle_ai_no_reply_total", reason="stale") == 1
    assert fake.calls == 0
    assert await queue_depth(topology.interaction_queue) == 0
    assert await queue_depth(topology.dead_letter_queue) == 0


async def test_staleness_is_decided_at_max_event_age(
    make_settings: Callable[..., Settings], router_client: RouterClient, fake: FakeProvider,
) -> None:
    """Just under MAX_EVENT_AGE_S is answered; just over is not (the limit, not 4 × it)."""
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url, max_event_age_s=30)
    fresh = make_event("hello there", user="fresh")
    fresh["sent_at"] = (datetime.now(UTC) - timedelta(seconds=25)).isoformat()
    stale = make_event("hello there", user="stale")
    stale["sent_at"] = (datetime.now(UTC) - timedelta(seconds=35)).isoformat()
    async with running_worker(settings) as app:
        await router_client.publish(stale)
        await router_client.publish(fresh)
        message = await router_client.next_reply(REPLY_TIMEOUT_S)
        await wait_for_metric(app, "waddle_ai_no_reply_total", 1, reason="stale")
        assert await no_reply_within(router_client, 0.2)
    assert orjson.loads(message.body)["event_id"] == fresh["event_id"]
    assert fake.calls == 1


async def test_the_first_delivery_time_is_carried_across_retries(
    make_settings: Callable[..., Settings], router_client: RouterClient, fake: FakeProvider,
    topology: Topology,
) -> None:
    """An event with no `sent_at` ages from its first delivery, not from each retry's.

    MAX_EVENT_AGE_S is 4 s; the provider fails twice; the retries wait 1 s, then
    4 s. The second retry arrives about 5 s after the first delivery, so it is
    stale, although it itself was received just now: `x-first-received-at`
    carried the first delivery's time through both retry copies.
    """
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url, max_event_age_s=4,
                             retry_delays_ms=[1000, 4000])
    fake.script = [Behaviour(status=500), Behaviour(status=500)]
    event = make_event("hello there")
    del event["sent_at"]
    async with running_worker(settings) as app:
        await router_client.publish(event)
        await wait_for_metric(app, "waddle_ai_no_reply_total", 1, timeout_s=30, reason="stale")
        retried = {delay: await metric_value(app, "waddle_ai_retries_total", delay_ms=delay,
                                             error_type="provider_unavailable")
                   for delay in ("1000", "4000")}
        assert await no_reply_within(router_client, 0.2)
    assert retried == {"1000": 1, "4000": 1}
    assert fake.calls == 2
    assert await queue_depth(topology.dead_letter_queue) == 0


async def test_a_retry_copy_keeps_the_traceparent(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider,
) -> None:
    """The reply to an event that needed a retry carries the router's traceparent."""
    fake.script = [Behaviour(status=500)]
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with running_worker(ollama_settings) as app:
        await router_client.publish(make_event("hello everyone"),
                                    headers={headers.TRACEPARENT: traceparent})
        message = await router_client.next_reply(REPLY_TIMEOUT_S)
        assert await metric_value(app, "waddle_ai_retries_total", delay_ms="100",
                                  error_type="provider_unavailable") == 1
    assert fake.calls == 2
    assert message.headers[headers.TRACEPARENT] == traceparent


async def test_in_flight_work_is_bounded_by_max_concurrent_requests(
    make_settings: Callable[..., Settings], router_client: RouterClient, fake: FakeProvider
) -> None:
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url,
                             max_concurrent_requests=3, prefetch_count=10)
    fake.latency_s = 0.3
    async with running_worker(settings):
        for viewer in range(9):
            await router_client.publish(make_event("hello?", user=f"v{viewer}",
                                                   channel=f"c{viewer}"))
        for _ in range(9):
            await router_client.next_reply(REPLY_TIMEOUT_S)
    assert fake.max_in_flight == 3


async def test_works_without_redis_on_process_memory(
    make_settings: Callable[..., Settings], router_client: RouterClient, fake: FakeProvider
) -> None:
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url, redis_url=None)
    event = make_event("hello everyone")
    async with running_worker(settings) as app:
        assert app.store.backend == "memory"
        await router_client.publish(event)
        await router_client.next_reply(REPLY_TIMEOUT_S)
        await router_client.publish(event)
        assert await no_reply_within(router_client, 1.0)
    assert fake.calls == 1


async def test_waddleai_provider_answers_with_key_and_preferred_model(
    make_settings: Callable[..., Settings], router_client: RouterClient, fake: FakeProvider
) -> None:
    settings = make_settings(ai_provider="waddleai", waddleai_base_url=fake.url,
                             waddleai_api_key="sk-test", waddleai_preferred_model="big")
    async with running_worker(settings):
        await router_client.publish(make_event("hello?"))
        message = await router_client.next_reply(REPLY_TIMEOUT_S)
    assert orjson.loads(message.body)["provider"] == "waddleai"
    request = fake.last
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert request.headers["X-Preferred-Model"] == "big"


async def test_fallback_provider_answers_when_the_primary_fails(
    make_settings: Callable[..., Settings], router_client: RouterClient, fake: FakeProvider
) -> None:
    async with FakeProvider() as backup:
        backup.reply_text = "backup here"
        fake.status = 503
        settings = make_settings(ai_provider="ollama", ollama_host=fake.url,
                                 ai_fallback_providers="waddleai",
                                 waddleai_base_url=backup.url)
        async with running_worker(settings):
            await router_client.publish(make_event("hello?"))
            reply = orjson.loads((await router_client.next_reply(REPLY_TIMEOUT_S)).body)
    assert reply["provider"] == "waddleai"
    assert reply["response"] == "🤖 backup here"


async def test_sidecar_serves_health_readiness_and_metrics(
    ollama_settings: Settings, router_client: RouterClient
) -> None:
    async with running_worker(ollama_settings) as app:
        await router_client.publish(make_event("hello?"))
        await router_client.next_reply(REPLY_TIMEOUT_S)
        assert app.sidecar is not None
        base = f"http://127.0.0.1:{app.sidecar.bound_port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 200
            async with http.get(f"{base}/readyz") as response:
                assert response.status == 200
                ready: dict[str, Any] = await response.json()
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 200
                metrics = await response.text()
            assert app.consumer is not None
            await app.consumer.stop(1.0)
            async with http.get(f"{base}/readyz") as response:
                assert response.status == 503
                assert (await response.json())["consumer"]["attached"] is False
    assert ready["consumer"]["attached"] is True
    assert ready["broker"]["connected"] is True
    assert ready["state"] == {"backend": "redis", "ok": True, "degraded": False}
    assert ready["providers"]["ollama"]["ok"] is True
    assert 'waddle_ai_replies_total{provider="ollama",trigger="question"} 1.0' in metrics
    assert 'waddle_ai_events_received_total{message_type="chatMessage"} 1.0' in metrics
    assert "waddle_ai_provider_latency_seconds_bucket" in metrics
    assert "waddle_ai_in_flight 0.0" in metrics


async def test_session_id_is_carried_to_the_reply(
    ollama_settings: Settings, router_client: RouterClient
) -> None:
    event = make_event("hello?")
    event["session_id"] = f"session-{uuid.uuid4().hex}"
    event["some_future_field"] = {"ignored": True}
    async with running_worker(ollama_settings):
        await router_client.publish(event)
        reply = orjson.loads((await router_client.next_reply(REPLY_TIMEOUT_S)).body)
    assert reply["session_id"] == event["session_id"]


async def test_stopping_lets_in_flight_events_finish(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider,
    topology: Topology,
) -> None:
    fake.latency_s = 1.0
    app = await App.build(ollama_settings)
    await app.start()
    await router_client.publish(make_event("hello?"))
    await wait_until(lambda: fake.calls > 0)
    assert await app.stop() is True
    message = await router_client.next_reply(REPLY_TIMEOUT_S)
    assert orjson.loads(message.body)["response"].endswith("Hello there, friend!")
    assert await queue_depth(topology.interaction_queue) == 0


async def test_a_reply_stashed_by_a_dead_attempt_is_published_again_unchanged(
    ollama_settings: Settings, router_client: RouterClient, fake: FakeProvider
) -> None:
    """A worker died after the confirm but before recording: the same reply goes out again."""
    event = make_event("hello everyone", community="c1", channel="ch1", user="u1")
    stashed = Reply(
        event_id=event["event_id"], session_id=event["event_id"], community_id="c1",
        platform=Platform.TWITCH, channel_id="ch1", user_id="u1",
        response="🤖 the first attempt's words", trigger=Trigger.GREETING,
        provider="ollama", model="llama3.2",
    ).to_json()
    async with running_worker(ollama_settings) as app:
        key = ConversationKey(community_id="c1", channel_id="ch1", user_id="u1",
                              platform="twitch")
        dead = await app.store.admit(AdmitRequest(
            event_id=event["event_id"], attempt_id="dead-worker", key=key,
            user_cooldown_ms=0, channel_cooldown_ms=0, lease_ms=60_000, history_turns=0))
        assert dead.admitted
        assert await app.store.stash_reply(event["event_id"], "dead-worker", stashed, 60_000)
        await app.store.release(event["event_id"], "dead-worker")  # its lease ran out

        await router_client.publish(event)
        message = await router_client.next_reply(REPLY_TIMEOUT_S)
        await router_client.publish(event)  # and a later copy is a plain duplicate
        assert await no_reply_within(router_client, 1.0)
        assert await metric_value(app, "waddle_ai_replies_republished_total") == 1
    assert message.body == stashed
    assert message.message_id == f"reply:{event['event_id']}"
    assert fake.calls == 0
