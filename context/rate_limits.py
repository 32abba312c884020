"""Sliding-window rate limits: how many replies a user, a community or a feature may get.

Cooldowns (in the state store) space replies out; rate limits cap how many
fit in a longer window ("5 replies per user per minute, 60 per community").
A fixed bucket ("this minute") lets twice the limit through across a bucket
boundary, so the window slides and is exact: every allowed hit is kept with
its timestamp until it leaves the window.

Window edge (both backends, to the millisecond): a hit allowed at `t` counts
against a later hit at `now` while `now - window_ms < t <= now`, i.e. in the
half-open window `(now - window_ms, now]`. It stops counting at exactly
`t + window_ms`: with limit 1 and a 1000 ms window, a hit at 0 refuses one at
999 and lets one at 1000 through.

Only allowed hits are recorded. A refused hit costs nothing, so a user who
keeps talking while limited does not push their own limit further away.

Several limits are checked all-or-nothing (`hit_all`): one event is tested
against the user's limit and the community's, and is recorded in both only if
both allow it. A community at its limit therefore never spends the budget of
the user whose message it refused, and the other way round.

A hit has an identity (the member stored for it): the event id when the caller
passes one, a unique token otherwise. A hit whose identity is still in a window
is allowed again without being recorded twice, so a redelivered or retried
event is not charged twice (the same rule as cooldown ownership in the state
store), and a Redis call retried by the client after a dropped connection is
harmless.

Redis key layout (`<p>` is the key prefix, e.g. `ai:`):

    <p>rl:<scope>:<part>:...    sorted set: member = hit identity, score = time in ms

Scope and parts are percent-encoded (`%` -> `%25`, `:` -> `%3A`), as in the
state store, so an id containing `:` cannot make two limits share a key.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import logging
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis

from context.redis_link import UNREACHABLE, RedisLink
from context.redis_pool import BUSY, pooled_client
from domain.community import RateLimit

log = logging.getLogger(__name__)

SCOPE_USER = "user"
SCOPE_COMMUNITY = "community"
SCOPE_PROACTIVE = "proactive"


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    # Hits left in the tightest window after this one; 0 when refused.
    remaining: int
    # 0 when allowed; otherwise how long until every refusing limit has room again
    # (assuming no other hit takes that room first).
    retry_after_ms: int
    # The key of the limit that refused (the one with the longest wait), for skip
    # reasons and logs; None when allowed.
    limited_by: str | None = None


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One limit to test a hit against: at most `limit` hits per `window_ms` under `key`."""

    key: str
    limit: int
    window_ms: int

    def __post_init__(self) -> None:
        # Redis reads a window of 0 as "keep nothing" and PEXPIRE 0 deletes the key;
        # a limit of 0 is a switched-off feature, which the caller decides, not us.
        if not self.key:
            raise ValueError("a rate limit key must not be empty")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"limit must be a positive int, got {self.limit!r}")
        if (
            isinstance(self.window_ms, bool)
            or not isinstance(self.window_ms, int)
            or self.window_ms < 1
        ):
            raise ValueError(f"window_ms must be a positive int, got {self.window_ms!r}")

    @classmethod
    def of(cls, key: str, rate: RateLimit | None) -> LimitCheck | None:
        """From a configured limit in seconds; None (no check) when none is configured."""
        if rate is None:
            return None
        return cls(key, rate.limit, max(1, round(rate.window_s * 1000)))


class RateLimiter(Protocol):
    """Sliding-window limits, in Redis (shared by replicas) or process memory."""

    @property
    def backend(self) -> str:
        """`redis` or `memory`, for logs."""
        ...

    async def hit(
        self,
        key: str,
        limit: int,
        window_ms: int,
        *,
        now_ms: int | None = None,
        event_id: str | None = None,
    ) -> RateDecision:
        """One limit: allow and record the hit, or refuse it without recording."""
        ...

    async def hit_all(
        self,
        checks: Sequence[LimitCheck],
        *,
        now_ms: int | None = None,
        event_id: str | None = None,
    ) -> RateDecision:
        """Several limits at once: recorded in all of them only if all of them allow it.

        `now_ms` is for tests: without it Redis uses the server's clock, memory its own.
        """
        ...

    async def aclose(self) -> None: ...


def _part(value: str) -> str:
    """Escape one key part, so that `:` inside an id cannot shift a part boundary."""
    return value.replace("%", "%25").replace(":", "%3A")


