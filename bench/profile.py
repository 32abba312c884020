"""Where a system's CPU goes on the throughput scenario: py-spy, attached from outside.

The system runs exactly as in the throughput runs (its own process, a backlog
far larger than the sampling window), and py-spy samples it for a fixed time
without stopping it (`--nonblocking`; stopping it biases samples towards
system calls on this VM). py-spy leaves out idle samples, so the samples are
the event loop's CPU time. Each sample goes to one *part*: the innermost
library on its stack (httpx, redis-py, aio-pika, pydantic...) or the worker's
own code; a sample with no Python frame below the event loop is the loop's
own work. C code (uvloop, orjson) counts for the Python frame that called it.

    python -m bench profile            # the worker and the floor; prints the tables
    py-spy record --pid PID --format flamegraph -o worker.svg   # a picture, by hand
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import make_events
from bench.procs import process_cpu_s

if TYPE_CHECKING:
    from bench.harness import Harness

# (path fragment, part); the innermost frame that belongs to one of these wins, so
# stdlib frames (asyncio streams, contextlib) count for the library that called them.
# aiohttp as the provider client (the sidecar's server idles while profiled);
# httpx for the `httpx-provider` what-if.
HTTP = "HTTP to the provider (aiohttp, yarl; httpx in what-ifs)"
PARTS: tuple[tuple[str, str], ...] = (
    ("prometheus_client/", "metrics (prometheus_client)"),
    ("logging/", "logging"),
    ("observability/logs.py", "logging"),
    ("pydantic/", "pydantic (parse event, build reply)"),
    ("pydantic_core/", "pydantic (parse event, build reply)"),
    ("schemas/", "pydantic (parse event, build reply)"),
    ("redis/", "Redis (redis-py)"),
    ("context/redis_store.py", "Redis (redis-py)"),
    ("context/failover_store.py", "Redis (redis-py)"),
    ("context/redis_pool.py", "Redis (redis-py)"),
    ("aiohttp/", HTTP),
    ("yarl/", HTTP),
    ("multidict/", HTTP),
    ("httpx/", HTTP),
    ("httpcore/", HTTP),
    ("h11/", HTTP),
    ("anyio/", HTTP),
    ("sniffio/", HTTP),
    ("providers/", HTTP),
    ("faststream/", "FastStream (dispatch, acks)"),
    ("fast_depends/", "FastStream (dispatch, acks)"),
    ("aiormq/", "AMQP (aio-pika, aiormq, pamqp)"),
    ("aio_pika/", "AMQP (aio-pika, aiormq, pamqp)"),
    ("pamqp/", "AMQP (aio-pika, aiormq, pamqp)"),
    ("consumers/", "own code (consumer, pipeline, prompt, safety, publisher)"),
    ("publishers/", "own code (consumer, pipeline, prompt, safety, publisher)"),
    ("context/", "own code (consumer, pipeline, prompt, safety, publisher)"),
    ("config/", "own code (consumer, pipeline, prompt, safety, publisher)"),
    ("bench/systems.py", "own code (consumer, pipeline, prompt, safety, publisher)"),
)
EVENT_LOOP = "event loop (uvloop, asyncio tasks)"
ENTRY = ("main", "serve", "<module>", "serve_worker", "serve_floor", "serve_faststream")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>.*):(?P<line>\d+)\)$")


def parse_frame(frame: str) -> tuple[str, str]:
    match = FRAME.match(frame)
    if match is None:
        return frame, ""
    return match["func"], match["path"]


REPO_DIRS = ("worker", "consumers", "providers", "context", "publishers", "config",
             "domain", "observability", "schemas", "broker", "bench", "tests")


def area_of(path: str) -> str:
    """The module a frame is in: `consumers/pipeline.py` for the repo's, else the package.

    py-spy shortens paths to what follows their sys.path entry (`httpx/_models.py`).
    """
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    for root in REPO_DIRS:
        if path.startswith(f"{root}/") or f"/{root}/" in path:
            return f"{root}/{path.split(f'{root}/', 1)[1]}"
    return path.split("/", 1)[0].removesuffix(".py") or "?"


def part_of(frames: Sequence[str]) -> str:
    # The outer frames of every sample are the harness's own entry point.
    for frame in reversed(frames):
        _, path = parse_frame(frame)
        if path.endswith(("bench/systems.py", "bench/__main__.py")) and \
                parse_frame(frame)[0] in ENTRY:
            continue
        for fragment, part in PARTS:
            if path.startswith(fragment) or f"/{fragment}" in path:
                return part
    return EVENT_LOOP


def analyse(raw: str) -> dict[str, Any]:
    """py-spy's raw (collapsed) output to shares by part, by area and by leaf function."""
    parts: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        # py-spy's first frame is the thread ("process 123:\"python\"" with
        # --subprocesses); keep only Python frames.
        frames = [f for f in frames if FRAME.match(f)]
        total += count
        parts[part_of(frames)] += count
        if frames:
            func, path = parse_frame(frames[-1])
            areas[area_of(path)] += count
            leaves[f"{func} ({area_of(path)})"] += count
        else:
            areas["?"] += count

    def shares(counter: Counter[str], top: int) -> list[tuple[str, float]]:
        return [(name, round(n / total, 4)) for name, n in counter.most_common(top)] if total \
            else []

    return {"samples": total, "parts": shares(parts, 25), "areas": shares(areas, 15),
            "top": shares(leaves, 15)}


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed: pip install py-spy")
    return found


