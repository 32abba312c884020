"""Both state stores must give the same answers; the Redis one runs against a real Redis.

The Redis is tests/conftest.py's (`TEST_REDIS_URL`, default
redis://127.0.0.1:6379/0). Each test uses its own random key prefix and deletes
its keys afterwards, so tests can share a Redis with other users.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from context.lease import LeaseKeeper
from context.memory_store import MemoryStateStore
from context.redis_store import RedisStateStore
from context.store import AdmitRequest, RecordRequest, StateStore, Verdict
from domain.conversation import ConversationKey, Turn
from tests.conftest import REDIS_URL
from tests.redis_wire import RecordingConnection, WireLog

KEY = ConversationKey(community_id="c1", channel_id="ch1", user_id="u1", platform="twitch")


def conv(
    user: str = "u1", channel: str = "ch1", community: str = "c1", platform: str = "twitch"
) -> ConversationKey:
    return ConversationKey(
        community_id=community, channel_id=channel, user_id=user, platform=platform
    )


def admit_req(
    event_id: str,
    *,
    attempt_id: str = "a1",
    key: ConversationKey = KEY,
    user_ms: int = 10_000,
    channel_ms: int = 2_000,
    lease_ms: int = 30_000,
    history_turns: int = 6,
) -> AdmitRequest:
    return AdmitRequest(
        event_id=event_id,
        attempt_id=attempt_id,
        key=key,
        user_cooldown_ms=user_ms,
        channel_cooldown_ms=channel_ms,
        lease_ms=lease_ms,
        history_turns=history_turns,
    )


def record_req(
    event_id: str,
    turns: list[Turn],
    *,
    attempt_id: str = "a1",
    key: ConversationKey = KEY,
    history_turns: int = 6,
    history_ttl_s: int = 3600,
    dedupe_ttl_s: int = 86_400,
) -> RecordRequest:
    return RecordRequest(
        event_id=event_id,
        attempt_id=attempt_id,
        key=key,
        turns=turns,
        history_turns=history_turns,
        history_ttl_s=history_ttl_s,
        dedupe_ttl_s=dedupe_ttl_s,
    )


def exchange(n: int, speaker: str = "Alice") -> list[Turn]:
    return [
        Turn(role="user", content=f"question {n}", speaker=speaker),
        Turn(role="assistant", content=f"answer {n}"),
    ]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    store: StateStore
    # Lets time pass: the fake clock for memory, a real sleep for Redis.
    advance: Callable[[float], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Harness]:
    store: MemoryStateStore | RedisStateStore
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.now += seconds

        store = MemoryStateStore(clock=clock)
        yield Harness(store, advance)
    else:
        store = RedisStateStore.from_url(REDIS_URL, redis_prefix)
        await store.ping()
        yield Harness(store, asyncio.sleep)
    await store.aclose()


# --- admission -------------------------------------------------------------


async def test_first_admit_is_admitted(harness: Harness) -> None:
    admission = await harness.store.admit(admit_req("e1"))
    assert admission.verdict is Verdict.ADMITTED
    assert admission.admitted
    assert admission.history == []


async def test_already_answered_after_record(harness: Harness) -> None:
    store = harness.store
    assert await store.admit(admit_req("e1"))
    assert not await store.was_answered("e1")
    await store.record(record_req("e1", exchange(1)))
    assert await store.was_answered("e1")
    assert not await store.was_answered("e2")
    # Even the attempt that answered it, and a brand-new one, are told it is done.
    for attempt in ("a1", "a2"):
        admission = await store.admit(admit_req("e1", attempt_id=attempt))
        assert admission.verdict is Verdict.ALREADY_ANSWERED
        assert admission.history == []


async def test_second_attempt_is_in_flight_elsewhere(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", attempt_id="a1"))).admitted
    admission = await store.admit(admit_req("e1", attempt_id="a2"))
    assert admission.verdict is Verdict.IN_FLIGHT_ELSEWHERE
    # How long the other attempt's lease still runs (30 s were taken a moment ago).
    assert admission.lease_left_ms is not None
    assert 25_000 < admission.lease_left_ms <= 30_000


async def test_release_can_give_the_events_cooldowns_back(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", attempt_id="a1"))).admitted
    await store.release("e1", "a1", cooldowns=KEY)
    # Neither the viewer nor the channel is cooling down any more.
    assert (await store.admit(admit_req("e2", attempt_id="a2"))).admitted
    other_user = conv(user="u2")
    assert (await store.admit(admit_req("e3", key=other_user))).verdict is \
        Verdict.CHANNEL_COOLDOWN


async def test_release_leaves_cooldowns_another_event_holds(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", attempt_id="a1"))).admitted
    await store.release("e9", "a9", cooldowns=KEY)  # not the owner of anything
    assert (await store.admit(admit_req("e2"))).verdict is Verdict.USER_COOLDOWN
    assert (await store.admit(admit_req("e3", key=conv(user="u2")))).verdict is \
        Verdict.CHANNEL_COOLDOWN
    await store.release("e1", "a1")  # the lease only, as before
    assert (await store.admit(admit_req("e2"))).verdict is Verdict.USER_COOLDOWN


async def test_same_attempt_is_readmitted(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", attempt_id="a1"))).admitted
    assert (await store.admit(admit_req("e1", attempt_id="a1"))).admitted


async def test_release_lets_a_new_attempt_in(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", attempt_id="a1"))).admitted
    # Only the owner can drop the lease.
    await store.release("e1", "someone-else")
    admission = await store.admit(admit_req("e1", attempt_id="a2"))
    assert admission.verdict is Verdict.IN_FLIGHT_ELSEWHERE
    await store.release("e1", "a1")
    # The retry owns the event's cooldowns, so they do not stop it either.
    assert (await store.admit(admit_req("e1", attempt_id="a2"))).admitted


async def test_lease_ends_on_its_own(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", attempt_id="a1", lease_ms=200))).admitted
    refused = await store.admit(admit_req("e1", attempt_id="a2", lease_ms=200))
    assert refused.verdict is Verdict.IN_FLIGHT_ELSEWHERE
    await harness.advance(0.35)
    assert (await store.admit(admit_req("e1", attempt_id="a2"))).admitted
    # Now the first attempt is the one elsewhere.
    refused = await store.admit(admit_req("e1", attempt_id="a1"))
    assert refused.verdict is Verdict.IN_FLIGHT_ELSEWHERE


async def test_user_cooldown(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1"))).admitted
    admission = await store.admit(admit_req("e2"))
    assert admission.verdict is Verdict.USER_COOLDOWN
    assert admission.history == []
    # A refusal claims nothing: a second attempt of e2 is refused for the same reason.
    again = await store.admit(admit_req("e2", attempt_id="a2"))
    assert again.verdict is Verdict.USER_COOLDOWN


async def test_channel_cooldown(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", key=conv(user="u1")))).admitted
    admission = await store.admit(admit_req("e2", key=conv(user="u2")))
    assert admission.verdict is Verdict.CHANNEL_COOLDOWN
    # Other channels are not held back.
    assert (await store.admit(admit_req("e3", key=conv(user="u2", channel="ch2")))).admitted


async def test_retry_of_same_event_is_not_blocked_by_its_own_cooldowns(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", attempt_id="a1", lease_ms=100))).admitted
    await harness.advance(0.25)  # the lease is gone, the cooldowns (10 s, 2 s) are not
    assert (await store.admit(admit_req("e1", attempt_id="a2"))).admitted
    assert (await store.admit(admit_req("e2", attempt_id="a1"))).verdict is Verdict.USER_COOLDOWN


async def test_cooldowns_expire(harness: Harness) -> None:
    store = harness.store
    u1, u2 = conv(user="u1"), conv(user="u2")
    assert (await store.admit(admit_req("e1", key=u1, user_ms=200, channel_ms=200))).admitted
    assert (await store.admit(admit_req("e2", key=u1))).verdict is Verdict.USER_COOLDOWN
    assert (await store.admit(admit_req("e3", key=u2))).verdict is Verdict.CHANNEL_COOLDOWN
    await harness.advance(0.35)
    assert (await store.admit(admit_req("e2", key=u1, user_ms=200, channel_ms=0))).admitted
    assert (await store.admit(admit_req("e3", key=u2))).admitted


async def test_zero_cooldown_means_none(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", user_ms=0, channel_ms=0))).admitted
    assert (await store.admit(admit_req("e2", user_ms=0, channel_ms=0))).admitted
    # A channel cooldown alone still holds back everyone else in the channel.
    assert (await store.admit(admit_req("e3", key=conv(user="u9"), user_ms=0))).admitted
    refused = await store.admit(admit_req("e4", user_ms=0))
    assert refused.verdict is Verdict.CHANNEL_COOLDOWN


async def test_zero_cooldown_is_not_checked_either(harness: Harness) -> None:
    """A mention skips the channel's cooldown: an active one does not hold it back."""
    store = harness.store
    assert (await store.admit(admit_req("e1", key=conv(user="u1")))).admitted
    busy = await store.admit(admit_req("e2", key=conv(user="u2")))
    assert busy.verdict is Verdict.CHANNEL_COOLDOWN
    assert (await store.admit(admit_req("e3", key=conv(user="u2"), channel_ms=0))).admitted
    # The user's own cooldown is still honoured when only the channel's is skipped.
    again = await store.admit(admit_req("e4", key=conv(user="u1"), channel_ms=0))
    assert again.verdict is Verdict.USER_COOLDOWN


