"""The scenarios of `python -m bench run`, in one run on one broker.

Every run of every system gets its own queue prefix (so its own queues,
exchange and Redis keys) and removes them afterwards, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    AMQP_URL,
    DEFAULT_CONCURRENCY,
    REDIS_URL,
    RETRY_DELAYS_MS,
    Broker,
    CpuSample,
    ReplyCollector,
    delete_redis_keys,
    first_to_last,
    make_events,
    median,
    new_prefix,
    percentile,
    publish_paced,
)
from bench.procs import (
    Child,
    CpuMeter,
    FakeProviderProcess,
    WorkerCli,
    clean_env,
    service_pids,
)
from bench.systems import ServeConfig

BENCH_DIR = Path(__file__).resolve().parent
SYSTEMS = ("floor", "faststream", "worker")
ALL_SCENARIOS = ("throughput", "latency", "slow", "replicas", "local", "profile")
QUICK_SCENARIOS = ("throughput", "latency", "slow", "replicas")

SLOW_LATENCY_S = 1.0
SLOW_CONCURRENCY = 1000
LATENCY_PROVIDER_S = 0.05


@dataclass
class Options:
    quick: bool
    events: int
    runs: int
    slow_events: int
    latency_s: float  # how long the steady-rate publisher runs
    latency_rate: float | None
    latency_warmup_s: float
    local_events: int
    local_sequential: int
    profile_events: int
    profile_duration_s: int
    scenarios: tuple[str, ...]
    systems: tuple[str, ...]
    patches: tuple[str, ...]
    worker_settings: dict[str, Any]
    out: Path
    json_out: Path | None
    log_dir: Path

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        quick = bool(args.quick)
        scenarios = tuple(s.strip() for s in args.only.split(",")) if args.only else (
            QUICK_SCENARIOS if quick else ALL_SCENARIOS)
        unknown = set(scenarios) - set(ALL_SCENARIOS)
        if unknown:
            raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        from bench.patches import PATCHES

        systems = tuple(x.strip() for x in args.systems.split(",")) if args.systems else SYSTEMS
        if set(systems) - set(SYSTEMS):
            raise SystemExit(f"unknown system; known: {', '.join(SYSTEMS)}")

        patches = tuple(args.patch or ())
        if set(patches) - set(PATCHES):
            raise SystemExit(f"unknown patch; known: {', '.join(PATCHES)}")
        worker_settings: dict[str, Any] = {}
        for item in args.set or ():
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
            worker_settings[key.strip().lower()] = value or None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        # Only a complete run of the product as shipped replaces bench/RESULTS.md.
        complete = (not quick and not patches and not worker_settings
                    and set(scenarios) == set(ALL_SCENARIOS) and set(systems) == set(SYSTEMS))
        default_out = (BENCH_DIR / "RESULTS.md" if complete else
                       BENCH_DIR / "out" / ("RESULTS-quick.md" if quick else f"RESULTS-{stamp}.md"))
        out = args.out or default_out
        return cls(
            quick=quick,
            events=args.events or (50 if quick else 6000),
            runs=args.runs or (1 if quick else 3),
            slow_events=args.slow_events or (200 if quick else 3000),
            latency_s=1.0 if quick else 12.0,
            latency_rate=args.rate or (50.0 if quick else None),
            latency_warmup_s=0.0 if quick else 2.0,
            local_events=24,
            local_sequential=5,
            profile_events=20000,
            profile_duration_s=8,
            scenarios=scenarios,
            systems=systems,
            patches=patches,
            worker_settings=worker_settings,
            out=out,
            json_out=args.json,
            log_dir=BENCH_DIR / "out" / f"logs-{stamp}",
        )


@dataclass
class ThroughputRun:
    system: str
    n: int
    replies: int
    duplicates: int
    msgs_per_s: float
    publish_s: float
    cpu: dict[str, float]  # fraction of one core, by process group
    machine_busy: float


@dataclass
class SlowRun:
    replicas: int
    n: int
    replies: int
    duplicates: int
    concurrency: int
    latency_s: float
    msgs_per_s: float
    ideal_per_s: float
    publish_s: float
    peak_rss_mb: list[float]
    provider_max_in_flight: int
    cpu: dict[str, float]
    machine_busy: float


@dataclass
class LatencyRun:
    system: str
    rate_per_s: float
    n: int
    measured: int
    replies: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    cpu: dict[str, float]
    machine_busy: float


@dataclass
class LocalRun:
    n: int
    replies: int
    replies_per_s: float
    burst_p50_s: float
    sequential_p50_s: float
    sequential_n: int
    parallel: int
    sample: str
    sequential_tokens: float  # mean completion tokens of a reply
    burst_tokens: float
    burst_tokens_per_s: float


@dataclass
class Results:
    started_at: str
    command: str
    options: dict[str, Any]
    throughput: list[ThroughputRun] = field(default_factory=list)
    slow: list[SlowRun] = field(default_factory=list)
    latency: list[LatencyRun] = field(default_factory=list)
    local: LocalRun | None = None
    profile: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)

    def medians(self) -> dict[str, float]:
        """Median msgs/s of each system over its runs."""
        return {system: median([r.msgs_per_s for r in self.throughput if r.system == system])
                for system in SYSTEMS if any(r.system == system for r in self.throughput)}

    def to_json(self) -> bytes:
        data = asdict(self)
        data["medians"] = self.medians()
        return orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str)


def _shares(sample: CpuSample) -> dict[str, float]:
    """CPU by process group as a fraction of one core, and `other`: what the rest of
    the machine used meanwhile (another job on a shared machine shows up there)."""
    if sample.wall_s < 0.5:
        return {}  # /proc counts in 10 ms ticks: too short a window to say anything
    shares = {name: round(sample.share(name), 3) for name in sample.seconds}
    cores = os.cpu_count() or 1
    shares["other"] = round(max(0.0, sample.machine_busy * cores - sum(shares.values())), 3)
    return shares


KEEP_LOG_DIRS = 10


def _prune_logs(out_dir: Path) -> None:
    """Keep the logs of the last few runs only: a full run writes tens of megabytes."""
    runs = sorted(out_dir.glob("logs-*"), reverse=True)
    for old in runs[KEEP_LOG_DIRS - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def _cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {share:.0%}" for name, share in cpu.items())


class Harness:
    def __init__(self, options: Options, broker: Broker, fake: FakeProviderProcess) -> None:
        self.options = options
        self.broker = broker
        self.fake = fake

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, options: Options) -> AsyncIterator[Harness]:
        _prune_logs(options.log_dir.parent)
        options.log_dir.mkdir(parents=True, exist_ok=True)
        broker = await Broker.connect()
        fake = await FakeProviderProcess.start(0.0, options.log_dir)
        try:
            yield cls(options, broker, fake)
        finally:
            await fake.stop()
            await broker.aclose()

    # -- plumbing ------------------------------------------------------------------

    async def serve(self, system: str, prefix: str, *, concurrency: int = DEFAULT_CONCURRENCY,
                    worker: dict[str, Any] | None = None, ready_timeout_s: float = 60.0) -> Child:
        config = ServeConfig(
            system=system, amqp_url=AMQP_URL, prefix=prefix, provider_url=self.fake.url,
            concurrency=concurrency,
            worker={"redis_url": REDIS_URL, **self.options.worker_settings, **(worker or {})},
            patches=self.options.patches if system == "worker" else ())
        child = await Child.spawn(system, ["bench", "serve", config.to_json()], clean_env(),
                                  self.options.log_dir / f"{system}.log")
        try:
            await child.read_json(ready_timeout_s)
        except BaseException:
            await child.stop(5.0)
            raise
        return child

    def meter(self, **groups: list[int]) -> CpuMeter:
        return CpuMeter({**groups, "fake": [self.fake.child.pid], "harness": [os.getpid()],
                         **service_pids()})

    @contextlib.asynccontextmanager
    async def deployment(self, system: str) -> AsyncIterator[tuple[str, ReplyCollector]]:
        """A fresh prefix with the topology declared and a bound reply collector; removed after."""
        prefix = new_prefix(system)
        topo = await self.broker.declare(prefix)
        collector = await self.broker.collector(topo.responses_exchange)
        try:
            yield prefix, collector
        finally:
            with contextlib.suppress(Exception):
                await collector.aclose()
            await self.broker.delete(prefix)
            await delete_redis_keys(prefix)

    async def wait_consumers(self, prefix: str, workers: list[WorkerCli],
                             timeout_s: float = 60.0) -> None:
        """Until every worker consumes from the interaction queue (or one of them died)."""
        deadline = time.monotonic() + timeout_s
        while await self.broker.consumers(prefix) < len(workers):
            for worker in workers:
                worker.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not consuming within {timeout_s:g} s: "
                                   f"{workers[0].log_tail()}")
            await asyncio.sleep(0.1)

    def note(self, text: str) -> None:
        print(text, flush=True)

    # -- 1. throughput: floor, FastStream, worker ------------------------------------

    async def throughput_once(self, system: str, n: int) -> ThroughputRun:
        """Backlog of `n` first, then the consumer; msgs/s from the first reply to the last."""
        async with self.deployment(system) as (prefix, collector):
            topo_queue = f"{prefix}.interaction"
            publish_s = await self.broker.publish_backlog(topo_queue, make_events(prefix, n))
            collector.expect(n)
            child = await self.serve(system, prefix)
            try:
                meter = self.meter(system=[child.pid]).start()
                complete = await collector.wait(60 + n / 100)
                cpu = meter.stop()
            finally:
                await child.stop()
            if not complete:
                raise RuntimeError(f"{system}: {len(collector.received)} of {n} replies")
            rate = first_to_last(collector.received.values())
            return ThroughputRun(system, n, len(collector.received), collector.duplicates,
                                 round(rate.per_s, 1), round(publish_s, 3), _shares(cpu),
                                 round(cpu.machine_busy, 3))

    async def throughput(self, results: Results) -> None:
        # Interleaved, so a drift of the machine or the broker hits every system alike.
        for run in range(self.options.runs):
            for system in self.options.systems:
                try:
                    outcome = await self.throughput_once(system, self.options.events)
                except Exception as exc:
                    results.errors.append(f"throughput {system} run {run + 1}: {exc!r}")
                    self.note(f"  {system:<11} run {run + 1}: FAILED {exc!r}")
                    continue
                results.throughput.append(outcome)
                self.note(f"  {system:<11} run {run + 1}: {outcome.msgs_per_s:8.1f} msgs/s  "
                          f"(cpu: {_cpu_text(outcome.cpu)})")

    # -- 2. slow provider / replicas (worker subprocesses) -----------------------------

    def worker_env(self, prefix: str, concurrency: int) -> dict[str, str]:
        """`waddle-ai run` as deployed: defaults (INFO JSON logs) but for what the scenario sets.

        `--set KEY=VALUE` settings apply here too, as environment variables.
        """
        what_if = {key.upper(): "" if value is None else str(value)
                   for key, value in self.options.worker_settings.items()}
        return clean_env(**{
            "AMQP_URL": AMQP_URL, "QUEUE_PREFIX": prefix, "REDIS_URL": REDIS_URL,
            "AI_PROVIDER": "ollama", "OLLAMA_HOST": self.fake.url,
            "USER_COOLDOWN_S": "0", "CHANNEL_COOLDOWN_S": "0",
            "MAX_CONCURRENT_REQUESTS": str(concurrency), "PREFETCH_COUNT": str(concurrency),
            "RETRY_DELAYS_MS": ",".join(map(str, RETRY_DELAYS_MS)),
            "SIDECAR_HOST": "127.0.0.1", "SIDECAR_PORT": "0", **what_if})

    async def slow_once(self, replicas: int, per_replica: int) -> SlowRun:
        """Replicas ready first, then a burst of events; msgs/s from the first publish.

        With a 1 s provider the first replies come a second after the first
        event, so the rate counts from the first publish, not the first reply.
        """
        await self.fake.set_latency(SLOW_LATENCY_S)
        total = replicas * per_replica
        async with self.deployment(f"slow{replicas}") as (prefix, collector):
            env = self.worker_env(prefix, SLOW_CONCURRENCY)
            workers = [await WorkerCli.start(f"slow{replicas}-worker{i + 1}", env,
                                             self.options.log_dir, self.options.patches)
                       for i in range(replicas)]
            try:
                await self.wait_consumers(prefix, workers)
                events = make_events(prefix, total)
                collector.expect(total)
                await self.fake.stats(reset=True)
                meter = self.meter(system=[w.pid for w in workers]).start()
                started = time.perf_counter()
                publish_s = await self.broker.publish_backlog(f"{prefix}.interaction", events)
                complete = await collector.wait(60 + total / 100)
                cpu = meter.stop()
                stats = await self.fake.stats()
                rss = [w.peak_rss_mb() or 0.0 for w in workers]
            finally:
                await asyncio.gather(*(w.stop() for w in workers))
                await self.fake.set_latency(0.0)
            if not complete:
                raise RuntimeError(f"{replicas} replica(s): {len(collector.received)} of "
                                   f"{total} replies; log: {workers[0].log_tail()}")
            span = max(collector.received.values()) - started
            return SlowRun(
                replicas=replicas, n=total, replies=len(collector.received),
                duplicates=collector.duplicates, concurrency=SLOW_CONCURRENCY,
                latency_s=SLOW_LATENCY_S, msgs_per_s=round(total / span, 1),
                ideal_per_s=replicas * SLOW_CONCURRENCY / SLOW_LATENCY_S,
                publish_s=round(publish_s, 3), peak_rss_mb=[round(r, 1) for r in rss],
                provider_max_in_flight=int(stats["max_in_flight"]), cpu=_shares(cpu),
                machine_busy=round(cpu.machine_busy, 3))

    async def slow(self, results: Results, replicas: int) -> None:
        try:
            outcome = await self.slow_once(replicas, self.options.slow_events)
        except Exception as exc:
            results.errors.append(f"slow provider, {replicas} replica(s): {exc!r}")
            self.note(f"  {replicas} replica(s): FAILED {exc!r}")
            return
        results.slow.append(outcome)
        self.note(f"  {replicas} replica(s): {outcome.msgs_per_s:.1f} msgs/s of "
                  f"{outcome.ideal_per_s:.0f} ideal; peak RSS {outcome.peak_rss_mb} MB; "
                  f"provider in flight ≤ {outcome.provider_max_in_flight}; "
                  f"machine {outcome.machine_busy:.0%}")

    # -- 3. latency added at half load ----------------------------------------------

    async def latency_once(self, system: str, rate: float) -> LatencyRun:
        await self.fake.set_latency(LATENCY_PROVIDER_S)
        try:
            async with self.deployment(f"lat-{system}") as (prefix, collector):
                child = await self.serve(system, prefix)
                try:
                    n = max(10, int(rate * self.options.latency_s))
                    events = make_events(prefix, n)
                    sent: dict[str, float] = {}
                    collector.expect(n)
                    meter = self.meter(system=[child.pid]).start()
                    await publish_paced(self.broker, f"{prefix}.interaction", events, rate, sent)
                    complete = await collector.wait(30 + n / 50)
                    cpu = meter.stop()
                finally:
                    await child.stop()
                if not complete:
                    raise RuntimeError(f"{len(collector.received)} of {n} replies")
        finally:
            await self.fake.set_latency(0.0)
        first = min(sent.values())
        warm = first + self.options.latency_warmup_s
        added = [(collector.received[eid] - t) * 1000 - LATENCY_PROVIDER_S * 1000
                 for eid, t in sent.items() if t >= warm and eid in collector.received]
        return LatencyRun(
            system=system, rate_per_s=round(rate, 1), n=n, measured=len(added),
            replies=len(collector.received), p50_ms=round(percentile(added, 50), 2),
            p95_ms=round(percentile(added, 95), 2), p99_ms=round(percentile(added, 99), 2),
            max_ms=round(max(added), 2), cpu=_shares(cpu), machine_busy=round(cpu.machine_busy, 3))

    async def latency(self, results: Results) -> None:
        # Half the worker's median (a quick run's tiny backlog says little: 50/s there).
        max_rate = results.medians().get("worker")
        rate = self.options.latency_rate or (max_rate / 2 if max_rate else 200.0)
        # The floor at the same rate: what the broker and the measuring add on their own.
        # Interleaved runs, as for throughput: this VM's speed drifts, and one
        # slow stretch can make a single run's p99 (the median run is the figure).
        for _ in range(self.options.runs):
            for system in ("worker", "floor"):
                try:
                    outcome = await self.latency_once(system, rate)
                except Exception as exc:
                    results.errors.append(f"latency {system}: {exc!r}")
                    self.note(f"  {system}: FAILED {exc!r}")
                    continue
                results.latency.append(outcome)
                self.note(f"  {system:<6} at {outcome.rate_per_s:.0f}/s: added p50 "
                          f"{outcome.p50_ms} p95 {outcome.p95_ms} p99 {outcome.p99_ms} ms "
                          f"({outcome.measured} events)")

    # -- 4. the embedded model ----------------------------------------------------

    async def local(self, results: Results) -> None:
        try:
            results.local = await self.local_once()
        except Exception as exc:
            results.errors.append(f"local model: {exc!r}")
            self.note(f"  FAILED {exc!r}")
            return
        r = results.local
        self.note(f"  {r.replies}/{r.n} replies, {r.replies_per_s:.2f} replies/s "
                  f"({r.burst_tokens_per_s:.0f} tokens/s, {r.burst_tokens:.0f} a reply), burst "
                  f"p50 {r.burst_p50_s:.2f} s; one at a time p50 {r.sequential_p50_s:.2f} s "
                  f"({r.sequential_tokens:.0f} tokens a reply)")

    async def local_once(self) -> LocalRun:
        from config.settings import Settings

        parallel = Settings(_env_file=None).local_parallel  # type: ignore[call-arg]
        async with self.deployment("local") as (prefix, collector):
            collector.keep_bodies = 1000
            child = await self.serve("worker", prefix, worker={"ai_provider": "local"},
                                     ready_timeout_s=120.0)
            try:
                queue = f"{prefix}.interaction"
                seq = make_events(prefix, self.options.local_sequential)
                sent: dict[str, float] = {}
                for i, event in enumerate(seq):
                    collector.expect(i + 1)
                    await self.broker.publish_backlog(queue, [event], sent)
                    if not await collector.wait(60):
                        raise RuntimeError(f"no reply to sequential event {i + 1} within 60 s")
                sequential = [collector.received[eid] - sent[eid] for eid, _ in seq]
                burst = make_events(prefix, self.options.local_events, start=len(seq))
                collector.expect(len(seq) + len(burst))
                started = time.perf_counter()
                await self.broker.publish_backlog(queue, burst, sent)
                complete = await collector.wait(180)
            finally:
                await child.stop(30.0)
            done = [eid for eid, _ in burst if eid in collector.received]
            if not done:
                raise RuntimeError("no reply to the burst")
            span = max(collector.received[eid] for eid in done) - started
            replies: dict[str, dict[str, Any]] = {
                r["event_id"]: r for r in map(orjson.loads, collector.bodies)}
            sample = str(next(iter(replies.values()), {}).get("response", ""))

            def tokens(ids: list[str]) -> list[float]:
                return [float(replies[e]["usage"]["completion_tokens"]) for e in ids
                        if e in replies]

            seq_tokens = tokens([eid for eid, _ in seq])
            burst_tokens = tokens(done)
            del complete
            return LocalRun(
                sequential_tokens=round(sum(seq_tokens) / max(1, len(seq_tokens)), 1),
                burst_tokens=round(sum(burst_tokens) / max(1, len(burst_tokens)), 1),
                burst_tokens_per_s=round(sum(burst_tokens) / span, 1),
                n=len(burst), replies=len(done), replies_per_s=round(len(done) / span, 2),
                burst_p50_s=round(median([collector.received[e] - sent[e] for e in done]), 3),
                sequential_p50_s=round(median(sequential), 3), sequential_n=len(seq),
                parallel=parallel, sample=str(sample)[:160])


async def run_command(args: argparse.Namespace) -> int:
    from bench.report import environment, write_report

    options = Options.from_args(args)
    command = "python -m bench run" + (" --quick" if options.quick else "")
    for flag, value in (("--events", args.events), ("--runs", args.runs),
                        ("--slow-events", args.slow_events), ("--only", args.only),
                        ("--systems", args.systems), ("--rate", args.rate)):
        if value is not None:
            command += f" {flag} {value}"
    command += "".join(f" --patch {p}" for p in options.patches)
    command += "".join(f" --set {s}" for s in args.set or ())
    results = Results(started_at=datetime.now(UTC).isoformat(timespec="seconds"),
                      command=command, options={
                          "quick": options.quick, "events": options.events,
                          "runs": options.runs,
                          "slow_events": options.slow_events,
                          "latency_s": options.latency_s,
                          "latency_warmup_s": options.latency_warmup_s,
                          "scenarios": list(options.scenarios),
                          "concurrency": DEFAULT_CONCURRENCY, "patches": list(options.patches),
                          "worker_settings": options.worker_settings})
    started = time.perf_counter()
    results.environment = await environment()
    wanted = options.scenarios
    async with Harness.open(options) as harness:
        if "throughput" in wanted:
            harness.note(f"throughput: backlog of {options.events}, {options.runs} run(s), "
                         f"prefetch = concurrency = {DEFAULT_CONCURRENCY}")
            await harness.throughput(results)
        if "latency" in wanted:
            harness.note(f"latency added, provider {LATENCY_PROVIDER_S * 1000:.0f} ms, "
                         "at half the worker's rate")
            await harness.latency(results)
        if "slow" in wanted:
            harness.note(f"slow provider: {SLOW_LATENCY_S:g} s, {SLOW_CONCURRENCY} in flight, "
                         f"{options.slow_events} events per replica")
            await harness.slow(results, 1)
        if "replicas" in wanted:
            harness.note("replicas: 2 workers, slow provider")
            if not any(r.replicas == 1 for r in results.slow):
                await harness.slow(results, 1)
            await harness.slow(results, 2)
        if "local" in wanted:
            harness.note(f"embedded model: {options.local_sequential} one at a time, then a "
                         f"burst of {options.local_events}")
            await harness.local(results)
        if "profile" in wanted:
            from bench.profile import profile_systems

            harness.note(f"profile: py-spy on the worker and the floor, backlog of "
                         f"{options.profile_events}, {options.profile_duration_s} s each")
            try:
                results.profile = await profile_systems(
                    harness, options.profile_events, options.profile_duration_s)
            except Exception as exc:
                results.errors.append(f"profile: {exc!r}")
                harness.note(f"  FAILED {exc!r}")
    results.duration_s = round(time.perf_counter() - started, 1)
    write_report(results, options.out)
    harness.note(f"wrote {options.out} ({results.duration_s:.0f} s)")
    if options.json_out is not None:
        options.json_out.parent.mkdir(parents=True, exist_ok=True)
        options.json_out.write_bytes(results.to_json())
    for error in results.errors:
        harness.note(f"error: {error}")
    return 1 if results.errors else 0