async def profile_one(harness: Harness, system: str, n: int, duration_s: int) -> dict[str, Any]:
    """Sample `system` for `duration_s` seconds while it works through a backlog of `n`."""
    out_file = harness.options.log_dir / f"profile-{system}.txt"
    async with harness.deployment(f"prof-{system}") as (prefix, collector):
        await harness.broker.publish_backlog(f"{prefix}.interaction", make_events(prefix, n))
        collector.expect(n)
        child = await harness.serve(system, prefix)
        try:
            # Let the first prefetch burst and connection setup pass.
            await asyncio.sleep(0.5)
            replies0, cpu0, t0 = len(collector.received), process_cpu_s(child.pid), \
                time.perf_counter()
            spy = await asyncio.create_subprocess_exec(
                py_spy(), "record", "--pid", str(child.pid), "--duration", str(duration_s),
                "--rate", "200", "--nonblocking", "--format", "raw", "-o", str(out_file),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(spy.communicate(), duration_s + 30)
            replies1, cpu1, t1 = len(collector.received), process_cpu_s(child.pid), \
                time.perf_counter()
            if spy.returncode != 0 or not out_file.exists():
                raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode()[-500:]}")
            if replies1 >= n:
                raise RuntimeError(f"the backlog of {n} ran out while sampling; raise it")
        finally:
            await child.stop()
    events = replies1 - replies0
    result = analyse(out_file.read_text())
    result.update({
        "system": system, "file": str(out_file), "events": events,
        "msgs_per_s": round(events / (t1 - t0), 1),
        "cpu_ms_per_event": round((cpu1 - cpu0) * 1000 / events, 3) if events else None,
        "command": (f"py-spy record --pid PID_OF_BENCH_SERVE_{system.upper()} "
                    f"--duration {duration_s} --rate 200 --nonblocking --format raw"),
    })
    return result


async def profile_systems(harness: Harness, n: int, duration_s: int) -> dict[str, Any]:
    return {system: await profile_one(harness, system, n, duration_s)
            for system in ("worker", "floor")}


def print_profile(profile: dict[str, Any]) -> None:
    for system, data in profile.items():
        print(f"\n{system}: {data['msgs_per_s']} msgs/s while sampled, "
              f"{data['cpu_ms_per_event']} ms CPU per event, {data['samples']} samples")
        for title in ("parts", "areas", "top"):
            print(f"  by {title}:")
            for name, share in data[title]:
                print(f"    {share:6.1%}  {name}")


async def profile_command(n: int, duration_s: int, patches: list[str] | None = None,
                          settings: list[str] | None = None) -> int:
    import argparse

    from bench.harness import Harness, Options

    args = argparse.Namespace(quick=False, events=None, runs=None, slow_events=None,
                              only="profile", out=None, json=None, patch=patches, set=settings,
                              systems=None, rate=None)
    options = Options.from_args(args)
    async with Harness.open(options) as harness:
        profile = await profile_systems(harness, n, duration_s)
    print_profile(profile)
    print(f"\nraw samples in {options.log_dir}")
    return 0