async def test_refusal_order(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1"))).admitted
    # Both cooldowns hold e2 back; the user's is reported.
    assert (await store.admit(admit_req("e2"))).verdict is Verdict.USER_COOLDOWN
    # The lease is checked before the cooldowns, the marker before the lease.
    assert (await store.admit(admit_req("e1", attempt_id="a2"))).verdict is (
        Verdict.IN_FLIGHT_ELSEWHERE
    )
    await store.record(record_req("e1", exchange(1)))
    assert (await store.admit(admit_req("e1", attempt_id="a2"))).verdict is (
        Verdict.ALREADY_ANSWERED
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"lease_ms": 0},
        {"lease_ms": -1},
        {"user_ms": -1},
        {"channel_ms": -5},
        {"history_turns": -1},
    ],
)
async def test_admit_rejects_bad_numbers(harness: Harness, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        await harness.store.admit(admit_req("e1", **bad))


@pytest.mark.parametrize(
    "bad", [{"dedupe_ttl_s": 0}, {"history_ttl_s": 0}, {"history_turns": -1}]
)
async def test_record_rejects_bad_numbers(harness: Harness, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        await harness.store.record(record_req("e1", exchange(1), **bad))
    assert not await harness.store.was_answered("e1")


# --- history ---------------------------------------------------------------


async def _answer(
    store: StateStore,
    event_id: str,
    turns: list[Turn],
    key: ConversationKey = KEY,
    history_turns: int = 6,
    history_ttl_s: int = 3600,
) -> None:
    """Admit then record, the way the worker does; cooldowns off so events follow quickly."""
    admission = await store.admit(
        admit_req(event_id, key=key, user_ms=0, channel_ms=0, history_turns=history_turns)
    )
    assert admission.admitted
    await store.record(
        record_req(
            event_id, turns, key=key, history_turns=history_turns, history_ttl_s=history_ttl_s
        )
    )


async def test_history_returns_the_last_turns_in_order(harness: Harness) -> None:
    store = harness.store
    await _answer(store, "e1", exchange(1, speaker="Alice"))
    await _answer(store, "e2", exchange(2, speaker="Bob"))

    admission = await store.admit(admit_req("e3", history_turns=6))
    assert admission.history == [*exchange(1, speaker="Alice"), *exchange(2, speaker="Bob")]
    assert admission.history[2].speaker == "Bob"
    assert admission.history[1].speaker is None

    await store.release("e3", "a1")
    admission = await store.admit(admit_req("e3", attempt_id="a2", history_turns=3))
    assert [turn.content for turn in admission.history] == ["answer 1", "question 2", "answer 2"]


async def test_history_keeps_only_the_last_history_turns_entries(harness: Harness) -> None:
    store = harness.store
    for n in range(1, 5):
        await _answer(store, f"e{n}", exchange(n), history_turns=3)
    admission = await store.admit(admit_req("e9", user_ms=0, channel_ms=0, history_turns=50))
    assert [turn.content for turn in admission.history] == ["answer 3", "question 4", "answer 4"]

    # One record with more turns than kept keeps only its own tail.
    many = [Turn(role="user", content=f"m{i}", speaker="Z") for i in range(5)]
    await store.record(record_req("e9", many, history_turns=2))
    admission = await store.admit(admit_req("e10", user_ms=0, channel_ms=0, history_turns=50))
    assert [turn.content for turn in admission.history] == ["m3", "m4"]


async def test_history_turns_zero_stores_and_reads_nothing(harness: Harness) -> None:
    store = harness.store
    await _answer(store, "e1", exchange(1), history_turns=0)
    assert await store.was_answered("e1")
    admission = await store.admit(admit_req("e2", user_ms=0, channel_ms=0, history_turns=6))
    assert admission.admitted
    assert admission.history == []

    await store.record(record_req("e2", exchange(2)))
    admission = await store.admit(admit_req("e3", user_ms=0, channel_ms=0, history_turns=0))
    assert admission.admitted
    assert admission.history == []


async def test_history_expires(harness: Harness) -> None:
    store = harness.store
    await _answer(store, "e1", exchange(1), history_ttl_s=1)
    await harness.advance(0.6)
    # A write starts the ttl over; a read does not.
    await _answer(store, "e2", exchange(2), history_ttl_s=1)
    await harness.advance(0.6)
    admission = await store.admit(admit_req("e3", user_ms=0, channel_ms=0))
    assert len(admission.history) == 4
    await harness.advance(0.6)
    admission = await store.admit(admit_req("e4", user_ms=0, channel_ms=0))
    assert admission.history == []


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (conv(user="u1"), conv(user="u2")),
        (conv(channel="ch1"), conv(channel="ch2")),
        (conv(community="c1"), conv(community="c2")),
        (conv(platform="twitch"), conv(platform="discord")),
        # Ids holding ':' must not shift a part boundary.
        (conv(community="a:b", channel="c"), conv(community="a", channel="b:c")),
        (conv(channel="x", user="y:z"), conv(channel="x:y", user="z")),
        (conv(channel="a%3Ab"), conv(channel="a:b")),
    ],
    ids=["user", "channel", "community", "platform", "colon-1", "colon-2", "percent"],
)
async def test_conversations_are_isolated(
    harness: Harness, first: ConversationKey, second: ConversationKey
) -> None:
    store = harness.store
    await _answer(store, "e1", exchange(1), key=first)
    admission = await store.admit(admit_req("e2", key=second, user_ms=0, channel_ms=0))
    assert admission.admitted
    assert admission.history == []
    admission = await store.admit(admit_req("e3", key=first, user_ms=0, channel_ms=0))
    assert admission.history == exchange(1)