def rate_key(scope: str, *parts: str) -> str:
    """`<scope>:<part>:...`, escaped; the limiter adds its prefix and `rl:`."""
    if not scope:
        raise ValueError("a rate limit scope must not be empty")
    return ":".join(_part(value) for value in (scope, *parts))


def user_rate_key(community_id: str, platform: str, user_id: str) -> str:
    # User ids are per platform; one person's Twitch and Discord accounts are two users.
    return rate_key(SCOPE_USER, community_id, platform, user_id)


def community_rate_key(community_id: str) -> str:
    # A community spans platforms; its budget is one, whichever chat the events come from.
    return rate_key(SCOPE_COMMUNITY, community_id)


async def check_limits(
    limiter: RateLimiter,
    checks: Iterable[LimitCheck | None],
    *,
    now_ms: int | None = None,
    event_id: str | None = None,
) -> RateDecision | None:
    """Test every configured limit at once; None (and no round trip) when none is configured.

    `checks` may hold None for limits a community does not set, so callers can
    pass `LimitCheck.of(key, profile.user_rate_limit)` without branching.
    """
    configured = [check for check in checks if check is not None]
    if not configured:
        return None
    return await limiter.hit_all(configured, now_ms=now_ms, event_id=event_id)


def _validate(checks: Sequence[LimitCheck], now_ms: int | None, event_id: str | None) -> None:
    if not checks:
        raise ValueError("at least one limit must be checked")
    if len({check.key for check in checks}) != len(checks):
        # Both backends would record the hit once while counting it against both
        # limits: refuse the ambiguity instead of picking one.
        raise ValueError("each key may be checked only once per hit")
    if now_ms is not None and (isinstance(now_ms, bool) or not isinstance(now_ms, int)):
        raise ValueError(f"now_ms must be an int, got {now_ms!r}")
    if event_id is not None and not event_id:
        raise ValueError("event_id must not be empty")


class _Identities:
    """Hit identities: event ids as given, otherwise unique per process and call.

    The namespaces keep a generated token from ever equalling an event id.
    """

    __slots__ = ("_counter", "_instance")

    def __init__(self) -> None:
        self._instance = uuid.uuid4().hex
        self._counter = itertools.count()

    def member(self, event_id: str | None) -> str:
        if event_id is not None:
            return f"e:{event_id}"
        return f"g:{self._instance}:{next(self._counter)}"


