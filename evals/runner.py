"""Play scenarios through the worker as deployed, and collect what reached chat.

The worker runs as operators run it, `waddle-ai run` in a process of its own
(`tests/worker_process.py` starts it and reads its JSON log), on a queue
prefix of its own, so the scorecard measures the whole path a reply takes:
triggers, prompt building, the provider, the safety filter. Events are
published as the router publishes them (`worker.client`), and replies are
read off `ai.responses`. An event that gets no reply says why in the
worker's log ("event handled" with `skipped:<reason>`, or "event
dead-lettered"); that is how a skip is told apart from a slow reply.

Settings come from the caller's environment, as for `waddle-ai run`, except
what the suite must control: its own queue prefix, no cooldowns (a
follow-up comes seconds after the first line), memory state (no Redis or
database, so runs never share anything), an event age limit long enough for
a slow burst, and JSON logs at INFO (the skip reasons).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson

from config.community import persona_from_settings
from config.settings import Settings
from consumers.pipeline import reply_token_budget
from context.prompts import build_system_prompt
from domain.platforms import reply_limit
from evals.checks import Checker, CheckResult, ReplyContext, Verdict, failed, passed
from evals.scenarios import Scenario
from schemas.events import InteractionEvent
from schemas.replies import Trigger
from tests.worker_process import SETTINGS_VARIABLES, WorkerLauncher, WorkerProcess
from worker.app import topology_for
from worker.client import RouterClient, make_event

COMMUNITY = "evals"
PROVIDERS = ("local", "ollama", "waddleai")
MODEL_SETTING = {"local": "LOCAL_MODEL_PATH", "ollama": "OLLAMA_MODEL",
                 "waddleai": "WADDLEAI_MODEL"}
# Settings of the caller's environment the suite never passes on: shared state.
NOT_PASSED = frozenset({"DATABASE_URL", "REDIS_URL", "WADDLE_TEST_CRASH_MARKER"})
LOG_POLL_S = 0.2


@dataclass(frozen=True)
class RunOptions:
    scenarios: Sequence[Scenario]
    log_dir: Path
    provider: str | None = None
    model: str | None = None
    max_tokens: int | None = None
    concurrency: int = 1
    timeout_s: float = 300.0
    burst: Sequence[Scenario] = ()
    extra: Mapping[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 180.0
    # Another commit's files for the worker process to import (evals.worker_code).
    worker_code: Path | None = None
    # Called with each scenario's result as it comes (the CLI prints progress).
    progress: Callable[[ScenarioResult], None] | None = None


@dataclass
class Exchange:
    """One event published and what came of it."""

    event_id: str
    text: str
    outcome: str  # replied | skipped:<reason> | dead_lettered:<type> | timeout
    reply: dict[str, Any] | None = None
    latency_s: float | None = None
    # time.perf_counter() when the event was published.
    sent_at: float = 0.0
    # Earlier attempts that ended without a reply: `deferred:lease_lost`, `failed:timeout`…
    attempts: list[str] = field(default_factory=list)

    @property
    def response(self) -> str | None:
        return None if self.reply is None else str(self.reply.get("response", ""))


@dataclass
class ScenarioResult:
    scenario: Scenario
    exchange: Exchange
    checks: list[CheckResult]
    token_budget: int
    before: list[Exchange] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        return self.exchange.outcome

    def verdict(self, name: str) -> Verdict:
        for check in self.checks:
            if check.name == name:
                return check.verdict
        return Verdict.NA

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.verdict is Verdict.FAIL]

    @property
    def passed_all(self) -> bool:
        return not self.failures


@dataclass
class BurstResult:
    n: int
    replies: int
    span_s: float
    latencies_s: list[float]
    completion_tokens: list[int]
    outcomes: dict[str, str]


@dataclass
class SuiteRun:
    settings: Settings
    env: dict[str, str]
    results: list[ScenarioResult]
    burst: BurstResult | None
    started_at: float
    duration_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    concurrency: int = 1
    duplicates: int = 0
    # Where the worker's code came from, when not this checkout (`--worker-ref`).
    worker_code: str | None = None
    model: str | None = None
    provider: str | None = None


def worker_settings(options: RunOptions, prefix: str,
                    environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: the caller's settings, the suite's own on top."""
    environ = os.environ if environ is None else environ
    passed_on = {k.upper(): v for k, v in environ.items()
                 if k.upper() in SETTINGS_VARIABLES and k.upper() not in NOT_PASSED}
    if options.provider is not None:
        if options.provider not in PROVIDERS:
            raise ValueError(f"--provider must be one of {', '.join(PROVIDERS)}")
        passed_on["AI_PROVIDER"] = options.provider
    provider = passed_on.get("AI_PROVIDER", "local").lower()
    if options.model is not None:
        passed_on[MODEL_SETTING.get(provider, "LOCAL_MODEL_PATH")] = options.model
    if options.max_tokens is not None:
        passed_on["AI_MAX_TOKENS"] = str(options.max_tokens)
    passed_on.update({k.upper(): v for k, v in options.extra.items()})
    passed_on.update({
        "QUEUE_PREFIX": prefix,
        "USER_COOLDOWN_S": "0",
        "CHANNEL_COOLDOWN_S": "0",
        "MAX_EVENT_AGE_S": "3600",
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
    })
    return passed_on


