"""The benchmark harness still runs: `python -m bench run --quick`, end to end, in < 60 s.

It asserts that every system produced numbers, not that any goal is met: a
backlog of 50 measures start-up noise, and CI machines differ. The figures
themselves come from a full run (`python -m bench run`, bench/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import AMQP_URL, REDIS_URL, REQUIRED_TOOL

# Per test, not for the module: a skip at import is a collection skip that the
# CI rule (tests/required_tools.py) would not see.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("faststream") is None,
    reason=REQUIRED_TOOL + "FastStream (the `bench` extra; `make install` installs it)")

REPO = Path(__file__).resolve().parent.parent
TIME_LIMIT_S = 60


def test_quick_run_measures_every_system(tmp_path: Path) -> None:
    report = tmp_path / "RESULTS.md"
    raw = tmp_path / "results.json"
    env = {**os.environ, "BENCH_AMQP_URL": AMQP_URL, "BENCH_REDIS_URL": REDIS_URL}
    # A session of its own: on a timeout the harness and every process it
    # started (systems under test, workers, the fake provider) go together.
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", "run", "--quick", "--out", str(report),
         "--json", str(raw)],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the quick run took over {TIME_LIMIT_S} s:\n{output.decode()[-3000:]}")
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-3000:]

    results = orjson.loads(raw.read_bytes())
    rates = {run["system"]: run["msgs_per_s"] for run in results["throughput"]}
    assert set(rates) == {"floor", "faststream", "worker"}, text
    assert all(rate > 0 for rate in rates.values()), rates
    assert all(run["replies"] == run["n"] and run["duplicates"] == 0
               for run in results["throughput"])
    assert {run["system"] for run in results["latency"]} == {"worker", "floor"}
    assert all(run["p99_ms"] > 0 for run in results["latency"])
    assert sorted(run["replicas"] for run in results["slow"]) == [1, 2]
    assert all(run["msgs_per_s"] > 0 and min(run["peak_rss_mb"]) > 0 for run in results["slow"])
    markdown = report.read_text()
    assert "## Goals" in markdown
    assert "## 1. Throughput" in markdown
