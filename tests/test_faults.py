"""Faults that only a real process can show: kill -9, SIGTERM, crash loops, outages, poison.

The worker runs as operators run it (`python -m worker run`, a subprocess per
incarnation); the provider is the loopback fake in this process; RabbitMQ and
Redis are real. Each test checks the promise the README makes under one fault:
nothing is lost, nothing is answered twice, and nothing loops forever.

Retry delays are 100 and 200 ms, the same as the router client's topology in
conftest (so both declare the same queues and `broker_cleanup` deletes them).
A small `OLLAMA_TIMEOUT` keeps the in-flight lease (provider timeout + 15 s)
short: after a kill -9, redelivered events wait out the dead worker's leases.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from broker.topology import Topology
from schemas import headers
from tests.conftest import AMQP_URL, REDIS_URL, get_dead_letters, queue_depth
from tests.fake_provider import Behaviour, FakeProvider
from tests.replies import ReplyCounter
from tests.worker_process import WorkerLauncher, WorkerProcess, run_cli
from worker.client import RouterClient, make_event

GREETING = "hello everyone, how is the stream going?"
OLLAMA_TIMEOUT_S = 2
LEASE_S = OLLAMA_TIMEOUT_S + 15  # what worker/app.py gives an in-flight lease
QUIET_S = 2.0  # after the last expected reply: time for a late duplicate to show up


# -- plumbing ---------------------------------------------------------------




def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


async def publish_burst(client: RouterClient, count: int) -> list[str]:
    """`count` greetings, each from its own user in its own channel (no cooldown applies)."""
    event_ids = []
    for n in range(count):
        event = make_event(GREETING, user=f"viewer{n}", channel=f"channel{n}")
        await client.publish(event)
        event_ids.append(str(event["event_id"]))
    return event_ids


async def depth_within(queue_name: str, depth: int, timeout_s: float) -> int | None:
    """None once `queue_name` holds `depth` messages, else its depth after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (current := await queue_depth(queue_name)) != depth:
        if loop.time() > deadline:
            return current
        await asyncio.sleep(0.1)
    return None


async def wait_depth(queue_name: str, depth: int, timeout_s: float, what: str) -> None:
    current = await depth_within(queue_name, depth, timeout_s)
    if current is not None:
        raise AssertionError(
            f"{what}: {queue_name} holds {current}, expected {depth} after {timeout_s:g} s")


async def wait_drained(topology: Topology, timeout_s: float = 15.0) -> None:
    """Nothing waiting in the interaction queue or any delay queue."""
    for name in (topology.interaction_queue, *topology.retry_queues):
        await wait_depth(name, 0, timeout_s, "draining")


