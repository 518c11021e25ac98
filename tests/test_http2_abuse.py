"""HTTP/2 abuse of a real server on a real port, at a small bounded scale (docs/operations.md,
"HTTP/2 abuse and connection limits"). The attacker (tests/h2_flood.py: the h2 library over a
raw socket) runs in its own process and connects from 127.0.0.2, the legitimate client from
127.0.0.1 (both loopback), so that neither its CPU nor its memory counts as the server's and a
proxy can tell them apart.

- rapid reset (HEADERS + RST_STREAM pairs on one connection, CVE-2023-44487): other clients'
  streams still get the right transcript in bounded time (without --max-streams-per-connection,
  gRPC core's default of no limit, their new streams failed at once with CANCELLED / INTERNAL);
- a burst of streams over --max-streams-per-connection: the excess is refused (REFUSED_STREAM);
- a flood of token-less grpc.health.v1 Watch streams: at most --max-health-watchers are held and
  the server's RSS grows by less than a stated bound;
- deploy/haproxy/haproxy.cfg, run unchanged by the real HAProxy in front of the server: a stream
  through it works, and one address's connection flood, stream flood and rapid reset are limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr.v1 import asr_pb2_grpc
from client.stream import channel
from server.config import ServerSettings
from server.model.loading import load_demo
from tests.conftest import ROOT, running_server
from tests.helpers import transcript
from tests.observability import free_port, scrape

FLOOD = ROOT / "tests" / "h2_flood.py"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
ENHANCE_YOUR_CALM = 0xB  # HTTP/2 error code
ATTACKER = "127.0.0.2"  # the attacker's address; the legitimate client connects from 127.0.0.1
DEFAULTS = ServerSettings()

RAPID_RESET_PAIRS = 30_000  # HEADERS + RST_STREAM pairs on one connection (a few seconds' worth)
BURST_LIMIT = 50  # --max-streams-per-connection for the burst
BURST_STREAMS = 200
WATCH_CAP = 200  # --max-health-watchers for the Watch flood
WATCH_CONNECTIONS, WATCH_STREAMS = 3, 1000  # 3000 Watch calls, each connection at the default limit
# RSS the Watch flood may add, held open: the capped watchers (200 x ~20 KB) and 2800 refused calls
# in flight at once measured 22-27 MB; uncapped, the 3000 watchers added 52-56 MB.
WATCH_RSS_BOUND = 40 * 1024 * 1024


async def flood(mode: str, port: int, *args: str, source: str = ATTACKER) -> dict:
    """Run tests/h2_flood.py in its own process; its JSON report."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(FLOOD), mode, "--port", str(port), "--source", source, *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, f"h2_flood.py {mode} failed: {err.decode()[-2000:]}"
    return json.loads(out)


@pytest.fixture(scope="module")
def demo():
    return load_demo()


async def health_check(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)).status


