"""A newcomer's first hour, as subprocesses: answers instead of silence, no tracebacks.

The worker runs as `python -m worker run` (tests/worker_process.py); the CLI
runs as `python -m worker ...` against it. The provider is the loopback fake.
Each test checks what the user reads: the reply, or the one sentence that
says why there is none, and never a traceback.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from broker.topology import Topology
from tests.conftest import AMQP_URL, REDIS_URL, get_dead_letters
from tests.fake_provider import Behaviour, FakeProvider
from tests.worker_process import WorkerLauncher, run_cli
from worker.client import RouterClient, make_event

CLOSED = "127.0.0.1:1"  # nothing listens on port 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as provider:
        yield provider


def worker_settings(prefix: str, fake: FakeProvider, **extra: str) -> dict[str, str]:
    return {
        "AMQP_URL": AMQP_URL, "QUEUE_PREFIX": prefix, "AI_PROVIDER": "ollama",
        "OLLAMA_HOST": fake.url, "OLLAMA_TIMEOUT": "5", "RETRY_DELAYS_MS": "100,200",
        "SHUTDOWN_GRACE_S": "5", **extra,
    }


@pytest.fixture
async def launcher(
    prefix: str, tmp_path: Path, broker_cleanup: None, redis_cleanup: None
) -> AsyncIterator[WorkerLauncher]:
    launcher = WorkerLauncher(tmp_path)
    try:
        yield launcher
    finally:
        await launcher.aclose()


def no_traceback(*outputs: str) -> None:
    for output in outputs:
        assert "Traceback" not in output, output


async def test_publish_wait_and_explain_tell_a_reply_a_cooldown_and_no_trigger_apart(
    launcher: WorkerLauncher, fake: FakeProvider, prefix: str, tmp_path: Path
) -> None:
    """Memory backend (the README's default): outcomes come from the worker's sidecar."""
    port = free_port()
    settings = worker_settings(prefix, fake, SIDECAR_PORT=str(port), USER_COOLDOWN_S="10",
                               CHANNEL_COOLDOWN_S="600")
    worker = await launcher.start(settings)
    env = launcher.env(**settings)

    code, out, err = await run_cli("publish", "hello everyone", "--wait", env=env, cwd=tmp_path)
    assert code == 0, err
    reply = orjson.loads(out)
    first_id = reply["event_id"]
    assert reply["trigger"] == "greeting"
    # age_ms counts from sent_at, so it covers at least this attempt's processing.
    assert reply["age_ms"] >= reply["processing_time_ms"] >= 0

    # The same viewer again within USER_COOLDOWN_S: said at once, not after the timeout.
    code, out, err = await run_cli("publish", "hello again", "--wait", "--timeout", "120",
                                   env=env, cwd=tmp_path)
    assert code == 1
    assert "no reply (user_cooldown): user cooldown: a reply to this viewer started" in err
    assert "USER_COOLDOWN_S=10" in err
    assert "no reply within" not in err
    second_id = err.split("published event ", 1)[1].split()[0]

    code, out, err = await run_cli("publish", "just chatting here", "--wait", "--user", "bob",
                                   env=env, cwd=tmp_path)
    assert code == 1
    assert "no reply (no_trigger)" in err
    no_traceback(out, err)

    # Someone else in the same channel: the channel's cooldown, with its setting.
    code, out, err = await run_cli("publish", "hey all", "--wait", "--user", "carol",
                                   env=env, cwd=tmp_path)
    assert code == 1
    assert "no reply (channel_cooldown): channel cooldown: a reply to this channel" in err
    assert "CHANNEL_COOLDOWN_S=600" in err
    # Another bot's line.
    code, out, err = await run_cli("publish", "hello everyone", "--wait", "--user", "dave",
                                   "--metadata", '{"is_bot": true}', env=env, cwd=tmp_path)
    assert code == 1
    assert "no reply (bot_message): sent by a bot" in err
    assert "KNOWN_BOTS" in err

    # Later, from the outside: `explain` asks the sidecar (SIDECAR_PORT) for each.
    code, out, err = await run_cli("explain", second_id, env=env, cwd=tmp_path)
    assert code == 0, err
    assert f"event {second_id}: no reply (user_cooldown)" in out
    code, out, err = await run_cli("explain", second_id, "--json", env=env, cwd=tmp_path)
    assert code == 0, err
    record = orjson.loads(out)
    assert record["status"] == "no_reply"
    assert record["final"] is True
    assert "hello again" not in out  # no message text is kept
    code, out, err = await run_cli("explain", first_id, env=env, cwd=tmp_path)
    assert code == 0, err
    assert f"event {first_id}: replied (greeting)" in out
    code, out, err = await run_cli("explain", "no-such-event", env=env, cwd=tmp_path)
    assert code == 1
    assert "no outcome known for event no-such-event" in err
    assert f"127.0.0.1:{port}" in err

    # Process metrics come with the worker's own.
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{worker.sidecar_port}/metrics") as response:
        metrics = await response.text()
    for series in ("process_resident_memory_bytes", "process_open_fds", "python_info",
                   "python_gc_objects_collected_total", "waddle_ai_unroutable_replies_total"):
        assert f"\n{series}" in metrics, series


async def test_a_dead_letter_is_explained_from_redis_after_its_retries(
    launcher: WorkerLauncher, fake: FakeProvider, prefix: str, tmp_path: Path,
    topology: Topology,
) -> None:
    """With Redis, `explain` reads Redis: no sidecar is needed (SIDECAR_PORT=0 here)."""
    fake.default = Behaviour(status=500, error_message="the GPU is on fire")
    settings = worker_settings(prefix, fake, REDIS_URL=REDIS_URL, USER_COOLDOWN_S="0",
                               CHANNEL_COOLDOWN_S="0")
    await launcher.start(settings)
    env = launcher.env(**settings)

    code, out, err = await run_cli("publish", "hello?", "--wait", env=env, cwd=tmp_path)
    assert code == 1
    event_id = err.split("published event ", 1)[1].split()[0]
    assert f"event {event_id}: retrying (provider_" in err  # progress is shown
    assert f"event {event_id}: dead-lettered (provider_" in err
    assert "gave up after 2 retries" in err
    assert f"dlq replay --id {event_id}" in err
    no_traceback(out, err)

    code, out, err = await run_cli("explain", event_id, env=env, cwd=tmp_path)
    assert code == 0, err
    assert f"event {event_id}: dead-lettered" in out
    assert len(await get_dead_letters(topology, 1)) == 1


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_an_unroutable_reply_says_nobody_listens_and_ends_in_the_dlq_as_unroutable(
    launcher: WorkerLauncher, fake: FakeProvider, prefix: str, tmp_path: Path,
    topology: Topology, backend: str,
) -> None:
    """No router bound to ai.responses: retried (it may be restarting), then dead-lettered.

    The README's walk-through: `publish` without `--wait`, then `explain`
    (from the sidecar on memory, from Redis with REDIS_URL).
    """
    state = ({"REDIS_URL": REDIS_URL} if backend == "redis"
             else {"SIDECAR_PORT": str(free_port())})
    settings = worker_settings(prefix, fake, USER_COOLDOWN_S="0", CHANNEL_COOLDOWN_S="0",
                               **state)
    worker = await launcher.start(settings)
    env = launcher.env(**settings)

    code, _, err = await run_cli("publish", "hello there", env=env, cwd=tmp_path)
    assert code == 0, err
    assert f"{prefix}.responses" in err
    assert "unroutable" in err
    event_id = err.split("published event ", 1)[1].split()[0]

    record: dict[str, object] = {}
    for _ in range(200):
        code, out, _ = await run_cli("explain", event_id, "--json", env=env, cwd=tmp_path)
        if code == 0 and (record := orjson.loads(out))["final"]:
            break
        await asyncio.sleep(0.1)
    assert record.get("status") == "dead_lettered", record
    assert record["reason"] == "unroutable"
    assert "is the router running and bound" in str(record["detail"])

    letters = await get_dead_letters(topology, 1)
    assert letters[0].headers["x-error-type"] == "unroutable"
    log = worker.log_records()
    named = [r for r in log if "reply unroutable" in str(r.get("message"))]
    assert len(named) == 3  # the first try and 2 retries (RETRY_DELAYS_MS=100,200)
    assert named[0]["exchange"] == f"{prefix}.responses"
    assert named[0]["routing_key"] == "twitch.dev-community"
    assert "is the router running and bound?" in named[0]["message"]
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{worker.sidecar_port}/metrics") as response:
        assert "\nwaddle_ai_unroutable_replies_total 3.0" in await response.text()


async def test_a_replayed_reply_keeps_its_age_across_retries(
    launcher: WorkerLauncher, fake: FakeProvider, prefix: str, tmp_path: Path,
    router_client: RouterClient,
) -> None:
    """age_ms runs from sent_at through retries; processing_time_ms is the last attempt."""
    fake.script = [Behaviour(status=503), Behaviour(status=503)]
    settings = worker_settings(prefix, fake, USER_COOLDOWN_S="0", CHANNEL_COOLDOWN_S="0",
                               RETRY_DELAYS_MS="1000,2000")
    await launcher.start(settings)
    event = make_event("hello everyone")
    await router_client.publish(event)
    message = await router_client.next_reply(60)
    reply = orjson.loads(message.body)
    assert reply["event_id"] == event["event_id"]
    # Two retries waited 1 s and 2 s in the delay queues: the viewer waited that long.
    assert reply["age_ms"] >= 3000 > reply["processing_time_ms"]


# -- errors, not tracebacks ----------------------------------------------------


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("waddle-ai:")]
    assert len(lines) == 1, err
    no_traceback(err)
    return lines[0]


@pytest.mark.parametrize(
    ("args", "setting", "what"),
    [
        (("run",), "AMQP_URL", "cannot reach RabbitMQ at 127.0.0.1:1"),
        (("publish", "hi", "--wait"), "AMQP_URL", "cannot reach RabbitMQ at 127.0.0.1:1"),
        (("topology",), "AMQP_URL", "cannot reach RabbitMQ at 127.0.0.1:1"),
        (("dlq", "list"), "AMQP_URL", "cannot reach RabbitMQ at 127.0.0.1:1"),
        (("dlq", "replay", "--all"), "AMQP_URL", "cannot reach RabbitMQ at 127.0.0.1:1"),
        (("config", "list"), "DATABASE_URL", "cannot use PostgreSQL at 127.0.0.1:1"),
        (("config", "get", "c1"), "DATABASE_URL", "cannot use PostgreSQL at 127.0.0.1:1"),
        (("migrate",), "DATABASE_URL", "cannot use PostgreSQL at 127.0.0.1:1"),
        (("explain", "e1"), "REDIS_URL", "Redis"),
    ],
)
async def test_an_unreachable_service_is_one_line_naming_the_setting(
    args: tuple[str, ...], setting: str, what: str, prefix: str, tmp_path: Path
) -> None:
    urls = {"AMQP_URL": f"amqp://guest:guest@{CLOSED}/",
            "DATABASE_URL": f"postgresql://postgres@{CLOSED}/test",
            "REDIS_URL": f"redis://{CLOSED}/0"}
    env = WorkerLauncher(tmp_path).env(
        QUEUE_PREFIX=prefix, AI_PROVIDER="ollama", **{setting: urls[setting]})
    code, _out, err = await run_cli(*args, env=env, cwd=tmp_path)
    assert code == 1, err
    line = one_line(err)
    assert what in line, line
    assert setting in line, line
    assert "guest:guest" not in err  # credentials stay out of the message


async def test_explain_without_redis_or_a_sidecar_says_where_to_look(
    prefix: str, tmp_path: Path
) -> None:
    env = WorkerLauncher(tmp_path).env(QUEUE_PREFIX=prefix, SIDECAR_PORT="0")
    code, _, err = await run_cli("explain", "e1", env=env, cwd=tmp_path)
    assert code == 1
    assert "outcomes live in the worker process" in one_line(err)
    assert "--sidecar" in err
    port = free_port()  # nothing listens there
    code, _, err = await run_cli("explain", "e1", "--sidecar", f"http://127.0.0.1:{port}",
                                 env=env, cwd=tmp_path)
    assert code == 1
    assert f"cannot reach the worker's sidecar at http://127.0.0.1:{port}" in one_line(err)


async def test_the_traceback_is_there_with_log_level_debug(prefix: str, tmp_path: Path) -> None:
    env = WorkerLauncher(tmp_path).env(QUEUE_PREFIX=prefix, LOG_LEVEL="DEBUG",
                                       AMQP_URL=f"amqp://guest:guest@{CLOSED}/")
    code, _, err = await run_cli("topology", env=env, cwd=tmp_path)
    assert code == 1
    assert "cannot reach RabbitMQ" in err
    assert "Traceback" in err


async def test_a_second_worker_on_a_taken_port_says_which_setting(
    launcher: WorkerLauncher, fake: FakeProvider, prefix: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = await launcher.start(worker_settings(prefix, fake, SIDECAR_PORT=str(port)),
                                      wait_ready=False)
        assert await worker.wait_exit(60) == 1
    text = worker.log_text()
    assert "address already in use" in text, text
    assert "SIDECAR_PORT" in text, text
    no_traceback(text)


async def test_a_bad_model_path_is_a_bad_setting(prefix: str, tmp_path: Path) -> None:
    env = WorkerLauncher(tmp_path).env(QUEUE_PREFIX=prefix, AI_PROVIDER="local",
                                       LOCAL_MODEL_PATH=str(tmp_path / "missing.gguf"))
    code, _, err = await run_cli("run", env=env, cwd=tmp_path)
    assert code == 2
    line = one_line(err)
    assert "LOCAL_MODEL_PATH" in line
    assert "missing.gguf" in line
