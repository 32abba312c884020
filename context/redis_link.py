"""The worker's one link to Redis: one client, one outage flag, one watcher.

The state store and the rate limiter both talk to Redis. Each used to have
its own client, and only the store knew when Redis was gone (the limiter
asked it through a callable wired in `worker/app.py`). Now both are given
this link: one pooled client, and one answer to "is Redis there?".

`run()` is the failover rule, in one place. While Redis is up, a call goes
to Redis, bounded by `op_timeout_s`; a pool with every connection in use
(`BUSY`) is load on this replica and is raised (the event is retried, the
link stays up); an unreachable Redis (`UNREACHABLE`) marks the link
degraded (one warning, `waddle_ai_state_degraded` = 1) and the call is
served from memory. While degraded, nothing waits on Redis: calls go to
memory, and one watcher PINGs Redis every `retry_after_s` until it
answers, then marks the link up again (one info log, gauge 0).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING, TypeVar

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from context.redis_pool import BUSY

if TYPE_CHECKING:
    from observability.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

# What "Redis is not there" looks like: redis-py wraps socket failures in its own
# ConnectionError / TimeoutError; OSError and the builtin TimeoutError cover what
# slips through unwrapped and our own `op_timeout_s` deadline.
UNREACHABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    TimeoutError,
    OSError,
)


class RedisLink:
    """One Redis client and whether it answers; owns the client and closes it."""

    def __init__(
        self,
        client: Redis,
        metrics: Metrics,
        *,
        retry_after_s: float = 5.0,
        op_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        ping: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """`ping`: what the watcher asks (default: the client's PING)."""
        if retry_after_s <= 0 or op_timeout_s <= 0:
            raise ValueError("retry_after_s and op_timeout_s must be positive")
        self.client = client
        self._metrics = metrics
        self._retry_after_s = retry_after_s
        self.op_timeout_s = op_timeout_s
        self._clock = clock
        self._ping = ping or client.ping
        self._degraded = False
        self._degraded_since = 0.0
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False
        metrics.state_degraded.set(0)

    @property
    def degraded(self) -> bool:
        return self._degraded

    async def run(
        self, operation: str, on_redis: Callable[[], Awaitable[T]],
        on_memory: Callable[[], Awaitable[T]],
    ) -> T:
        """`on_redis()` while Redis is up, else (or once it is found gone) `on_memory()`."""
        if self._degraded:
            return await on_memory()
        try:
            async with asyncio.timeout(self.op_timeout_s):
                return await on_redis()
        except BUSY:
            # Every pooled connection in use: load on this replica, not an
            # outage. Switching to memory would split dedupe and leases from
            # the other replicas; the event is retried instead.
            self._metrics.state_errors.labels(operation).inc()
            raise
        except UNREACHABLE as exc:
            self._metrics.state_errors.labels(operation).inc()
            self.degrade(operation, exc)
        # Outside the except block, so a failure here is not chained to Redis's.
        return await on_memory()

    def degrade(self, operation: str, exc: BaseException) -> None:
        """Redis is gone: one warning, one watcher, however many calls found out at once."""
        if self._degraded or self._closed:
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
            self._watch(), name="redis-failover-watch")

    async def aclose(self) -> None:
        """Stop watching, then close the client (and its pool)."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await self.client.aclose()

    async def _watch(self) -> None:
        """PING Redis every `retry_after_s` until it answers, then mark the link up."""
        while True:
            await asyncio.sleep(self._retry_after_s)
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    await self._ping()
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


__all__ = ["UNREACHABLE", "RedisLink"]
