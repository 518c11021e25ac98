"""docker-compose.yml as a fleet, checked without Docker: yamllint on it and on deploy/'s YAML,
every reference between services, files and ports resolves, the servers publish no host port
(any number of replicas), the proxy runs deploy/haproxy/haproxy.cfg in DNS mode over the
service's name (the real haproxy checks it so), Prometheus finds every replica by DNS, and the
alerts go to the Alertmanager service, which reads deploy/alertmanager."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from tests.observability import DEPLOY, ROOT

pytestmark = pytest.mark.system  # runs haproxy (apt) and yamllint (pip)

COMPOSE = ROOT / "docker-compose.yml"
# yamllint's defaults, less two rules: line length (alert descriptions are prose) and the "---"
# document start (none of these files is a stream of documents).
YAMLLINT = YamlLintConfig("{extends: default, rules: {line-length: disable, document-start: disable}}")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict:
    return compose()["services"]


def env(service: str) -> dict:
    return services()[service].get("environment", {})


def mounts(service: str) -> dict[str, Path]:
    """Bind mounts of ``service``: container path -> path in the repository."""
    out = {}
    for volume in services()[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = ROOT / source
    return out


def yaml_files() -> list[Path]:
    return [COMPOSE, *sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))]


def lint(text: str) -> list:
    return list(linter.run(text, YAMLLINT))


def test_compose_and_deploy_yaml_pass_yamllint():
    files = yaml_files()
    assert len(files) > 10
    problems = {str(f.relative_to(ROOT)): [str(p) for p in lint(f.read_text())] for f in files}
    assert not {f: p for f, p in problems.items() if p}, problems


def test_yamllint_catches_a_duplicated_key():
    assert [p.rule for p in lint("a: 1\nb: 2\na: 3\n")] == ["key-duplicates"]


def test_every_reference_between_services_files_and_volumes_resolves():
    doc = compose()
    for name, service in doc["services"].items():
        for other in service.get("depends_on", []):
            assert other in doc["services"], f"{name} depends on {other}, which is not a service"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in doc.get("volumes", {}), f"{name}: named volume {source} is not declared"
        assert "build" in service or ":" in service["image"], f"{name}: an image without a tag"
    used = {v.split(":")[0] for s in doc["services"].values() for v in s.get("volumes", [])}
    assert set(doc.get("volumes", {})) <= used, "a declared volume no service uses"


def test_servers_publish_no_host_port_and_run_read_only():
    asr = services()["asr"]
    assert "ports" not in asr, "a fixed host port allows one replica only"
    grpc_port, metrics_port = env("asr")["ASR_PORT"], env("asr")["ASR_METRICS_PORT"]
    assert sorted(asr["expose"]) == sorted([grpc_port, metrics_port])
    assert "container_name" not in asr  # a fixed name allows one replica only
    assert asr["read_only"] is True and asr["tmpfs"] == ["/tmp"]
    published = [p.split(":")[0] for s in services().values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), "two services publish one host port"


def test_the_proxy_balances_over_every_server_by_dns(tmp_path):
    proxy = services()["proxy"]
    assert env("proxy")["ASR_BACKEND_DNS"] == f"asr:{env('asr')['ASR_PORT']}"
    assert env("proxy")["ASR_BACKEND_HEALTH_PORT"] == env("asr")["ASR_METRICS_PORT"]  # its /healthz
    # the haproxy image reads /usr/local/etc/haproxy/haproxy.cfg: deploy/haproxy's file
    assert mounts("proxy")["/usr/local/etc/haproxy"] / "haproxy.cfg" == DEPLOY / "haproxy" / "haproxy.cfg"
    assert "command" not in proxy and proxy["image"].startswith("haproxy:2.6")
    bind_port = env("proxy")["ASR_PROXY_BIND"].rsplit(":", 1)[1]
    assert proxy["ports"] == [f"{bind_port}:{bind_port}"]
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).is_file():
        pytest.fail("haproxy is not installed: `make test-apt` installs Debian's haproxy package")
    result = subprocess.run([haproxy, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")], capture_output=True,
                            text=True, timeout=30, env={**os.environ, **env("proxy")})
    assert result.returncode == 0, result.stdout + result.stderr
    # the counter-case: the same check fails on a broken copy
    broken = tmp_path / "haproxy.cfg"
    shipped = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    broken.write_text(shipped.replace("server-template asr", "server-template"))
    bad = subprocess.run([haproxy, "-c", "-f", str(broken)], capture_output=True, text=True, timeout=30,
                         env={**os.environ, **env("proxy")})
    assert bad.returncode != 0 and "server-template" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def test_prometheus_scrapes_every_server_and_alerts_through_alertmanager():
    prom = services()["prometheus"]
    config_dir = next(t for t, s in mounts("prometheus").items() if s == DEPLOY / "prometheus")
    assert f"--config.file={config_dir}/prometheus.yml" in prom["command"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert "static_configs" not in job, "a fixed target sees one replica only"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["asr"] and sd["type"] == "A" and str(sd["port"]) == env("asr")["ASR_METRICS_PORT"]
    (manager,) = config["alerting"]["alertmanagers"]
    (target,) = [t for c in manager["static_configs"] for t in c["targets"]]
    host, port = target.split(":")
    assert host in services() and f"{port}:{port}" in services()[host]["ports"]
    assert {"asr", "alertmanager"} <= set(prom["depends_on"])
    alertmanager = services()["alertmanager"]
    config_dir = next(t for t, s in mounts("alertmanager").items() if s == DEPLOY / "alertmanager")
    assert f"--config.file={config_dir}/alertmanager.yml" in alertmanager["command"]
