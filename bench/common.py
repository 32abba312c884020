"""What every scenario shares: where the services are, the events, the broker plumbing.

All three systems are fed and drained by the same code (this module, in the
harness process), so a difference in their numbers is a difference in the
systems, not in how they were measured.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage

from broker.topology import Topology

AMQP_URL = os.environ.get(
    "BENCH_AMQP_URL", os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
REDIS_URL = os.environ.get(
    "BENCH_REDIS_URL", os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))

# The worker's own defaults: the floor and FastStream run with the same bound.
DEFAULT_CONCURRENCY = 64
# The delays the worker declares by default; the harness declares the same
# topology first, so the worker's idempotent declaration must match it.
RETRY_DELAYS_MS = (1000, 2000, 4000, 8000, 16000)
# Publishes awaiting their confirm at once while the backlog is loaded.
PUBLISH_WINDOW = 512

PERSONA = (
    "You are waddlebot, the friendly, upbeat chat bot of a live-streaming community. "
    "You answer viewers in chat: short, warm, on topic, one or two sentences, "
    "no markdown, no links unless asked, never rude, never political."
)
MESSAGE = "hello everyone, how is the stream going today?"


def new_prefix(system: str) -> str:
    """A queue prefix (and Redis key prefix) of its own for every run of every system."""
    return f"bench-{system}-{uuid.uuid4().hex[:8]}"


def topology(prefix: str) -> Topology:
    return Topology(prefix=prefix, retry_delays_ms=RETRY_DELAYS_MS)


def make_events(prefix: str, n: int, *, start: int = 0) -> list[tuple[str, bytes]]:
    """(event_id, body) for `n` events, each from its own user in its own channel.

    Distinct users and channels with cooldowns at 0 mean every event needs a
    reply: no event is skipped cheaply, so every system does the whole job N times.
    """
    sent_at = datetime.now(UTC).isoformat()
    events = []
    for i in range(start, start + n):
        event_id = f"{prefix}-{i}"
        body = {
            "schema_version": 1,
            "event_id": event_id,
            "community_id": "bench-community",
            "platform": "twitch",
            "channel_id": f"channel-{i}",
            "user_id": f"user-{i}",
            "username": f"viewer{i}",
            "display_name": f"Viewer {i}",
            "message_type": "chatMessage",
            "message_content": MESSAGE,
            "metadata": {"is_mod": False},
            "sent_at": sent_at,
        }
        events.append((event_id, orjson.dumps(body)))
    return events


def event_message(event_id: str, body: bytes) -> aio_pika.Message:
    """As the router publishes an event (contract v1)."""
    return aio_pika.Message(
        body=body, content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=event_id)


class Broker:
    """The harness's own connection: declares, publishes the backlog, collects replies."""

    def __init__(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        self.connection = connection
        self._channel: aio_pika.abc.AbstractChannel | None = None

    @classmethod
    async def connect(cls) -> Broker:
        connection = await aio_pika.connect_robust(
            AMQP_URL, client_properties={"connection_name": "waddle-ai bench harness"})
        broker = cls(connection)
        broker._channel = await connection.channel(publisher_confirms=True)
        return broker

    @property
    def channel(self) -> aio_pika.abc.AbstractChannel:
        assert self._channel is not None
        return self._channel

    async def declare(self, prefix: str) -> Topology:
        """The worker's topology (quorum `interaction` queue and all): every system uses it.

        The floor and FastStream consume from the same kind of queue with the
        same arguments as the worker, so the broker's share of the cost is the same.
        """
        topo = topology(prefix)
        await topo.declare(self.channel)
        return topo

    async def publish_backlog(
        self, queue: str, events: Sequence[tuple[str, bytes]],
        sent: dict[str, float] | None = None,
    ) -> float:
        """Publish persistent events, confirmed, `PUBLISH_WINDOW` in flight; returns seconds."""
        exchange = self.channel.default_exchange
        started = time.perf_counter()
        pending: set[asyncio.Future[Any]] = set()
        for event_id, body in events:
            if len(pending) >= PUBLISH_WINDOW:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for finished in done:
                    finished.result()
            if sent is not None:
                sent[event_id] = time.perf_counter()
            pending.add(asyncio.ensure_future(
                exchange.publish(event_message(event_id, body), routing_key=queue)))
        for outcome in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome
        return time.perf_counter() - started

    async def collector(self, exchange: str) -> ReplyCollector:
        """A queue bound to the replies exchange before any event is consumed.

        Bound first, so no reply is unroutable (the systems publish `mandatory`).
        """
        channel = await self.connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="#")
        collector = ReplyCollector(channel, queue)
        await queue.consume(collector.on_reply, no_ack=True)
        return collector

    async def delete(self, prefix: str) -> None:
        """Remove every queue and exchange a run created."""
        topo = topology(prefix)
        channel = await self.connection.channel()
        try:
            await topo.delete(channel)
        finally:
            await channel.close()

    async def consumers(self, prefix: str) -> int:
        """How many consumers the interaction queue has: a worker is ready once it counts."""
        channel = await self.connection.channel()
        try:
            queue = await channel.declare_queue(topology(prefix).interaction_queue, passive=True)
            return int(queue.declaration_result.consumer_count or 0)
        finally:
            await channel.close()

    async def aclose(self) -> None:
        await self.connection.close()


