"""Outages: Redis going away and coming back, the broker dropping our connections.

Nothing here stops the machine's shared Redis or RabbitMQ (other tests use
them). Redis outages use a private `redis-server` on a free port that the
test stops and starts again; broker outages close only this test's worker
connections, found by their names (`waddle-ai consume <prefix>`), with
`rabbitmqctl close_connection`, the way a broker restart or a network cut
looks to the client.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from config.settings import Settings
from context.failover_store import DEGRADED_BACKEND, FailoverStateStore
from context.memory_store import MemoryStateStore
from context.redis_link import UNREACHABLE, RedisLink
from context.redis_pool import BUSY, RedisBusy, pooled_client
from context.redis_store import RedisStateStore
from context.store import AdmitRequest, RecordRequest, Verdict
from domain.conversation import ConversationKey, Turn
from observability.metrics import Metrics
from tests.conftest import AMQP_URL, REDIS_URL, REQUIRED_TOOL, running_worker
from tests.fake_provider import FakeProvider
from worker.app import App, connection_name
from worker.client import RouterClient, make_event

# Only the tests that run a private Redis need the binary (the broker tests do
# not): they skip without it, and in CI that skip is a failure (conftest).
needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason=REQUIRED_TOOL + "redis-server (Debian: apt-get install redis-server)")
needs_rabbitmqctl = pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None,
    reason=REQUIRED_TOOL + "rabbitmqctl (Debian: apt-get install rabbitmq-server)")

REPLY_TIMEOUT_S = 30.0
KEY = ConversationKey(community_id="c1", channel_id="ch1", user_id="u1", platform="twitch")


# -- a private Redis --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """A throwaway redis-server this test may stop, freeze and restart at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url, socket_connect_timeout=0.2)
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        await client.ping()
                        return
                    except Exception:
                        await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGCONT)  # in case a test froze it
        process.terminate()
        await process.wait()

    def freeze(self, frozen: bool) -> None:
        """SIGSTOP: Redis keeps its socket open but answers nothing (a hung server)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class LinkedStore(FailoverStateStore):
    """The store over its own link, closed with it (in the worker, the App closes the link)."""

    def __init__(self, primary: RedisStateStore, link: RedisLink) -> None:
        super().__init__(primary, MemoryStateStore(), link)
        self.link = link

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.link.aclose()


def failover_store(url: str, metrics: Metrics, *, retry_after_s: float = 0.3,
                   op_timeout_s: float = 1.0) -> LinkedStore:
    client = pooled_client(url, socket_connect_timeout=0.5, socket_timeout=0.5,
                           retry=Retry(NoBackoff(), 1))
    link = RedisLink(client, metrics, retry_after_s=retry_after_s, op_timeout_s=op_timeout_s)
    return LinkedStore(RedisStateStore(client, "t:"), link)


def admit_request(event_id: str) -> AdmitRequest:
    return AdmitRequest(event_id=event_id, attempt_id=uuid.uuid4().hex, key=KEY,
                        user_cooldown_ms=0, channel_cooldown_ms=0, lease_ms=30_000,
                        history_turns=10)


def record_request(admitted: AdmitRequest) -> RecordRequest:
    return RecordRequest(event_id=admitted.event_id, attempt_id=admitted.attempt_id, key=KEY,
                         turns=[Turn("user", "hi", speaker="u1"), Turn("assistant", "hello")],
                         history_turns=10, history_ttl_s=60, dedupe_ttl_s=60)


def gauge(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polling plain in-process state
            await asyncio.sleep(0.02)


def actions(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


# -- FailoverStateStore -----------------------------------------------------


@needs_redis_server
async def test_failover_store_uses_memory_while_redis_is_down_and_returns_to_it(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="context.redis_link")
    metrics = Metrics()
    store = failover_store(private_redis.url, metrics)
    # Its pooled connection dies with the server: one retry reconnects it.
    direct = Redis.from_url(private_redis.url, retry=Retry(NoBackoff(), 1))
    try:
        first = admit_request("e1")
        assert (await store.admit(first)).admitted
        await store.record(record_request(first))
        assert store.backend == "redis"
        assert await direct.exists("t:replied:e1") == 1

        await private_redis.stop()
        during = admit_request("e2")
        admission = await store.admit(during)  # no exception: memory answers
        assert admission.admitted
        assert store.degraded
        assert store.backend == DEGRADED_BACKEND
        assert gauge(metrics, "waddle_ai_state_degraded") == 1
        assert gauge(metrics, "waddle_ai_state_errors_total", operation="admit") == 1
        await store.record(record_request(during))
        assert (await store.admit(admit_request("e2"))).verdict is Verdict.ALREADY_ANSWERED
        await store.ping()  # degraded is not a failure
        # Once degraded, calls go straight to memory: no more errors, no waiting.
        assert gauge(metrics, "waddle_ai_state_errors_total", operation="admit") == 1

        await private_redis.start()  # same port, empty: --save "" keeps nothing
        await eventually(lambda: not store.degraded, timeout_s=5.0)
        assert store.backend == "redis"
        assert gauge(metrics, "waddle_ai_state_degraded") == 0
        # Answered from memory during the outage: still known after it.
        assert (await store.admit(admit_request("e2"))).verdict is Verdict.ALREADY_ANSWERED
        after = admit_request("e3")
        assert (await store.admit(after)).admitted
        assert await direct.get("t:lease:e3") == after.attempt_id.encode()
    finally:
        await direct.aclose()
        await store.aclose()
    assert len(actions(caplog, "state_degraded")) == 1
    assert len(actions(caplog, "state_recovered")) == 1


@needs_redis_server
async def test_failover_store_gives_up_on_a_hung_redis_after_the_op_timeout(
    private_redis: PrivateRedis,
) -> None:
    metrics = Metrics()
    store = failover_store(private_redis.url, metrics, retry_after_s=0.2, op_timeout_s=0.5)
    try:
        await store.ping()
        private_redis.freeze(True)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await store.admit(admit_request("e1"))).admitted
        assert loop.time() - started < 1.5
        assert store.degraded
        assert (await store.admit(admit_request("e2"))).admitted
        assert loop.time() - started < 1.6  # the second call did not wait on Redis
        private_redis.freeze(False)
        await eventually(lambda: not store.degraded, timeout_s=5.0)
        assert gauge(metrics, "waddle_ai_state_degraded") == 0
    finally:
        private_redis.freeze(False)
        await store.aclose()


async def test_a_full_pool_is_load_not_an_outage(redis_prefix: str) -> None:
    """Every pooled connection in use: the call fails as busy (the event is retried),
    the store stays on Redis, and the next call is served by Redis again."""
    metrics = Metrics()
    client = pooled_client(REDIS_URL, max_connections=1, pool_wait_s=0.1)
    store = LinkedStore(RedisStateStore(client, redis_prefix),
                        RedisLink(client, metrics, op_timeout_s=1.0))
    holder = asyncio.create_task(client.blpop([f"{redis_prefix}never"], timeout=1))
    try:
        await eventually(lambda: not client.connection_pool.can_get_connection())
        with pytest.raises(RedisBusy, match="no Redis connection came free"):
            await store.admit(admit_request("e1"))
        assert not store.degraded
        assert store.backend == "redis"
        assert gauge(metrics, "waddle_ai_state_degraded") == 0
        assert gauge(metrics, "waddle_ai_state_errors_total", operation="admit") == 1
        await holder
        assert (await store.admit(admit_request("e1"))).admitted
        assert await client.exists(f"{redis_prefix}lease:e1") == 1
    finally:
        holder.cancel()
        await store.aclose()


async def test_a_refused_connection_is_still_an_outage() -> None:
    """The pool tells its own wait apart from Redis refusing the connection."""
    client = pooled_client(f"redis://127.0.0.1:{free_port()}/0", max_connections=1,
                           pool_wait_s=0.1, socket_connect_timeout=0.5)
    try:
        with pytest.raises(UNREACHABLE) as caught:
            await client.ping()
        assert not isinstance(caught.value, BUSY)
    finally:
        await client.aclose()


# -- the worker through a Redis outage --------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as provider:
        yield provider


async def collect_replies(client: RouterClient, replies: Counter[str], expected: set[str],
                          timeout_s: float = REPLY_TIMEOUT_S) -> None:
    """Count replies by correlation id until every expected event has one."""
    async with asyncio.timeout(timeout_s):
        while not expected <= replies.keys():
            message = await client.next_reply(timeout_s)
            replies[str(message.correlation_id)] += 1


async def drain_quietly(client: RouterClient, replies: Counter[str], quiet_s: float) -> None:
    """Anything more that arrives within `quiet_s` (a duplicate would) is counted too."""
    while True:
        try:
            message = await client.next_reply(quiet_s)
        except TimeoutError:
            return
        replies[str(message.correlation_id)] += 1


@needs_redis_server
async def test_worker_answers_every_event_once_through_a_redis_outage(
    make_settings: Callable[..., Settings], router_client: RouterClient, fake: FakeProvider,
    private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("worker.app.REDIS_RETRY_AFTER_S", 0.5)
    fake.latency_s = 0.05
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url,
                             redis_url=private_redis.url)
    replies: Counter[str] = Counter()
    sent: set[str] = set()

    async def publish(n: int, tag: str) -> None:
        for i in range(n):
            event = make_event("hello?", user=f"{tag}-u{i}", channel=f"{tag}-ch{i}")
            sent.add(event["event_id"])
            await router_client.publish(event)
            await asyncio.sleep(0.02)

    async with running_worker(settings) as app:
        assert app.store.backend == "redis"
        await publish(15, "before")
        await private_redis.stop()
        await publish(15, "during")
        await collect_replies(router_client, replies, sent)
        store = app.store
        assert isinstance(store, FailoverStateStore)
        assert store.degraded
        ready, detail = await app.readiness()
        assert ready  # degraded is not unready
        assert detail["state"]["backend"] == DEGRADED_BACKEND
        assert detail["state"]["degraded"] is True
        assert await metric(app, "waddle_ai_state_degraded") == 1

        await private_redis.start()
        await eventually(lambda: not store.degraded, timeout_s=5.0)
        await publish(10, "after")
        await collect_replies(router_client, replies, sent)
        await drain_quietly(router_client, replies, 1.0)
        assert await metric(app, "waddle_ai_state_degraded") == 0
        assert app.consumer is not None
        assert app.consumer.attached
        ready, detail = await app.readiness()
        assert ready
        assert detail["state"]["backend"] == "redis"
        assert detail["state"]["degraded"] is False

    assert len(sent) == 40
    assert set(replies) == sent
    assert all(count == 1 for count in replies.values()), replies


async def metric(app: App, name: str, **labels: str) -> float:
    return gauge(app.metrics, name, **labels)


# -- the worker through a broker connection loss ----------------------------


async def rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def connection_pids(names: list[str]) -> list[str]:
    """The broker's ids of exactly the connections with these names."""
    listing = await rabbitmqctl("list_connections", "-q", "pid", "client_properties")
    return [
        line.split("\t", 1)[0]
        for line in listing.splitlines()
        if any(f'{{"connection_name","{name}"}}' in line for name in names)
    ]