async def peek_dead_letters(
    topology: Topology, expected: int
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Read `expected` dead letters and leave them in the DLQ (unacked, returned on close)."""
    connection = await aio_pika.connect(AMQP_URL)
    found: list[aio_pika.abc.AbstractIncomingMessage] = []
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.dead_letter_queue, ensure=True)
        while len(found) < expected:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            found.append(message)
    finally:
        await connection.close()
    return found


def assert_exactly_once(
    replies: ReplyCounter, event_ids: Sequence[str], workers: Sequence[WorkerProcess],
    notes: Sequence[str] = (), *, identical_repeats_allowed: bool = False,
) -> int:
    """Each event answered once; on failure, say which, when, and what each worker did.

    With `identical_repeats_allowed`, an event may be published twice only as
    the very same message (same message_id `reply:<event_id>`, same bytes): the
    outbox republishing the stashed reply of a worker killed between the
    broker's confirm and recording it. A router dropping repeats by message_id
    shows the viewer one reply. Returns how many such repeats were seen.
    """
    counts = replies.counts
    if identical_repeats_allowed:
        duplicated = {e: len(replies.distinct[e]) for e in event_ids
                      if len(replies.distinct.get(e, ())) > 1}
        for event_id in event_ids:
            for message_id, _ in replies.distinct.get(event_id, ()):
                assert message_id == f"reply:{event_id}", message_id
    else:
        duplicated = {e: counts[e] for e in event_ids if counts[e] > 1}
    missing = [e for e in event_ids if counts[e] == 0]
    strangers = set(counts) - set(event_ids)
    if not (duplicated or missing or strangers):
        return sum(counts[e] - 1 for e in event_ids if counts[e] > 1)
    lines = [f"{len(duplicated)} answered more than once, {len(missing)} never answered, "
             f"replies to unknown ids: {sorted(strangers)[:5]}"]
    for event_id in [*duplicated, *missing[:5]]:
        lines.append(f"{event_id}: {replies.timeline(event_id)}")
        for worker in workers:
            handled = [r for r in worker.log_records() if r.get("event_id") == event_id]
            results = Counter(str(r.get("result")) for r in handled)
            settled = [f"{r.get('result')}@{r.get('timestamp')}" for r in handled
                       if not str(r.get("result")).startswith("deferred")]
            lines.append(f"  {worker.name} (log {worker.log_path}): "
                         f"{dict(results) or 'nothing logged'}; {settled}")
    raise AssertionError("\n".join([*lines, *notes]))


async def replied_without_marker(prefix: str, event_ids: Sequence[str]) -> dict[str, int]:
    """Answered events with no reply marker in Redis, and their lease's TTL (ms, -2: none).

    Diagnostics only; the key names are `context/redis_store.py`'s layout.
    """
    client = aioredis.from_url(REDIS_URL)
    try:
        found: dict[str, int] = {}
        for event_id in event_ids:
            if not await client.exists(f"{prefix}:replied:{event_id}"):
                found[event_id] = int(await client.pttl(f"{prefix}:lease:{event_id}"))
        return found
    finally:
        await client.aclose()


# -- fixtures ---------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as provider:
        yield provider


def _worker_settings(prefix: str, fake: FakeProvider) -> dict[str, str]:
    return {
        "AMQP_URL": AMQP_URL,
        "QUEUE_PREFIX": prefix,
        "REDIS_URL": REDIS_URL,
        "AI_PROVIDER": "ollama",
        "OLLAMA_HOST": fake.url,
        "OLLAMA_TIMEOUT": str(OLLAMA_TIMEOUT_S),
        "RETRY_DELAYS_MS": "100,200",
        "USER_COOLDOWN_S": "0",
        "CHANNEL_COOLDOWN_S": "0",
        "SHUTDOWN_GRACE_S": "5",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
async def workers(
    prefix: str, fake: FakeProvider, tmp_path: Path, broker_cleanup: None, redis_cleanup: None
) -> AsyncIterator[WorkerLauncher]:
    """Worker processes of this test; any still running at the end are killed."""
    launcher = WorkerLauncher(tmp_path, **_worker_settings(prefix, fake))
    try:
        yield launcher
    finally:
        await launcher.aclose()


# -- tests ------------------------------------------------------------------


async def test_kill_9_mid_burst_loses_nothing_and_answers_nothing_twice(
    workers: WorkerLauncher, router_client: RouterClient, replies: ReplyCounter,
    fake: FakeProvider, topology: Topology, prefix: str,
) -> None:
    """A node dies with 50 events in hand: the broker gives them to the next worker.

    Those whose reply went out before the kill are recognised by their reply
    marker; the others wait (deferred in delay steps that end before the leases do) until the
    dead worker's in-flight leases expire, then are answered, once.

    A duplicate here means the dead worker's reply reached the broker but its
    reply marker never reached Redis (killed between the publish and
    `record()`); the failure message shows each reply's time against the kill,
    what each worker logged of the event, and what Redis held after the kill.
    """
    # Uneven latencies (0.1-0.3 s, 0.2 s on average): with one fixed latency the 50
    # calls in flight finish together and the kill always lands while all of them
    # wait on the provider, never between a reply's publish and its bookkeeping.
    jitter = random.Random(300)
    fake.latency_s = 0.2
    fake.script = [Behaviour(latency_s=jitter.uniform(0.1, 0.3)) for _ in range(300)]
    busy = {"MAX_CONCURRENT_REQUESTS": "50", "PREFETCH_COUNT": "50"}
    event_ids = await publish_burst(router_client, 300)
    first = await workers.start(busy)
    await replies.wait_answered(event_ids, 100, 30, "before the kill")
    first.kill()
    replies.mark("SIGKILL")
    assert await first.wait_exit(10) == -signal.SIGKILL
    await asyncio.sleep(0.2)  # replies the broker had already routed still arrive
    answered_before_kill = replies.answered(event_ids)
    assert answered_before_kill < 300, "the burst ended before the kill; nothing was in flight"
    # For the failure message: what the dead worker left in Redis for what it answered.
    unrecorded = await replied_without_marker(
        prefix, [e for e in event_ids if replies.counts[e]])

    second = await workers.start(busy)
    took = await replies.wait_answered(event_ids, 300, LEASE_S + 30, "after the restart")
    await wait_drained(topology)
    await asyncio.sleep(QUIET_S)

    repeats = assert_exactly_once(
        replies, event_ids, workers.workers, identical_repeats_allowed=True, notes=[
            f"after the SIGKILL, {len(unrecorded)} answered events had no reply marker in "
            f"Redis (event id: in-flight lease TTL ms): {unrecorded}"])
    # Only replies the dead worker had in hand can be repeated (and only identically).
    assert repeats <= len(unrecorded)
    assert await queue_depth(topology.dead_letter_queue) == 0
    assert await queue_depth(topology.interaction_queue) == 0
    assert second.returncode is None
    print(f"kill -9 at {answered_before_kill}/300 replies; the rest took {took:.1f} s; "
          f"{repeats} identical repeat(s) from the outbox")


async def test_sigterm_mid_burst_drains_and_exits_0(
    workers: WorkerLauncher, router_client: RouterClient, replies: ReplyCounter,
    fake: FakeProvider, topology: Topology,
) -> None:
    """A rolling update: SIGTERM finishes what is in hand, hands back the rest, exits 0.

    Nothing is answered twice (finished events are acked, unstarted ones go
    back untouched with no lease left behind) and the next worker answers the
    rest without waiting for any lease.
    """
    fake.latency_s = 0.3
    grace_s = 10
    busy = {"MAX_CONCURRENT_REQUESTS": "50", "PREFETCH_COUNT": "50",
            "SHUTDOWN_GRACE_S": str(grace_s)}
    event_ids = await publish_burst(router_client, 200)
    first = await workers.start(busy)
    await replies.wait_answered(event_ids, 50, 30, "before SIGTERM")
    first.terminate()
    replies.mark("SIGTERM")
    signalled = time.monotonic()
    assert await first.wait_exit(grace_s + 5) == 0
    shutdown_s = time.monotonic() - signalled
    stopped = [r for r in first.log_records() if r.get("message") == "worker stopped"]
    assert stopped, f"no 'worker stopped' line; log tail:\n{first.log_tail()}"
    assert stopped[0]["drained"] is True
    answered_by_first = replies.answered(event_ids)
    assert answered_by_first < 200, "the burst ended before SIGTERM; nothing was in flight"

    await workers.start(busy)
    # No lease of the first worker survives a drain, so no wait for one either.
    await replies.wait_answered(event_ids, 200, LEASE_S - 2, "after the restart")
    await wait_drained(topology)
    await asyncio.sleep(QUIET_S)

    assert_exactly_once(replies, event_ids, workers.workers)
    assert await queue_depth(topology.dead_letter_queue) == 0
    assert await queue_depth(topology.interaction_queue) == 0
    print(f"SIGTERM at {answered_by_first}/200 replies; exit 0 after {shutdown_s:.2f} s")


async def _outage_fills_the_dlq(
    workers: WorkerLauncher, router_client: RouterClient, fake: FakeProvider,
    topology: Topology, count: int, settings: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The provider answers 503 to everything: each event is tried 3 times, then dead-lettered.

    The circuit breaker is kept out of it (a threshold no burst reaches): an
    open circuit makes events wait for the provider instead of spending their
    retries (issue 11; tests/test_outage.py), and this is about events that
    really fail every try.
    """
    fake.status = 503
    await workers.start({"CIRCUIT_FAILURE_THRESHOLD": "1000", **(settings or {})})
    events = [make_event(GREETING, user=f"viewer{n}", channel=f"channel{n}")
              for n in range(count)]
    for event in events:
        await router_client.publish(event)
    await wait_depth(topology.dead_letter_queue, count, 20, "provider outage")

    letters = await peek_dead_letters(topology, count)
    assert len(letters) == count
    by_id = {orjson.loads(letter.body)["event_id"]: letter for letter in letters}
    assert set(by_id) == {event["event_id"] for event in events}
    for event in events:
        letter = by_id[event["event_id"]]
        assert letter.body == orjson.dumps(event)
        assert letter.headers[headers.ERROR_TYPE] == "provider_unavailable"
        assert letter.headers[headers.RETRY_COUNT] == 2
        assert letter.headers[headers.ORIGINAL_QUEUE] == topology.interaction_queue
    # The first try and one per delay step: each a real failure.
    assert fake.calls == 3 * count
    # Peeking left them where they were.
    await wait_depth(topology.dead_letter_queue, count, 5, "after peeking")
    return events


async def test_provider_outage_ends_each_event_in_the_dlq_after_its_retries(
    workers: WorkerLauncher, router_client: RouterClient, replies: ReplyCounter,
    fake: FakeProvider, topology: Topology,
) -> None:
    """An outage longer than the backoff parks events in the DLQ, with why, not in a loop."""
    await _outage_fills_the_dlq(workers, router_client, fake, topology, 10)
    assert sum(replies.counts.values()) == 0
    assert await queue_depth(topology.interaction_queue) == 0


async def test_dead_letters_replayed_after_the_outage_are_answered_once(
    workers: WorkerLauncher, router_client: RouterClient, replies: ReplyCounter,
    fake: FakeProvider, topology: Topology, tmp_path: Path,
) -> None:
    """The operator's recovery: provider back, `waddle-ai dlq replay --all` at once, all answered.

    (Replaying into a worker whose circuit is still open is tests/test_outage.py's.)
    """
    cli_env = workers.env()
    events = await _outage_fills_the_dlq(workers, router_client, fake, topology, 10)
    event_ids = [str(event["event_id"]) for event in events]

    fake.status = None
    code, out, err = await run_cli("dlq", "replay", "--all", env=cli_env, cwd=tmp_path)
    assert code == 0, f"dlq replay failed ({code}):\n{out}\n{err}"
    await replies.wait_answered(event_ids, 10, 20, "after the replay")
    await wait_depth(topology.dead_letter_queue, 0, 5, "after the replay")
    await wait_drained(topology)
    await asyncio.sleep(QUIET_S)
    assert_exactly_once(replies, event_ids, workers.workers)


POISON: list[tuple[str, bytes, str]] = [
    ("not-json", b"this is not json {", "invalid_json"),
    ("bad-utf8", b'{"event_id": "\xff\xfe\xfa"}', "invalid_json"),
    ("json-array", b'[{"event_id": "x"}]', "invalid_schema"),
    ("wrong-schema", orjson.dumps({"schema_version": 1, "event_id": "x", "platform": "myspace"}),
     "invalid_schema"),
    ("two-megabytes",
     b'{"schema_version": 1, "padding": "' + b"x" * (2 * 1024 * 1024) + b'"}',
     "invalid_schema"),
]


async def test_poison_bodies_go_to_the_dlq_and_the_worker_lives_on(
    workers: WorkerLauncher, router_client: RouterClient, replies: ReplyCounter,
    topology: Topology,
) -> None:
    """Bodies that can never succeed are dead-lettered at once, and do not hurt the process."""
    worker = await workers.start()
    for message_id, body, _ in POISON:
        await router_client.publish(body, message_id=message_id)
    letters = await get_dead_letters(topology, len(POISON), timeout_s=15)
    assert len(letters) == len(POISON), f"log tail:\n{worker.log_tail()}"

    by_id = {letter.message_id: letter for letter in letters}
    for message_id, body, error_type in POISON:
        letter = by_id[message_id]
        assert letter.body == body, message_id
        assert letter.headers[headers.ERROR_TYPE] == error_type, message_id
        assert letter.headers[headers.RETRY_COUNT] == 0, message_id
        assert _text(letter.headers[headers.ERROR]), message_id

    assert worker.returncode is None, f"the worker died; log tail:\n{worker.log_tail()}"
    event = make_event(GREETING)
    await router_client.publish(event)
    await replies.wait_answered([event["event_id"]], 1, 15, "a valid event after the poison")
    assert await queue_depth(topology.interaction_queue) == 0


async def test_a_crash_loop_ends_in_the_dlq_by_the_delivery_limit(
    prefix: str, fake: FakeProvider, tmp_path: Path, broker_cleanup: None, redis_cleanup: None,
) -> None:
    """An event that kills every worker that takes it is dead-lettered by the broker.

    No worker code runs between the crash and the redelivery, so only the
    quorum queue's delivery limit can end the loop; the event must reach the
    DLQ unchanged, and a fresh worker must then answer normal events.
    """
    delivery_limit = 2
    max_starts = 6
    topology = Topology(prefix=prefix, retry_delays_ms=(100, 200),
                        delivery_limit=delivery_limit)
    launcher = WorkerLauncher(
        tmp_path, **_worker_settings(prefix, fake),
        DELIVERY_LIMIT=str(delivery_limit), WADDLE_TEST_CRASH_MARKER="CRASH-ME")
    client = await RouterClient.connect(AMQP_URL, topology)
    await client.listen("#")
    replies = ReplyCounter(client)
    try:
        await launcher.start()
        poison = make_event("hello everyone CRASH-ME please")
        await client.publish(poison)

        crashes = 0
        worker = launcher.workers[-1]
        while True:
            code = await worker.wait_exit(20)
            assert code == 70, (f"{worker.name} exited with {code}, not the crash hook's 70; "
                                f"log tail:\n{worker.log_tail()}")
            crashes += 1
            # The broker dead-letters as it takes the delivery back from the dead consumer.
            if await depth_within(topology.dead_letter_queue, 1, 2.0) is None:
                break
            assert len(launcher.workers) < max_starts, (
                f"still looping after {crashes} crashes; the delivery limit "
                f"({delivery_limit}) did not end it")
            # Not waiting for "worker started": it may take the event and die first.
            worker = await launcher.start(wait_ready=False)

        # One crash per delivery: the first and `delivery_limit` redeliveries.
        assert crashes == delivery_limit + 1
        [letter] = await get_dead_letters(topology, 1)
        assert letter.body == orjson.dumps(poison)
        assert _text(letter.headers["x-first-death-reason"]) == "delivery_limit"
        deaths = letter.headers["x-death"]
        assert isinstance(deaths, list)
        assert len(deaths) == 1
        death = deaths[0]
        assert isinstance(death, dict)
        assert _text(death["reason"]) == "delivery_limit"
        assert _text(death["queue"]) == topology.interaction_queue

        # The loop is over: a worker stays up and answers what comes next.
        fresh = launcher.workers[-1]
        if fresh.returncode is not None:
            fresh = await launcher.start()
        else:
            await fresh.wait_ready()
        event = make_event(GREETING)
        await client.publish(event)
        await replies.wait_answered([event["event_id"]], 1, 15, "a normal event after the loop")
        assert fresh.returncode is None
        assert await queue_depth(topology.interaction_queue) == 0
    finally:
        await replies.aclose()
        await client.aclose()
        await launcher.aclose()



async def scrape(worker: WorkerProcess, name: str) -> float:
    """One unlabelled series from a worker process's /metrics (0 when absent)."""
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{worker.sidecar_port}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


async def wait_metric(worker: WorkerProcess, name: str, value: float, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (current := await scrape(worker, name)) != value:
        if loop.time() > deadline:
            raise AssertionError(f"{worker.name}: {name} is {current}, expected {value} "
                                 f"after {timeout_s:g} s; log tail:\n{worker.log_tail()}")
        await asyncio.sleep(0.1)


async def test_a_crash_between_the_confirm_and_the_marker_republishes_the_same_reply(
    workers: WorkerLauncher, router_client: RouterClient, replies: ReplyCounter,
    fake: FakeProvider, topology: Topology, prefix: str,
) -> None:
    """The one window of "Failure handling", hit on purpose, not by luck.

    WADDLE_TEST_CRASH_AFTER_CONFIRM makes the first worker die right after the
    broker confirmed its reply, before the reply marker is recorded and before
    the ack. The event comes back to the next worker, which must find the
    stashed reply (the outbox) and publish it again byte for byte, under the
    same message_id, without asking the provider again; a further copy is then
    a plain duplicate.
    """
    fake.reply_text = "Hello there, welcome in!"
    event = make_event(GREETING, user="crash-viewer", channel="crash-channel")
    event_id = str(event["event_id"])
    first = await workers.start({"WADDLE_TEST_CRASH_AFTER_CONFIRM": event_id})
    await router_client.publish(event)
    assert await first.wait_exit(30) == 70, first.log_tail()
    await replies.wait_answered([event_id], 1, 10, "before the crash")
    assert fake.calls == 1

    # What the crash left behind: the reply stashed, no marker.
    client = aioredis.from_url(REDIS_URL)
    try:
        stashed = await client.get(f"{prefix}:outbox:{event_id}")
        marked = await client.exists(f"{prefix}:replied:{event_id}")
    finally:
        await client.aclose()
    assert stashed is not None, "the reply was published without being stashed first"
    assert not marked

    second = await workers.start()
    # The dead worker's lease must run out first (provider timeout + 15 s).
    await wait_metric(second, "waddle_ai_replies_republished_total", 1, LEASE_S + 30)
    await replies.wait_count(event_id, 2, 10)
    # One distinct (message_id, body): the router drops the repeat by its message_id.
    assert replies.distinct[event_id] == {(f"reply:{event_id}", stashed)}
    assert fake.calls == 1  # no second model call

    # Recorded now: another copy is a duplicate, counted as such, not answered.
    await router_client.publish(event)
    await wait_metric(second, "waddle_ai_dedupe_hits_total", 1, 15)
    await wait_drained(topology)
    assert replies.counts[event_id] == 2
    assert await scrape(second, "waddle_ai_replies_republished_total") == 1
    assert fake.calls == 1