class ReplyCollector:
    """Counts replies as they arrive and keeps when each one came (perf_counter)."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel,
                 queue: aio_pika.abc.AbstractQueue) -> None:
        self._channel = channel
        self._queue = queue
        self.received: dict[str, float] = {}
        self.duplicates = 0
        self.bodies: list[bytes] = []
        self.keep_bodies = 0
        self._expected = 0
        self._done = asyncio.Event()

    def expect(self, n: int) -> None:
        """Wait for `n` replies in all (those already in count)."""
        self._expected = n
        self._done.clear()
        self._check()

    async def on_reply(self, message: AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        key = message.correlation_id or ""
        if key in self.received:
            self.duplicates += 1
            return
        self.received[key] = now
        if len(self.bodies) < self.keep_bodies:
            self.bodies.append(message.body)
        self._check()

    def _check(self) -> None:
        if self._expected and len(self.received) >= self._expected:
            self._done.set()

    async def wait(self, timeout_s: float) -> bool:
        """True once the expected number of replies is in; False on timeout."""
        try:
            await asyncio.wait_for(self._done.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        await self._channel.close()


async def delete_redis_keys(prefix: str) -> int:
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start:start + 1000])
        return len(keys)
    finally:
        await client.aclose()


@dataclass
class Rate:
    """A throughput measurement: `n` replies over `span_s` seconds."""

    n: int
    span_s: float

    @property
    def per_s(self) -> float:
        return self.n / self.span_s if self.span_s > 0 else 0.0


def first_to_last(times: Iterable[float]) -> Rate:
    """Replies/s between the first and the last reply: start-up is left out.

    N-1 intervals between N replies; the consumer's connect and declare time
    (and a child process's imports) never count, whichever system it is.
    """
    ordered = sorted(times)
    if len(ordered) < 2:
        return Rate(len(ordered), 0.0)
    return Rate(len(ordered) - 1, ordered[-1] - ordered[0])


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class CpuSample:
    """CPU seconds used by named processes (and the whole machine) between two reads."""

    seconds: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    machine_busy: float = 0.0  # fraction of all cores busy

    def share(self, name: str) -> float:
        """CPU of `name` as a fraction of one core."""
        return self.seconds.get(name, 0.0) / self.wall_s if self.wall_s > 0 else 0.0


async def publish_paced(
    broker: Broker, queue: str, events: Sequence[tuple[str, bytes]], rate_per_s: float,
    sent: dict[str, float],
) -> float:
    """Publish at a steady rate, as a router would; `sent` gets each event's send time.

    Each publish is its own task, so waiting for one confirm never delays the
    next send. Returns the seconds it took.
    """
    exchange = broker.channel.default_exchange
    tasks: list[asyncio.Task[Any]] = []
    started = time.perf_counter()
    for i, (event_id, body) in enumerate(events):
        delay = started + i / rate_per_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[event_id] = time.perf_counter()
        tasks.append(asyncio.create_task(
            exchange.publish(event_message(event_id, body), routing_key=queue)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - started
