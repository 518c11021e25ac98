"""A real Prometheus (Debian's package) scrapes a real server while real audio streams run: its
query API answers the operator's questions, loads the alert rules, and accepts every query of
the Grafana dashboard, which refers only to metrics the server exports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from client.stream import StreamOptions, pcm16, stream_audio
from tests.conftest import running_server
from tests.observability import DEPLOY, free_port, tool

pytestmark = pytest.mark.slow

WINDOW = "30s"  # rate window of the test queries (the test scrapes every second)


class Prometheus:
    """A Prometheus process on a loopback port, with deploy/prometheus's config and alert rules
    pointed at one target."""

    def __init__(self, base_url: str, proc: subprocess.Popen, log: Path):
        self.base_url, self.proc, self.log = base_url, proc, log

    def get(self, path: str, **params) -> dict:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422: a query Prometheus refused
            body = json.load(exc)
        return body

    def query(self, expr: str) -> list:
        """The instant vector of ``expr`` now; fails with Prometheus's error when it refuses it."""
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", f"Prometheus refused {expr!r}: {body.get('error')}"
        return body["data"]["result"]

    def values(self, expr: str) -> list[float]:
        return [float(sample["value"][1]) for sample in self.query(expr)]


@contextlib.contextmanager
def prometheus_scraping(target: str, directory: Path, job: dict | None = None, alertmanager: str | None = None):
    """``job``: a whole scrape job of its own, instead of the repository's job aimed at ``target``
    (in place of the compose service's DNS name); ``alertmanager``: HOST:PORT the alerts go to
    (none when not given)."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    if job is None:
        (job,) = config["scrape_configs"]
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]
    if alertmanager is None:
        del config["alerting"]
    else:
        (manager,) = config["alerting"]["alertmanagers"]
        manager["static_configs"] = [{"targets": [alertmanager]}]
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    for rules in config["rule_files"]:
        shutil.copy(DEPLOY / "prometheus" / rules, directory / rules)
    port = free_port()
    log = directory / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([tool("prometheus"), f"--config.file={directory / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={directory / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{prom.base_url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def until(check, what: str, timeout: float = 90.0):
    """Poll ``check()`` (run off the loop) until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.5)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target, with Grafana's variables filled in."""
    d = json.loads((DEPLOY / "grafana" / "dashboards" / "asr.json").read_text())
    out = []
    for panel in d["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", WINDOW).replace("$instance", ".*")
            assert "$" not in expr, f"unknown variable in {expr!r}"
            out.append((panel["title"], expr))
    for variable in d["templating"]["list"]:
        if variable["type"] == "query":
            out.append((f"variable {variable['name']}", variable["definition"]))
    return out


async def test_prometheus_scrapes_streams_and_answers_every_dashboard_query(speech, tmp_path):
    async with running_server() as (server, stub):
        stop = asyncio.Event()

        async def keep_streaming(offset: int):
            options = StreamOptions(realtime=False, interim_results=True, endpointing=True)
            i = offset
            while not stop.is_set():
                _, audio, _ = speech[i % len(speech)]
                async for _ in stream_audio(stub, pcm16(audio), 16000, options):
                    pass
                i += 1
                await asyncio.sleep(0.1)

        streams = [asyncio.create_task(keep_streaming(k)) for k in range(2)]
        try:
            with prometheus_scraping(f"127.0.0.1:{server.metrics_port}", tmp_path) as prom:
                await until(lambda: prom.values('up{job="asr"}') == [1.0], "the target to be up")
                p99_expr = (f"histogram_quantile(0.99, sum by (le) "
                            f"(rate(asr_chunk_latency_seconds_bucket[{WINDOW}])))")
                p99 = await until(lambda: [v for v in prom.values(p99_expr) if math.isfinite(v)],
                                  "a chunk-latency p99")
                assert len(p99) == 1 and 0 < p99[0] <= 5.0, p99
                audio_rate = await until(lambda: [v for v in prom.values(
                    f"sum(rate(asr_audio_seconds_total[{WINDOW}]))") if v > 0], "audio seconds per second")
                assert audio_rate[0] > 0
                ttfr = prom.values(f"histogram_quantile(0.5, sum by (le) "
                                   f"(rate(asr_time_to_first_result_seconds_bucket[{WINDOW}])))")
                assert ttfr and all(v >= 0 or math.isnan(v) for v in ttfr)

                # every dashboard query is valid PromQL with data, over metrics the server exports
                exported = set(prom.get("/api/v1/label/__name__/values")["data"])
                assert {"asr_chunk_latency_seconds_bucket", "asr_build_info", "asr_streams_total"} <= exported
                for title, expr in dashboard_queries():
                    for name in re.findall(r"\b(asr_[a-z0-9_]+)", expr):
                        assert name in exported, f"panel {title!r} uses {name}, which the server does not export"
                    if expr.startswith("label_values("):
                        metric, label = re.fullmatch(r"label_values\((\w+), *(\w+)\)", expr).groups()
                        values = prom.get(f"/api/v1/label/{label}/values", **{"match[]": metric})["data"]
                        assert values, f"{title}: no {label} values for {metric}"
                        continue
                    assert prom.query(expr), f"panel {title!r}: {expr!r} returns nothing"

                # the alert rules are loaded and evaluate without errors
                def rules_evaluated():
                    groups = prom.get("/api/v1/rules")["data"]["groups"]
                    rules = [r for g in groups for r in g["rules"]]
                    done = rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules)
                    return rules if done else None

                rules = await until(rules_evaluated, "the alert rules to be evaluated")
                names = {r["name"] for r in rules}
                assert {"AsrServerDown", "AsrChunkLatencyOverChunkPeriod", "AsrRealTimeFactorOverOne",
                        "AsrErrorRateHigh", "AsrStreamsRejected"} <= names
                assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
                # a query that names a metric the server does not have comes back empty: the check above bites
                assert prom.query("asr_no_such_metric_seconds") == []
        finally:
            stop.set()
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
