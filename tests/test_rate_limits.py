"""Both rate limiters must give the same answers; the Redis one runs against a real Redis.

The Redis is tests/conftest.py's (`TEST_REDIS_URL`, default
redis://127.0.0.1:6379/0). Each test uses its own random key prefix and deletes
its keys afterwards, so tests can share a Redis with other users.

Most tests pass explicit `now_ms` values to hit the window edge to the
millisecond. Their windows are long (a minute): Redis still expires a key one
window after its last allowed hit in *real* time, and a slow run must not see
its keys vanish mid-test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from context.rate_limits import (
    FailoverRateLimiter,
    LimitCheck,
    MemoryRateLimiter,
    RateDecision,
    RateLimiter,
    RedisRateLimiter,
    check_limits,
    community_rate_key,
    rate_key,
    user_rate_key,
)
from context.redis_link import RedisLink
from observability.metrics import Metrics
from tests.conftest import REDIS_URL
from tests.redis_wire import RecordingConnection, WireLog

MINUTE = 60_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[RateLimiter]:
    made: RateLimiter
    if request.param == "memory":
        made = MemoryRateLimiter(clock=FakeClock())
    else:
        made = RedisRateLimiter.from_url(REDIS_URL, redis_prefix)
    yield made
    await made.aclose()


def allowed(remaining: int) -> RateDecision:
    return RateDecision(allowed=True, remaining=remaining, retry_after_ms=0)


def refused(retry_after_ms: int, by: str) -> RateDecision:
    return RateDecision(allowed=False, remaining=0, retry_after_ms=retry_after_ms, limited_by=by)


# --- one limit ---------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3, 10])
async def test_allows_exactly_limit_then_refuses(limiter: RateLimiter, limit: int) -> None:
    for t in range(limit):
        assert await limiter.hit("k", limit, MINUTE, now_ms=t) == allowed(limit - 1 - t)
    # The first hit (t=0) counts until t=MINUTE, exclusive.
    assert await limiter.hit("k", limit, MINUTE, now_ms=limit) == refused(MINUTE - limit, "k")


@pytest.mark.parametrize("limit", [1, 3, 10])
async def test_window_edge_is_exact(limiter: RateLimiter, limit: int) -> None:
    """A hit at t counts in (now - window, now]: at t + window - 1 it counts, at t + window not."""
    for t in range(limit):
        assert (await limiter.hit("k", limit, MINUTE, now_ms=t)).allowed
    # One millisecond before the hit at 0 leaves: refused, and told exactly how long to wait.
    assert await limiter.hit("k", limit, MINUTE, now_ms=MINUTE - 1) == refused(1, "k")
    # The moment it leaves: exactly one slot is free again.
    assert await limiter.hit("k", limit, MINUTE, now_ms=MINUTE) == allowed(0)
    if limit > 1:
        # The hit at 1 is still in (MINUTE - MINUTE, MINUTE] ... until MINUTE + 1.
        assert await limiter.hit("k", limit, MINUTE, now_ms=MINUTE) == refused(1, "k")
        assert await limiter.hit("k", limit, MINUTE, now_ms=MINUTE + 1) == allowed(0)
    else:
        # Limit 1: the hit at MINUTE itself now holds the window until 2 * MINUTE.
        assert await limiter.hit("k", 1, MINUTE, now_ms=2 * MINUTE - 1) == refused(1, "k")
        assert await limiter.hit("k", 1, MINUTE, now_ms=2 * MINUTE) == allowed(0)


async def test_refused_hits_are_not_recorded(limiter: RateLimiter) -> None:
    assert (await limiter.hit("k", 2, MINUTE, now_ms=0)).allowed
    assert (await limiter.hit("k", 2, MINUTE, now_ms=500)).allowed
    for t in range(600, MINUTE, 997):
        assert not (await limiter.hit("k", 2, MINUTE, now_ms=t)).allowed
    # Had any refusal counted, these would still be refused.
    assert await limiter.hit("k", 2, MINUTE, now_ms=MINUTE) == allowed(0)
    assert await limiter.hit("k", 2, MINUTE, now_ms=MINUTE + 499) == refused(1, "k")
    assert await limiter.hit("k", 2, MINUTE, now_ms=MINUTE + 500) == allowed(0)


async def test_retry_after_waits_for_the_oldest_hit_that_must_leave(limiter: RateLimiter) -> None:
    for t in (100, 3_000, 7_000):
        assert (await limiter.hit("k", 3, MINUTE, now_ms=t)).allowed
    assert await limiter.hit("k", 3, MINUTE, now_ms=10_000) == refused(MINUTE + 100 - 10_000, "k")
    # Honouring retry_after is enough: the retry is let through.
    assert (await limiter.hit("k", 3, MINUTE, now_ms=MINUTE + 100)).allowed
    assert await limiter.hit("k", 3, MINUTE, now_ms=MINUTE + 200) == refused(2_800, "k")


async def test_a_lowered_limit_waits_for_enough_hits_to_leave(limiter: RateLimiter) -> None:
    for t in (0, 10, 20, 30):
        assert (await limiter.hit("k", 4, MINUTE, now_ms=t)).allowed
    # Four hits in the window and a limit of two: the third oldest (20) must leave first.
    assert await limiter.hit("k", 2, MINUTE, now_ms=100) == refused(MINUTE + 20 - 100, "k")


async def test_keys_are_independent(limiter: RateLimiter) -> None:
    assert (await limiter.hit("a", 1, MINUTE, now_ms=0)).allowed
    assert not (await limiter.hit("a", 1, MINUTE, now_ms=1)).allowed
    assert (await limiter.hit("b", 1, MINUTE, now_ms=1)).allowed
    assert (await limiter.hit(rate_key("user", "a"), 1, MINUTE, now_ms=1)).allowed


async def test_keys_with_colons_do_not_collide(limiter: RateLimiter) -> None:
    first = user_rate_key("c:1", "twitch", "u")
    second = user_rate_key("c", "1:twitch", "u")
    assert first != second
    assert (await limiter.hit(first, 1, MINUTE, now_ms=0)).allowed
    assert (await limiter.hit(second, 1, MINUTE, now_ms=0)).allowed


async def test_the_same_event_is_not_charged_twice(limiter: RateLimiter) -> None:
    assert await limiter.hit("k", 2, MINUTE, now_ms=0, event_id="e1") == allowed(1)
    # A redelivery of e1 finds its own hit: allowed, nothing more recorded.
    assert await limiter.hit("k", 2, MINUTE, now_ms=50, event_id="e1") == allowed(1)
    assert await limiter.hit("k", 2, MINUTE, now_ms=60, event_id="e2") == allowed(0)
    # Even at the limit, a retry of a counted event goes through.
    assert await limiter.hit("k", 2, MINUTE, now_ms=70, event_id="e1") == allowed(0)
    assert await limiter.hit("k", 2, MINUTE, now_ms=80, event_id="e3") == refused(MINUTE - 80, "k")
    # Its hit keeps its first time: it leaves at MINUTE, not MINUTE + 70.
    assert await limiter.hit("k", 2, MINUTE, now_ms=MINUTE, event_id="e3") == allowed(0)
    # Once its hit left the window, e1 is a new hit again (and is refused).
    assert not (await limiter.hit("k", 2, MINUTE, now_ms=MINUTE + 1, event_id="e1")).allowed


# --- several limits at once --------------------------------------------------


async def test_all_or_nothing_across_user_and_community(limiter: RateLimiter) -> None:
    community = community_rate_key("c1")

    def checks(user: str) -> list[LimitCheck]:
        return [
            LimitCheck(user_rate_key("c1", "twitch", user), 2, 10 * MINUTE),
            LimitCheck(community, 3, MINUTE),
        ]

    async def hit(user: str, t: int) -> RateDecision:
        return await limiter.hit_all(checks(user), now_ms=t)

    alice, bob = user_rate_key("c1", "twitch", "alice"), user_rate_key("c1", "twitch", "bob")
    assert await hit("alice", 0) == allowed(1)
    assert await hit("alice", 1) == allowed(0)
    # Alice's own limit refuses: the community's budget is left alone...
    assert await hit("alice", 2) == refused(10 * MINUTE - 2, alice)
    # ...so Bob still gets its last slot.
    assert await hit("bob", 10) == allowed(0)
    # The community refuses Bob: his own budget is left alone...
    assert await hit("bob", 20) == refused(MINUTE - 20, community)
    # ...so once the community's window moved on, he still has one hit of his two.
    assert await hit("bob", MINUTE + 10) == allowed(0)
    assert await hit("bob", MINUTE + 20) == refused(10 + 10 * MINUTE - MINUTE - 20, bob)
    # And Alice's refusals did not spend the community's budget either.
    assert await hit("alice", MINUTE + 30) == refused(10 * MINUTE - MINUTE - 30, alice)
    assert (await hit("carol", MINUTE + 40)).allowed
    assert (await hit("dave", MINUTE + 50)).allowed
    assert await hit("erin", MINUTE + 60) == refused(MINUTE - 50, community)


async def test_both_refusing_reports_the_longer_wait(limiter: RateLimiter) -> None:
    user, community = LimitCheck("u", 1, MINUTE), LimitCheck("c", 1, 2 * MINUTE)
    assert (await limiter.hit_all([user, community], now_ms=0)).allowed
    assert await limiter.hit_all([user, community], now_ms=100) == refused(
        2 * MINUTE - 100, "c"
    )
    assert await limiter.hit_all([community, user], now_ms=100) == refused(
        2 * MINUTE - 100, "c"
    )


async def test_remaining_is_the_tightest_limit(limiter: RateLimiter) -> None:
    checks = [LimitCheck("u", 5, MINUTE), LimitCheck("c", 2, MINUTE)]
    assert await limiter.hit_all(checks, now_ms=0) == allowed(1)
    assert await limiter.hit_all(checks, now_ms=1) == allowed(0)


async def test_check_limits_skips_unconfigured_limits(limiter: RateLimiter) -> None:
    assert await check_limits(limiter, [None, None]) is None
    decision = await check_limits(limiter, [None, LimitCheck("c", 1, MINUTE)], now_ms=0)
    assert decision == allowed(0)
    assert await check_limits(limiter, [LimitCheck("c", 1, MINUTE)], now_ms=1) == refused(
        MINUTE - 1, "c"
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: LimitCheck("k", 0, 1000),
        lambda: LimitCheck("k", 1, 0),
        lambda: LimitCheck("", 1, 1000),
        lambda: LimitCheck("k", True, 1000),
        lambda: LimitCheck("k", 1, 1.5),  # type: ignore[arg-type]
    ],
)
def test_limit_checks_reject_bad_numbers(build: Any) -> None:
    with pytest.raises(ValueError, match=r"limit|window_ms|key"):
        build()


async def test_hits_reject_bad_requests(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError, match="at least one"):
        await limiter.hit_all([])
    with pytest.raises(ValueError, match="only once"):
        await limiter.hit_all([LimitCheck("k", 1, 1000), LimitCheck("k", 2, 1000)])
    with pytest.raises(ValueError, match="event_id"):
        await limiter.hit("k", 1, 1000, event_id="")
    with pytest.raises(ValueError, match="now_ms"):
        await limiter.hit("k", 1, 1000, now_ms=1.5)  # type: ignore[arg-type]


def test_limit_check_from_a_configured_rate() -> None:
    class Rate:
        limit = 5
        window_s = 2.5

    assert LimitCheck.of("k", Rate()) == LimitCheck("k", 5, 2500)
    assert LimitCheck.of("k", None) is None


# --- concurrency -------------------------------------------------------------


async def test_concurrent_hits_allow_exactly_the_limit(limiter: RateLimiter) -> None:
    # No now_ms: Redis uses its own clock, memory its (fake) one.
    results = await asyncio.gather(*(limiter.hit("k", 10, MINUTE) for _ in range(100)))
    assert sum(result.allowed for result in results) == 10
    assert sorted(r.remaining for r in results if r.allowed) == list(range(10))


async def test_concurrent_multi_key_hits_allow_exactly_the_shared_limit(
    limiter: RateLimiter,
) -> None:
    results = await asyncio.gather(*(
        limiter.hit_all([LimitCheck(f"u{i % 7}", 3, MINUTE), LimitCheck("c", 10, MINUTE)])
        for i in range(100)
    ))
    assert sum(result.allowed for result in results) == 10
    # Seven users, three hits each at most: 10 fits, and no user went over.
    per_user = [0] * 7
    for i, result in enumerate(results):
        per_user[i % 7] += result.allowed
    assert max(per_user) <= 3


# --- clocks ------------------------------------------------------------------


async def test_memory_uses_its_clock_without_now_ms() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    assert await limiter.hit("k", 1, 1000) == allowed(0)
    clock.now += 0.999
    assert await limiter.hit("k", 1, 1000) == refused(1, "k")
    clock.now += 0.001
    assert await limiter.hit("k", 1, 1000) == allowed(0)


async def test_redis_uses_the_server_clock_without_now_ms(redis_prefix: str) -> None:
    limiter = RedisRateLimiter.from_url(REDIS_URL, redis_prefix)
    client = Redis.from_url(REDIS_URL)
    try:
        window = 300
        assert await limiter.hit("k", 1, window) == allowed(0)
        seconds, micros = await client.time()
        server_ms = seconds * 1000 + micros // 1000
        entries = await client.zrange(limiter.redis_key("k"), 0, -1, withscores=True)
        assert len(entries) == 1
        assert 0 <= server_ms - float(entries[0][1]) < 1000
        # The key lives one window after its newest hit, then Redis drops it.
        assert 0 < await client.pttl(limiter.redis_key("k")) <= window

        second = await limiter.hit("k", 1, window)
        assert not second.allowed
        assert 0 < second.retry_after_ms <= window
        await asyncio.sleep(second.retry_after_ms / 1000 + 0.05)
        assert (await limiter.hit("k", 1, window)).allowed
    finally:
        await client.aclose()
        await limiter.aclose()


# --- memory only -------------------------------------------------------------


async def test_memory_max_keys_is_honoured() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock(), max_keys=5)
    for i in range(50):
        assert (await limiter.hit(f"k{i}", 1, MINUTE, now_ms=i)).allowed
        assert len(limiter) <= 5
    # The most recently hit keys are the ones kept.
    assert not (await limiter.hit("k49", 1, MINUTE, now_ms=100)).allowed
    assert (await limiter.hit("k0", 1, MINUTE, now_ms=100)).allowed


async def test_memory_drops_idle_keys() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    for i in range(20):
        assert (await limiter.hit(f"k{i}", 3, 1000, now_ms=i)).allowed
    assert len(limiter) == 20
    # k0..k9 had their only hit leave the window; k10..k19 still count.
    await limiter.hit("other", 3, MINUTE, now_ms=1009)
    assert len(limiter) == 11
    await limiter.hit("other", 3, MINUTE, now_ms=5000)
    assert len(limiter) == 1


async def test_memory_expiry_heap_stays_bounded() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    for t in range(5000):
        await limiter.hit("hot", 1_000_000, MINUTE, now_ms=t)
    assert len(limiter._heap) <= 2 * len(limiter) + 65


async def test_memory_keeps_order_when_now_goes_backwards() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    for t in (500, 100, 300):
        assert (await limiter.hit("k", 3, 1000, now_ms=t)).allowed
    # Like Redis's sorted set: the oldest by time (100) leaves first.
    assert await limiter.hit("k", 3, 1000, now_ms=1000) == refused(100, "k")
    assert await limiter.hit("k", 3, 1000, now_ms=1100) == allowed(0)


async def test_memory_aclose_drops_state() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    await limiter.hit("k", 1, MINUTE, now_ms=0)
    await limiter.aclose()
    assert len(limiter) == 0


# --- Redis only --------------------------------------------------------------


async def test_redis_every_hit_is_one_round_trip(redis_prefix: str) -> None:
    wire_log = WireLog()
    pool = ConnectionPool.from_url(
        REDIS_URL, connection_class=RecordingConnection, wire_log=wire_log
    )
    client = Redis(connection_pool=pool)
    limiter = RedisRateLimiter(client, redis_prefix)
    try:
        # Connect, and load the script should the server not know it yet.
        await limiter.hit("warm-up", 1, MINUTE)
        checks = [LimitCheck("u", 1, MINUTE), LimitCheck("c", 5, MINUTE)]
        expected = [True, False, True, False]  # allowed, refused, in both, refused by one
        for i, allowed_now in enumerate(expected):
            wire_log.reset()
            if i < 2:
                decision = await limiter.hit("k", 1, MINUTE)
            else:
                decision = await limiter.hit_all(checks)
            assert decision.allowed is allowed_now
            assert (wire_log.writes, wire_log.commands) == (1, ["EVALSHA"])
    finally:
        await client.aclose()
        await pool.aclose()


async def test_redis_key_layout(redis_prefix: str) -> None:
    limiter = RedisRateLimiter.from_url(REDIS_URL, redis_prefix)
    client = Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        await limiter.hit_all(
            [
                LimitCheck(user_rate_key("guild:1", "discord", "50%"), 1, MINUTE),
                LimitCheck(community_rate_key("guild:1"), 1, MINUTE),
            ],
            event_id="ev:1",
        )
        p = redis_prefix
        keys = {key async for key in client.scan_iter(match=f"{p}*")}
        assert keys == {
            f"{p}rl:user:guild%3A1:discord:50%25",
            f"{p}rl:community:guild%3A1",
        }
        assert await client.zrange(f"{p}rl:community:guild%3A1", 0, -1) == ["e:ev:1"]
    finally:
        await client.aclose()
        await limiter.aclose()


async def test_redis_limiter_leaves_a_client_it_does_not_own_open(redis_prefix: str) -> None:
    client = Redis.from_url(REDIS_URL)
    try:
        limiter = RedisRateLimiter(client, redis_prefix)
        await limiter.aclose()
        assert await client.ping()
    finally:
        await client.aclose()


# --- failover ----------------------------------------------------------------


class Unreachable:
    """A primary whose Redis is gone."""

    def __init__(self) -> None:
        self.calls = 0

    @property
    def backend(self) -> str:
        return "redis"

    async def hit(self, key: str, limit: int, window_ms: int, *, now_ms: int | None = None,
                  event_id: str | None = None) -> RateDecision:
        return await self.hit_all([LimitCheck(key, limit, window_ms)])

    async def hit_all(self, checks: Any, *, now_ms: int | None = None,
                      event_id: str | None = None) -> RateDecision:
        self.calls += 1
        raise RedisConnectionError("connection refused")

    async def aclose(self) -> None:
        pass


async def test_failover_counts_in_memory_when_redis_is_unreachable() -> None:
    primary = Unreachable()
    limiter = FailoverRateLimiter(primary, MemoryRateLimiter(clock=FakeClock()))
    assert await limiter.hit("k", 1, MINUTE, now_ms=0) == allowed(0)
    assert await limiter.hit("k", 1, MINUTE, now_ms=1) == refused(MINUTE - 1, "k")
    assert primary.calls == 2


async def test_failover_skips_redis_while_the_store_is_degraded() -> None:
    primary = Unreachable()
    link = RedisLink(Redis(host="127.0.0.1", port=1), Metrics(), retry_after_s=60)
    link.degrade("admit", RedisConnectionError("connection refused"))  # the store found out
    limiter = FailoverRateLimiter(primary, MemoryRateLimiter(clock=FakeClock()), link=link)
    try:
        assert (await limiter.hit("k", 1, MINUTE, now_ms=0)).allowed
        assert primary.calls == 0
        assert limiter.backend == "memory"
    finally:
        await link.aclose()


async def test_an_outage_the_limiter_finds_degrades_the_one_link() -> None:
    primary = Unreachable()
    metrics = Metrics()
    link = RedisLink(Redis(host="127.0.0.1", port=1), metrics, retry_after_s=60)
    limiter = FailoverRateLimiter(primary, MemoryRateLimiter(clock=FakeClock()), link=link)
    try:
        assert (await limiter.hit("k", 1, MINUTE, now_ms=0)).allowed
        assert link.degraded  # the state store sharing the link now skips Redis too
        assert metrics.registry.get_sample_value("waddle_ai_state_degraded") == 1
        assert (await limiter.hit("k", 1, MINUTE, now_ms=1)) == refused(MINUTE - 1, "k")
        assert primary.calls == 1  # degraded: Redis is not asked again
    finally:
        await link.aclose()


async def test_failover_uses_redis_while_it_answers(redis_prefix: str) -> None:
    fallback = MemoryRateLimiter(clock=FakeClock())
    limiter = FailoverRateLimiter(RedisRateLimiter.from_url(REDIS_URL, redis_prefix), fallback)
    try:
        assert (await limiter.hit("k", 1, MINUTE, now_ms=0)).allowed
        assert len(fallback) == 0
        assert limiter.backend == "redis"
    finally:
        await limiter.aclose()


# -- edges found by the mutation run (tests/README.md); memory only, no Redis --


@dataclass(frozen=True)
class Rate:
    limit: int
    window_s: float


async def test_memory_clock_counts_in_milliseconds() -> None:
    clock = FakeClock()
    clock.now = 0.0
    limiter = MemoryRateLimiter(clock=clock)
    assert (await limiter.hit("k", 1, 1000)).allowed
    clock.now = 0.9995  # 999 ms later: still inside the window
    assert not (await limiter.hit("k", 1, 1000)).allowed
    clock.now = 1.0
    assert (await limiter.hit("k", 1, 1000)).allowed


async def test_memory_keeps_exactly_max_keys() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock(), max_keys=2)
    for i in range(3):
        await limiter.hit(f"k{i}", 1, MINUTE, now_ms=i)
    assert len(limiter) == 2
    single = MemoryRateLimiter(clock=FakeClock(), max_keys=1)
    await single.hit("a", 1, MINUTE, now_ms=0)
    assert len(single) == 1
    with pytest.raises(ValueError, match="max_keys must be at least 1"):
        MemoryRateLimiter(max_keys=0)


async def test_of_two_equal_waits_the_first_refusing_limit_is_named() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    checks = [LimitCheck("a", 1, 1000), LimitCheck("b", 1, 1000)]
    assert (await limiter.hit_all(checks, now_ms=0)).allowed
    assert await limiter.hit_all(checks, now_ms=10) == RateDecision(False, 0, 990, "a")


def test_the_smallest_window_is_one_millisecond() -> None:
    assert LimitCheck("k", 1, 1).window_ms == 1
    check = LimitCheck.of("k", Rate(limit=3, window_s=0.0001))
    assert check == LimitCheck("k", 3, 1)
    assert LimitCheck.of("k", Rate(limit=3, window_s=2.5)) == LimitCheck("k", 3, 2500)
    with pytest.raises(ValueError, match="a rate limit key must not be empty"):
        LimitCheck("", 1, 1)


def test_key_layout_escapes_every_part() -> None:
    assert user_rate_key("c:1", "twitch", "u%2") == "user:c%3A1:twitch:u%252"
    assert community_rate_key("c:1") == "community:c%3A1"
    assert rate_key("proactive", "a", "b") == "proactive:a:b"


async def test_check_limits_charges_one_event_once() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    check = LimitCheck("k", 1, MINUTE)
    assert (await check_limits(limiter, [check], now_ms=0, event_id="e1")).allowed  # type: ignore[union-attr]
    assert (await check_limits(limiter, [check], now_ms=1, event_id="e1")).allowed  # type: ignore[union-attr]
    assert not (await check_limits(limiter, [check], now_ms=2, event_id="e2")).allowed  # type: ignore[union-attr]


async def test_bad_requests_say_what_is_wrong() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    with pytest.raises(ValueError, match="at least one limit must be checked"):
        await limiter.hit_all([], now_ms=0)
    with pytest.raises(ValueError, match="each key may be checked only once per hit"):
        await limiter.hit_all([LimitCheck("k", 1, 10), LimitCheck("k", 2, 10)], now_ms=0)
    with pytest.raises(ValueError, match="event_id must not be empty"):
        await limiter.hit_all([LimitCheck("k", 1, 10)], now_ms=0, event_id="")


async def test_an_event_whose_hit_left_the_window_is_charged_again() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    check = [LimitCheck("k", 1, 1000)]
    assert (await limiter.hit_all(check, now_ms=0, event_id="e1")).allowed
    # Its first hit has left the window: the same event is a new hit now.
    assert (await limiter.hit_all(check, now_ms=2000, event_id="e1")).allowed
    assert not (await limiter.hit_all(check, now_ms=2001, event_id="e2")).allowed
