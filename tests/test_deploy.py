"""deploy/, Dockerfile and docker-compose.yml, checked without Docker: promtool on the Prometheus
config and alert rules (with a unit test per alert), the dashboard against a schema, and every
path and port the files name against the repository and the server's defaults."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.config import ServerSettings
from tests.observability import DEPLOY, ROOT, promtool

PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "asr.json"
SETTINGS = ServerSettings()


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


# --- Prometheus ----------------------------------------------------------------------------
def test_prometheus_config_passes_promtool():
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_alert_rules_pass_promtool():
    result = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_passing_promtool_unit_test():
    alerts = {rule["alert"] for group in load_yaml(PROMETHEUS / "alerts.yml")["groups"] for rule in group["rules"]}
    assert {"AsrChunkLatencyOverChunkPeriod", "AsrRealTimeFactorOverOne", "AsrErrorRateHigh"} <= alerts
    cases = load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]
    for alert in alerts:
        firing = [t for case in cases for t in case.get("alert_rule_test", [])
                  if t["alertname"] == alert and t.get("exp_alerts")]
        assert firing, f"no promtool test expects {alert} to fire"
    result = promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_can_fail(tmp_path):
    """The harness is live: a test that expects an alert which cannot fire fails."""
    case = load_yaml(PROMETHEUS / "alerts_test.yml")
    case["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
    case["tests"] = [{"interval": "1m", "input_series": [{"series": 'up{job="asr", instance="a"}', "values": "1x10"}],
                      "alert_rule_test": [{"eval_time": "5m", "alertname": "AsrServerDown",
                                           "exp_alerts": [{"exp_labels": {"instance": "a"}}]}]}]
    (tmp_path / "t.yml").write_text(yaml.safe_dump(case))
    assert promtool("test", "rules", str(tmp_path / "t.yml")).returncode != 0


def test_alert_rules_use_the_chunk_period_and_only_exported_metrics():
    from server.observability.metrics import CHUNK_SECONDS, METRIC_NAMES

    rules = [r for g in load_yaml(PROMETHEUS / "alerts.yml")["groups"] for r in g["rules"]]
    latency = next(r for r in rules if r["alert"] == "AsrChunkLatencyOverChunkPeriod")
    assert f"> {CHUNK_SECONDS:g}" in latency["expr"]
    for rule in rules:
        for name in re.findall(r"\b(asr_[a-z0-9_]+)", rule["expr"]):
            assert re.sub(r"_(bucket|sum|count)$", "", name) in METRIC_NAMES, (rule["alert"], name)


# --- Grafana -------------------------------------------------------------------------------
TARGET = {"type": "object", "required": ["refId", "expr"],
          "properties": {"refId": {"type": "string", "minLength": 1}, "expr": {"type": "string", "minLength": 1},
                         "datasource": {"$ref": "#/$defs/datasource"}}}
DASHBOARD_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time", "refresh"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {"type": "array", "items": {
            "type": "object", "required": ["name", "type"],
            "properties": {"type": {"enum": ["datasource", "query", "custom", "constant", "interval"]}}}}}},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["id", "type", "title", "gridPos"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": ["row", "timeseries", "stat", "gauge", "table", "bargauge", "text", "heatmap"]},
                "title": {"type": "string", "minLength": 1},
                "gridPos": {"type": "object", "required": ["h", "w", "x", "y"], "properties": {
                    "h": {"type": "integer", "minimum": 1}, "w": {"type": "integer", "minimum": 1, "maximum": 24},
                    "x": {"type": "integer", "minimum": 0, "maximum": 23}, "y": {"type": "integer", "minimum": 0}}},
                "datasource": {"$ref": "#/$defs/datasource"},
                "targets": {"type": "array", "items": TARGET},
            },
            "if": {"properties": {"type": {"not": {"enum": ["row", "text"]}}}},
            "then": {"required": ["datasource", "targets"], "properties": {"targets": {"minItems": 1}}},
        }},
    },
    "$defs": {"datasource": {"type": "object", "required": ["type", "uid"], "properties": {
        "type": {"const": "prometheus"}, "uid": {"const": "${datasource}"}}}},
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_matches_its_schema():
    jsonschema.validate(dashboard(), DASHBOARD_SCHEMA)


def test_the_schema_catches_a_broken_panel():
    broken = dashboard()
    del broken["panels"][1]["targets"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, DASHBOARD_SCHEMA)


def test_dashboard_shows_memory_cpu_gc_pauses_step_failures_and_refusals_by_reason():
    """An operator's blind spots: each has a panel (tests/test_prometheus.py runs every panel's query
    against a real Prometheus scraping a real server)."""
    exprs = " ".join(t["expr"] for p in dashboard()["panels"] for t in p.get("targets", []))
    for metric in ("process_resident_memory_bytes", "process_cpu_seconds_total", "asr_gc_pause_seconds_bucket",
                   "asr_engine_step_failures_total"):
        assert metric in exprs, metric
    assert re.search(r'asr_limit_hits_total\{reason=~"[^"]*max_streams[^"]*overload', exprs), "refusals by reason"


def test_dashboard_layout_and_references_are_consistent():
    d = dashboard()
    panels = d["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(set(refs)) == len(refs), p["title"]
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for p in panels:
        for t in p.get("targets", []):
            for used in re.findall(r"\$\{?([a-zA-Z_]+)", t["expr"]):
                assert used in variables or used.startswith("__"), (p["title"], used)
    text = json.dumps(d)
    for wanted in ("asr_active_streams", "asr_chunk_latency_seconds_bucket", "asr_time_to_first_result_seconds",
                   "asr_engine_rtf", "asr_stream_rtf", "asr_batch_size", "asr_queue_wait_seconds",
                   "asr_audio_seconds_total", "asr_errors_total", "asr_build_info"):
        assert wanted in text, f"the dashboard lacks {wanted}"
    for q in (0.5, 0.95, 0.99):
        assert f"histogram_quantile({q}, sum by (le) (rate(asr_chunk_latency_seconds_bucket" in text


def test_grafana_provisioning_matches_compose_and_prometheus():
    compose = load_yaml(ROOT / "docker-compose.yml")
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}  # target: source
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "asr.yml")["providers"][0]
    dashboards_dir = provider["options"]["path"]
    assert ROOT / mounts[dashboards_dir].removeprefix("./") == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    assert ROOT / mounts["/etc/grafana/provisioning"].removeprefix("./") == GRAFANA / "provisioning"
    source = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert source["type"] == "prometheus"
    host, port = re.match(r"http://([^:/]+):(\d+)", source["url"]).groups()
    assert host in compose["services"] and f"{port}:{port}" in compose["services"][host]["ports"]


# --- docker-compose.yml ----------------------------------------------------------------------
def test_compose_wires_server_prometheus_and_grafana():
    """(tests/test_compose.py checks the fleet: proxy, replicas, Alertmanager, yamllint.)"""
    compose = load_yaml(ROOT / "docker-compose.yml")
    services = compose["services"]
    assert {"asr", "proxy", "prometheus", "alertmanager", "grafana"} <= set(services)
    assert (ROOT / services["asr"]["build"] / "Dockerfile").is_file()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in compose.get("volumes", {}), f"{name}: named volume {source} is not declared"
    env = services["asr"]["environment"]
    metrics_port = int(env.get("ASR_METRICS_PORT", SETTINGS.metrics_port))
    grpc_port = int(env.get("ASR_PORT", SETTINGS.port))
    # clients reach the servers through the proxy, on the server's own port
    assert services["proxy"]["ports"] == [f"{grpc_port}:{grpc_port}"]
    # Prometheus (in compose) reads deploy/prometheus and scrapes the asr service's metrics port
    prom = services["prometheus"]
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_dir = next(v for v in prom["volumes"] if v.startswith("./deploy/prometheus:")).split(":")[1]
    assert config_flag == f"--config.file={config_dir}/prometheus.yml"
    scrape = load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]
    found = [(name, sd["port"]) for job in scrape for sd in job["dns_sd_configs"] for name in sd["names"]]
    assert found == [("asr", metrics_port)]


# --- Dockerfile ------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_a_cpu_non_root_image_with_a_health_check():
    steps = dockerfile()
    kinds = [k for k, _ in steps]
    assert kinds[0] in ("FROM", "ARG") and any(k == "FROM" and "python:3.11" in a for k, a in steps)
    run = " ".join(a for k, a in steps if k == "RUN")
    assert "download.pytorch.org/whl/cpu" in " ".join(a for _, a in steps), "torch must come from the CPU index"
    assert "pip install" in run and "--no-deps ." in run and " -e " not in run  # a package install: the demo model is package data
    # the native kernels are built into the image (setup.py, against the image's torch), never at run time
    assert "g++" in run and "--no-build-isolation" in run and "python -m server.kernels.native" in run
    # runs as a named non-root user, set after the last RUN
    user = [a for k, a in steps if k == "USER"]
    assert user and user[-1] not in ("root", "0") and kinds.index("USER") > max(
        i for i, k in enumerate(kinds) if k == "RUN")
    assert "useradd" in run and user[-1] in run
    exposed = {int(p) for k, a in steps if k == "EXPOSE" for p in a.split()}
    assert {SETTINGS.port, SETTINGS.metrics_port} <= exposed
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    health = next(a for k, a in steps if k == "HEALTHCHECK")
    command = json.loads(health.split("CMD", 1)[1])
    assert command[0] in scripts, f"HEALTHCHECK runs {command[0]}, not a console script of this project"
    entrypoint = json.loads(next(a for k, a in steps if k == "ENTRYPOINT"))
    assert entrypoint[0] in scripts


def test_dockerfile_copies_existing_files_and_leaves_the_heavy_ones_out():
    for kind, args in dockerfile():
        if kind in ("COPY", "ADD"):
            *sources, _dest = shlex.split(args)
            for source in sources:
                if not source.startswith("--") and source != ".":
                    assert (ROOT / source).exists(), f"{kind} {source}: no such file"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data"} <= ignored
    for needed in ("server", "client", "asr", "pyproject.toml", "README.md", "models"):
        assert needed not in ignored
