"""Redis when it answers, process memory when it does not: the worker keeps replying.

A dead Redis must not stop a chat bot: every event would fail, retry and end
in the DLQ while the streamers' chats go unanswered. So each operation goes
to Redis first; the first connection error or timeout switches the store to
*degraded* mode (one warning, `waddle_ai_state_degraded` = 1) and the
operation, and every one after it, is served from a `MemoryStateStore`.
While degraded, a background task PINGs Redis every `retry_after_s` and
switches back as soon as it answers (one info log, gauge 0). No call ever
waits on a Redis we already know is down.

What degraded mode costs (the price of answering at all):

* Dedupe markers, in-flight leases and cooldowns are **per replica**: two
  replicas can both answer one event delivered to each, and a user's cooldown
  is enforced by each replica on its own.
* State written to Redis before the outage is not visible during it: an event
  answered just before the outage and redelivered during it can be answered
  again, and conversations lose their history until Redis is back.
* State written to memory during the outage is not copied to Redis. Reply
  markers are the one thing that matters afterwards, so `admit()` also asks
  memory whether this replica answered the event while degraded; a copy
  delivered to *another* replica after recovery can still be answered twice.
  Replies stashed in memory (the outbox) and conversation turns from the
  outage are forgotten once Redis is back.
* A switch between an event's `admit()` and its `stash_reply()` leaves its
  lease on the other side: the stash reports the lease lost and the event is
  deferred and admitted again where state now lives (one extra provider call).

Only "Redis is unreachable" degrades (connection refused or reset, timeouts,
Redis still loading its data set). A pool with every connection in use
(`RedisBusy`, context/redis_pool.py) is load on this replica: the call fails
and the event is retried, but the store stays on Redis. A Redis that answers with an error (out of
memory, a read-only replica, a script bug) is not an outage this store can
fix by forgetting state, so those errors propagate as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from context.memory_store import MemoryStateStore
from context.redis_pool import BUSY
from context.store import Admission, AdmitRequest, RecordRequest, StateStore, Verdict
from domain.conversation import ConversationKey

if TYPE_CHECKING:
    from observability.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

DEGRADED_BACKEND = "memory (redis unreachable)"

# What "Redis is not there" looks like: redis-py wraps socket failures in its own
# ConnectionError / TimeoutError; OSError and the builtin TimeoutError cover what
# slips through unwrapped and our own `op_timeout_s` deadline.
UNREACHABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    TimeoutError,
    OSError,
)


class FailoverStateStore:
    """StateStore over Redis that falls back to process memory while Redis is unreachable.

    `op_timeout_s` bounds every Redis call on top of the client's own socket
    timeouts, so a Redis that accepts connections but never answers costs an
    event at most that long, once, before the store degrades.
    """

    def __init__(
        self,
        primary: StateStore,
        fallback: MemoryStateStore,
        metrics: Metrics,
        *,
        retry_after_s: float = 5.0,
        op_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if retry_after_s <= 0 or op_timeout_s <= 0:
            raise ValueError("retry_after_s and op_timeout_s must be positive")
        self._primary = primary
        self._fallback = fallback
        self._metrics = metrics
        self._retry_after_s = retry_after_s
        self._op_timeout_s = op_timeout_s
        self._clock = clock
        self._degraded = False
        self._degraded_since = 0.0
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False
        metrics.state_degraded.set(0)

    @property
    def degraded(self) -> bool:
        return self._degraded

    @property
    def backend(self) -> str:
        return DEGRADED_BACKEND if self._degraded else self._primary.backend

    async def admit(self, request: AdmitRequest) -> Admission:
        if not self._degraded and await self._fallback.was_answered(request.event_id):
            # Answered by this replica while Redis was away: Redis has no marker for it.
            return Admission(Verdict.ALREADY_ANSWERED)
        return await self._call("admit", lambda store: store.admit(request))

    async def stash_reply(
        self, event_id: str, attempt_id: str, reply: bytes, ttl_ms: int
    ) -> bool:
        # The lease lives where `admit()` put it: a switch between admit and stash
        # finds none and says "lease lost", so the event is deferred and admitted
        # afresh on the other side rather than answered with no lease at all.
        return await self._call(
            "stash_reply", lambda store: store.stash_reply(event_id, attempt_id, reply, ttl_ms))

    async def renew_lease(self, event_id: str, attempt_id: str, lease_ms: int) -> bool:
        # Where the lease lives, as for stash_reply: a switch in between says
        # "lost", and the attempt's reply is then deferred rather than doubled.
        return await self._call(
            "renew_lease", lambda store: store.renew_lease(event_id, attempt_id, lease_ms))

    async def record(self, request: RecordRequest) -> None:
        await self._call("record", lambda store: store.record(request))

    async def release(
        self, event_id: str, attempt_id: str, *, cooldowns: ConversationKey | None = None
    ) -> None:
        # A lease taken in memory during the outage may outlive it: drop it too.
        # Memory only deletes what this attempt or event still owns, so this is always safe.
        await self._fallback.release(event_id, attempt_id, cooldowns=cooldowns)
        await self._call("release", lambda store: store.release(
            event_id, attempt_id, cooldowns=cooldowns))

    async def was_answered(self, event_id: str) -> bool:
        if not self._degraded and await self._fallback.was_answered(event_id):
            return True
        return await self._call("was_answered", lambda store: store.was_answered(event_id))

    async def put_outcome(self, event_id: str, outcome: bytes, ttl_s: int) -> None:
        await self._call("put_outcome", lambda store: store.put_outcome(event_id, outcome, ttl_s))

    async def get_outcome(self, event_id: str) -> bytes | None:
        found = await self._call("get_outcome", lambda store: store.get_outcome(event_id))
        if found is None and not self._degraded:
            # Written to memory during an outage that has since ended.
            found = await self._fallback.get_outcome(event_id)
        return found

    async def ping(self) -> None:
        """Succeed whenever state can be served: degraded is a mode, not a failure.

        While healthy this is a real PING, so /readyz notices an outage even
        when no events are flowing.
        """
        await self._call("ping", lambda store: store.ping())

    async def aclose(self) -> None:
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        try:
            await self._primary.aclose()
        finally:
            await self._fallback.aclose()

    async def _call(self, operation: str, call: Callable[[StateStore], Awaitable[T]]) -> T:
        if self._degraded:
            return await call(self._fallback)
        try:
            async with asyncio.timeout(self._op_timeout_s):
                return await call(self._primary)
        except BUSY:
            # Every pooled connection in use: load on this replica, not an
            # outage. Switching to memory would split dedupe and leases from
            # the other replicas; the event is retried instead.
            self._metrics.state_errors.labels(operation).inc()
            raise
        except UNREACHABLE as exc:
            self._metrics.state_errors.labels(operation).inc()
            self._degrade(operation, exc)
        # Outside the except block, so a failure here is not chained to Redis's.
        return await call(self._fallback)

    def _degrade(self, operation: str, exc: BaseException) -> None:
        if self._degraded or self._closed:
            # Several calls in flight fail together: one warning, one watcher.
            return
        self._degraded = True
        self._degraded_since = self._clock()
        self._metrics.state_degraded.set(1)
        log.warning(
            "Redis unreachable; serving conversation state from process memory "
            "(dedupe and cooldowns are per replica until it is back)",
            extra={"action": "state_degraded", "operation": operation, "error": repr(exc),
                   "retry_after_s": self._retry_after_s},
        )
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch_primary(), name="redis-failover-watch")

    async def _watch_primary(self) -> None:
        """PING Redis every `retry_after_s` until it answers, then switch back."""
        while True:
            await asyncio.sleep(self._retry_after_s)
            try:
                async with asyncio.timeout(self._op_timeout_s):
                    await self._primary.ping()
            except Exception as exc:
                log.debug("Redis still unreachable", extra={
                    "action": "state_probe", "error": repr(exc)})
                continue
            self._recover()
            return

    def _recover(self) -> None:
        self._degraded = False
        self._watcher = None
        self._metrics.state_degraded.set(0)
        log.info("Redis reachable again; conversation state is shared again",
                 extra={"action": "state_recovered",
                        "degraded_for_s": round(self._clock() - self._degraded_since, 3)})
