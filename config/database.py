"""PostgreSQL connections for community config: one typed seam over asyncpg.

asyncpg ships no type information, so it is imported here only, and the rest
of the package talks to the small protocols below. They name just what this
package uses, which also keeps the code honest about what it needs from a
connection.

Pools are created with `min_size=0`: creating one never touches the network,
so a worker whose database is down at start still starts (and serves the
environment defaults) instead of crash-looping.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg

Record = Mapping[str, Any]

#: What "the database is unreachable" looks like, as opposed to a bad query.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)

CheckViolationError: type[Exception] = asyncpg.CheckViolationError
PostgresError: type[Exception] = asyncpg.PostgresError


class Transaction(Protocol):
    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: object) -> Any: ...


class Connection(Protocol):
    async def execute(self, query: str, *args: Any) -> str: ...
    async def fetch(self, query: str, *args: Any) -> list[Record]: ...
    async def fetchrow(self, query: str, *args: Any) -> Record | None: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    def transaction(self) -> Transaction: ...
    async def add_listener(self, channel: str, callback: Callable[..., Any]) -> None: ...
    async def remove_listener(self, channel: str, callback: Callable[..., Any]) -> None: ...
    def add_termination_listener(self, callback: Callable[..., Any]) -> None: ...
    def get_server_pid(self) -> int: ...
    def is_closed(self) -> bool: ...
    async def close(self) -> None: ...
    def terminate(self) -> None: ...


class Pool(Protocol):
    def acquire(self) -> AbstractAsyncContextManager[Connection]: ...
    async def execute(self, query: str, *args: Any) -> str: ...
    async def fetch(self, query: str, *args: Any) -> list[Record]: ...
    async def fetchrow(self, query: str, *args: Any) -> Record | None: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def close(self) -> None: ...
    def terminate(self) -> None: ...


async def create_pool(
    dsn: str,
    *,
    min_size: int = 0,
    max_size: int = 10,
    connect_timeout_s: float = 5.0,
    command_timeout_s: float = 10.0,
    server_settings: Mapping[str, str] | None = None,
) -> Pool:
    """A lazy pool: nothing connects until the first query (see the module docstring)."""
    settings = {"application_name": "waddle-ai", **(server_settings or {})}
    pool: Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=connect_timeout_s,
        command_timeout=command_timeout_s,
        server_settings=settings,
    )
    return pool


async def connect(
    dsn: str,
    *,
    connect_timeout_s: float = 5.0,
    server_settings: Mapping[str, str] | None = None,
) -> Connection:
    """One connection outside any pool: LISTEN must live on a connection nobody else uses."""
    settings = {"application_name": "waddle-ai", **(server_settings or {})}
    connection: Connection = await asyncpg.connect(
        dsn, timeout=connect_timeout_s, server_settings=settings
    )
    return connection


@asynccontextmanager
async def connection_from(pool_or_dsn: Pool | str) -> AsyncIterator[Connection]:
    """A connection from a pool (returned after) or a DSN (closed after)."""
    if isinstance(pool_or_dsn, str):
        connection = await connect(pool_or_dsn)
        try:
            yield connection
        finally:
            await connection.close()
    else:
        async with pool_or_dsn.acquire() as connection:
            yield connection


def redact_dsn(dsn: str) -> str:
    """A DSN fit for a log line: the password replaced, everything else kept."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, UNAVAILABLE_ERRORS)


__all__ = [
    "UNAVAILABLE_ERRORS",
    "CheckViolationError",
    "Connection",
    "Pool",
    "PostgresError",
    "Record",
    "connect",
    "connection_from",
    "create_pool",
    "is_unavailable",
    "redact_dsn",
]
