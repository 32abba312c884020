"""The connection pool both Redis clients (state store, rate limiter) use.

Many events in flight is load, not an outage, and the failover logic must be
able to tell the two apart:

* redis-py 6+ caps an asyncio pool at 100 connections and, past the cap,
  raises `MaxConnectionsError` at once. It is a `ConnectionError`, so with
  more than 100 events in flight the failover store took a busy replica for a
  dead Redis and switched to memory (bench/RESULTS.md, "before"). Hence a
  *blocking* pool: a call waits for a free connection.
* A blocking pool that waits too long says "No connection available." as a
  `ConnectionError` too. Here that wait ends in `RedisBusy` instead, which is
  not a connection error: the event is retried later, Redis is not given up.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisError

from schemas.errors import WaddleError

POOL_MAX_CONNECTIONS = 100
# How long a call may wait for a free connection. Callers keep it under their
# own deadline for a Redis call, so that deadline measures Redis, not the queue.
POOL_WAIT_S = 0.75


class RedisBusy(WaddleError, RedisError):
    """No pooled connection came free in time: this replica is busy, Redis is not down."""


# What "busy, not down" looks like from either kind of pool.
BUSY: tuple[type[BaseException], ...] = (RedisBusy, MaxConnectionsError)


class WaitingPool(BlockingConnectionPool):
    """A blocking pool whose timed-out wait raises `RedisBusy`, not `ConnectionError`."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Connection:
        try:
            connection: Connection = await super().get_connection(  # type: ignore[no-untyped-call]
                *args, **kwargs
            )
        except RedisConnectionError as exc:
            # The pool's own wait timing out is a bare ConnectionError caused by
            # a TimeoutError; a refused or failed connect has another cause, and
            # a connect timeout is redis' TimeoutError, not a ConnectionError.
            if type(exc) is RedisConnectionError and isinstance(exc.__cause__, TimeoutError):
                raise RedisBusy(
                    f"no Redis connection came free within {self.timeout} s "
                    f"({self.max_connections} in use)"
                ) from exc
            raise
        return connection


def pooled_client(
    url: str,
    *,
    max_connections: int = POOL_MAX_CONNECTIONS,
    pool_wait_s: float = POOL_WAIT_S,
    **client_options: Any,
) -> Redis:
    """A client over its own `WaitingPool`; closing the client closes the pool."""
    pool = WaitingPool.from_url(
        url, max_connections=max_connections, timeout=pool_wait_s, **client_options
    )
    return Redis.from_pool(pool)