def settings_of(env: Mapping[str, str]) -> Settings:
    """What the worker will read from `env`: validated here too, so a bad value fails early."""
    # model_validate, not Settings(): only `env`, never this process's own environment.
    return Settings.model_validate({k.lower(): v for k, v in env.items()})


def read_log(records: Sequence[Mapping[str, Any]]
             ) -> tuple[dict[str, str], dict[str, list[str]]]:
    """From the worker's JSON log: why events ended without a reply, and wasted attempts.

    An event ends without a reply when it is handled as `skipped:<reason>` or
    dead-lettered; a `deferred:…` or `failed:…` attempt is followed by
    another (a retry copy, a redelivery), so it is only counted.
    """
    ended: dict[str, str] = {}
    attempts: dict[str, list[str]] = {}
    for record in records:
        event_id = record.get("event_id") or record.get("message_id")
        if not event_id:
            continue
        message = record.get("message")
        result = str(record.get("result", ""))
        if message == "event handled" and result.startswith(("deferred:", "failed:")):
            attempts.setdefault(event_id, []).append(result)
        elif event_id in ended:
            continue
        elif message == "event handled" and result.startswith("skipped:"):
            ended[event_id] = result
        elif message == "event dead-lettered":
            ended[event_id] = f"dead_lettered:{record.get('error_type')}"
    return ended, attempts


