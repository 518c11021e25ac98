"""Scale-in and crashes in a fleet of three real ``asr-server`` processes (the demo model, one
intra-op thread each: they share this machine's cores), reached two ways:

- through the real HAProxy running deploy/haproxy/haproxy.cfg unchanged, in its DNS mode: the
  three servers are the three addresses of one name (127.0.0.1, .2 and .3, one port), answered by
  a DNS server in the test, as a headless Service or ``docker compose --scale`` give them;
- with client-side round robin and no proxy: an ``ipv4:`` target naming the three.

Either way streams spread across all three (each server's ``asr_streams_total``: within one of
even); SIGTERM to one mid-stream lets every open stream finish with its final result while new
streams go to the other two (the draining server refuses the ones that still reach it with
UNAVAILABLE, and the client tries them again: ``client.stream.Retry``); SIGKILL to one ends its
streams within a second, with UNAVAILABLE without a proxy and CANCELLED through HAProxy, and the
client's next streams land on the others. Each test prints what it measured (docs/scaling.md
quotes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from asr.v1 import asr_pb2_grpc
from client.stream import Retry, StreamOptions, channel, pcm16, stream_audio
from tests.conftest import ROOT
from tests.observability import free_port, scrape
from tests.test_fleet import HostsDNS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
BIN = Path(sys.executable).parent
HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
NAME = "asr.fleet.test"  # the name HAProxy resolves (its three addresses: HOSTS)
DRAIN_TIMEOUT_S = 20  # asr-server's --drain-timeout: longer than any stream here
STREAMS = 9  # three per server when even: a modest load for three servers on two cores
RETRY = Retry(attempts=4, pause_s=0.05)


# --- the fleet -------------------------------------------------------------------------------
@dataclass
class ServerProcess:
    """``asr-server --model demo`` on ``host:port``; ``metrics_port`` once it serves."""

    host: str
    port: int
    proc: subprocess.Popen | None = None
    metrics_port: int = 0
    lines: list[str] = field(default_factory=list)
    extra_args: tuple[str, ...] = ()  # more asr-server arguments (a later one wins)

    def start(self) -> None:
        env = {**os.environ, "ASR_LOG_LEVEL": "info"}
        self.lines = []
        self.metrics_port = 0
        self.proc = subprocess.Popen(
            [str(BIN / "asr-server"), "--model", "demo", "--host", self.host, "--port", str(self.port),
             "--metrics-host", self.host, "--metrics-port", "0", "--threads", "1", "--latency-budget-ms", "0",
             "--drain-timeout", str(DRAIN_TIMEOUT_S), *self.extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line)
            match = re.search(r"metrics on http://[^:]+:(\d+)/metrics", line)
            if match:
                self.metrics_port = int(match.group(1))

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not self.metrics_port:
            assert self.proc.poll() is None, f"asr-server on {self.host} exited: {''.join(self.lines)[-3000:]}"
            assert time.monotonic() < deadline, f"asr-server on {self.host} not up: {''.join(self.lines)[-3000:]}"
            time.sleep(0.2)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self):
        return scrape(self.metrics_port, self.host)

    def streams(self, outcome: str | None = None) -> float:
        """Streams this server has ended (``asr_streams_total``), of one outcome or all."""
        return sum(v for labels, v in self.metrics().series("asr_streams_total").items()
                   if outcome is None or ("outcome", outcome) in labels)

    def active(self) -> float:
        return sum(self.metrics().series("asr_active_streams").values())

    def stop(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGINT)
            self.proc.send_signal(signal.SIGINT)  # the second signal stops at once
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ThreadedDNS:
    """tests.test_fleet.HostsDNS answering on a UDP socket from a thread of its own (HAProxy
    re-resolves every second, also while no event loop runs)."""

    def __init__(self, addresses: list[str]):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.dns = HostsDNS(addresses)
        self.dns.connection_made(self.sock)  # its "transport": sendto(data, peer)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            self.dns.datagram_received(data, peer)

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        self.sock.close()


def haproxy_binary() -> str:
    path = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).is_file()), None)
    if path is None:
        pytest.fail("haproxy is not installed: `make test-apt` installs Debian's haproxy package")
    return path


def common_free_port() -> int:
    """A port free on every address of HOSTS."""
    for _ in range(50):
        port = free_port()
        try:
            for host in HOSTS[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise AssertionError("no port free on all of " + ", ".join(HOSTS))


class Fleet:
    def __init__(self):
        self.port = common_free_port()
        self.servers = [ServerProcess(host, self.port) for host in HOSTS]
        self.dns = ThreadedDNS(HOSTS)
        self.proxy_port = free_port()
        self.proxy: subprocess.Popen | None = None

    def start(self) -> None:
        for server in self.servers:
            server.start()
        env = {**os.environ, "ASR_PROXY_BIND": f"127.0.0.1:{self.proxy_port}", "ASR_BACKEND_DNS": f"{NAME}:{self.port}",
               "ASR_PROXY_RESOLVER": f"127.0.0.1:{self.dns.port}"}
        self.proxy = subprocess.Popen([haproxy_binary(), "-db", "-f", str(HAPROXY_CFG)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.ensure_up()

    def ensure_up(self) -> None:
        """Every server serving (a stopped one started again), HAProxy running."""
        for server in self.servers:
            if not server.running:
                server.start()
        for server in self.servers:
            server.wait_ready()
        assert self.proxy.poll() is None, f"haproxy exited: {self.proxy.stderr.read().decode()[-2000:]}"

    @property
    def round_robin_target(self) -> str:
        return "ipv4:" + ",".join(f"{host}:{self.port}" for host in HOSTS)

    @property
    def proxy_target(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    def streams(self, outcome: str | None = None) -> list[float]:
        return [server.streams(outcome) if server.running else 0.0 for server in self.servers]

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        if self.proxy is not None:
            self.proxy.terminate()
            self.proxy.wait(timeout=10)
        self.dns.close()


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.close()


# --- streams ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    finals: list[str]
    code: grpc.StatusCode
    details: str = ""
    retries: int = 0
    ended_at: float = 0.0  # time.monotonic()

    @property
    def text(self) -> str:
        return " ".join(t for t in self.finals if t)


async def one_stream(stub, audio, realtime: bool = True, started: asyncio.Event | None = None,
                     retry: Retry = RETRY) -> Outcome:
    """A stream of ``audio`` to its end (one final result: endpointing off), with the clients'
    retry of a new stream refused with UNAVAILABLE."""
    options = StreamOptions(realtime=realtime, interim_results=True, endpointing=False)
    outcome = Outcome([], grpc.StatusCode.OK)

    def retried(error, attempt):
        outcome.retries = attempt

    try:
        async for event in stream_audio(stub, pcm16(audio), 16000, options, retry=retry, on_retry=retried):
            if started is not None:
                started.set()
            outcome.finals += [r.alternatives[0].transcript for r in event.response.results if r.is_final]
    except grpc.aio.AioRpcError as exc:
        outcome.code, outcome.details = exc.code(), exc.details()
    outcome.ended_at = time.monotonic()
    return outcome


@contextlib.asynccontextmanager
async def client(target: str, lb: str):
    async with channel(target, options=[("grpc.lb_policy_name", lb)]) as ch:
        await asyncio.wait_for(ch.channel_ready(), 30)
        yield asr_pb2_grpc.SpeechRecognitionStub(ch)


async def until_every_server_serves(fleet: Fleet, stub, audio, timeout: float = 60) -> None:
    """Quick streams through ``stub`` until each server has had one (HAProxy has found all three
    by DNS and checked them; a round-robin channel has a connection to each)."""
    before = fleet.streams()
    deadline = time.monotonic() + timeout
    while True:
        await asyncio.gather(*(one_stream(stub, audio[:8000], realtime=False) for _ in HOSTS))
        served = [now - then for now, then in zip(fleet.streams(), before)]
        if all(served):
            return
        assert time.monotonic() < deadline, f"not every server got streams: {served}"
        await asyncio.sleep(0.5)


def clip_set(speech, n: int):
    """``n`` (audio, reference transcript) pairs, the bundled samples in turn."""
    return [(speech[i % len(speech)][1], speech[i % len(speech)][2]) for i in range(n)]


async def open_streams(fleet: Fleet, stub, clips) -> tuple[list[asyncio.Task], list[float], int, list, list[float]]:
    """Start a real-time stream per clip and wait until each has sent audio. Returns the running
    streams, the open streams per server, the server with the most (the one to stop), the other
    servers, and the streams each of those had completed OK so far."""
    started = [asyncio.Event() for _ in clips]
    running = [asyncio.create_task(one_stream(stub, audio, started=event))
               for (audio, _), event in zip(clips, started)]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 60)
    active = [server.active() for server in fleet.servers]
    victim = max(range(len(HOSTS)), key=lambda i: active[i])
    others = [s for i, s in enumerate(fleet.servers) if i != victim]
    return running, active, victim, others, [s.streams("ok") for s in others]


async def spread_and_drain(fleet: Fleet, target: str, lb: str, speech, label: str) -> None:
    fleet.ensure_up()
    async with client(target, lb) as stub:
        await until_every_server_serves(fleet, stub, speech[0][1])

        # Spread: STREAMS concurrent real-time streams.
        clips = clip_set(speech, STREAMS)
        before = fleet.streams("ok")
        outcomes = await asyncio.gather(*(one_stream(stub, audio) for audio, _ in clips))
        spread = [now - then for now, then in zip(fleet.streams("ok"), before)]
        print(f"{label}: {STREAMS} streams spread {spread}")
        assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * STREAMS, outcomes
        assert [o.text for o in outcomes] == [reference for _, reference in clips]
        assert sum(spread) == STREAMS and max(spread) - min(spread) <= 1, spread

        # Drain: SIGTERM to one server while STREAMS streams are open, then new streams.
        running, active, victim, others, ok_before = await open_streams(fleet, stub, clips)
        fleet.servers[victim].proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.sleep(0.3)  # the signal has reached it: it refuses new streams
        new_clips = clip_set(speech, 2 * STREAMS)[STREAMS:]
        new = await asyncio.gather(*(one_stream(stub, audio, realtime=False) for audio, _ in new_clips))
        drained = await asyncio.gather(*running)
        exit_code = await asyncio.to_thread(fleet.servers[victim].proc.wait, DRAIN_TIMEOUT_S + 15)
        exited = time.monotonic() - signalled
        on_others = [s.streams("ok") - then for s, then in zip(others, ok_before)]
    retries = sum(o.retries for o in new)
    print(f"{label}: SIGTERM to {HOSTS[victim]} with {active[victim]:.0f} of {sum(active):.0f} streams open "
          f"(open per server {active}); it exited {exit_code} after {exited:.1f} s; "
          f"{sum(o.code == grpc.StatusCode.OK for o in drained)}/{len(drained)} open streams ended OK with "
          f"their final result; {len(new)} new streams: {sum(o.code == grpc.StatusCode.OK for o in new)} OK, "
          f"{retries} retries after UNAVAILABLE, OK streams on the other two {on_others}")
    assert active[victim] >= 1 and sum(active) == STREAMS, active
    # every stream open at the SIGTERM, on whichever server, ends OK with its whole final result
    assert [(o.code, o.text) for o in drained] == [(grpc.StatusCode.OK, ref) for _, ref in clips], drained
    assert exit_code == 0
    # every new stream ends OK on one of the other two (after retries where the draining one refused it)
    assert [(o.code, o.text) for o in new] == [(grpc.StatusCode.OK, ref) for _, ref in new_clips], new
    active_on_others = sum(active) - active[victim]
    assert sum(on_others) == len(new) + active_on_others, (on_others, len(new), active_on_others)
    assert min(on_others) >= 1


async def test_streams_spread_through_haproxy_and_a_drain_loses_no_final_result(fleet, speech):
    await spread_and_drain(fleet, fleet.proxy_target, "pick_first", speech, "HAProxy")


async def test_streams_spread_by_client_round_robin_and_a_drain_loses_no_final_result(fleet, speech):
    await spread_and_drain(fleet, fleet.round_robin_target, "round_robin", speech, "round robin")


async def kill_one(fleet: Fleet, target: str, lb: str, speech, label: str) -> tuple[list[Outcome], list[float]]:
    """SIGKILL to the server with the most open streams while STREAMS streams run; new streams
    after it. Returns the outcomes of the streams that failed and the seconds from the kill to
    each failure."""
    fleet.ensure_up()
    async with client(target, lb) as stub:
        await until_every_server_serves(fleet, stub, speech[0][1])
        clips = clip_set(speech, STREAMS)
        running, active, victim, others, ok_before = await open_streams(fleet, stub, clips)
        fleet.servers[victim].proc.kill()
        killed = time.monotonic()
        outcomes = await asyncio.gather(*running)
        new_clips = clip_set(speech, 2 * STREAMS)[STREAMS:]
        new = await asyncio.gather(*(one_stream(stub, audio, realtime=False) for audio, _ in new_clips))
        on_others = [s.streams("ok") - then for s, then in zip(others, ok_before)]
    fleet.servers[victim].proc.wait()
    failed = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    after = [round(o.ended_at - killed, 3) for o in failed]
    print(f"{label}: SIGKILL to {HOSTS[victim]} with {active[victim]:.0f} of {sum(active):.0f} streams open; "
          f"{len(failed)} streams failed ({sorted({(o.code.name, o.details) for o in failed})}) "
          f"{after} s after the kill; {len(new)} new streams: {sum(o.code == grpc.StatusCode.OK for o in new)} OK "
          f"({sum(o.retries for o in new)} retries), OK streams on the other two {on_others}")
    assert active[victim] >= 1 and sum(active) == STREAMS, active
    assert len(failed) == active[victim], (len(failed), active)
    survivors = [(o.code, o.text) for o in outcomes if o.code == grpc.StatusCode.OK]
    assert len(survivors) == STREAMS - active[victim]
    # every new stream lands on the other two and ends OK
    assert [(o.code, o.text) for o in new] == [(grpc.StatusCode.OK, ref) for _, ref in new_clips], new
    assert sum(on_others) == len(new) + len(survivors) and min(on_others) >= 1, on_others
    return failed, after


async def test_a_killed_servers_streams_end_unavailable_within_a_second_without_a_proxy(fleet, speech):
    failed, after = await kill_one(fleet, fleet.round_robin_target, "round_robin", speech, "round robin")
    assert {o.code for o in failed} == {grpc.StatusCode.UNAVAILABLE}, failed
    assert max(after) < 1.0, after


async def test_a_killed_servers_streams_end_at_once_through_haproxy(fleet, speech):
    """Through HAProxy the client sees the crash as a reset: HAProxy resets the client's stream
    (RST_STREAM CANCEL) when its connection to the server dies under it, read as CANCELLED, or as
    INTERNAL where the gRPC client's own pending write fails on the reset first."""
    failed, after = await kill_one(fleet, fleet.proxy_target, "pick_first", speech, "HAProxy")
    assert failed and {o.code for o in failed} <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}, failed
    assert max(after) < 1.0, after
