"""RESULTS.md from a run: the machine, the versions, the figures, and each goal met or not.

The goals are judged here, from the figures, never by hand. The section
between `<!-- analysis:begin -->` and `<!-- analysis:end -->` is the one part
written by a person (what the profile means); it is kept when the report is
written again, under the new figures, which it may then no longer match: its
heading says which run it was written for.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import AMQP_URL, REDIS_URL

if TYPE_CHECKING:
    from bench.harness import LatencyRun, Results

ANALYSIS_BEGIN = "<!-- analysis:begin -->"
ANALYSIS_END = "<!-- analysis:end -->"
PACKAGES = ("aio-pika", "aiormq", "faststream", "aiohttp", "yarl", "httpx", "redis",
            "pydantic", "uvloop", "orjson", "xllamacpp")

# The goals of issue 6.
WORKER_VS_FLOOR = 0.9
SLOW_VS_IDEAL = 0.95
RSS_LIMIT_MB = 150.0
P99_LIMIT_MS = 5.0
REPLICA_SCALING = 1.9


def machine() -> dict[str, Any]:
    """nproc, memory, CPU model (from /proc), Python and the packages' versions."""
    env: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                           "kernel": platform.release()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        env["cpu"] = model.group(1).strip() if model else platform.processor()
        meminfo = Path("/proc/meminfo").read_text()
        total = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.MULTILINE)
        env["memory_gib"] = round(int(total.group(1)) / 2**20, 1) if total else None
    except OSError:
        env["cpu"] = platform.processor()
    for package in PACKAGES:
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = "not installed"
    return env


async def environment() -> dict[str, Any]:
    """The machine and every version that shapes the figures, the servers' included."""
    import aio_pika
    import redis.asyncio as aioredis

    env = machine()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        transport = connection.transport
        properties = transport.connection.server_properties if transport is not None else {}

        def text(value: Any) -> str:
            return value.decode() if isinstance(value, bytes) else str(value)

        env["rabbitmq"] = (f"{text(properties.get('product', '?'))} "
                           f"{text(properties.get('version', '?'))}")
    finally:
        await connection.close()
    client = aioredis.from_url(REDIS_URL)
    try:
        env["redis_server"] = (await client.info("server")).get("redis_version", "?")
    finally:
        await client.aclose()
    return env


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _met(ok: bool | None) -> str:
    return "n/a (not run)" if ok is None else ("**met**" if ok else "**not met**")


def _cpu(cpu: dict[str, float], system_label: str = "system") -> str:
    if not cpu:
        return "n/a (window too short)"
    parts = [f"{system_label if name == 'system' else name} {share:.0%}"
             for name, share in cpu.items()]
    return ", ".join(parts)