class Outcomes:
    """Replies off `ai.responses` and no-reply reasons off the worker's log, by event id."""

    def __init__(self, client: RouterClient, worker: WorkerProcess) -> None:
        self._client = client
        self._worker = worker
        self._replies: dict[str, tuple[float, dict[str, Any]]] = {}
        self._ended: dict[str, str] = {}
        # Attempts the worker logged as handled but not finished (retried or deferred).
        self._attempts: dict[str, list[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Replies to an event already answered: viewers would see them twice.
        self.duplicates = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump_replies()),
                       asyncio.create_task(self._watch_log())]

    async def _pump_replies(self) -> None:
        while True:
            try:
                message = await self._client.next_reply(3600)
            except TimeoutError:
                continue
            body: dict[str, Any] = orjson.loads(message.body)
            event_id = message.correlation_id or str(body.get("event_id"))
            if event_id in self._replies:
                self.duplicates += 1
                continue
            self._replies[event_id] = (time.perf_counter(), body)

    async def _watch_log(self) -> None:
        while True:
            # A file read and JSON parsing: off the event loop.
            records = await asyncio.to_thread(self._worker.log_records)
            self._ended, self._attempts = read_log(records)
            await asyncio.sleep(LOG_POLL_S)

    async def wait(self, event_id: str, sent_at: float, timeout_s: float) -> Exchange:
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if event_id in self._replies:
                received, body = self._replies[event_id]
                # The log line of the last failed attempt may trail the reply by a poll.
                await asyncio.sleep(2 * LOG_POLL_S)
                return Exchange(event_id, "", "replied", body, received - sent_at,
                                attempts=list(self._attempts.get(event_id, [])))
            if event_id in self._ended:
                return Exchange(event_id, "", self._ended[event_id],
                                attempts=list(self._attempts.get(event_id, [])))
            if self._worker.returncode is not None:
                raise RuntimeError(f"the worker exited with {self._worker.returncode}:\n"
                                   f"{self._worker.log_tail()}")
            for task in self._tasks:
                if task.done():
                    task.result()  # a reader that died: its error, not a silent timeout
            await asyncio.sleep(0.05)
        return Exchange(event_id, "", "timeout",
                        attempts=list(self._attempts.get(event_id, [])))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Suite:
    """One worker process and the router's side of the broker, for one run."""

    def __init__(self, options: RunOptions, settings: Settings, client: RouterClient,
                 worker: WorkerProcess, outcomes: Outcomes, checker: Checker) -> None:
        self.options = options
        self.settings = settings
        self.client = client
        self.worker = worker
        self.outcomes = outcomes
        self.checker = checker
        self.run_id = uuid.uuid4().hex[:8]

    def event_for(self, scenario: Scenario, channel: str, line: str | None = None
                  ) -> dict[str, Any]:
        return scenario_event(scenario, bot_name=self.settings.bot_name, channel=channel,
                              line=line)

    async def send(self, event: dict[str, Any]) -> Exchange:
        sent = time.perf_counter()
        await self.client.publish(event)
        exchange = await self.outcomes.wait(event["event_id"], sent, self.options.timeout_s)
        exchange.text = event["message_content"]
        exchange.sent_at = sent
        return exchange

    async def play(self, scenario: Scenario, tag: str = "") -> ScenarioResult:
        channel = f"{scenario.id}-{self.run_id}{tag}"
        before = [await self.send(self.event_for(scenario, channel, line))
                  for line in scenario.before]
        event = self.event_for(scenario, channel)
        exchange = await self.send(event)
        return self.score(scenario, event, exchange, before)

    def score(self, scenario: Scenario, event: dict[str, Any], exchange: Exchange,
              before: list[Exchange]) -> ScenarioResult:
        return score_exchange(scenario, event, exchange, settings=self.settings,
                              checker=self.checker, before=before)

    async def play_all(self, scenarios: Sequence[Scenario]) -> list[ScenarioResult]:
        gate = asyncio.Semaphore(max(1, self.options.concurrency))

        async def one(scenario: Scenario) -> ScenarioResult:
            async with gate:
                result = await self.play(scenario)
            if self.options.progress is not None:
                self.options.progress(result)
            return result

        return list(await asyncio.gather(*(one(s) for s in scenarios)))

    async def burst(self, scenarios: Sequence[Scenario]) -> BurstResult:
        """Every scenario's event at once, each in a new channel: how long until the last reply."""
        events = [self.event_for(s, f"{s.id}-{self.run_id}-burst") for s in scenarios]
        started = time.perf_counter()
        exchanges = await asyncio.gather(*(self.send(e) for e in events))
        replied = [x for x in exchanges if x.outcome == "replied"]
        # From the first publish to the last reply.
        span = max((x.sent_at + (x.latency_s or 0.0) - started for x in replied),
                   default=time.perf_counter() - started)
        return BurstResult(
            n=len(events), replies=len(replied), span_s=span,
            latencies_s=[x.latency_s for x in replied if x.latency_s is not None],
            completion_tokens=[int((x.reply or {}).get("usage", {}).get("completion_tokens", 0))
                               for x in replied],
            outcomes={s.id: x.outcome for s, x in zip(scenarios, exchanges, strict=True)},
        )


def scenario_event(scenario: Scenario, *, bot_name: str, channel: str = "evals",
                   line: str | None = None) -> dict[str, Any]:
    """The scenario's event as the router sends it, or (`line`) an earlier chat line."""
    own = line is None
    return make_event(
        scenario.render(scenario.text if line is None else line, bot_name),
        community=COMMUNITY, platform=scenario.platform.value, channel=channel,
        user=scenario.render(scenario.login(), bot_name),
        display_name=scenario.render(scenario.display_name, bot_name),
        message_type=scenario.message_type.value if own else "chatMessage",
        metadata=dict(scenario.metadata) if own else {},
    )


