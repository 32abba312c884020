"""schemathesis against a real sidecar: the API does what its OpenAPI document says.

A worker process answers with the fake provider (instant), and schemathesis,
an independent API fuzzer, takes the OpenAPI document (the one the worker
serves at `/openapi.json`, checked below) and sends each operation generated
requests, valid and not:
no 5xx, and every status, content type, header and body must be one the
document declares. Examples are bounded and derandomised so the run is short
and the same on every machine; a failure prints the request that broke it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from tests.live_sidecar import API_KEY, LiveSidecar, live_sidecar
from worker.openapi import build_openapi

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_EXAMPLES = 50


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSidecar]:
    with live_sidecar(tmp_path_factory.mktemp("fuzz")) as running:
        yield running


# The document the worker serves is this one (`test_served_document_is_the_generated_one`).
# It is loaded at collection, without a server; the calls go to the live sidecar.
# (schemathesis' lazy `from_fixture` loader does not run on pytest 9: it sets
# `node._nodeid`, which pytest 9 no longer has.)
# A body over the size cap is refused with 413 before it is parsed, whatever it
# holds; schemathesis' default list of "rejected" statuses lacks 413.
CONFIG = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {
    "expected-statuses": [400, 401, 404, 405, 413, 415, 422, 429]}}})
schema = schemathesis.openapi.from_dict(build_openapi(), config=CONFIG)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_follows_its_openapi_document(case: schemathesis.Case, sidecar: LiveSidecar) -> None:
    case.call_and_validate(base_url=sidecar.url, headers=AUTH)


def test_served_document_is_the_generated_one(sidecar: LiveSidecar) -> None:
    served = requests.get(f"{sidecar.url}/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.headers["Content-Type"].startswith("application/json")
    assert served.json() == build_openapi()


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/v1/nope", 404, "not_found"),
    ("GET", "/nope", 404, "not_found"),
    ("DELETE", "/v1/chat/completions", 405, "method_not_allowed"),
    ("PUT", "/v1/models", 405, "method_not_allowed"),
    ("GET", "/v1/models/no-such-model", 404, "model_not_found"),
])
def test_errors_are_openai_json_everywhere(
    sidecar: LiveSidecar, method: str, path: str, status: int, code: str
) -> None:
    """Regression: unknown routes and methods answered aiohttp's text/plain `404: Not Found`."""
    response = requests.request(method, sidecar.url + path, headers=AUTH, timeout=10)
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
    if status == 405:
        assert response.headers["Allow"]


def test_retrieve_model_answers_an_entry_of_the_list(sidecar: LiveSidecar) -> None:
    listing = requests.get(f"{sidecar.url}/v1/models", headers=AUTH, timeout=10).json()
    assert listing["data"], listing
    first = listing["data"][0]
    one = requests.get(f"{sidecar.url}/v1/models/{first['id']}", headers=AUTH, timeout=10)
    assert one.status_code == 200
    assert one.json() == first
    anonymous = requests.get(f"{sidecar.url}/v1/models/{first['id']}", timeout=10)
    assert anonymous.status_code == 401


def test_readyz_says_memory_state_is_degraded(sidecar: LiveSidecar) -> None:
    """No REDIS_URL: state lives in this process, per replica, and /readyz says so
    (the contract's "explicitly degraded"), while the replica stays ready."""
    response = requests.get(f"{sidecar.url}/readyz", timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["state"]["backend"] == "memory"
    assert body["state"]["degraded"] is True
    assert body["postgres"] == {"status": "disabled"}


def test_fuzzing_left_the_worker_healthy(sidecar: LiveSidecar, tmp_path: Path) -> None:
    """After the fuzzing, the worker still answers a plain request."""
    response = requests.post(f"{sidecar.url}/v1/chat/completions", headers=AUTH, timeout=30,
                             json={"model": "auto", "messages": [{"role": "user",
                                                                 "content": "hi"}]})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert "Traceback" not in sidecar.log_path.read_text(errors="replace"), sidecar.log_tail()