async def test_colon_ids_do_not_share_cooldowns(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", key=conv(community="a:b", channel="c")))).admitted
    assert (await store.admit(admit_req("e2", key=conv(community="a", channel="b:c")))).admitted


# --- concurrency -----------------------------------------------------------


async def test_concurrent_admits_in_one_channel_admit_exactly_one(harness: Harness) -> None:
    requests = [admit_req(f"e{i}", key=conv(user=f"u{i}")) for i in range(50)]
    results = await asyncio.gather(*(harness.store.admit(r) for r in requests))
    verdicts = Counter(result.verdict for result in results)
    assert verdicts == {Verdict.ADMITTED: 1, Verdict.CHANNEL_COOLDOWN: 49}


async def test_concurrent_attempts_of_one_event_admit_exactly_one(harness: Harness) -> None:
    requests = [admit_req("e1", attempt_id=f"a{i}") for i in range(50)]
    results = await asyncio.gather(*(harness.store.admit(r) for r in requests))
    verdicts = Counter(result.verdict for result in results)
    assert verdicts == {Verdict.ADMITTED: 1, Verdict.IN_FLIGHT_ELSEWHERE: 49}


async def test_backend_and_ping(harness: Harness) -> None:
    await harness.store.ping()
    expected = "memory" if isinstance(harness.store, MemoryStateStore) else "redis"
    assert harness.store.backend == expected


# --- memory store only -----------------------------------------------------


async def test_memory_conversations_are_an_lru() -> None:
    store = MemoryStateStore(max_conversations=2, clock=FakeClock())
    a, b, c = conv(user="a"), conv(user="b"), conv(user="c")
    await _answer(store, "ea", exchange(1), key=a)
    await _answer(store, "eb", exchange(2), key=b)
    # Reading a's history makes b the least recently used.
    assert (await store.admit(admit_req("ea2", key=a, user_ms=0, channel_ms=0))).history
    await _answer(store, "ec", exchange(3), key=c)
    assert len(store._conversations) == 2
    assert (await store.admit(admit_req("ea3", key=a, user_ms=0, channel_ms=0))).history
    assert (await store.admit(admit_req("ec2", key=c, user_ms=0, channel_ms=0))).history
    assert (await store.admit(admit_req("eb2", key=b, user_ms=0, channel_ms=0))).history == []


async def test_memory_markers_are_capped() -> None:
    store = MemoryStateStore(max_markers=3, clock=FakeClock())
    for n in range(5):
        await store.record(record_req(f"e{n}", [], history_turns=0))
    assert len(store._markers) == 3
    answered = [await store.was_answered(f"e{n}") for n in range(5)]
    assert answered == [False, False, True, True, True]


async def test_memory_prunes_what_expired() -> None:
    clock = FakeClock()
    store = MemoryStateStore(clock=clock)
    for n in range(200):
        key = conv(user=f"u{n}", channel=f"ch{n}")
        assert (await store.admit(admit_req(f"e{n}", key=key, lease_ms=5_000))).admitted
        await store.record(
            record_req(f"d{n}", exchange(n), key=key, history_ttl_s=60, dedupe_ttl_s=60)
        )
    assert len(store._leases) == len(store._user_cooldowns) == len(store._channel_cooldowns) == 200
    assert len(store._markers) == len(store._conversations) == 200

    clock.now += 30  # leases and cooldowns are over, markers and histories are not
    await store.ping()
    assert not await store.was_answered("nothing")
    assert len(store._leases) == len(store._user_cooldowns) == len(store._channel_cooldowns) == 0
    assert len(store._markers) == len(store._conversations) == 200

    clock.now += 31
    assert not await store.was_answered("nothing")
    assert len(store._markers) == len(store._conversations) == 0
    assert store._markers._heap == store._leases._heap == []
    assert store._conversations._heap == []


async def test_memory_expiry_heap_stays_bounded() -> None:
    store = MemoryStateStore(clock=FakeClock())
    # Every readmit refreshes the lease and cooldowns, leaving stale heap items behind.
    for _ in range(10_000):
        assert (await store.admit(admit_req("e1"))).admitted
    assert len(store._leases) == 1
    assert len(store._leases._heap) <= 2 * 1 + 64 + 1


async def test_memory_aclose_drops_state() -> None:
    store = MemoryStateStore(clock=FakeClock())
    await _answer(store, "e1", exchange(1))
    await store.aclose()
    assert not await store.was_answered("e1")


# --- Redis store only ------------------------------------------------------


@pytest.fixture
async def recorded(redis_prefix: str) -> AsyncIterator[tuple[RedisStateStore, WireLog]]:
    wire_log = WireLog()
    pool = ConnectionPool.from_url(
        REDIS_URL, connection_class=RecordingConnection, wire_log=wire_log
    )
    client = Redis(connection_pool=pool)
    store = RedisStateStore(client, redis_prefix)
    # Connect, and load the scripts should the server not know them yet.
    assert (await store.admit(admit_req("warm-up", key=conv(channel="warm")))).admitted
    await store.record(record_req("warm-up", exchange(0), key=conv(channel="warm")))
    wire_log.reset()
    yield store, wire_log
    await client.aclose()
    await pool.aclose()


async def test_redis_admit_is_one_round_trip(recorded: tuple[RedisStateStore, WireLog]) -> None:
    store, wire_log = recorded
    await _answer(store, "e0", exchange(0))
    wire_log.reset()

    admission = await store.admit(admit_req("e1", user_ms=0, channel_ms=0))
    assert admission.admitted
    assert len(admission.history) == 2
    assert (wire_log.writes, wire_log.commands) == (1, ["EVALSHA"])

    wire_log.reset()
    refused = await store.admit(admit_req("e1", attempt_id="a2"))
    assert refused.verdict is Verdict.IN_FLIGHT_ELSEWHERE
    assert (wire_log.writes, wire_log.commands) == (1, ["EVALSHA"])


async def test_redis_record_and_release_are_one_round_trip(
    recorded: tuple[RedisStateStore, WireLog],
) -> None:
    store, wire_log = recorded
    assert (await store.admit(admit_req("e1"))).admitted
    wire_log.reset()
    await store.record(record_req("e1", exchange(1)))
    assert (wire_log.writes, wire_log.commands) == (1, ["EVALSHA"])

    assert (await store.admit(admit_req("e2", key=conv(channel="other")))).admitted
    wire_log.reset()
    await store.release("e2", "a1")
    assert (wire_log.writes, wire_log.commands) == (1, ["EVALSHA"])


async def test_redis_key_layout(redis_prefix: str) -> None:
    store = RedisStateStore.from_url(REDIS_URL, redis_prefix, decode_responses=True)
    key = conv(community="guild:1", channel="50%", user="u1")
    try:
        assert (await store.admit(admit_req("ev:1", key=key, history_turns=2))).admitted
        assert (await store.admit(admit_req("ev:2", key=conv(user="u2"), channel_ms=0))).admitted
        client = Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            p = redis_prefix
            keys = {k async for k in client.scan_iter(match=f"{p}*")}
            assert keys == {
                f"{p}lease:ev:1",
                f"{p}cd:u:twitch:guild%3A1:50%25:u1",
                f"{p}cd:c:twitch:guild%3A1:50%25",
                f"{p}lease:ev:2",
                f"{p}cd:u:twitch:c1:ch1:u2",
            }
            assert await client.get(f"{p}lease:ev:1") == "a1"
            assert await client.get(f"{p}cd:c:twitch:guild%3A1:50%25") == "ev:1"
            assert 0 < await client.pttl(f"{p}cd:u:twitch:guild%3A1:50%25:u1") <= 10_000

            await store.record(
                record_req("ev:1", exchange(1), key=key, history_turns=2, history_ttl_s=60)
            )
            assert not await client.exists(f"{p}lease:ev:1")
            assert await client.get(f"{p}replied:ev:1") == "1"
            assert 86_000_000 < await client.pttl(f"{p}replied:ev:1") <= 86_400_000
            hist = f"{p}hist:twitch:guild%3A1:50%25:u1"
            assert 0 < await client.ttl(hist) <= 60
            assert await client.lrange(hist, 0, -1) == [
                '{"r":"user","c":"question 1","s":"Alice"}',
                '{"r":"assistant","c":"answer 1","s":null}',
            ]
            # decode_responses=True on the store's client is handled as well.
            await client.delete(
                f"{p}cd:u:twitch:guild%3A1:50%25:u1", f"{p}cd:c:twitch:guild%3A1:50%25"
            )
            readback = await store.admit(admit_req("ev:3", key=key, user_ms=0, channel_ms=0))
            assert readback.history == exchange(1)
        finally:
            await client.aclose()
    finally:
        await store.aclose()


async def test_redis_record_keeps_a_lease_another_attempt_took(redis_prefix: str) -> None:
    store = RedisStateStore.from_url(REDIS_URL, redis_prefix)
    client = Redis.from_url(REDIS_URL)
    try:
        assert (await store.admit(admit_req("e1", attempt_id="a1", lease_ms=100))).admitted
        await asyncio.sleep(0.2)
        assert (await store.admit(admit_req("e1", attempt_id="a2"))).admitted
        await store.record(record_req("e1", exchange(1), attempt_id="a1"))
        assert await client.get(f"{redis_prefix}lease:e1") == b"a2"
        await store.record(record_req("e1", exchange(1), attempt_id="a2"))
        assert not await client.exists(f"{redis_prefix}lease:e1")
    finally:
        await client.aclose()
        await store.aclose()


async def test_redis_skips_history_entries_that_are_not_turns(redis_prefix: str) -> None:
    store = RedisStateStore.from_url(REDIS_URL, redis_prefix)
    client = Redis.from_url(REDIS_URL)
    try:
        await _answer(store, "e1", exchange(1))
        hist = f"{redis_prefix}hist:twitch:c1:ch1:u1"
        await client.rpush(hist, b"not json", b"[1,2]", b'{"r":"system","c":"x"}')
        await client.rpush(hist, b'{"r":"user","c":"ok","s":"Al"}')
        admission = await store.admit(admit_req("e2", user_ms=0, channel_ms=0))
        assert admission.history == [*exchange(1), Turn(role="user", content="ok", speaker="Al")]
    finally:
        await client.aclose()
        await store.aclose()


async def test_redis_store_leaves_a_client_it_does_not_own_open(redis_prefix: str) -> None:
    client = Redis.from_url(REDIS_URL)
    try:
        store = RedisStateStore(client, redis_prefix)
        await store.ping()
        await store.aclose()
        assert await client.ping()
    finally:
        await client.aclose()


async def test_redis_ping_raises_when_redis_is_unreachable() -> None:
    store = RedisStateStore.from_url("redis://127.0.0.1:1/0", "test-unreachable:")
    try:
        with pytest.raises(RedisConnectionError):
            await store.ping()
    finally:
        await store.aclose()


# -- the outbox: a reply stashed before publishing ---------------------------------


async def test_a_stashed_reply_is_handed_to_the_next_attempt(harness: Harness) -> None:
    """The attempt died between the confirm and record(): its reply is published again."""
    store = harness.store
    assert (await store.admit(admit_req("e1", attempt_id="a1"))).admitted
    assert await store.stash_reply("e1", "a1", b'{"response": "hi"}', ttl_ms=60_000)
    # While a1 holds the lease, another attempt waits.
    waiting = await store.admit(admit_req("e1", attempt_id="a2"))
    assert waiting.verdict is Verdict.IN_FLIGHT_ELSEWHERE
    await store.release("e1", "a1")  # as the lease of a dead worker runs out
    pending = await store.admit(admit_req("e1", attempt_id="a2"))
    assert pending.verdict is Verdict.REPLY_PENDING
    assert pending.pending_reply == b'{"response": "hi"}'
    # a2 now holds the lease, so a third attempt waits for it.
    third = await store.admit(admit_req("e1", attempt_id="a3"))
    assert third.verdict is Verdict.IN_FLIGHT_ELSEWHERE
    await store.record(record_req("e1", exchange(1), attempt_id="a2"))
    done = await store.admit(admit_req("e1", attempt_id="a4"))
    assert done.verdict is Verdict.ALREADY_ANSWERED


async def test_only_the_lease_holder_may_stash(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", attempt_id="a1"))).admitted
    assert not await store.stash_reply("e1", "intruder", b"{}", ttl_ms=60_000)
    await store.release("e1", "a1")
    assert not await store.stash_reply("e1", "a1", b"{}", ttl_ms=60_000)
    # Nothing was stashed, so a new attempt starts afresh.
    assert (await store.admit(admit_req("e1", attempt_id="a2"))).admitted


async def test_record_clears_the_stash(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", attempt_id="a1"))).admitted
    assert await store.stash_reply("e1", "a1", b"{}", ttl_ms=60_000)
    await store.record(record_req("e1", exchange(1), attempt_id="a1"))
    assert await store.was_answered("e1")


# --- what "why no reply?" needs ---------------------------------------------


async def test_a_cooldown_refusal_says_how_long_it_still_runs(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", key=conv(user="u1")))).admitted
    user = await store.admit(admit_req("e2", key=conv(user="u1")))
    assert user.verdict is Verdict.USER_COOLDOWN
    assert user.cooldown_left_ms is not None
    assert 0 < user.cooldown_left_ms <= 10_000
    channel = await store.admit(admit_req("e3", key=conv(user="u2")))
    assert channel.verdict is Verdict.CHANNEL_COOLDOWN
    assert channel.cooldown_left_ms is not None
    assert 0 < channel.cooldown_left_ms <= 2_000


async def test_outcomes_are_kept_for_their_ttl_then_forgotten(harness: Harness) -> None:
    store = harness.store
    assert await store.get_outcome("e1") is None
    await store.put_outcome("e1", b'{"status": "no_reply"}', ttl_s=1)
    assert await store.get_outcome("e1") == b'{"status": "no_reply"}'
    await store.put_outcome("e1", b'{"status": "replied"}', ttl_s=1)  # the last word wins
    assert await store.get_outcome("e1") == b'{"status": "replied"}'
    assert await store.get_outcome("e2") is None
    await harness.advance(1.2)
    assert await store.get_outcome("e1") is None
# -- lease renewal: a slow attempt keeps its lease (issue 11) ---------------------------


async def test_the_holder_renews_its_lease(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", attempt_id="a1", lease_ms=200))).admitted
    await harness.advance(0.15)
    assert await store.renew_lease("e1", "a1", 200)
    await harness.advance(0.15)  # past the first lease, within the renewed one
    refused = await store.admit(admit_req("e1", attempt_id="a2", lease_ms=200))
    assert refused.verdict is Verdict.IN_FLIGHT_ELSEWHERE
    await harness.advance(0.2)  # the renewed lease ends on its own too
    assert (await store.admit(admit_req("e1", attempt_id="a2"))).admitted


async def test_only_the_holder_renews(harness: Harness) -> None:
    store = harness.store
    assert (await store.admit(admit_req("e1", attempt_id="a1", lease_ms=200))).admitted
    assert not await store.renew_lease("e1", "a2", 60_000)
    await harness.advance(0.3)
    assert not await store.renew_lease("e1", "a1", 60_000)  # expired: nothing to renew
    assert (await store.admit(admit_req("e1", attempt_id="a2"))).admitted
    assert not await store.renew_lease("e1", "a1", 60_000)  # another attempt took it


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_lease_keeper_holds_the_lease_while_the_attempt_runs(
    backend: str, redis_prefix: str
) -> None:
    """Real time: an attempt three leases long keeps its lease; once it ends, the lease
    expires as a dead worker's would (LeaseKeeper never releases on its own)."""
    store: StateStore = (MemoryStateStore() if backend == "memory"
                         else RedisStateStore.from_url(REDIS_URL, redis_prefix))
    try:
        assert (await store.admit(admit_req("e1", attempt_id="a1", lease_ms=300))).admitted
        async with LeaseKeeper(store, "e1", "a1", 300) as keeper:
            for _ in range(9):
                await asyncio.sleep(0.1)
                copy = await store.admit(admit_req("e1", attempt_id="a2", lease_ms=300))
                assert copy.verdict is Verdict.IN_FLIGHT_ELSEWHERE
        assert keeper.renewals >= 5
        assert not keeper.lost
        await asyncio.sleep(0.4)
        assert (await store.admit(admit_req("e1", attempt_id="a2"))).admitted
    finally:
        await store.aclose()


async def test_lease_keeper_notices_a_lost_lease(redis_prefix: str) -> None:
    store = MemoryStateStore()
    assert (await store.admit(admit_req("e1", attempt_id="a1", lease_ms=300))).admitted
    await store.release("e1", "a1")
    assert (await store.admit(admit_req("e1", attempt_id="a2", lease_ms=300))).admitted
    async with LeaseKeeper(store, "e1", "a1", 300, every_s=0.05) as keeper:
        await asyncio.sleep(0.2)
    assert keeper.lost
    assert keeper.renewals == 0
    refused = await store.admit(admit_req("e1", attempt_id="a1"))
    assert refused.verdict is Verdict.IN_FLIGHT_ELSEWHERE  # a2's lease untouched