async def sessions_settle(server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while server.active_sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert server.active_sessions == 0, f"{server.active_sessions} sessions left behind"


# --- the server alone ------------------------------------------------------------------------
@pytest.mark.timeout(120)
async def test_rapid_reset_flood_leaves_other_clients_streams_working(demo, speech):
    """30 000 HEADERS + RST_STREAM pairs on one connection, as fast as the socket takes them,
    against the default settings: every stream a legitimate client makes meanwhile gets the
    reference transcript, within 3x the audio's duration (streamed as fast as possible: 0.1-0.3 s
    unloaded); the server frees everything and stays SERVING."""
    name, audio, reference = speech[0]
    duration = len(audio) / 16000
    async with running_server(model=demo) as (server, stub):
        assert await transcript(stub, audio) == reference
        attack = asyncio.create_task(flood("rapid-reset", server.port, "--pairs", str(RAPID_RESET_PAIRS)))
        times, results = [], []
        while not attack.done() or not times:
            started = time.monotonic()
            results.append(await transcript(stub, audio))
            times.append(time.monotonic() - started)
        report = await attack
        await sessions_settle(server)
        assert await health_check(server.port) == health_pb2.HealthCheckResponse.SERVING
    print(f"rapid reset: {report}; {len(times)} legitimate streams meanwhile, "
          f"{min(times):.2f}-{max(times):.2f} s each (audio {duration:.1f} s)")
    assert report["max_concurrent_streams"] == DEFAULTS.max_streams_per_connection  # advertised
    assert report["sent"] == RAPID_RESET_PAIRS
    assert results == [reference] * len(results), name
    assert max(times) < 3 * duration, times


@pytest.mark.timeout(60)
async def test_streams_over_the_per_connection_limit_are_refused():
    """200 streams opened at once on one connection against --max-streams-per-connection 50:
    the server advertises 50 and refuses the other 150 with RST_STREAM(REFUSED_STREAM); the
    admitted ones are freed when the client resets them."""
    async with running_server(max_streams_per_connection=BURST_LIMIT) as (server, _):
        report = await flood("burst", server.port, "--streams", str(BURST_STREAMS))
        await sessions_settle(server)
    assert report["max_concurrent_streams"] == BURST_LIMIT
    assert report["refused"] == BURST_STREAMS - BURST_LIMIT, report
    assert report["goaway"] is None and not report["closed"], report


@pytest.mark.timeout(120)
async def test_health_watch_flood_is_capped_and_memory_is_bounded(tmp_path):
    """3000 token-less Health.Watch calls held open on 3 connections against
    --max-health-watchers 200: exactly 200 are held (each got its SERVING message), the other
    2800 ended at once, RSS grows by less than 40 MiB (uncapped: 52-56 MiB, and on without bound
    with more connections), Health.Check still answers, and the count falls back to 0."""
    process = psutil.Process()
    async with running_server(max_health_watchers=WATCH_CAP) as (server, _):
        health = server.health
        # warm-up: the code paths of an admitted and of a refused Watch, then released
        await flood("watch", server.port, "--connections", "1", "--streams", str(WATCH_CAP + 50),
                    "--hold", "0", "--ready-file", str(tmp_path / "warm.json"))
        await wait_for(lambda: health.watchers == 0)
        gc.collect()
        rss_before = process.memory_info().rss
        ready = tmp_path / "ready.json"
        attack = asyncio.create_task(flood(
            "watch", server.port, "--connections", str(WATCH_CONNECTIONS), "--streams", str(WATCH_STREAMS),
            "--hold", "1", "--ready-file", str(ready)))
        await wait_for(lambda: ready.exists() or attack.done(), timeout=60)
        await asyncio.sleep(0.5)
        held, rss_growth = health.watchers, process.memory_info().rss - rss_before
        status = await health_check(server.port)
        at_ready = json.loads(ready.read_text())
        report = await attack
        await wait_for(lambda: health.watchers == 0)
        refusals = scrape(server.metrics_port).value("asr_limit_hits_total", reason="max_health_watchers")
        assert refusals == health.refused > 0  # every refusal is counted
    attempted = WATCH_CONNECTIONS * WATCH_STREAMS
    print(f"Watch flood: {at_ready}; {held} held, RSS +{rss_growth / 2**20:.1f} MiB")
    assert held == WATCH_CAP
    assert at_ready["messages"] == WATCH_CAP  # one SERVING message per admitted Watch
    assert sum(at_ready["statuses"].values()) == attempted - WATCH_CAP, at_ready  # the rest ended
    assert at_ready["statuses"].get(str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), 0) > attempted / 2
    assert rss_growth < WATCH_RSS_BOUND, f"RSS grew by {rss_growth / 2**20:.1f} MiB"
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert report["connections"] == WATCH_CONNECTIONS and report["closed"] == 0


async def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


