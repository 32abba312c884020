"""The state store for a single worker without Redis, kept in process memory.

It follows `RedisStateStore` rule for rule, so a deployment can move between
the two without replies changing. Everything runs on one event loop and no
method awaits between its check and its claim, so plain dict operations are
as atomic here as the Lua scripts are in Redis.

What is lost: state does not survive a restart and is not shared between
replicas, so two replicas without Redis can both answer one event.

Memory stays bounded whatever the traffic: every entry has an expiry and is
pruned when it passes (a heap makes that O(log n) per entry), and every table
has a cap past which the oldest entries are evicted.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from context.store import Admission, AdmitRequest, RecordRequest, Verdict
from domain.conversation import ConversationKey, Turn

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

ChannelKey = tuple[str, str, str]


class _ExpiringMap(Generic[K, V]):
    """A capped map whose entries vanish at their expiry, like Redis keys with a TTL.

    Entries are ordered by last write (or by last read with `touch`), so the
    cap evicts the least recently used. The heap may hold stale items for
    keys since overwritten or deleted; it is rebuilt once those outnumber the
    live entries, which keeps it within a constant factor of the map.
    """

    __slots__ = ("_capacity", "_data", "_heap", "_seq")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        # key -> (value, expires_at, seq); seq tells the current entry from stale heap items.
        self._data: OrderedDict[K, tuple[V, float, int]] = OrderedDict()
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K, now: float, *, touch: bool = False) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._data[key]
            return None
        if touch:
            self._data.move_to_end(key)
        return entry[0]

    def set(self, key: K, value: V, expires_at: float) -> None:
        seq = next(self._seq)
        self._data[key] = (value, expires_at, seq)
        self._data.move_to_end(key)
        heapq.heappush(self._heap, (expires_at, seq, key))
        while len(self._data) > self._capacity:
            self._data.popitem(last=False)
        if len(self._heap) > 2 * len(self._data) + 64:
            self._heap = [(exp, s, k) for k, (_, exp, s) in self._data.items()]
            heapq.heapify(self._heap)

    def delete(self, key: K) -> None:
        self._data.pop(key, None)

    def expires_at(self, key: K) -> float | None:
        entry = self._data.get(key)
        return None if entry is None else entry[1]

    def prune(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, key = heapq.heappop(heap)
            entry = self._data.get(key)
            if entry is not None and entry[2] == seq:
                del self._data[key]

    def clear(self) -> None:
        self._data.clear()
        self._heap.clear()


def _left_ms(expires_at: float | None, now: float) -> int | None:
    return None if expires_at is None else max(0, int((expires_at - now) * 1000))


def _channel(key: ConversationKey) -> ChannelKey:
    return (key.platform, key.community_id, key.channel_id)


class MemoryStateStore:
    """StateStore in process memory, for one worker without Redis.

    `history_turns` counts entries: a user message and the assistant's reply
    are two. `record()` keeps the last `history_turns` entries and restarts
    the conversation's `history_ttl_s`; `admit()` reads it without extending
    it, but does count as a use for the `max_conversations` LRU cap.

    `clock` returns seconds and must not go backwards; tests pass their own to
    move time without sleeping.
    """

    def __init__(
        self,
        *,
        max_conversations: int = 10_000,
        max_markers: int = 1_000_000,
        max_claims: int = 100_000,
        max_outcomes: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._markers: _ExpiringMap[str, bool] = _ExpiringMap(max_markers)
        # Leases and cooldowns live seconds; the cap only matters under a flood.
        self._leases: _ExpiringMap[str, str] = _ExpiringMap(max_claims)
        self._outbox: _ExpiringMap[str, bytes] = _ExpiringMap(max_claims)
        self._user_cooldowns: _ExpiringMap[ConversationKey, str] = _ExpiringMap(max_claims)
        self._channel_cooldowns: _ExpiringMap[ChannelKey, str] = _ExpiringMap(max_claims)
        self._conversations: _ExpiringMap[ConversationKey, tuple[Turn, ...]] = _ExpiringMap(
            max_conversations
        )
        # What became of recent events (`waddle-ai explain`); a few hundred bytes each.
        self._outcomes: _ExpiringMap[str, bytes] = _ExpiringMap(max_outcomes)

    @property
    def backend(self) -> str:
        return "memory"

    def _now(self) -> float:
        now = self._clock()
        self._markers.prune(now)
        self._leases.prune(now)
        self._outbox.prune(now)
        self._user_cooldowns.prune(now)
        self._channel_cooldowns.prune(now)
        self._conversations.prune(now)
        self._outcomes.prune(now)
        return now

    async def admit(self, request: AdmitRequest) -> Admission:
        now = self._now()
        event_id, key = request.event_id, request.key
        if self._markers.get(event_id, now):
            return Admission(Verdict.ALREADY_ANSWERED)
        lease = self._leases.get(event_id, now)
        if lease is not None and lease != request.attempt_id:
            expires_at = self._leases.expires_at(event_id)
            left = None if expires_at is None else max(0, int((expires_at - now) * 1000))
            return Admission(Verdict.IN_FLIGHT_ELSEWHERE, lease_left_ms=left)
        pending = self._outbox.get(event_id, now)
        if pending is not None:
            self._leases.set(event_id, request.attempt_id, now + request.lease_ms / 1000)
            return Admission(Verdict.REPLY_PENDING, pending_reply=pending)
        # A cooldown of 0 ms is neither checked nor claimed (see the Redis script).
        if request.user_cooldown_ms > 0:
            user_cd = self._user_cooldowns.get(key, now)
            if user_cd is not None and user_cd != event_id:
                return Admission(Verdict.USER_COOLDOWN, cooldown_left_ms=_left_ms(
                    self._user_cooldowns.expires_at(key), now))
        channel = _channel(key)
        if request.channel_cooldown_ms > 0:
            channel_cd = self._channel_cooldowns.get(channel, now)
            if channel_cd is not None and channel_cd != event_id:
                return Admission(Verdict.CHANNEL_COOLDOWN, cooldown_left_ms=_left_ms(
                    self._channel_cooldowns.expires_at(channel), now))

        self._leases.set(event_id, request.attempt_id, now + request.lease_ms / 1000)
        if request.user_cooldown_ms > 0:
            self._user_cooldowns.set(key, event_id, now + request.user_cooldown_ms / 1000)
        if request.channel_cooldown_ms > 0:
            self._channel_cooldowns.set(
                channel, event_id, now + request.channel_cooldown_ms / 1000
            )
        history: list[Turn] = []
        if request.history_turns > 0:
            turns = self._conversations.get(key, now, touch=True)
            if turns:
                history = list(turns[-request.history_turns :])
        return Admission(Verdict.ADMITTED, history)

    async def record(self, request: RecordRequest) -> None:
        now = self._now()
        self._markers.set(request.event_id, True, now + request.dedupe_ttl_s)
        self._outbox.delete(request.event_id)
        n = request.history_turns
        if n > 0 and request.turns:
            old = self._conversations.get(request.key, now) or ()
            turns = (*old, *request.turns)[-n:]
            self._conversations.set(request.key, turns, now + request.history_ttl_s)
        if self._leases.get(request.event_id, now) == request.attempt_id:
            self._leases.delete(request.event_id)

    async def stash_reply(
        self, event_id: str, attempt_id: str, reply: bytes, ttl_ms: int
    ) -> bool:
        now = self._now()
        if self._leases.get(event_id, now) != attempt_id:
            return False
        self._outbox.set(event_id, reply, now + ttl_ms / 1000)
        return True

    async def renew_lease(self, event_id: str, attempt_id: str, lease_ms: int) -> bool:
        now = self._now()
        if self._leases.get(event_id, now) != attempt_id:
            return False
        self._leases.set(event_id, attempt_id, now + lease_ms / 1000)
        return True

    async def release(
        self, event_id: str, attempt_id: str, *, cooldowns: ConversationKey | None = None
    ) -> None:
        now = self._now()
        if self._leases.get(event_id, now) == attempt_id:
            self._leases.delete(event_id)
        if cooldowns is not None:
            if self._user_cooldowns.get(cooldowns, now) == event_id:
                self._user_cooldowns.delete(cooldowns)
            channel = _channel(cooldowns)
            if self._channel_cooldowns.get(channel, now) == event_id:
                self._channel_cooldowns.delete(channel)

    async def was_answered(self, event_id: str) -> bool:
        now = self._now()
        return bool(self._markers.get(event_id, now))

    async def put_outcome(self, event_id: str, outcome: bytes, ttl_s: int) -> None:
        now = self._now()
        self._outcomes.set(event_id, outcome, now + ttl_s)

    async def get_outcome(self, event_id: str) -> bytes | None:
        return self._outcomes.get(event_id, self._now())

    async def ping(self) -> None:
        """Process memory is always there; the method exists for the protocol."""

    async def aclose(self) -> None:
        """Drop the state at once rather than when the store is collected."""
        for table in (
            self._markers,
            self._leases,
            self._outbox,
            self._user_cooldowns,
            self._channel_cooldowns,
            self._conversations,
            self._outcomes,
        ):
            table.clear()
