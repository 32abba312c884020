"""The worker as operators run it: `python -m worker run` in a process of its own.

Fault tests need what an in-process `App` cannot give them: a process that can
be SIGKILLed in the middle of a burst, SIGTERMed while busy, or that dies with
`os._exit` the way a segfault or an OOM kill would. Everything else stays as
real as in the other tests (broker, Redis, a fake provider on loopback).

Each worker writes its JSON log to a file rather than a pipe: a busy worker
logs thousands of lines, and a pipe nobody drains would block it. Readiness is
read from that log (the "worker started" line, which also carries the sidecar
port chosen by `SIDECAR_PORT=0`), so no port has to be guessed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from config.settings import Settings

# Every variable the worker reads: none of the caller's own may leak into a test.
SETTINGS_VARIABLES = frozenset(name.upper() for name in Settings.model_fields)


def worker_env(**settings: str) -> dict[str, str]:
    """The parent's environment without any worker setting, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_VARIABLES}
    env.update({"SIDECAR_PORT": "0", "SIDECAR_HOST": "127.0.0.1", "LOG_FORMAT": "json"})
    env.update(settings)
    return env


@dataclass
class WorkerProcess:
    """One `waddle-ai run` process and the file its log goes to."""

    process: asyncio.subprocess.Process
    log_path: Path
    name: str
    started: dict[str, Any] | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def sidecar_port(self) -> int:
        assert self.started is not None, f"{self.name} has not logged 'worker started'"
        return int(self.started["sidecar_port"])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines; anything else (a traceback from a crash) is left out."""
        records: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # the last line of a killed process may be cut short
            if isinstance(record, dict):
                records.append(record)
        return records

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    async def wait_ready(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait for the "worker started" line; fail with the log if it dies or dawdles."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            for record in self.log_records():
                if record.get("message") == "worker started":
                    self.started = record
                    return record
            if self.process.returncode is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode} before it was "
                    f"ready; log tail:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"{self.name} not ready within {timeout_s:g} s; log tail:\n{self.log_tail()}")

    async def wait_exit(self, timeout_s: float) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still running after {timeout_s:g} s; "
                f"log tail:\n{self.log_tail()}") from None

    def kill(self) -> None:
        """SIGKILL: no drain, no acks, no cleanup; what a node failure does."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: what an orchestrator sends before it stops a pod."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)


class WorkerLauncher:
    """Starts workers for one test (one queue prefix) and kills whatever is left."""

    def __init__(self, log_dir: Path, **settings: str) -> None:
        self._log_dir = log_dir
        self._settings = dict(settings)
        self.workers: list[WorkerProcess] = []

    async def start(
        self, settings: Mapping[str, str] | None = None, *, wait_ready: bool = True
    ) -> WorkerProcess:
        """A new worker with this test's settings, `settings` on top."""
        name = f"worker-{len(self.workers) + 1}"
        log_path = self._log_dir / f"{name}.log"
        env = worker_env(**{**self._settings, **(settings or {})})
        with log_path.open("wb") as log_file:
            # cwd: the test's own directory, so a developer's `.env` cannot leak in.
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker", "run", env=env, cwd=self._log_dir,
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            )
        worker = WorkerProcess(process, log_path, name)
        self.workers.append(worker)
        if wait_ready:
            await worker.wait_ready()
        return worker

    def env(self, **settings: str) -> dict[str, str]:
        """The environment the workers get, for CLI commands on the same deployment."""
        return worker_env(**{**self._settings, **settings})

    async def aclose(self) -> None:
        for worker in self.workers:
            if worker.process.returncode is None:
                worker.kill()
            await worker.process.wait()


async def run_cli(
    *args: str, env: Mapping[str, str], cwd: Path, timeout_s: float = 60.0
) -> tuple[int, str, str]:
    """`python -m worker ARGS...` to completion: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env=dict(env), cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"`waddle-ai {' '.join(args)}` took over {timeout_s:g} s") from None
    assert process.returncode is not None
    return process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