# --- behind HAProxy (deploy/haproxy/haproxy.cfg) -----------------------------------------------
def haproxy_binary() -> str:
    """The haproxy the tests drive for real; fails (never skips) when it is missing."""
    path = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).is_file()), None)
    if path is None:
        pytest.fail("haproxy is not installed: `make test-apt` installs Debian's haproxy package")
    return path


def test_haproxy_config_is_valid():
    result = subprocess.run([haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


@contextlib.asynccontextmanager
async def haproxy(backend_port: int, **limits):
    """deploy/haproxy/haproxy.cfg, unchanged, listening on a free loopback port in front of
    ``backend_port``; ``limits``: its environment variables (ASR_PROXY_...). Yields the port."""
    port = free_port()
    env = {**os.environ, "ASR_PROXY_BIND": f"127.0.0.1:{port}", "ASR_BACKEND": f"127.0.0.1:{backend_port}",
           **{k: str(v) for k, v in limits.items()}}
    proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(HAPROXY_CFG)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, f"haproxy exited: {proc.stderr.read().decode()[-2000:]}"
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            assert time.monotonic() < deadline, "haproxy did not listen within 10 s"
            await asyncio.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.timeout(120)
async def test_haproxy_limits_one_address_and_serves_the_others(demo, speech):
    """The shipped HAProxy config in front of a real server, with small limits (8 connections
    per address, 500 streams per 10 s): a recognition stream through it gives the reference
    transcript; from one address, 40 connections get 8 through and 32 closed at accept; of 1500
    quick calls on one connection 500 get through, then HAProxy sends GOAWAY(ENHANCE_YOUR_CALM);
    a rapid reset from another address is counted too (its reset streams are dropped in HAProxy,
    without a GOAWAY), and an address over its stream rate gets no new connection; the
    legitimate client, from its own address, is served throughout."""
    name, audio, reference = speech[0]
    limits = {"ASR_PROXY_MAX_CONN_PER_IP": 8, "ASR_PROXY_MAX_CONN_RATE_PER_IP": 1000,
              "ASR_PROXY_MAX_STREAM_RATE_PER_IP": 500}
    async with running_server(model=demo) as (server, _), haproxy(server.port, **limits) as port:
        async with channel(f"127.0.0.1:{port}") as ch:
            stub = asr_pb2_grpc.SpeechRecognitionStub(ch)
            assert await transcript(stub, audio) == reference

            conns = asyncio.create_task(flood("connections", port, "--connections", "40", "--hold", "2"))
            await asyncio.sleep(1.0)
            during_conns = await transcript(stub, audio)
            conns = await conns

            calls = await flood("rapid-reset", port, "--no-reset", "--pairs", "1500", "--batch", "50")
            after_calls = await flood("connections", port, "--connections", "1", "--hold", "0")

            resets = asyncio.create_task(flood("rapid-reset", port, "--pairs", "5000", source="127.0.0.3"))
            during_resets = await transcript(stub, audio)
            resets = await resets
            after_resets = await flood("connections", port, "--connections", "1", "--hold", "0",
                                       source="127.0.0.3")
            last = await transcript(stub, audio)
    print(f"through HAProxy: connections {conns}; calls {calls}; rapid reset {resets}")
    assert conns["answered"] == 8 and conns["refused"] == 32, conns
    assert during_conns == reference, name
    # 50 at a time (under the 100 streams per connection): the first 500 reach the server
    # (INVALID_ARGUMENT: a call without a message); on the next HAProxy closes the connection with
    # GOAWAY(ENHANCE_YOUR_CALM); without the stream rate limit all 1500 would reach the server
    assert 450 <= calls["responses"] <= 500 and calls["sent"] < 1500, calls
    assert calls["goaway"] is not None and calls["goaway"]["error_code"] == ENHANCE_YOUR_CALM, calls
    assert after_calls["answered"] == 0 and after_calls["refused"] == 1, after_calls
    assert resets["sent"] == 5000, resets
    assert after_resets["answered"] == 0 and after_resets["refused"] == 1, after_resets
    assert during_resets == reference and last == reference, name
