"""A real worker process with its sidecar, for tests that speak plain (blocking) HTTP.

schemathesis drives the API with `requests` from synchronous tests, so this
starts everything with `subprocess` rather than asyncio: the fake provider
(`python -m tests.fake_provider`, instant answers) and `python -m worker run`
on it, with an API key, its own queue prefix, no Redis and no database. The
worker picks a free sidecar port and logs it in its "worker started" line.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from tests.conftest import AMQP_URL, delete_topology
from tests.worker_process import worker_env

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-test-spec-key"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LiveSidecar:
    url: str  # http://127.0.0.1:PORT
    prefix: str
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def fake_provider_process() -> Iterator[str]:
    """`python -m tests.fake_provider --port 0`; yields its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_provider", "--port", "0"], cwd=REPO,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "... listening on http://127.0.0.1:PORT  (...)"
        words = [word for word in line.split() if word.startswith("http://")]
        assert words, f"the fake provider did not start: {line!r}"
        yield words[0]
    finally:
        _stop(process)


@contextlib.contextmanager
def live_sidecar(log_dir: Path, **settings: str) -> Iterator[LiveSidecar]:
    """A worker answering with the fake provider; its queues are deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    log_path = log_dir / "worker.log"
    with fake_provider_process() as provider_url:
        env = worker_env(
            AMQP_URL=AMQP_URL, QUEUE_PREFIX=prefix, AI_PROVIDER="ollama",
            OLLAMA_HOST=provider_url, OLLAMA_MODEL="llama3.2", API_KEYS=API_KEY,
            LOG_LEVEL="INFO", **settings)
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "worker", "run"], env=env, cwd=log_dir,
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
        try:
            port = _wait_started(process, log_path)
            yield LiveSidecar(f"http://127.0.0.1:{port}", prefix, log_path)
        finally:
            _stop(process)
            asyncio.run(delete_topology(prefix))


def _wait_started(process: subprocess.Popen[bytes], log_path: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in log_path.read_bytes().splitlines():
            if not line.startswith(b"{"):
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                record = orjson.loads(line)
                if isinstance(record, dict) and record.get("message") == "worker started":
                    return int(record["sidecar_port"])
        if process.poll() is not None:
            break
        time.sleep(0.1)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
    raise AssertionError(f"the worker did not start (exit {process.poll()}); log tail:\n{tail}")


def _stop(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()
