"""deploy/k8s/: `kubectl kustomize` renders it, every object is valid for Kubernetes 1.32
(kubernetes-validate, strict), checkov finds nothing that is not skipped with a reason, the
numbers agree with the server (drain timeout, grace period, probes, options), the scrape job
passes promtool, and prometheus-adapter's rule, run against a real Prometheus scraping two real
servers, gives each pod its own open-stream count (the HorizontalPodAutoscaler's metric)."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from asr.v1 import asr_pb2
from client.stream import pcm16
from server.app import FINALS_GRACE_S
from server.config import ServerSettings
from tests.conftest import running_server
from tests.observability import DEPLOY, ROOT, promtool

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.32.0"  # the oldest release the manifests are stated for (kustomization.yaml)
CHECKOV_VENV = ROOT / ".venv-checkov"


def command(name: str, *fallbacks: Path) -> str:
    """A tool the tests run for real; fails (never skips) when it is missing."""
    path = shutil.which(name) or next((str(p) for p in fallbacks if p.is_file()), None)
    if path is None:
        pytest.fail(f"{name} is not installed (kubectl: your distribution or dl.k8s.io; "
                    f"kubernetes-validate: the dev extra; checkov: `make checkov`, its own venv)")
    return path


def render() -> list[dict]:
    result = subprocess.run([command("kubectl"), "kustomize", str(K8S)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render()


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{kind} {name or ''}: {len(matches)} objects"
    return matches[0]


def write(objects: list[dict], path: Path) -> Path:
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return path


# --- rendering and schema ------------------------------------------------------------------
def test_kustomize_renders_every_object_in_its_namespace(objects):
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["Namespace", "ServiceAccount", "Deployment", "Service", "Service",
                            "PodDisruptionBudget", "NetworkPolicy", "HorizontalPodAutoscaler",
                            "ConfigMap", "ConfigMap"])
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == "asr", o["metadata"]["name"]
    image = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"asr-server:\d+\.\d+\.\d+", image), image  # a version, never "latest"


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([command("kubernetes-validate", ROOT / ".venv" / "bin" / "kubernetes-validate"),
                           "--kubernetes-version", KUBERNETES_VERSION, "--strict", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_objects_are_valid_kubernetes(objects, tmp_path):
    result = kubernetes_validate(write(objects, tmp_path / "asr.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(f"against version {KUBERNETES_VERSION.rsplit('.', 1)[0]}") == len(objects)


def test_kubernetes_validate_rejects_a_misspelt_field(objects, tmp_path):
    """The validator bites: a probe field in the wrong place fails strict validation."""
    broken = copy.deepcopy(objects)
    container = find(broken, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpcPort"] = 50051
    result = kubernetes_validate(write(broken, tmp_path / "broken.yaml"))
    assert result.returncode != 0 and "grpcPort" in result.stdout + result.stderr


# --- checkov -------------------------------------------------------------------------------
def checkov(path: Path) -> dict:
    exe = command("checkov", CHECKOV_VENV / "bin" / "checkov")
    result = subprocess.run([exe, "--file", str(path), "--framework", "kubernetes", "--output", "json",
                             "--skip-download"],
                            capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(path.parent), "BC_SKIP_MAPPING": "TRUE"})
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout)
    return report[0] if isinstance(report, list) else report


def test_checkov_finds_nothing_unjustified(objects, tmp_path):
    report = checkov(write(objects, tmp_path / "asr.yaml"))
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert failed == [], failed
    assert report["summary"]["passed"] > 50
    skipped = report["results"]["skipped_checks"]
    # every skip carries its reason, in the object's annotations beside a comment in the source
    for check in skipped:
        assert len(check["check_result"]["suppress_comment"].split()) >= 8, check["check_id"]
    annotations = find(objects, "Deployment")["metadata"]["annotations"]
    skips = [v for k, v in annotations.items() if k.startswith("checkov.io/skip")]
    assert sorted(s.split("=")[0] for s in skips) == sorted(c["check_id"] for c in skipped)


def test_checkov_catches_a_writable_root_filesystem(objects, tmp_path):
    broken = copy.deepcopy(objects)
    container = find(broken, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFilesystem"] = False
    failed = {c["check_id"] for c in checkov(write(broken, tmp_path / "broken.yaml"))["results"]["failed_checks"]}
    assert "CKV_K8S_22" in failed


# --- agreement with the server -------------------------------------------------------------
def container_env(deployment: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_every_env_var_is_a_valid_server_option(objects):
    env = container_env(find(objects, "Deployment"))
    options = {name.removeprefix("ASR_").lower(): value for name, value in env.items()}
    assert set(options) <= set(ServerSettings.model_fields), set(options) - set(ServerSettings.model_fields)
    settings = ServerSettings(**{k: v for k, v in options.items() if k != "model"})  # validated as at start-up
    assert settings.metrics_host == "0.0.0.0"  # Prometheus scrapes from another pod


def test_grace_period_covers_pre_stop_drain_and_finals(objects):
    deployment = find(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    drain = float(container_env(deployment)["ASR_DRAIN_TIMEOUT"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + drain + FINALS_GRACE_S
    assert needed < pod["terminationGracePeriodSeconds"] <= needed + 10
    # liveness cannot restart a draining (NOT_SERVING) server before the grace period is over
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > pod["terminationGracePeriodSeconds"]
    # readiness turns within a few seconds of the drain's start
    ready = container["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] <= float(pre_stop[1])


def test_probes_ports_and_services_agree(objects):
    deployment = find(objects, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    defaults = ServerSettings()
    assert ports == {"grpc": defaults.port, "metrics": defaults.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe  # grpc.health.v1, service ""
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for service in (find(objects, "Service", "asr"), find(objects, "Service", "asr-headless")):
        assert service["spec"]["selector"].items() <= labels.items()
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
    assert find(objects, "Service", "asr-headless")["spec"]["clusterIP"] == "None"
    assert find(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]


def test_resources_and_autoscaling_follow_the_capacity_figures(objects):
    deployment = find(objects, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = container_env(deployment)
    assert container["resources"]["requests"] == container["resources"]["limits"]  # Guaranteed QoS
    assert int(container["resources"]["limits"]["cpu"]) == int(env["ASR_THREADS"]) == 2  # the benchmark's cores
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    fp32 = int(re.search(r"\| greedy fp32 \| \*\*(\d+)\*\*", benchmarks).group(1))
    max_streams = int(env["ASR_MAX_STREAMS"])
    assert max_streams == int(0.8 * fp32)  # docs/operations.md: 80 % of the capacity
    hpa = find(objects, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "asr_active_streams"
    target = float(metric["pods"]["target"]["averageValue"])
    assert 0.5 * max_streams <= target < max_streams  # scale out before pods refuse streams
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


# --- Prometheus and prometheus-adapter -----------------------------------------------------
def config_map_file(objects: list[dict], name: str, key: str) -> dict:
    return yaml.safe_load(find(objects, "ConfigMap", name)["data"][key])


def with_file_discovery(job: dict, path: Path) -> dict:
    """The scrape job with its Kubernetes pod discovery replaced by file discovery from ``path``
    (Debian's Prometheus is built without the Kubernetes discovery; the relabelling is unchanged)."""
    job = copy.deepcopy(job)
    assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
    job["file_sd_configs"] = [{"files": [str(path)], "refresh_interval": "1s"}]
    return job


def test_scrape_job_passes_promtool(objects, tmp_path):
    config = config_map_file(objects, "asr-prometheus-scrape", "prometheus.yml")
    config["scrape_configs"] = [with_file_discovery(config["scrape_configs"][0], tmp_path / "pods.json")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def discovered_pod(port: int, name: str, app: str = "asr-server", port_name: str = "metrics") -> dict:
    """A target with the labels Kubernetes pod discovery gives a container port."""
    return {"targets": [f"127.0.0.1:{port}"],
            "labels": {"__meta_kubernetes_namespace": "asr", "__meta_kubernetes_pod_name": name,
                       "__meta_kubernetes_pod_label_app_kubernetes_io_name": app,
                       "__meta_kubernetes_pod_container_port_name": port_name}}


def adapter_query(rule: dict, namespace: str, pods: list[str]) -> str:
    """The query prometheus-adapter sends for the pods of one namespace (its template filled in
    as the adapter fills it for a pod metric request)."""
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", "pod"))


@pytest.mark.slow
async def test_adapter_rule_gives_each_pod_its_open_streams_from_a_real_prometheus(objects, speech, tmp_path):
    from tests.test_prometheus import prometheus_scraping, until

    (rule,) = config_map_file(objects, "asr-prometheus-adapter", "config.yaml")["rules"]
    assert rule["name"]["as"] == find(objects, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    scrape = config_map_file(objects, "asr-prometheus-scrape", "prometheus.yml")["scrape_configs"][0]
    _, audio, _ = speech[0]
    async with running_server() as (a, stub_a), running_server() as (b, stub_b):
        calls = []
        for stub, count in ((stub_a, 3), (stub_b, 1)):
            for _ in range(count):  # streams left open: config and some audio, no half-close
                call = stub.StreamingRecognize()
                await call.write(asr_pb2.StreamingRecognizeRequest(streaming_config=asr_pb2.StreamingRecognitionConfig(
                    config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=16000),
                    interim_results=True)))
                await call.write(asr_pb2.StreamingRecognizeRequest(audio_content=pcm16(audio[:16000])))
                calls.append(call)
        try:
            # The two servers as pod discovery finds them, beside targets the job must drop: another
            # app's pod, and the gRPC port of an asr-server pod.
            pods = tmp_path / "pods.json"
            pods.write_text(json.dumps([discovered_pod(a.metrics_port, "asr-server-a"),
                                        discovered_pod(b.metrics_port, "asr-server-b"),
                                        discovered_pod(a.metrics_port, "other-x", app="other"),
                                        discovered_pod(a.port, "asr-server-a", port_name="grpc")]))
            with prometheus_scraping("", tmp_path, job=with_file_discovery(scrape, pods)) as prom:
                await until(lambda: len(prom.query('up{job="asr"}')) == 2, "the two pods' targets")
                query = adapter_query(rule, "asr", ["asr-server-a", "asr-server-b"])

                def per_pod():
                    values = {s["metric"]["pod"]: float(s["value"][1]) for s in prom.query(query)}
                    return values if values == {"asr-server-a": 3.0, "asr-server-b": 1.0} else None

                assert await until(per_pod, f"per-pod values of {query}", timeout=60)
                # the series query the adapter discovers metrics with finds both pods' series
                series = prom.get("/api/v1/series", **{"match[]": rule["seriesQuery"]})["data"]
                assert {s["pod"] for s in series} == {"asr-server-a", "asr-server-b"}
        finally:
            for call in calls:
                call.cancel()
