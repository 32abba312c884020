"""`make image-check` (deploy/image/): what can be checked without a Docker daemon.

The check itself builds and runs the image, so it is a CI step after
`make test`, not a test here. These keep its parts honest: the Dockerfile needs
no registry beyond its PYTHON_IMAGE, the check says "skipped" (never "passed")
with its reason where Docker cannot run, CI runs it, and its clean-up never
touches a real deployment's queues.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.compose_file import ROOT, compose

CHECK = ROOT / "deploy" / "image" / "check.sh"


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's lines without comments."""
    text = (ROOT / "Dockerfile").read_text()
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def test_dockerfile_pulls_nothing_but_its_base_image() -> None:
    text = (ROOT / "Dockerfile").read_text()
    # A `# syntax=` directive makes BuildKit fetch its frontend from Docker Hub.
    assert not re.search(r"^#\s*syntax\s*=", text, flags=re.MULTILINE | re.IGNORECASE)
    froms = [line for line in dockerfile_instructions() if line.startswith("FROM ")]
    assert froms == ["FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE}"]


def test_dockerfile_calls_python3_only() -> None:
    # A Debian python3 base has neither `python` nor a global `pip`; the build
    # makes its own virtualenv first, and the HEALTHCHECK names the venv's python.
    body = "\n".join(dockerfile_instructions())
    bare = re.findall(r"(?<![\w/.-])python(?![\w.:])", body)  # python:3.11-slim is an image
    assert bare == [], "call python3 (or /opt/venv/bin/python), not python"
    assert "python3 -m venv /build-venv" in body
    assert body.index("python3 -m venv /build-venv") < body.index("pip wheel")
    assert '"/opt/venv/bin/python", "-c"' in body


def test_dockerfile_takes_an_optional_ca_bundle_for_pip_as_a_secret() -> None:
    body = "\n".join(dockerfile_instructions())
    assert "--mount=type=secret,id=pip-ca" in body
    assert "PIP_CERT=/run/secrets/pip-ca" in body
    assert "pip-ca" not in body.split("AS build", 1)[1].split("FROM ", 1)[1]  # build stage only


def test_compose_builds_with_the_same_base_image_switch() -> None:
    args = compose()["services"]["worker"]["build"]["args"]
    assert args["PYTHON_IMAGE"] == "${PYTHON_IMAGE:-python:3.11-slim}"


def run_check(**env: str) -> subprocess.CompletedProcess[str]:
    # /bin/false as the only docker client: no daemon can be reached or started.
    environment = {**os.environ, "DOCKER": "/bin/false", **env}
    return subprocess.run([str(CHECK)], capture_output=True, text=True, env=environment,
                          cwd=ROOT, timeout=60, check=False)


def test_image_check_says_skipped_and_why_where_docker_cannot_run() -> None:
    result = run_check()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("image-check: skipped: "), result.stdout
    assert "BuildKit" in lines[-1]
    assert "passed" not in result.stdout


def test_image_check_skip_fails_when_the_check_is_required() -> None:
    result = run_check(IMAGE_CHECK_REQUIRED="1")
    assert result.returncode == 1
    assert "image-check: skipped: " in result.stdout


def test_ci_runs_the_image_check_after_the_tests() -> None:
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip().startswith("make ")]
    assert commands[-2:] == ["make test", "make image-check"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^image-check:\n\tdeploy/image/check\.sh$", makefile, flags=re.MULTILINE)


def test_topology_clean_up_refuses_a_real_deployments_prefix() -> None:
    script = ROOT / "deploy" / "image" / "delete_topology.py"
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "QUEUE_PREFIX": "ai", "PYTHONPATH": str(ROOT)}, check=False,
    )
    assert result.returncode == 2
    assert "refusing prefix 'ai'" in result.stderr
