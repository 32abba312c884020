"""Skips that cannot hide: in CI a test skipped for a missing required tool fails.

A test that needs a tool the suite requires (the embedded model, redis-server,
rabbitmqctl, promtool) skips on a developer's machine that lacks it, with a
reason starting with `REQUIRED_TOOL` that says what to install. In CI
(`CI=true`), the hook below turns such a skip into a failure, so a missing
install step shows as red instead of a quietly smaller suite. Optional tools
(docker, docker compose) skip with any other reason and stay skips.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

REQUIRED_TOOL = "required tool missing: "


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if REQUIRED_TOOL in reason:
        report.outcome = "failed"
        report.longrepr = (f"CI=true: a required tool is missing, so this test may not "
                           f"skip ({reason})")
