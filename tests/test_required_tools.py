"""The CI rule for skips, proved on a throwaway suite run in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SUITE = '''
import pytest
from tests.required_tools import REQUIRED_TOOL

@pytest.mark.skipif(True, reason=REQUIRED_TOOL + "frobnicator")
def test_needs_a_required_tool():
    pass

def test_skips_at_run_time_for_a_required_tool():
    pytest.skip(REQUIRED_TOOL + "frobnicator")

@pytest.mark.skipif(True, reason="no `docker compose` client here")
def test_needs_an_optional_tool():
    pass

def test_plain():
    pass
'''


def run_suite(tmp_path: Path, ci: str | None) -> str:
    (tmp_path / "conftest.py").write_text(
        "from tests.required_tools import pytest_runtest_makereport  # noqa: F401\n")
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:asyncio",
         "-o", "addopts=", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("ci", ["true", "1"])
def test_in_ci_a_required_tools_skip_fails_and_an_optional_ones_stays_a_skip(
    tmp_path: Path, ci: str
) -> None:
    summary = run_suite(tmp_path, ci)
    # A skipif is decided while setting up, so that one reports as an error: red all the same.
    assert "1 failed" in summary
    assert "1 error" in summary
    assert "1 passed" in summary
    assert "1 skipped" in summary


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_they_all_skip(tmp_path: Path, ci: str | None) -> None:
    summary = run_suite(tmp_path, ci)
    assert "failed" not in summary
    assert "3 skipped" in summary
