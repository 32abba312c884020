"""The processes a benchmark runs, and what the harness reads from /proc about them.

Every system under test runs in a process of its own, as does the fake
provider: on a 2-core machine, a system that shared the harness's event loop
(publisher, reply collector) or the fake's would be charged for their work
too, and the ratios between systems would shrink towards 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from bench.common import CpuSample

REPO = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")


def clean_env(**settings: str) -> dict[str, str]:
    """The parent's environment without any worker setting, plus `settings`.

    A developer's AI_PROVIDER or DATABASE_URL must not leak into a measurement.
    """
    from config.settings import Settings

    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    env.update(settings)
    # The children import `bench` and `tests` from the checkout.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# -- /proc ---------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return float(total - idle), float(total)


def find_pids(comm: str) -> list[int]:
    """Pids whose command name is `comm` (e.g. `beam.smp`, `redis-server`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == comm:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM: the most resident memory the process ever had, in MB (10^6 bytes)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


class CpuMeter:
    """CPU used by named groups of processes (and by the machine) over a window."""

    def __init__(self, groups: Mapping[str, Sequence[int]]) -> None:
        self._groups = {name: list(pids) for name, pids in groups.items()}
        self._start: dict[str, float] = {}
        self._machine: tuple[float, float] = (0.0, 0.0)
        self._wall = 0.0

    def start(self) -> CpuMeter:
        self._start = {name: self._read(pids) for name, pids in self._groups.items()}
        self._machine = machine_times()
        self._wall = time.perf_counter()
        return self

    def stop(self) -> CpuSample:
        busy0, total0 = self._machine
        busy1, total1 = machine_times()
        return CpuSample(
            seconds={name: self._read(pids) - self._start.get(name, 0.0)
                     for name, pids in self._groups.items()},
            wall_s=time.perf_counter() - self._wall,
            machine_busy=(busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0,
        )

    @staticmethod
    def _read(pids: Sequence[int]) -> float:
        return sum(process_cpu_s(pid) for pid in pids)


def service_pids() -> dict[str, list[int]]:
    return {"rabbitmq": find_pids("beam.smp"), "redis": find_pids("redis-server")}


# -- child processes -------------------------------------------------------------


async def stop_process(process: asyncio.subprocess.Process, timeout_s: float) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; only this child's pid."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        return await process.wait()


class Child:
    """A `python -m ...` child that speaks JSON lines on stdout (and reads commands on stdin)."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def spawn(cls, name: str, args: Sequence[str], env: Mapping[str, str],
                    stderr_path: Path, *, prefix: Sequence[str] = ()) -> Child:
        with stderr_path.open("ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                *prefix, sys.executable, "-m", *args, env=dict(env), cwd=REPO,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                limit=1 << 20)
        return cls(process, name)

    async def read_json(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON line the child prints; fails if it exits or says nothing in time."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no answer within {timeout_s:g} s")
            line = await asyncio.wait_for(self.process.stdout.readline(), left)
            if not line:
                code = await self.process.wait()
                raise RuntimeError(f"{self.name} exited with {code}")
            if line.startswith(b"{"):
                data: dict[str, Any] = orjson.loads(line)
                return data

    async def command(self, text: str, timeout_s: float = 10.0) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        await self.process.stdin.drain()
        return await self.read_json(timeout_s)

    async def stop(self, timeout_s: float = 15.0) -> int:
        return await stop_process(self.process, timeout_s)


class FakeProviderProcess:
    """`tests.fake_provider.FakeProvider` (Ollama API, `record=False`) in a process of its own."""

    def __init__(self, child: Child, url: str) -> None:
        self.child = child
        self.url = url

    @classmethod
    async def start(cls, latency_s: float, log_dir: Path) -> FakeProviderProcess:
        child = await Child.spawn("fake provider", ["bench", "fake", "--latency", str(latency_s)],
                                  clean_env(), log_dir / "fake-provider.log")
        ready = await child.read_json(30.0)
        return cls(child, str(ready["url"]))

    async def set_latency(self, latency_s: float) -> None:
        await self.child.command(f"latency {latency_s}")

    async def stats(self, reset: bool = False) -> dict[str, Any]:
        return await self.child.command("reset" if reset else "stats")

    async def stop(self) -> None:
        await self.child.stop(5.0)


class WorkerCli:
    """`python -m worker run` as operators run it, its log in a file.

    Readiness is read from the broker (the queue's consumer count), not from
    the log, so it holds at any LOG_LEVEL.
    """

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path, name: str) -> None:
        self.process = process
        self.log_path = log_path
        self.name = name

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls, name: str, env: Mapping[str, str], log_dir: Path,
                    patches: Sequence[str] = ()) -> WorkerCli:
        log_path = log_dir / f"{name}.log"
        # With what-if patches, the same CLI through a wrapper that applies them first.
        command = (["bench.worker_cli", *(f"--patch={p}" for p in patches)] if patches
                   else ["worker"])
        with log_path.open("wb") as log_file:
            # cwd: the log directory, so a developer's `.env` cannot leak in.
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", *command, "run", env=dict(env), cwd=log_dir,
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file)
        return cls(process, log_path, name)

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}: "
                               f"{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def peak_rss_mb(self) -> float | None:
        return peak_rss_mb(self.pid)

    async def stop(self, timeout_s: float = 30.0) -> int:
        return await stop_process(self.process, timeout_s)
