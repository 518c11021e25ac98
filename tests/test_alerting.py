"""Alerts that reach someone: deploy/alertmanager/alertmanager.yml passes amtool, and the whole
chain runs for real. A real server is scraped by a real Prometheus (Debian's ``prometheus``)
with the shipped alert rules, which sends its alerts to a real Alertmanager (Debian's
``prometheus-alertmanager``) running the shipped config, whose webhook is the shipped receiver
(deploy/alertmanager/webhook_log.py, as docker-compose.yml runs it). The only server stops; a
minute later AsrServerDown and AsrNoServerUp fire and the receiver prints both."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import running_server
from tests.observability import DEPLOY, free_port

ALERTMANAGER = DEPLOY / "alertmanager"
CONFIG = ALERTMANAGER / "alertmanager.yml"
RECEIVER = ALERTMANAGER / "webhook_log.py"


def tool(name: str) -> str:
    """Debian's prometheus-alertmanager installs the server as ``prometheus-alertmanager`` (the
    release tarballs call it ``alertmanager``) and ``amtool``; fails (never skips) when missing."""
    path = shutil.which(name) or (shutil.which("alertmanager") if name == "prometheus-alertmanager" else None)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test-apt` installs Debian's prometheus-alertmanager")
    return path


def amtool_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("amtool"), "check-config", str(path)], capture_output=True, text=True, timeout=60)


def test_alertmanager_config_passes_amtool():
    result = amtool_check(CONFIG)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_amtool_rejects_a_route_to_a_missing_receiver(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    config["route"]["receiver"] = "nobody"
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))
    result = amtool_check(tmp_path / "alertmanager.yml")
    assert result.returncode != 0 and "nobody" in result.stdout + result.stderr


def test_the_webhook_goes_to_the_compose_receiver():
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    (receiver,) = yaml.safe_load(CONFIG.read_text())["receivers"]
    (hook,) = receiver["webhook_configs"]
    host_port = hook["url"].split("//")[1].split("/")[0]
    host, port = host_port.split(":")
    command = compose["services"][host]["command"]
    assert command[command.index("--port") + 1] == port
    assert command[command.index("--host") + 1] == "0.0.0.0"  # reachable from the alertmanager container
    mounted = {v.split(":")[1]: v.split(":")[0] for v in compose["services"][host]["volumes"]}
    script = next(a for a in command if a.endswith(".py"))
    assert (DEPLOY.parent / mounted[script]).resolve() == RECEIVER.resolve()


@contextlib.contextmanager
def process(args: list[str], ready: str, timeout: float = 60):
    """A process whose output lines are collected; yields (proc, lines) once a line contains
    ``ready``."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while not any(ready in line for line in lines):
            assert proc.poll() is None, f"{args[0]} exited: {''.join(lines)[-2000:]}"
            assert time.monotonic() < deadline, f"{args[0]} not ready: {''.join(lines)[-2000:]}"
            time.sleep(0.1)
        yield proc, lines
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def receiver_rejects_what_is_not_an_alert(port: int) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/alerts", data=b'{"no": "alerts"}', method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


def post(port: int, body: bytes) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/alerts", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def test_the_receiver_prints_each_alert_of_concurrent_notifications_as_one_line():
    """Alertmanager sends the notifications of different groups at once: 20 of them from 20
    threads, 5 alerts each, come out as 100 whole JSON lines."""
    port = free_port()
    with process([sys.executable, str(RECEIVER), "--port", str(port)], "listening on") as (_, lines):
        bodies = [json.dumps({"receiver": "webhook", "status": "firing", "alerts": [
            {"status": "firing", "labels": {"alertname": f"A{n}", "instance": f"i{k}"},
             "annotations": {"summary": "x" * 2000}} for k in range(5)]}).encode() for n in range(20)]
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda b=b: statuses.append(post(port, b))) for b in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 10
        while sum(line.startswith("{") for line in lines) < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        printed = [json.loads(line) for line in list(lines) if line.startswith("{")]
    assert statuses == [200] * 20
    assert sorted((a["labels"]["alertname"], a["labels"]["instance"]) for a in printed) == sorted(
        (f"A{n}", f"i{k}") for n in range(20) for k in range(5))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_stopped_server_pages_through_alertmanager_to_the_webhook(tmp_path):
    from tests.test_prometheus import prometheus_scraping, until

    hook_port, manager_port = free_port(), free_port()
    config = yaml.safe_load(CONFIG.read_text())
    (config["receivers"][0]["webhook_configs"][0])["url"] = f"http://127.0.0.1:{hook_port}/alerts"
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))  # only the receiver's address changed
    with process([sys.executable, str(RECEIVER), "--port", str(hook_port)], "listening on") as (_, hook), \
            process([tool("prometheus-alertmanager"), f"--config.file={tmp_path / 'alertmanager.yml'}",
                     f"--storage.path={tmp_path / 'am-data'}", f"--web.listen-address=127.0.0.1:{manager_port}",
                     "--cluster.listen-address=", "--log.level=info"], "Listening") as (_, manager_log):
        assert receiver_rejects_what_is_not_an_alert(hook_port) == 400
        async with running_server() as (server, _):
            target = f"127.0.0.1:{server.metrics_port}"
            prom_dir = tmp_path / "prometheus"
            prom_dir.mkdir()
            with prometheus_scraping(target, prom_dir, alertmanager=f"127.0.0.1:{manager_port}") as prom:
                await until(lambda: prom.values('up{job="asr"}') == [1.0], "the first scrape")
                await until(lambda: prom.get("/api/v1/alertmanagers")["data"]["activeAlertmanagers"],
                            "Prometheus to find the Alertmanager")
                await server.stop(grace=0)
                stopped = time.monotonic()
                await until(lambda: prom.values('up{job="asr"}') == [0.0], "a failed scrape")
                # 1 minute of failed scrapes, then group_wait (10 s) in Alertmanager

                def received():
                    alerts = {}
                    for line in list(hook):  # the receiver's JSON lines, one per alert
                        if line.startswith("{"):
                            alert = json.loads(line)
                            alerts[alert["labels"]["alertname"]] = alert
                    return alerts if len(alerts) == 2 else None

                alerts = await until(received, "the webhook to receive both alerts", timeout=150)
                took = time.monotonic() - stopped
    print(f"the alerts reached the webhook {took:.0f} s after the server stopped: {alerts}")
    assert set(alerts) == {"AsrServerDown", "AsrNoServerUp"}
    assert all(a["status"] == "firing" and a["receiver"] == "webhook" for a in alerts.values())
    assert all(a["labels"]["severity"] == "critical" for a in alerts.values())
    down = alerts["AsrServerDown"]
    assert down["labels"]["instance"] == target and target in down["annotations"]["summary"]
    assert 60 <= took < 150, took
    assert not [line for line in manager_log if "level=error" in line], manager_log
