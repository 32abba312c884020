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
fix by forgetting state, so those errors propagate as before. The rule itself
(which errors degrade, the watcher that switches back) is `context/redis_link.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from context.memory_store import MemoryStateStore
from context.redis_link import RedisLink
from context.store import Admission, AdmitRequest, RecordRequest, StateStore, Verdict
from domain.conversation import ConversationKey

T = TypeVar("T")

DEGRADED_BACKEND = "memory (redis unreachable)"

class FailoverStateStore:
    """StateStore over Redis that falls back to process memory while Redis is unreachable.

    Whether Redis is there is the `RedisLink`'s to say (one flag and one
    watcher for the whole worker, shared with the rate limiter); its
    `op_timeout_s` bounds every Redis call on top of the client's own socket
    timeouts, so a Redis that accepts connections but never answers costs an
    event at most that long, once, before the link degrades.
    """

    def __init__(self, primary: StateStore, fallback: MemoryStateStore, link: RedisLink) -> None:
        self._primary = primary
        self._fallback = fallback
        self._link = link

    @property
    def degraded(self) -> bool:
        return self._link.degraded

    @property
    def backend(self) -> str:
        return DEGRADED_BACKEND if self.degraded else self._primary.backend

    async def admit(self, request: AdmitRequest) -> Admission:
        if not self.degraded and await self._fallback.was_answered(request.event_id):
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
        if not self.degraded and await self._fallback.was_answered(event_id):
            return True
        return await self._call("was_answered", lambda store: store.was_answered(event_id))

    async def put_outcome(self, event_id: str, outcome: bytes, ttl_s: int) -> None:
        await self._call("put_outcome", lambda store: store.put_outcome(event_id, outcome, ttl_s))

    async def get_outcome(self, event_id: str) -> bytes | None:
        found = await self._call("get_outcome", lambda store: store.get_outcome(event_id))
        if found is None and not self.degraded:
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
        """Both stores; the link (and its client) is closed by whoever built it."""
        try:
            await self._primary.aclose()
        finally:
            await self._fallback.aclose()

    async def _call(self, operation: str, call: Callable[[StateStore], Awaitable[T]]) -> T:
        return await self._link.run(
            operation, lambda: call(self._primary), lambda: call(self._fallback))