def score_exchange(
    scenario: Scenario, event: Mapping[str, Any], exchange: Exchange, *, settings: Settings,
    checker: Checker, before: list[Exchange] | None = None,
) -> ScenarioResult:
    """`answered` always; the text checks only on a reply the scenario wanted.

    An event that got no reply (no trigger, a skip, a dead letter) is not a
    failure of any text check: it has no text. Whether it should have had one
    is `answered`'s question alone.
    """
    parsed = InteractionEvent.model_validate(event)
    budget = reply_token_budget(settings.ai_max_tokens, reply_limit(parsed.platform))
    checks = [_answered(scenario, exchange)]
    reply = exchange.response
    if reply is not None and exchange.reply is not None and scenario.expect_reply:
        trigger = Trigger(exchange.reply.get("trigger", Trigger.MENTION.value))
        usage = exchange.reply.get("usage") or {}
        ctx = ReplyContext(
            viewer_text=parsed.message_content, display_name=parsed.speaker,
            username=parsed.username, platform=parsed.platform,
            language=scenario.language, message_type=parsed.message_type,
            metadata=parsed.metadata, bot_name=settings.bot_name,
            prefix=settings.response_prefix,
            system_prompt=build_system_prompt(parsed, trigger, persona_from_settings(settings)),
            completion_tokens=usage.get("completion_tokens"), token_budget=budget,
            expect_any=scenario.expect_any, forbidden=scenario.forbidden,
            trigger=trigger.value,
        )
        checks.extend(checker.run(reply, ctx))
    return ScenarioResult(scenario, exchange, checks, budget, list(before or []))


def _answered(scenario: Scenario, exchange: Exchange) -> CheckResult:
    got = exchange.outcome == "replied"
    if got == scenario.expect_reply:
        return passed("answered", exchange.outcome)
    if scenario.expect_reply:
        return failed("answered", f"no reply ({exchange.outcome})")
    return failed("answered", "replied, though no reply was expected")


async def delete_topology(amqp_url: str, settings: Settings) -> None:
    """Remove every queue and exchange the run declared (its own prefix only)."""
    topology = topology_for(settings)
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        await topology.delete(await connection.channel())
    finally:
        await connection.close()


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


@contextlib.asynccontextmanager
async def open_suite(options: RunOptions, checker: Checker,
                     environ: Mapping[str, str] | None = None) -> AsyncIterator[Suite]:
    prefix = f"evals-{uuid.uuid4().hex[:10]}"
    env = worker_settings(options, prefix, environ)
    settings = settings_of(env)
    options.log_dir.mkdir(parents=True, exist_ok=True)
    client = await RouterClient.connect(settings.amqp_url, topology_for(settings))
    # Only the worker's process imports the project from `worker_code`.
    code = {"PYTHONPATH": str(options.worker_code)} if options.worker_code else {}
    launcher = WorkerLauncher(options.log_dir, **env, **code)
    outcomes: Outcomes | None = None
    try:
        await client.listen("#")
        worker = await launcher.start(wait_ready=False)
        await worker.wait_ready(options.ready_timeout_s)
        outcomes = Outcomes(client, worker)
        outcomes.start()
        yield Suite(options, settings, client, worker, outcomes, checker)
        worker.terminate()
        await worker.wait_exit(60.0)
    finally:
        if outcomes is not None:
            await outcomes.aclose()
        await launcher.aclose()
        await client.aclose()
        await delete_topology(settings.amqp_url, settings)


async def run_suite(options: RunOptions, checker: Checker,
                    environ: Mapping[str, str] | None = None) -> SuiteRun:
    load_before = load_average()
    started_at = time.time()
    started = time.perf_counter()
    async with open_suite(options, checker, environ) as suite:
        results = await suite.play_all(options.scenarios)
        burst = await suite.burst(options.burst) if options.burst else None
        model = next((str(r.exchange.reply.get("model")) for r in results
                      if r.exchange.reply is not None), None)
        provider = next((str(r.exchange.reply.get("provider")) for r in results
                         if r.exchange.reply is not None), None)
        # Late copies would come within a moment of the first: give them one.
        await asyncio.sleep(1.0)
        duplicates = suite.outcomes.duplicates
    return SuiteRun(
        settings=suite.settings, env=worker_settings(options, "-", environ),
        results=results, burst=burst, started_at=started_at,
        duration_s=time.perf_counter() - started, load_before=load_before,
        load_after=load_average(), concurrency=options.concurrency, duplicates=duplicates,
        model=model,
        provider=provider)
