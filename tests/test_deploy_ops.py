"""The operations files stay true to the worker they watch and deploy.

- Every metric a Grafana panel or an alert rule names is one the worker really
  exports, learnt by scraping a running worker's /metrics (or a RabbitMQ
  plugin / Prometheus series from an explicit list), so a renamed metric breaks
  CI instead of silently emptying a panel or disarming an alert.
- The rules, their unit tests, the scrape config and every dashboard
  expression pass `promtool` when it is installed (skipped otherwise).
- docker-compose.yml, the Grafana provisioning and the Prometheus config agree
  with each other; the Kubernetes example has its probes, grace period,
  secrets and autoscaler wired to the right names.
- `.env.example` lists every setting with its real default.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from broker.topology import Topology
from config.settings import Settings
from tests.compose_file import ROOT, compose, has_compose_client
from tests.conftest import REQUIRED_TOOL, running_worker
from tests.fake_provider import FakeProvider
from worker.client import RouterClient, make_event

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "waddle-ai.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
K8S = DEPLOY / "k8s"
RUNBOOK = ROOT / "docs" / "operations.md"
ENV_EXAMPLE = ROOT / ".env.example"

SETTINGS_ENV_NAMES = {name.upper() for name in Settings.model_fields}
DEFAULTS = Settings.model_construct()  # class defaults, no environment read

# Series that are not the worker's: Prometheus's own `up`, and the
# rabbitmq_prometheus plugin's queue metrics as its metrics.md names them
# (served per queue, with `queue` and `vhost` labels, on /metrics/per-object).
RABBITMQ_METRICS = {
    "rabbitmq_queue_messages",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_consumers",
}
OTHER_METRICS = {"up", *RABBITMQ_METRICS}

PROMQL_FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_quantile", "holt_winters", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "ln", "log2", "log10", "minute", "month",
    "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt",
    "time", "timestamp", "vector", "year", "avg_over_time", "min_over_time", "max_over_time",
    "sum_over_time", "count_over_time", "quantile_over_time", "stddev_over_time",
    "stdvar_over_time", "last_over_time", "present_over_time",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "offset", "and", "or", "unless", "inf", "nan", "atan2"}

# What Grafana fills in before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "__rate_interval": "5m", "__interval": "1m", "__range": "1h",
    "job": "waddle-ai", "instance": ".*", "prefix": "ai",
}


# -- PromQL -----------------------------------------------------------------------


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables (`$name`, `${name}`) with typical values."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown dashboard variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    Strings (label values) go first, then label matchers `{...}`, ranges and
    subqueries `[...]`, and the label lists of `by`/`without`/`on`/`ignoring`/
    `group_left`/`group_right`; what identifiers remain are functions (followed
    by `(`, and checked against PromQL's list), keywords, or metric names.
    """
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names: set[str] = set()
    token_re = r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?|[A-Za-z_:][A-Za-z0-9_:]*"
    for match in re.finditer(token_re, text):
        token = match.group()
        if token[0].isdigit():
            continue
        if text[match.end():].lstrip().startswith("("):
            assert token in PROMQL_FUNCTIONS, f"unknown PromQL function {token!r} in {expr!r}"
            continue
        if token.lower() in PROMQL_KEYWORDS:
            continue
        names.add(token)
    return names


