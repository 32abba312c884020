"""Logs: the AAA shape, hashed user ids, per-event context, no viewer text."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from config.settings import Settings
from observability.logs import UserHasher, bind, configure_logging
from tests.conftest import AMQP_URL, LOG_HASH_TEST_KEY, REDIS_URL, capture_logs, running_worker
from tests.fake_provider import FakeProvider
from tests.worker_process import WorkerLauncher, WorkerProcess
from worker.client import RouterClient, make_event

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """At INFO: the level where viewers' text and raw ids must never appear."""
    with capture_logs(logging.INFO) as stream:
        yield stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_a_line_has_the_aaa_shape_and_hashes_the_user(captured_logs: io.StringIO) -> None:
    logging.getLogger("waddle.test").info("config changed", extra={
        "action": "config_set", "category": "audit", "user": "viewer-4521",
        "community": "c1", "result": "ok", "execution_time": 3.2})
    [entry] = lines(captured_logs)
    assert entry["level"] == "audit"
    assert entry["severity"] == "info"
    assert entry["module"] == "waddle.test"
    assert entry["action"] == "config_set"
    assert entry["community"] == "c1"
    assert entry["result"] == "ok"
    assert entry["execution_time"] == 3.2
    assert entry["message"] == "config changed"
    assert entry["timestamp"]
    assert entry["user"] == UserHasher(LOG_HASH_TEST_KEY)("viewer-4521")
    assert "viewer-4521" not in captured_logs.getvalue()


def test_levels_map_to_categories(captured_logs: io.StringIO) -> None:
    log = logging.getLogger("waddle.test")
    log.error("boom")
    log.warning("breaker open")
    log.info("handled")
    assert [e["level"] for e in lines(captured_logs)] == ["error", "system", "info"]


def test_the_hash_is_stable_for_one_key_and_differs_across_keys() -> None:
    assert UserHasher(b"k")("42") == UserHasher(b"k")("42")
    assert UserHasher(b"k")("42") != UserHasher(b"other")("42")
    assert UserHasher(b"k")("42") != UserHasher(b"k")("43")


async def test_bound_fields_appear_on_every_line_of_their_task_only(
    captured_logs: io.StringIO,
) -> None:
    log = logging.getLogger("waddle.test")
    with bind(event_id="e1", traceparent=TRACEPARENT, user_id="raw-id"):
        log.info("inside")
    log.info("outside")
    inside, outside = lines(captured_logs)
    assert inside["event_id"] == "e1"
    assert inside["traceparent"] == TRACEPARENT
    assert inside["user"] == UserHasher(LOG_HASH_TEST_KEY)("raw-id")
    assert "event_id" not in outside
    assert "raw-id" not in captured_logs.getvalue()


async def test_a_handled_event_is_logged_with_its_trace_and_without_its_text(
    make_settings: Callable[..., Settings], router_client: RouterClient, captured_logs: io.StringIO,
) -> None:
    async with FakeProvider() as fake:
        settings = make_settings(ai_provider="ollama", ollama_host=fake.url)
        event = make_event("hello, my secret plans are here?", user="user-9001")
        async with running_worker(settings):
            await router_client.publish(event, headers={"traceparent": TRACEPARENT})
            await router_client.next_reply(15)
    handled = [e for e in lines(captured_logs) if e.get("action") == "handle"]
    assert handled
    entry = handled[-1]
    assert entry["event_id"] == event["event_id"]
    assert entry["traceparent"] == TRACEPARENT
    assert entry["result"] == "replied"
    assert isinstance(entry["execution_time"], float)
    assert entry["user"] == UserHasher(LOG_HASH_TEST_KEY)("user-9001")
    text = captured_logs.getvalue()
    assert "user-9001" not in text
    assert "secret plans" not in text


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """configure_logging replaces the root's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level
             for name in ("aiormq", "aio_pika", "httpx", "httpcore", "aiohttp.access", "asyncio")}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, old in noisy.items():
            logging.getLogger(name).setLevel(old)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_production_logging_hashes_user_ids_with_the_configured_key(
    fmt: str, capsys: pytest.CaptureFixture[str], restore_root_logger: None,
) -> None:
    """What `waddle-ai run` installs, in both formats: the id hashed with LOG_HASH_KEY."""
    configure_logging("INFO", fmt, user_hash_key="replicas-share-this")
    with bind(user="viewer-4521", event_id="e-1"):
        logging.getLogger("waddle.test").info("event handled", extra={"action": "handle"})
    logging.getLogger("waddle.test").info("config read", extra={"user_id": "viewer-777"})
    out = capsys.readouterr().err
    hashed = UserHasher(b"replicas-share-this")
    assert hashed("viewer-4521") in out
    assert hashed("viewer-777") in out
    assert "viewer-4521" not in out
    assert "viewer-777" not in out
    if fmt == "json":
        first = orjson.loads(out.splitlines()[0])
        assert first["user"] == hashed("viewer-4521")
        assert first["event_id"] == "e-1"


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_a_worker_process_logs_no_raw_user_id(
    fmt: str, prefix: str, tmp_path: Path, router_client: RouterClient,
) -> None:
    """`python -m worker run` as deployed: its log holds the keyed hash, never the id."""
    async with FakeProvider() as fake:
        launcher = WorkerLauncher(
            tmp_path, AMQP_URL=AMQP_URL, REDIS_URL=REDIS_URL, QUEUE_PREFIX=prefix,
            AI_PROVIDER="ollama", OLLAMA_HOST=fake.url, RETRY_DELAYS_MS="100,200",
            LOG_HASH_KEY="replicas-share-this")
        try:
            worker = await launcher.start({"LOG_FORMAT": fmt}, wait_ready=fmt == "json")
            if fmt == "text":  # readiness is read from JSON lines; here, from the text
                await wait_for_text(worker, "worker started")
            event = make_event("hello everyone", user="viewer-raw-4521")
            await router_client.publish(event, headers={"traceparent": TRACEPARENT})
            await router_client.next_reply(15)
            await wait_for_text(worker, str(event["event_id"]))
        finally:
            await launcher.aclose()
    log = worker.log_text()
    assert UserHasher(b"replicas-share-this")("viewer-raw-4521") in log
    assert "viewer-raw-4521" not in log
    assert "hello everyone" not in log


async def wait_for_text(worker: WorkerProcess, text: str, timeout_s: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while text not in worker.log_text():
        if loop.time() > deadline or worker.returncode is not None:
            raise AssertionError(f"{text!r} not logged; log tail:\n{worker.log_tail()}")
        await asyncio.sleep(0.05)