async def close_connections(pids: list[str]) -> None:
    """Close them from the broker's side, as a broker restart or a network cut would."""
    await asyncio.gather(*(rabbitmqctl("close_connection", pid, "test: simulated outage")
                           for pid in pids))


@needs_rabbitmqctl
async def test_worker_loses_nothing_when_the_broker_drops_its_connections(
    make_settings: Callable[..., Settings], router_client: RouterClient, fake: FakeProvider,
) -> None:
    fake.latency_s = 0.2
    # Reconnect attempts every 0.5 s rather than aio-pika's default 5 s.
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url,
                             amqp_url=f"{AMQP_URL}?reconnect_interval=0.5",
                             max_concurrent_requests=4, prefetch_count=8)
    replies: Counter[str] = Counter()
    sent: set[str] = set()
    during_outage: list[tuple[str, bool, dict[str, Any]]] = []

    async with running_worker(settings) as app:
        assert app.consumer is not None
        # Found before the burst: rabbitmqctl takes a few hundred ms per call.
        pids = await connection_pids([connection_name(settings, "consume"),
                                      connection_name(settings, "publish")])
        assert len(pids) == 2
        # The outage lasts milliseconds (aio-pika retries at once), too short to
        # poll for. Close callbacks run, and are awaited, before the reconnect
        # starts: ask /readyz's logic from there.
        for role in ("consume", "publish"):  # the two this test closes
            connection = app.connections[role]

            async def probe(_: object, __: object, role: str = role) -> None:
                during_outage.append((role, *await app.readiness()))
            connection.close_callbacks.add(probe)

        closer: asyncio.Task[None] | None = None
        # ~2 s of events at about the rate 4 slots x 0.2 s can answer, so the
        # close lands with deliveries in hand and others still queued.
        for i in range(50):
            event = make_event("hello?", user=f"u{i}", channel=f"ch{i}")
            sent.add(event["event_id"])
            await router_client.publish(event)
            if i == 15:
                closer = asyncio.create_task(close_connections(pids))
            await asyncio.sleep(0.04)
        assert closer is not None
        await closer
        calls_when_closed = fake.calls
        await collect_replies(router_client, replies, sent, timeout_s=40.0)
        await drain_quietly(router_client, replies, 1.5)

        assert app.consumer.attached
        assert (await app.readiness())[0]
        assert await metric(app, "waddle_ai_consumer_up") == 1
        assert await metric(app, "waddle_ai_broker_reconnects_total", connection="consume") >= 1
        assert await metric(app, "waddle_ai_broker_reconnects_total", connection="publish") >= 1

    assert calls_when_closed < 50  # the outage hit the middle of the work
    assert set(replies) == sent
    # Deliveries in hand when the consume connection died are redelivered; the
    # reply marker must make their second handling a no-op. (aiormq cancels a
    # dead channel's consumer tasks: the consumer must let handling that has
    # already published finish and record, or this fails now and then.)
    duplicates = {event_id: n for event_id, n in replies.items() if n != 1}
    assert not duplicates
    # Not ready while a connection was down; ready again (asserted above) after.
    assert {role for role, _, _ in during_outage} == {"consume", "publish"}
    for role, ready, detail in during_outage:
        assert ready is False, role
        assert detail["broker"]["connected"] is False
    assert any(detail["consumer"]["attached"] is False for _, _, detail in during_outage)


@needs_rabbitmqctl
async def test_consumer_is_reattached_after_its_connection_is_closed(
    make_settings: Callable[..., Settings], router_client: RouterClient, fake: FakeProvider,
) -> None:
    """aio-pika re-declares the queue and re-consumes on the new channel by itself."""
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url,
                             amqp_url=f"{AMQP_URL}?reconnect_interval=0.5")
    async with running_worker(settings) as app:
        assert app.consumer is not None
        pids = await connection_pids([connection_name(settings, "consume")])
        assert len(pids) == 1
        await close_connections(pids)
        await eventually(lambda: app.consumer is not None and app.consumer.attached)
        await eventually(lambda: app.metrics.registry.get_sample_value(
            "waddle_ai_broker_reconnects_total", {"connection": "consume"}) == 1.0)
        event = make_event("hello?")
        await router_client.publish(event)
        reply = await router_client.wait_for(event["event_id"], REPLY_TIMEOUT_S)
        assert reply is not None
        detail: dict[str, Any] = (await app.readiness())[1]
        assert detail["broker"]["connected"] is True
        assert detail["consumer"]["attached"] is True