def test_the_metric_name_extractor_sees_through_promql() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le, provider) '
        '(rate(waddle_ai_provider_latency_seconds_bucket{job=~"$job", le!="x"}[$__rate_interval])))'
    ) == {"waddle_ai_provider_latency_seconds_bucket"}
    assert promql_metric_names(
        'sum(rate(a_total{reason="stale"}[10m])) / sum(rate(b_total[10m] offset 5m)) > 0.05'
    ) == {"a_total", "b_total"}
    assert promql_metric_names(
        "min_over_time(c[5m:1m]) >= 1 and on (instance) group_left (x) d == bool 2 or vector(0)"
    ) == {"c", "d"}
    assert promql_metric_names('count(up{job="waddle-ai"} == 1) or vector(0)') == {"up"}
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        promql_metric_names("rat(x_total[5m])")


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> dict[str, str]:
    """Every query of the dashboard, keyed by where it is (for messages)."""
    found: dict[str, str] = {}
    board = dashboard()
    for panel in walk_panels(board["panels"]):
        for target in panel.get("targets", []):
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", text)
            assert match, f"variable {variable['name']}: expected label_values(metric, label)"
            found[f"variable {variable['name']}"] = match.group(1)
    return found


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def exported_metric_names(exposition: str) -> set[str]:
    """The series names Prometheus stores from this exposition text."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        base = family.name
        if family.type == "counter":
            names.update({f"{base}_total", f"{base}_created"})
        elif family.type == "histogram":
            names.update(f"{base}{suffix}" for suffix in ("_bucket", "_sum", "_count", "_created"))
        elif family.type == "summary":
            names.update({base, f"{base}_sum", f"{base}_count", f"{base}_created"})
        else:
            names.add(base)
    return names


@pytest.fixture
async def scraped_metric_names(
    make_settings: Callable[..., Settings], router_client: RouterClient
) -> set[str]:
    """Scrape a real in-process worker after it answered one event."""
    async with FakeProvider() as fake:
        settings = make_settings(ai_provider="ollama", ollama_host=fake.url)
        async with running_worker(settings) as app:
            await router_client.publish(make_event("hello everyone"))
            await router_client.next_reply(15.0)
            # The reply counter moves after the ack, a moment after the reply lands.
            async with asyncio.timeout(10):
                while app.metrics.registry.get_sample_value(  # noqa: ASYNC110
                        "waddle_ai_replies_total",
                        {"trigger": "greeting", "provider": "ollama"}) is None:
                    await asyncio.sleep(0.02)
            assert app.sidecar is not None
            url = f"http://127.0.0.1:{app.sidecar.bound_port}/metrics"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                assert response.status == 200
                text = await response.text()
    names = exported_metric_names(text)
    # The replied event made labelled series; the scrape is what Prometheus sees.
    assert "waddle_ai_replies_total" in {s.name for f in text_string_to_metric_families(text)
                                         for s in f.samples}
    return names


async def test_every_metric_in_the_dashboard_and_alerts_is_exported(
    scraped_metric_names: set[str],
) -> None:
    queries = dashboard_exprs()
    queries.update({f"alert {rule['alert']}": rule["expr"] for rule in alert_rules()})
    problems = []
    for where, expr in queries.items():
        for name in sorted(promql_metric_names(expr)):
            if name.startswith("waddle_ai_"):
                if name not in scraped_metric_names:
                    problems.append(f"{where}: {name} is not exported by the worker")
            elif name not in OTHER_METRICS:
                problems.append(f"{where}: {name} is neither the worker's nor in OTHER_METRICS")
    assert not problems, "\n".join(problems)
    # And the check has teeth: the un-suffixed counter name is not a series.
    assert "waddle_ai_replies" not in scraped_metric_names


# -- Grafana ----------------------------------------------------------------------


def test_dashboard_shows_what_an_operator_needs() -> None:
    used = set().union(*(promql_metric_names(e) for e in dashboard_exprs().values()))
    for name in (
        "waddle_ai_events_received_total", "waddle_ai_replies_total", "waddle_ai_no_reply_total",
        "waddle_ai_provider_latency_seconds_bucket", "waddle_ai_in_flight",
        "waddle_ai_capacity", "waddle_ai_retries_total", "waddle_ai_dead_letters_total",
        "waddle_ai_circuit_state", "waddle_ai_state_degraded",
        "waddle_ai_broker_reconnects_total", "waddle_ai_event_handling_seconds_bucket",
        "rabbitmq_queue_messages_ready", "rabbitmq_queue_consumers",
    ):
        assert name in used, name
    exprs = list(dashboard_exprs().values())
    for quantile in ("0.50", "0.95", "0.99"):
        assert any(e.startswith(f"histogram_quantile({quantile}, sum by (le, provider)")
                   and "waddle_ai_provider_latency_seconds_bucket" in e for e in exprs), quantile
    assert any("reason=\"stale\"" in e for e in exprs)


def test_dashboard_is_well_formed_and_provisioned() -> None:
    board = dashboard()
    assert board["uid"] == "waddle-ai"
    panels = list(walk_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "job", "instance", "prefix"} <= names

    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "waddle-ai.yml").read_text())
    dashboards_path = providers["providers"][0]["options"]["path"]
    # docker-compose mounts the dashboards folder exactly where the provider looks.
    grafana = compose()["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{dashboards_path}:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


# -- Prometheus -------------------------------------------------------------------


def test_alerts_cover_the_failures_and_link_the_runbook() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for name in ("WaddleAIWorkerDown", "WaddleAINoConsumers", "WaddleAIBacklogGrowing",
                 "WaddleAIDeadLettersGrowing", "WaddleAICircuitOpen", "WaddleAISlowReplies",
                 "WaddleAIStateDegraded"):
        assert name in rules, name
    queue = Topology().interaction_queue
    assert f'queue="{queue}"' in rules["WaddleAINoConsumers"]["expr"]
    assert f'queue="{queue}"' in rules["WaddleAIBacklogGrowing"]["expr"]
    assert f'queue="{Topology().dead_letter_queue}"' in rules["WaddleAIDeadLettersGrowing"]["expr"]
    assert "waddle_ai_event_handling_seconds_bucket" in rules["WaddleAISlowReplies"]["expr"]
    assert 'up{job="waddle-ai"}' in rules["WaddleAIWorkerDown"]["expr"]

    anchors = markdown_anchors(RUNBOOK.read_text())
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        runbook = rule["annotations"]["runbook"]
        path, _, anchor = runbook.partition("#")
        assert path == "docs/operations.md", f"{name}: {runbook}"
        assert anchor in anchors, f"{name}: {runbook}"


def markdown_anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_the_runbook_links_resolve() -> None:
    text = RUNBOOK.read_text()
    anchors = markdown_anchors(text)
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, anchor
    for command in ("dlq list", "dlq show", "dlq replay", "dlq purge", "config rotate-key"):
        assert f"waddle-ai {command}" in re.sub(r"\s+", " ", text), command


def test_prometheus_scrapes_every_worker_and_the_broker() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker_sd = jobs["waddle-ai"]["dns_sd_configs"][0]
    services = compose()["services"]
    assert worker_sd["names"] == ["worker"]
    assert worker_sd["type"] == "A"
    assert worker_sd["port"] == int(services["worker"]["environment"]["SIDECAR_PORT"])
    assert jobs["rabbitmq"]["metrics_path"] == "/metrics/per-object"
    assert jobs["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq:15692"]
    volumes = services["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes


NO_PROMTOOL = REQUIRED_TOOL + "promtool (Debian: apt-get install prometheus)"


def has_promtool() -> bool:
    return shutil.which("promtool") is not None


def promtool(*args: str) -> None:
    result = subprocess.run(["promtool", *args], capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not has_promtool(), reason=NO_PROMTOOL)
def test_promtool_accepts_the_rules_their_tests_and_the_config() -> None:
    promtool("check", "rules", str(ALERTS))
    promtool("test", "rules", str(ALERT_TESTS))
    promtool("check", "config", "--syntax-only", str(PROMETHEUS_CONFIG))


@pytest.mark.skipif(not has_promtool(), reason=NO_PROMTOOL)
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
             for i, expr in enumerate(dashboard_exprs().values())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(path))


# -- docker compose ---------------------------------------------------------------


@pytest.mark.skipif(not has_compose_client(), reason="no `docker compose` client here")
def test_docker_compose_config_accepts_the_stack() -> None:
    subprocess.run(["docker", "compose", "--profile", "ollama", "config", "-q"],
                   check=True, cwd=ROOT, timeout=60)


def test_compose_runs_the_monitoring_stack() -> None:
    services = compose()["services"]
    assert {"rabbitmq", "redis", "postgres", "ollama", "worker", "prometheus",
            "grafana"} <= set(services)
    rabbitmq = services["rabbitmq"]
    assert "./deploy/rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins:ro" in (
        rabbitmq["volumes"])
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text().strip()
    assert plugins == "[rabbitmq_management,rabbitmq_prometheus]."
    assert "15692:15692" in rabbitmq["ports"]
    worker = services["worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert "ports" not in worker, "replicas cannot share a published port"
    assert services["ollama"]["profiles"] == ["ollama"]
    # Every file a service mounts is in the repository.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"


def test_compose_worker_environment_names_real_settings() -> None:
    worker = compose()["services"]["worker"]
    unknown = set(worker["environment"]) - SETTINGS_ENV_NAMES
    assert not unknown, unknown
    assert worker["env_file"] == [{"path": ".env", "required": False}]


# -- the image --------------------------------------------------------------------


def dockerfile_stages() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    return re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]


def test_dockerfile_builds_wheels_then_installs_them_slim_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, flags=re.MULTILINE)
    build, final = dockerfile_stages()
    assert build.startswith("${PYTHON_IMAGE} AS build")
    assert final.startswith("${PYTHON_IMAGE}\n")
    assert "pip wheel --wheel-dir /wheels" in build
    assert "pip install --no-index --find-links /wheels" in final
    assert "--mount=type=bind,from=build,source=/wheels" in final
    assert "config/migrations/" in build  # the build fails if the SQL is not packaged
    for tool in ("gcc", "build-essential", "g++", "make "):
        assert tool not in final, tool
    assert "USER waddle" in final
    assert "STOPSIGNAL SIGTERM" in final
    assert "HEALTHCHECK" in final
    assert "/healthz" in final
    assert "PIP_NO_CACHE_DIR=1" in build
    assert "PIP_NO_CACHE_DIR=1" in final
    assert "libgomp1" in final  # xllamacpp links OpenMP; slim has none


def dockerignore_excludes(path: str) -> bool:
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, c) for c in candidates for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_image_needs_and_nothing_secret() -> None:
    for needed in ("pyproject.toml", "README.md", "worker/app.py", "config/settings.py",
                   "config/migrations/0001_initial.sql", "broker/topology.py"):
        assert not dockerignore_excludes(needed), needed
    for unwanted in (".env", ".env.local", ".git/config", ".venv/bin/python", "tests/conftest.py",
                     "worker/__pycache__/app.cpython-311.pyc", "bench/out/x"):
        assert dockerignore_excludes(unwanted), unwanted


# -- Kubernetes -------------------------------------------------------------------


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in k8s_documents()
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)}"
    return found[0]


def test_k8s_files_parse_and_kustomize_lists_them() -> None:
    docs = k8s_documents()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "Secret",
                                          "ScaledObject", "TriggerAuthentication",
                                          "PodDisruptionBudget", "Kustomization"}
    kustomization = k8s_one("Kustomization")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # The Secret example is deliberately not applied (it would overwrite real keys).
    assert listed == on_disk - {"secret.example.yaml"}


def test_k8s_deployment_probes_grace_and_security() -> None:
    deployment = k8s_one("Deployment", "waddle-ai")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = k8s_one("ConfigMap", "waddle-ai-config")["data"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    sidecar_port = int(config["SIDECAR_PORT"])
    assert ports["http"] == sidecar_port == DEFAULTS.sidecar_port

    def probe(kind: str) -> tuple[str, Any]:
        get = container[kind]["httpGet"]
        assert get["port"] in ("http", sidecar_port), kind
        return get["path"], get["port"]

    assert probe("readinessProbe")[0] == "/readyz"
    assert probe("livenessProbe")[0] == "/healthz"
    assert probe("startupProbe")[0] == "/healthz"

    grace = pod["terminationGracePeriodSeconds"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pause = int(pre_stop[1]) if pre_stop[0] == "sleep" else 0
    shutdown_grace = float(config.get("SHUTDOWN_GRACE_S", DEFAULTS.shutdown_grace_s))
    assert grace > pause + shutdown_grace
    assert grace > pause + DEFAULTS.shutdown_grace_s

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    uid = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid is not None
    assert security["runAsUser"] == int(uid.group(1))
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_k8s_secrets_come_from_a_secret_and_the_rest_from_the_configmap() -> None:
    pod = k8s_one("Deployment", "waddle-ai")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = k8s_one("ConfigMap", "waddle-ai-config")["data"]
    secret = k8s_one("Secret", "waddle-ai-secrets")
    from_secret = {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for item in container["env"] if "secretKeyRef" in item.get("valueFrom", {})
    }
    for name in ("CONFIG_ENCRYPTION_KEY", "API_KEYS", "WADDLEAI_API_KEY", "AMQP_URL"):
        assert from_secret[name]["name"] == "waddle-ai-secrets", name
        assert from_secret[name]["key"] in secret["stringData"], name
        assert name not in config, f"{name} belongs in the Secret"
    assert container["envFrom"] == [{"configMapRef": {"name": "waddle-ai-config"}}]
    names = set(config) | {item["name"] for item in container["env"]}
    assert not names - SETTINGS_ENV_NAMES, names - SETTINGS_ENV_NAMES


def test_k8s_service_and_keda_target_the_worker() -> None:
    deployment = k8s_one("Deployment", "waddle-ai")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = k8s_one("Service", "waddle-ai")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"

    scaled = k8s_one("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] >= 1
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == Topology().interaction_queue
    assert trigger["metadata"]["mode"] == "QueueLength"
    auth = k8s_one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    ref = auth["spec"]["secretTargetRef"][0]
    assert ref["parameter"] == "host"
    assert ref["key"] in k8s_one("Secret", ref["name"])["stringData"]


# -- .env.example -----------------------------------------------------------------


def env_example() -> dict[str, str]:
    """NAME -> documented default, from the `# NAME=value` lines."""
    found: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#? ?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            assert match.group(1) not in found, f"{match.group(1)} listed twice"
            found[match.group(1)] = match.group(2)
    return found


def test_env_example_lists_every_setting_and_every_compose_variable() -> None:
    listed = set(env_example())
    assert not SETTINGS_ENV_NAMES - listed, f"missing: {sorted(SETTINGS_ENV_NAMES - listed)}"
    # Beyond the settings, only what docker-compose.yml interpolates, all of it.
    compose_only = set(re.findall(r"\$\{(\w+)", (ROOT / "docker-compose.yml").read_text()))
    compose_only -= SETTINGS_ENV_NAMES
    assert listed - SETTINGS_ENV_NAMES == compose_only


def test_env_example_defaults_are_the_real_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in SETTINGS_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    # An empty value documents "unset"; the rest, uncommented, must change nothing.
    dotenv = tmp_path / ".env"
    dotenv.write_text("".join(f"{name}={value}\n" for name, value in env_example().items()
                              if value))
    documented = Settings(_env_file=dotenv).model_dump()
    real = Settings(_env_file=None).model_dump()
    wrong = {name.upper(): (documented[name], real[name])
             for name in real if documented[name] != real[name]}
    assert not wrong, f"documented vs real default: {wrong}"