def goals(results: Results) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) for each goal of the issue."""
    medians = results.medians()
    rows: list[tuple[str, str, bool | None]] = []
    worker, floor, fast = medians.get("worker"), medians.get("floor"), medians.get("faststream")
    if worker and floor:
        ratio = worker / floor
        rows.append((f"worker ≥ {WORKER_VS_FLOOR} × the floor's msgs/s",
                     f"{worker:,.0f} / {floor:,.0f} = **{ratio:.2f} ×**", ratio >= WORKER_VS_FLOOR))
    else:
        rows.append((f"worker ≥ {WORKER_VS_FLOOR} × the floor's msgs/s", "not measured", None))
    if worker and fast:
        ratio = worker / fast
        rows.append(("worker above FastStream", f"{worker:,.0f} / {fast:,.0f} = **{ratio:.2f} ×**",
                     worker > fast))
    else:
        rows.append(("worker above FastStream", "not measured", None))
    one = next((r for r in results.slow if r.replicas == 1), None)
    two = next((r for r in results.slow if r.replicas == 2), None)
    if one is not None:
        share = one.msgs_per_s / one.ideal_per_s
        rows.append((f"slow provider ≥ {SLOW_VS_IDEAL} × ideal, {one.concurrency} in flight",
                     f"{one.msgs_per_s:,.0f} of {one.ideal_per_s:,.0f} msgs/s = **{share:.2f} ×**",
                     share >= SLOW_VS_IDEAL))
        rss = max(one.peak_rss_mb) if one.peak_rss_mb else None
        rows.append((f"peak RSS ≤ {RSS_LIMIT_MB:.0f} MB at {one.concurrency} in flight",
                     f"**{_fmt(rss)} MB** (VmHWM)", None if rss is None else rss <= RSS_LIMIT_MB))
    else:
        rows.append((f"slow provider ≥ {SLOW_VS_IDEAL} × ideal", "not measured", None))
        rows.append((f"peak RSS ≤ {RSS_LIMIT_MB:.0f} MB", "not measured", None))
    lat = median_latency_run(results.latency, "worker")
    if lat is not None:
        runs = sum(r.system == "worker" for r in results.latency)
        rows.append((f"added latency p99 ≤ {P99_LIMIT_MS:g} ms at half load",
                     f"**{lat.p99_ms:.1f} ms** at {lat.rate_per_s:,.0f} events/s"
                     + (f" (median of {runs} runs)" if runs > 1 else ""),
                     lat.p99_ms <= P99_LIMIT_MS))
    else:
        rows.append((f"added latency p99 ≤ {P99_LIMIT_MS:g} ms at half load", "not measured",
                     None))
    if one is not None and two is not None:
        ratio = two.msgs_per_s / one.msgs_per_s if one.msgs_per_s else 0.0
        rows.append((f"2 replicas ≥ {REPLICA_SCALING} × one (slow provider)",
                     f"{two.msgs_per_s:,.0f} / {one.msgs_per_s:,.0f} = **{ratio:.2f} ×**",
                     ratio >= REPLICA_SCALING))
    else:
        rows.append((f"2 replicas ≥ {REPLICA_SCALING} × one", "not measured", None))
    return rows


def _kept_analysis(out: Path) -> str | None:
    try:
        text = out.read_text()
    except OSError:
        return None
    if ANALYSIS_BEGIN in text and ANALYSIS_END in text:
        return text.split(ANALYSIS_BEGIN, 1)[1].split(ANALYSIS_END, 1)[0].strip("\n")
    return None


def median_latency_run(runs: Sequence[LatencyRun], system: str) -> LatencyRun | None:
    """The run with the median p99 (the lower middle one of an even count)."""
    mine = sorted((r for r in runs if r.system == system), key=lambda r: r.p99_ms)
    return mine[(len(mine) - 1) // 2] if mine else None


def render(results: Results, env: dict[str, Any], analysis: str | None) -> str:
    lines: list[str] = []
    add = lines.append
    opts = results.options
    add("# Benchmark results")
    add("")
    add(f"Written by `{results.command}` on {results.started_at} (the run took "
        f"{results.duration_s:.0f} s). How it measures: [README.md](README.md).")
    if results.options.get("quick"):
        add("")
        add("**Quick (smoke) run**: backlogs this small measure start-up noise, not "
            "throughput; the goals below are judged on them anyway and mean nothing.")
    if opts.get("patches") or opts.get("worker_settings"):
        add("")
        add(f"**What-if run**: the worker ran with patches {opts.get('patches')} and settings "
            f"{opts.get('worker_settings')}; these are not the worker as shipped.")
    if results.errors:
        add("")
        add("**Errors in this run** (their figures are missing below):")
        add("")
        for error in results.errors:
            add(f"- {error}")
    add("")
    add("## Machine and versions")
    add("")
    add("| | |")
    add("|---|---|")
    add(f"| CPU | {env.get('cpu')}, **{env.get('nproc')} cores** (nproc) |")
    add(f"| memory | {env.get('memory_gib')} GiB |")
    add(f"| kernel | {env.get('kernel')} |")
    add(f"| Python | {env.get('python')}, event loop uvloop {env.get('uvloop')} "
        "(every process of the run) |")
    add(f"| broker | {env.get('rabbitmq')} (`{AMQP_URL.split('@')[-1]}`), quorum queue |")
    add(f"| Redis | {env.get('redis_server')} |")
    add(f"| aio-pika / aiormq | {env.get('aio-pika')} / {env.get('aiormq')} |")
    add(f"| FastStream | {env.get('faststream')} |")
    add(f"| aiohttp / yarl (provider client) | {env.get('aiohttp')} / {env.get('yarl')} |")
    add(f"| httpx (only the `httpx-provider` what-if) | {env.get('httpx')} |")
    add(f"| redis-py / pydantic / orjson | {env.get('redis')} / {env.get('pydantic')} / "
        f"{env.get('orjson')} |")
    add(f"| xllamacpp (embedded model) | {env.get('xllamacpp')} |")
    add("")
    add(f"Command: `{results.command}`")
    add("")
    add("## Goals")
    add("")
    add("| goal | measured | |")
    add("|---|---|---|")
    for goal, measured, ok in goals(results):
        add(f"| {goal} | {measured} | {_met(ok)} |")
    add("")
    add("Why a goal is not met is in the profile and the analysis below.")

    add("")
    add(f"## 1. Throughput: backlog of {opts.get('events')}, prefetch = concurrency = "
        f"{opts.get('concurrency')}")
    add("")
    add("The backlog is published first, then the system starts; msgs/s counts from its "
        "first reply to its last. Each run has its own queues; runs are interleaved. "
        "CPU is the share of one core each process used while the backlog drained "
        "(`other`: the rest of the machine, kernel included).")
    add("")
    medians = results.medians()
    runs = int(opts.get("runs") or 1)
    add("| system | " + " | ".join(f"run {i + 1}" for i in range(runs)) +
        " | **median msgs/s** | CPU in the median run |")
    add("|---|" + "---|" * runs + "---|---|")
    for system, median_rate in medians.items():
        mine = [r for r in results.throughput if r.system == system]
        cells = [f"{r.msgs_per_s:,.0f}" for r in mine] + [""] * (runs - len(mine))
        closest = min(mine, key=lambda r: abs(r.msgs_per_s - median_rate))
        add(f"| {system} | " + " | ".join(cells) + f" | **{median_rate:,.0f}** | "
            f"{_cpu(closest.cpu, system)} |")
    if "worker" in medians:
        ratios = [f"worker / {other} = **{medians['worker'] / medians[other]:.2f}**"
                  for other in ("floor", "faststream") if medians.get(other)]
        add("")
        add("Ratios of the medians: " + ", ".join(ratios) + ".")

    if results.latency:
        add("")
        add("## 2. Latency added at half load")
        add("")
        add("Events published at a steady rate (half the worker's median msgs/s), provider "
            "latency 50 ms; added = reply received − event published − 50 ms, first "
            f"{results.options.get('latency_warmup_s', 0):g} s left out as warm-up. The floor "
            "at the same rate shows what the broker and the measuring add by themselves.")
        add("")
        add("| system | events/s | events measured | p50 ms | p95 ms | p99 ms | max ms | CPU |")
        add("|---|---|---|---|---|---|---|---|")
        for lat in sorted(results.latency, key=lambda r: r.system != "worker"):
            add(f"| {lat.system} | {lat.rate_per_s:,.0f} | {lat.measured} | {lat.p50_ms:.1f} | "
                f"{lat.p95_ms:.1f} | {lat.p99_ms:.1f} | {lat.max_ms:.1f} | "
                f"{_cpu(lat.cpu, lat.system)} |")

    if results.slow:
        add("")
        add("## 3. Slow provider and replicas")
        add("")
        add("`python -m worker run` processes as deployed (JSON logs at INFO), provider "
            "latency 1 s, MAX_CONCURRENT_REQUESTS = PREFETCH_COUNT = 1000 per replica. "
            "Replicas start first, then the events are published as fast as the broker "
            "confirms them; msgs/s counts from the first publish to the last reply. "
            "Ideal = replicas × concurrency / latency. Peak RSS is each worker's VmHWM.")
        add("")
        add("| replicas | events | msgs/s | ideal | achieved | peak RSS MB | provider in flight "
            "(max) | CPU |")
        add("|---|---|---|---|---|---|---|---|")
        for slow in results.slow:
            add(f"| {slow.replicas} | {slow.n} | **{slow.msgs_per_s:,.0f}** | "
                f"{slow.ideal_per_s:,.0f} | {slow.msgs_per_s / slow.ideal_per_s:.2f} × | "
                f"{', '.join(f'{m:.0f}' for m in slow.peak_rss_mb)} | "
                f"{slow.provider_max_in_flight} | "
                f"{_cpu(slow.cpu, 'workers' if slow.replicas > 1 else 'worker')} |")
        one = next((r for r in results.slow if r.replicas == 1), None)
        two = next((r for r in results.slow if r.replicas == 2), None)
        if one is not None and two is not None and one.msgs_per_s:
            add("")
            add(f"2 replicas / 1 = **{two.msgs_per_s / one.msgs_per_s:.2f}**.")

    if results.local is not None:
        r = results.local
        add("")
        add("## 4. Embedded model (AI_PROVIDER=local)")
        add("")
        add(f"The worker in-process with SmolLM2-135M (LOCAL_PARALLEL={r.parallel}, all "
            f"cores): {r.sequential_n} events one at a time, then a burst of {r.n}.")
        add("")
        add("| | |")
        add("|---|---|")
        add(f"| replies/s (burst of {r.n}) | **{r.replies_per_s:.2f}** ({r.replies}/{r.n}), "
            f"{r.burst_tokens_per_s:.0f} completion tokens/s |")
        add(f"| completion tokens a reply | {r.sequential_tokens:.0f} one at a time, "
            f"{r.burst_tokens:.0f} in the burst |")
        add(f"| p50 reply time, burst (publish → reply) | {r.burst_p50_s:.2f} s |")
        add(f"| p50 reply time, one at a time | **{r.sequential_p50_s:.2f} s** |")
        add(f"| a reply | {r.sample!r} |")

    if results.profile:
        add("")
        add("## 5. Profile of the throughput scenario")
        add("")
        first = next(iter(results.profile.values()))
        add(f"`{first.get('command')}` (the pid of `python -m bench serve worker`, then "
            "`floor`; `python -m bench profile` does it all), on a backlog of 20000 (see "
            "[bench/profile.py](profile.py)). py-spy samples without stopping the process "
            "(`--nonblocking`): stopping it makes every sample land next to a system call "
            "on this VM. Each sample goes to the innermost library it is in; C code "
            "(uvloop, orjson) counts for the Python frame that called it. CPU ms per event "
            "= the process's CPU time / events answered while sampled.")
        for system, data in results.profile.items():
            per_event = data.get("cpu_ms_per_event") or 0.0
            add("")
            add(f"**{system}**: {data.get('msgs_per_s')} msgs/s while sampled, "
                f"**{per_event} ms CPU per event**, {data.get('samples')} samples.")
            add("")
            add("| where | share | ms per event |")
            add("|---|---|---|")
            for name, share in data.get("parts", []):
                add(f"| {name} | {share:.1%} | {share * per_event:.3f} |")
            add("")
            add("<details><summary>top functions (self time)</summary>")
            add("")
            add("| function | share |")
            add("|---|---|")
            for name, share in data.get("top", []):
                add(f"| `{name}` | {share:.1%} |")
            add("")
            add("</details>")

    add("")
    add("## Analysis")
    add("")
    add(ANALYSIS_BEGIN)
    add(analysis if analysis is not None else
        "_Not written yet for this run: what costs most, and what is left._")
    add(ANALYSIS_END)
    add("")
    add("<details><summary>raw figures (JSON)</summary>")
    add("")
    add("```json")
    add(results.to_json().decode())
    add("```")
    add("")
    add("</details>")
    add("")
    return "\n".join(lines)


def write_report(results: Results, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    analysis = _kept_analysis(out)
    out.write_text(render(results, results.environment, analysis))