# KEYS: one sorted set per limit
# ARGV: now_ms ('' = the server's clock), member, then limit and window_ms per key
# Returns {allowed, remaining, retry_after_ms, index of the refusing key (1-based) or 0}.
# Effects replication (the default since Redis 5) makes TIME before writes safe.
_HIT_LUA = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local member = ARGV[2]
local remaining = -1
local wait, culprit = 0, 0
local fresh = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local count = redis.call('ZCARD', KEYS[i])
  local left
  if redis.call('ZSCORE', KEYS[i], member) then
    left = limit - count
  elseif count < limit then
    fresh[#fresh + 1] = i
    left = limit - count - 1
  else
    local oldest = redis.call('ZRANGE', KEYS[i], count - limit, count - limit, 'WITHSCORES')
    local w = math.max(1, tonumber(oldest[2]) + window - now)
    if culprit == 0 or w > wait then
      wait, culprit = w, i
    end
    left = 0
  end
  if remaining < 0 or left < remaining then
    remaining = left
  end
end
if culprit > 0 then
  return {0, 0, wait, culprit}
end
for _, i in ipairs(fresh) do
  redis.call('ZADD', KEYS[i], now, member)
  redis.call('PEXPIRE', KEYS[i], ARGV[2 + 2 * i])
end
return {1, math.max(remaining, 0), 0, 0}
"""


class _OneKeyHit(ABC):
    """`hit()` is `hit_all()` with one check, the same for every limiter."""

    @abstractmethod
    async def hit_all(
        self,
        checks: Sequence[LimitCheck],
        *,
        now_ms: int | None = None,
        event_id: str | None = None,
    ) -> RateDecision: ...

    async def hit(
        self,
        key: str,
        limit: int,
        window_ms: int,
        *,
        now_ms: int | None = None,
        event_id: str | None = None,
    ) -> RateDecision:
        return await self.hit_all(
            [LimitCheck(key, limit, window_ms)], now_ms=now_ms, event_id=event_id
        )


class RedisRateLimiter(_OneKeyHit):
    """Limits shared by every replica: one Lua script, so one round trip and atomic.

    Time is the Redis server's (`TIME`), so replicas whose clocks disagree
    still agree on every window. A key expires one window after its newest
    hit, so idle users cost Redis nothing.
    """

    def __init__(self, client: Redis, key_prefix: str, *, owns_client: bool = False) -> None:
        self._client = client
        self._prefix = f"{key_prefix}rl:"
        self._owns_client = owns_client
        self._identities = _Identities()
        self._script = client.register_script(_HIT_LUA)

    @classmethod
    def from_url(cls, url: str, key_prefix: str, **client_options: Any) -> RedisRateLimiter:
        """A limiter with its own connection pool, which `aclose()` then closes.

        The state store's kind of pool (context/redis_pool.py): with more events
        in flight than connections, a call waits for one instead of failing
        like a dead Redis.
        """
        return cls(pooled_client(url, **client_options), key_prefix, owns_client=True)

    @property
    def backend(self) -> str:
        return "redis"

    def redis_key(self, key: str) -> str:
        return f"{self._prefix}{key}"

    async def hit_all(
        self,
        checks: Sequence[LimitCheck],
        *,
        now_ms: int | None = None,
        event_id: str | None = None,
    ) -> RateDecision:
        _validate(checks, now_ms, event_id)
        args: list[str | int] = ["" if now_ms is None else now_ms,
                                 self._identities.member(event_id)]
        for check in checks:
            args += [check.limit, check.window_ms]
        result = await self._script(
            keys=[self.redis_key(check.key) for check in checks], args=args
        )
        allowed, remaining, retry_after_ms, culprit = (int(value) for value in result)
        return RateDecision(
            allowed=bool(allowed),
            remaining=remaining,
            retry_after_ms=retry_after_ms,
            limited_by=checks[culprit - 1].key if culprit else None,
        )

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


@dataclass(slots=True)
class _Window:
    # (time_ms, member), sorted by time: the oldest hit is always on the left.
    hits: deque[tuple[int, str]] = field(default_factory=deque)
    members: set[str] = field(default_factory=set)
    # When the newest hit leaves its window: from then on the key is idle.
    idle_at: int = 0
    # Tells the current heap item for this key from stale ones.
    seq: int = 0

    def prune(self, now: int, window_ms: int) -> None:
        hits, edge = self.hits, now - window_ms
        while hits and hits[0][0] <= edge:
            self.members.discard(hits.popleft()[1])

    def add(self, now: int, member: str) -> None:
        if not self.hits or self.hits[-1][0] <= now:
            self.hits.append((now, member))
        else:
            # Only an explicit now_ms can go backwards; keep Redis's order by score.
            bisect.insort(self.hits, (now, member))
        self.members.add(member)


class MemoryRateLimiter(_OneKeyHit):
    """Limits for one worker without Redis, with the same answers as `RedisRateLimiter`.

    Everything runs on one event loop and `hit_all` never awaits, so a check
    and its record are as atomic here as the Lua script is in Redis.

    Memory is bounded: a key is dropped once its newest hit leaves the window
    (a heap finds those in O(log n)), each key holds at most `limit` hits, and
    past `max_keys` the least recently hit key is evicted. Eviction forgets
    that key's hits, so under a flood of distinct keys a limit can let more
    through than it should; it never refuses more.

    `clock` returns seconds and must not go backwards; tests pass `now_ms`
    (or their own clock) to move time without sleeping.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self._clock = clock
        self._max_keys = max_keys
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._heap: list[tuple[int, int, str]] = []
        self._seq = itertools.count()
        self._identities = _Identities()

    def __len__(self) -> int:
        return len(self._windows)

    @property
    def backend(self) -> str:
        return "memory"

    async def hit_all(
        self,
        checks: Sequence[LimitCheck],
        *,
        now_ms: int | None = None,
        event_id: str | None = None,
    ) -> RateDecision:
        _validate(checks, now_ms, event_id)
        now = math.floor(self._clock() * 1000) if now_ms is None else now_ms
        self._prune_idle(now)
        member = self._identities.member(event_id)

        remaining = -1
        wait, culprit = 0, -1
        fresh: list[LimitCheck] = []
        for index, check in enumerate(checks):
            window = self._windows.get(check.key)
            if window is not None:
                window.prune(now, check.window_ms)
            count = len(window.hits) if window is not None else 0
            if window is not None and member in window.members:
                left = check.limit - count
            elif count < check.limit:
                fresh.append(check)
                left = check.limit - count - 1
            else:
                assert window is not None
                oldest = window.hits[count - check.limit][0]
                needed = max(1, oldest + check.window_ms - now)
                if culprit < 0 or needed > wait:
                    wait, culprit = needed, index
                left = 0
            if remaining < 0 or left < remaining:
                remaining = left
        if culprit >= 0:
            return RateDecision(False, 0, wait, checks[culprit].key)

        for check in fresh:
            self._record(check, now, member)
        return RateDecision(True, max(remaining, 0), 0)

    def _record(self, check: LimitCheck, now: int, member: str) -> None:
        window = self._windows.get(check.key)
        if window is None:
            window = self._windows[check.key] = _Window()
        window.add(now, member)
        window.idle_at = window.hits[-1][0] + check.window_ms
        window.seq = next(self._seq)
        self._windows.move_to_end(check.key)
        heapq.heappush(self._heap, (window.idle_at, window.seq, check.key))
        while len(self._windows) > self._max_keys:
            self._windows.popitem(last=False)
        if len(self._heap) > 2 * len(self._windows) + 64:
            self._heap = [(w.idle_at, w.seq, k) for k, w in self._windows.items()]
            heapq.heapify(self._heap)

    def _prune_idle(self, now: int) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, key = heapq.heappop(heap)
            window = self._windows.get(key)
            if window is not None and window.seq == seq:
                del self._windows[key]

    async def aclose(self) -> None:
        """Drop the windows at once rather than when the limiter is collected."""
        self._windows.clear()
        self._heap.clear()


class FailoverRateLimiter(_OneKeyHit):
    """Redis when it answers, process memory when it does not, like the state store.

    A dead Redis must not turn every reply into an error: while the worker's
    `RedisLink` is degraded (the one outage flag, shared with the state
    store) limits are counted in memory without asking Redis, and a call that
    finds Redis unreachable is answered from memory too and tells the link.
    While degraded, limits are per replica, so a deployment of N replicas can
    let up to N times a limit through; hits counted in memory are not copied
    to Redis afterwards. Without a link, each call finds out for itself.
    """

    def __init__(
        self,
        primary: RateLimiter,
        fallback: MemoryRateLimiter,
        *,
        link: RedisLink | None = None,
        op_timeout_s: float = 2.0,
    ) -> None:
        """`op_timeout_s` bounds a Redis call when there is no link (else the link's)."""
        if op_timeout_s <= 0:
            raise ValueError("op_timeout_s must be positive")
        self._primary = primary
        self._fallback = fallback
        self._link = link
        self._op_timeout_s = link.op_timeout_s if link is not None else op_timeout_s
        self._failing = False

    def _degraded(self) -> bool:
        return self._link is not None and self._link.degraded

    @property
    def backend(self) -> str:
        return self._fallback.backend if self._degraded() else self._primary.backend

    async def hit_all(
        self,
        checks: Sequence[LimitCheck],
        *,
        now_ms: int | None = None,
        event_id: str | None = None,
    ) -> RateDecision:
        if self._degraded():
            return await self._fallback.hit_all(checks, now_ms=now_ms, event_id=event_id)
        try:
            async with asyncio.timeout(self._op_timeout_s):
                decision = await self._primary.hit_all(checks, now_ms=now_ms, event_id=event_id)
        except BUSY:
            # A busy replica, not a dead Redis: counting in memory would hand
            # this event a budget of its own; the event is retried instead.
            raise
        except UNREACHABLE as exc:
            if self._link is not None:
                # The one outage flag: the link warns once and starts its watcher.
                self._link.degrade("hit_all", exc)
            elif not self._failing:
                self._failing = True
                log.warning("Redis unreachable; counting rate limits in process memory",
                            extra={"action": "rate_limits_degraded", "error": repr(exc)})
        else:
            self._failing = False
            return decision
        return await self._fallback.hit_all(checks, now_ms=now_ms, event_id=event_id)

    async def aclose(self) -> None:
        try:
            await self._primary.aclose()
        finally:
            await self._fallback.aclose()


__all__ = [
    "SCOPE_COMMUNITY",
    "SCOPE_PROACTIVE",
    "SCOPE_USER",
    "FailoverRateLimiter",
    "LimitCheck",
    "MemoryRateLimiter",
    "RateDecision",
    "RateLimiter",
    "RedisRateLimiter",
    "check_limits",
    "community_rate_key",
    "rate_key",
    "user_rate_key",
]
