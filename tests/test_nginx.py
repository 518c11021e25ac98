"""nginx (Debian's, running deploy/nginx/nginx.conf with its listen address and servers replaced)
and HAProxy (deploy/haproxy/haproxy.cfg) in front of three real ``asr-server`` processes
(tests.test_scale_in's fleet: 127.0.0.1, .2 and .3, one port).

- Through nginx streams spread across all three with their right transcripts, SIGTERM to one
  mid-stream loses no final result, and a SIGKILLed server's open streams end at once with
  INTERNAL (nginx's RST_STREAM INTERNAL_ERROR; HAProxy's is CANCEL, tests/test_scale_in.py).
- With no server up, both proxies answer a call with UNAVAILABLE and their own message.
- A stream with a pause (a final result before the cut) whose server is killed a second into
  its second utterance goes on on another server with ``client.stream.Resume`` and
  ``asr-client --resume``, through nginx and HAProxy and with client-side round robin (an
  ``ipv4:`` target naming the three): the same final transcripts as without the
  cut, none twice, times in order; past ``--resume-keep-s`` it fails with the cut's status and
  says why.

Each test prints what it measured (docs/scaling.md quotes it). nginx runs as the test's user,
with its prefix, pid file and logs in a temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import socket
import subprocess
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr.v1 import asr_pb2
from client.stream import NO_RETRY, Resume, StreamOptions, channel, pcm16, stream_audio
from tests.conftest import ROOT
from tests.observability import free_port
from tests.test_scale_in import (BIN, HAPROXY_CFG, HOSTS, NAME, Fleet, ServerProcess, client, clip_set,
                                 common_free_port, haproxy_binary, kill_one, one_stream, spread_and_drain,
                                 until_every_server_serves)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"


def nginx_conf(listen: str, servers: list[str]) -> str:
    """deploy/nginx/nginx.conf listening on ``listen`` with ``servers`` as its upstream, and
    nothing else changed."""
    text = NGINX_CONF.read_text()
    text, listens = re.subn(r"^(\s*)listen \S+ http2;", rf"\1listen {listen} http2;", text, flags=re.M)
    match = re.search(r"^(\s*)server \S+( [^;\n]*);\n", text, flags=re.M)
    assert listens == 1 and match, "deploy/nginx/nginx.conf: one listen line and one upstream server line expected"
    lines = "".join(f"{match.group(1)}server {s}{match.group(2)};\n" for s in servers)
    return text[:match.start()] + lines + text[match.end():]


def nginx_binary() -> str:
    path = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)
    if path is None:
        pytest.fail("nginx is not installed: `make test-apt` installs Debian's nginx package")
    return path


def start_nginx(tmp: Path, port: int, servers: list[str]) -> subprocess.Popen:
    """nginx with deploy/nginx/nginx.conf on 127.0.0.1:``port`` in front of ``servers``, its
    prefix, pid file and error log (``error.log``) in ``tmp``; returns once it listens."""
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_conf(f"127.0.0.1:{port}", servers))
    for temp in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / temp).mkdir(exist_ok=True)
    # workers as the test's user too (nginx started by root would switch them to nobody)
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    log = tmp / "error.log"
    proc = subprocess.Popen([nginx_binary(), "-p", str(tmp), "-c", str(conf), "-e", str(log),
                             "-g", f"daemon off; pid {tmp}/nginx.pid; {user}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        assert proc.poll() is None, f"nginx exited: {log.read_text()[-2000:]}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        assert time.monotonic() < deadline, "nginx does not listen"
        time.sleep(0.1)


class NginxFleet(Fleet):
    """tests.test_scale_in's fleet (three servers behind HAProxy, by DNS) with nginx in front of
    the same three too (their addresses in its upstream)."""

    def __init__(self, tmp: Path):
        super().__init__()
        self.tmp = tmp
        self.log = tmp / "error.log"
        self.nginx_port = free_port()
        self.nginx: subprocess.Popen | None = None
        # the metrics port, the same on every server, and a second HAProxy that checks its /healthz
        self.health_port = common_free_port()
        for server in self.servers:
            server.extra_args = ("--metrics-port", str(self.health_port))
        self.checking_port = free_port()
        self.checking: subprocess.Popen | None = None

    def start(self) -> None:
        self.nginx = start_nginx(self.tmp, self.nginx_port, [f"{h}:{self.port}" for h in HOSTS])
        env = {**os.environ, "ASR_PROXY_BIND": f"127.0.0.1:{self.checking_port}",
               "ASR_BACKEND_DNS": f"{NAME}:{self.port}", "ASR_PROXY_RESOLVER": f"127.0.0.1:{self.dns.port}",
               "ASR_BACKEND_HEALTH_PORT": str(self.health_port)}
        self.checking = subprocess.Popen([haproxy_binary(), "-db", "-f", str(HAPROXY_CFG)], env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        super().start()  # the servers and HAProxy; ensure_up checks nginx and the second HAProxy too

    def ensure_up(self) -> None:
        super().ensure_up()
        assert self.nginx.poll() is None, f"nginx exited: {self.log.read_text()[-2000:]}"
        assert self.checking.poll() is None, "the HAProxy that checks /healthz exited"

    @property
    def checking_target(self) -> str:
        return f"127.0.0.1:{self.checking_port}"

    @property
    def nginx_target(self) -> str:
        return f"127.0.0.1:{self.nginx_port}"

    def close(self) -> None:
        super().close()
        for proc in (self.nginx, self.checking):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def nginx_fleet(tmp_path_factory):
    fleet = NginxFleet(tmp_path_factory.mktemp("nginx"))
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.close()


async def test_with_no_server_up_both_proxies_answer_unavailable(tmp_path):
    """A call that reaches no server gets a gRPC answer from the proxy: UNAVAILABLE with the
    proxy's message for a unary call; a stream whose client is still sending when it comes ends
    with one of the codes client.stream.Resume goes on after (the gRPC Python client reports the
    proxy's reset or its own write failure, CANCELLED or INTERNAL, in some of them)."""
    dead = free_port()  # nothing listens there
    nginx_port, haproxy_port = free_port(), free_port()
    nginx = start_nginx(tmp_path, nginx_port, [f"127.0.0.1:{dead}"])
    haproxy = subprocess.Popen([haproxy_binary(), "-db", "-f", str(HAPROXY_CFG)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               env={**os.environ, "ASR_PROXY_BIND": f"127.0.0.1:{haproxy_port}",
                                    "ASR_BACKEND": f"127.0.0.1:{dead}"})
    try:
        for name, port, message in (("nginx", nginx_port, "no asr-server reachable"),
                                    ("HAProxy", haproxy_port, "no asr-server available")):
            async with client(f"127.0.0.1:{port}", "pick_first") as stub, \
                    channel(f"127.0.0.1:{port}") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as unary:
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert (unary.value.code(), unary.value.details()) == (grpc.StatusCode.UNAVAILABLE, message)
                codes = []
                for _ in range(10):
                    with pytest.raises(grpc.aio.AioRpcError) as stream:
                        async for _ in stream_audio(stub, bytes(32000), 16000, StreamOptions(realtime=False)):
                            pass
                    codes.append(stream.value.code())
                print(f"{name}, no server up: a health check UNAVAILABLE ({message!r}); 10 streams "
                      f"{sorted((c.name, codes.count(c)) for c in set(codes))}")
                assert set(codes) <= set(Resume().codes), codes
    finally:
        for proc in (nginx, haproxy):
            proc.terminate()
            proc.wait(timeout=10)


async def test_streams_spread_through_nginx_and_a_drain_loses_no_final_result(nginx_fleet, speech):
    await spread_and_drain(nginx_fleet, nginx_fleet.nginx_target, "pick_first", speech, "nginx")


async def test_a_killed_servers_streams_end_internal_at_once_through_nginx(nginx_fleet, speech):
    """nginx resets the client's stream with RST_STREAM INTERNAL_ERROR when its connection to the
    server dies under it: the client reads INTERNAL ("Received RST_STREAM with error code 2", or
    "Internal error from Core" when its pending write fails on the reset first). New streams after the kill go to the other
    two without a retry (grpc_next_upstream)."""
    failed, after = await kill_one(nginx_fleet, nginx_fleet.nginx_target, "pick_first", speech, "nginx")
    assert {o.code for o in failed} == {grpc.StatusCode.INTERNAL}, failed
    # the reset, or the gRPC Python client's own pending write failing on it first
    assert all("Received RST_STREAM with error code 2" in o.details or o.details == "Internal error from Core"
               for o in failed), [o.details for o in failed]
    assert max(after) < 1.0, after


# --- resuming a stream cut mid-way -----------------------------------------------------------
PAUSE_S = 1.5  # silence between two utterances: longer than the servers' endpointing (0.8 s)
KILL_AFTER_S = 1.0  # the kill comes this long after the first final result: in the second utterance


def two_utterances(speech) -> np.ndarray:
    """The first two samples with a pause between them (so a final result ends the first) and
    half a second of silence after."""
    silence = np.zeros(int(PAUSE_S * 16000), dtype=np.float32)
    return np.concatenate([speech[0][1], silence, speech[1][1], silence[:8000]])


@dataclass
class Final:
    text: str
    start_s: float
    end_s: float
    utterance: int


def final_of(result) -> Final:
    return Final(result.alternatives[0].transcript, result.result_start_time.ToNanoseconds() / 1e9,
                 result.result_end_time.ToNanoseconds() / 1e9, result.utterance_index)


def victim_of(fleet: NginxFleet) -> ServerProcess:
    """The one server with an open stream."""
    busy = [server for server in fleet.servers if server.running and server.active() >= 1]
    assert len(busy) == 1, [server.active() for server in fleet.servers]
    return busy[0]


def kill_later(fleet: NginxFleet, killed: dict) -> None:
    """SIGKILL, KILL_AFTER_S from now, to the server the stream is on."""
    victim = victim_of(fleet)

    def kill():
        victim.proc.kill()
        killed["at"] = time.monotonic()
    asyncio.get_running_loop().call_later(KILL_AFTER_S, kill)
    killed["server"] = victim


async def finals_of_stream(target: str, audio: np.ndarray, resume: Resume | None = None,
                           fleet: NginxFleet | None = None, lb: str = "pick_first",
                           ) -> tuple[list[Final], list[tuple], dict]:
    """The final results of one real-time stream of ``audio`` with endpointing; with ``fleet``,
    the server it is on is killed KILL_AFTER_S after its first final result. Also returns each
    resume (code, from_s) and when the kill came."""
    options = StreamOptions(realtime=True, interim_results=True, endpointing=True)
    finals: list[Final] = []
    resumes: list[tuple] = []
    killed: dict = {}
    async with client(target, lb) as stub:
        async for event in stream_audio(stub, pcm16(audio), 16000, options, resume=resume,
                                        on_resume=lambda error, from_s, attempt: resumes.append(
                                            (error.code(), from_s, time.monotonic()))):
            finals += [final_of(r) for r in event.response.results if r.is_final]
            if fleet is not None and finals and not killed:
                kill_later(fleet, killed)
    killed["ended"] = time.monotonic()
    return finals, resumes, killed


# a proxy that has forwarded a stream's headers can only reset it when the server dies: the client
# reads the reset as CANCELLED (HAProxy's RST_STREAM CANCEL) or INTERNAL (nginx's INTERNAL_ERROR, or
# grpcio's own pending write failing on the reset first)
PROXY_RESET = {grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}


def check_resumed(finals: list[Final], whole: list[Final], resumes: list[tuple], killed: dict,
                  codes: set[grpc.StatusCode], label: str) -> None:
    print(f"{label}: killed {killed['ended'] - killed['at']:.1f} s before the stream's end; resumed "
          f"{[(c.name, round(s, 2), t and round(t - killed['at'], 3)) for c, s, t in resumes]} (code, from s, "
          f"s after the kill); finals {[(f.text, f.start_s, f.end_s, f.utterance) for f in finals]}; "
          f"uninterrupted {[(f.text, f.start_s, f.end_s) for f in whole]}")
    assert killed["at"] < killed["ended"] - 1.0, "the kill came after the stream"
    # one cut, resumed from the end of the first final result
    assert len(resumes) == 1 and resumes[0][0] in codes, resumes
    assert resumes[0][1] == pytest.approx(finals[0].end_s, abs=1e-3), (resumes, finals)
    # the same final results as the uninterrupted stream, none twice, in order
    assert [f.text for f in finals] == [f.text for f in whole] == [f.text for f in finals if f.text], finals
    assert [f.utterance for f in finals] == list(range(len(finals))), finals
    for before, after in zip(finals, finals[1:]):
        assert before.end_s <= after.start_s < after.end_s, finals
    # where they are in the whole stream: as without the cut, to within a chunk or two
    for got, want in zip(finals, whole):
        assert got.end_s == pytest.approx(want.end_s, abs=0.35), (finals, whole)


@pytest.mark.parametrize("via, codes", [("nginx", PROXY_RESET), ("haproxy", PROXY_RESET),
                                        ("round robin", {grpc.StatusCode.UNAVAILABLE})])
async def test_a_stream_cut_by_a_killed_server_is_resumed_on_another(nginx_fleet, speech, via, codes):
    nginx_fleet.ensure_up()
    target, lb = {"nginx": (nginx_fleet.nginx_target, "pick_first"), "haproxy": (nginx_fleet.proxy_target, "pick_first"),
                  "round robin": (nginx_fleet.round_robin_target, "round_robin")}[via]
    audio = two_utterances(speech)
    whole, _, _ = await finals_of_stream(target, audio, lb=lb)
    assert [f.text for f in whole] == [speech[0][2], speech[1][2]], whole
    finals, resumes, killed = await finals_of_stream(target, audio, Resume(), nginx_fleet, lb)
    check_resumed(finals, whole, resumes, killed, codes, via)


async def asr_client(fleet: NginxFleet, target: str, wav: Path, *flags: str) -> tuple[int, list[Final], str, dict]:
    """``asr-client --resume --json`` streaming ``wav`` in real time; the server its stream is on
    is killed KILL_AFTER_S after the first final result. Exit code, final results, stderr, the kill."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "asr-client"), str(wav), "--server", target, "--json", "--no-interim", "--resume", *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    finals: list[Final] = []
    killed: dict = {}
    async for line in proc.stdout:
        response = json_format.Parse(line, asr_pb2.StreamingRecognizeResponse(), ignore_unknown_fields=True)
        finals += [final_of(r) for r in response.results if r.is_final]
        if finals and not killed:
            kill_later(fleet, killed)
    stderr = (await proc.stderr.read()).decode()
    code = await proc.wait()
    killed["ended"] = time.monotonic()
    return code, finals, stderr, killed


async def test_asr_client_resume_goes_on_after_a_killed_server(nginx_fleet, speech, tmp_path):
    nginx_fleet.ensure_up()
    audio = two_utterances(speech)
    wav = tmp_path / "two.wav"
    soundfile.write(wav, audio, 16000, subtype="PCM_16")
    whole, _, _ = await finals_of_stream(nginx_fleet.proxy_target, audio)
    code, finals, stderr, killed = await asr_client(nginx_fleet, nginx_fleet.proxy_target, wav)
    print(f"asr-client --resume: exit {code}; {stderr.strip()}")
    assert code == 0, stderr
    resumed = re.findall(r"asr-client: (\w+): .*; going on with a new stream from ([0-9.]+) s \(1 of 3\)", stderr)
    resumes = [(grpc.StatusCode[name], float(from_s), None) for name, from_s in resumed]  # when: not known
    check_resumed(finals, whole, resumes, killed, PROXY_RESET, "asr-client --resume, HAProxy")


async def test_asr_client_does_not_resume_past_its_kept_audio(nginx_fleet, speech, tmp_path):
    """--resume-keep-s 0.5 and a cut a second after the last final result: the stream fails with
    the cut's status (nginx: INTERNAL), and says why."""
    nginx_fleet.ensure_up()
    wav = tmp_path / "two.wav"
    soundfile.write(wav, two_utterances(speech), 16000, subtype="PCM_16")
    code, finals, stderr, killed = await asr_client(nginx_fleet, nginx_fleet.nginx_target, wav, "--resume-keep-s", "0.5")
    print(f"asr-client --resume --resume-keep-s 0.5: exit {code}; {stderr.strip()}")
    assert code == 1
    assert [f.text for f in finals] == [speech[0][2]]  # the final result before the cut stands
    said = re.fullmatch(r"asr-client: INTERNAL: .*RST_STREAM with error code 2.* \(not resumed: (\d+\.\d) s of audio "
                        r"since the last final result, more than the 0\.5 s kept\)\n", stderr)
    assert said and float(said.group(1)) > 0.5, stderr


# --- HAProxy checking /healthz --------------------------------------------------------------
def healthz(server: ServerProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/healthz", timeout=5) as reply:
            return reply.status, reply.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()


async def test_haproxy_checking_healthz_sends_a_draining_server_no_new_stream(nginx_fleet, speech):
    """HAProxy with ASR_BACKEND_HEALTH_PORT asks each server's GET /healthz: a server draining
    after SIGTERM answers 503 NOT_SERVING and leaves the turn within two checks, so the new
    streams sent while it drains all go to the other two, none refused, none retried."""
    fleet = nginx_fleet
    fleet.ensure_up()
    long_audio = np.concatenate([audio for _, audio, _ in speech[:3]])  # about 11 s
    async with client(fleet.checking_target, "pick_first") as stub:
        await until_every_server_serves(fleet, stub, speech[0][1])
        assert [healthz(server) for server in fleet.servers] == [(200, "SERVING")] * len(HOSTS)
        started = [asyncio.Event() for _ in HOSTS]
        running = [asyncio.create_task(one_stream(stub, long_audio, started=event)) for event in started]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 60)
        active = [server.active() for server in fleet.servers]
        assert active == [1.0] * len(HOSTS), active
        victim = fleet.servers[0]
        victim.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while healthz(victim) != (503, "NOT_SERVING"):
            assert time.monotonic() - signalled < 2, healthz(victim)
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # two checks at 1 s
        before = victim.streams()
        new_clips = clip_set(speech, 9)
        new = await asyncio.gather(*(one_stream(stub, audio, realtime=False, retry=NO_RETRY)
                                     for audio, _ in new_clips))
        during = time.monotonic() - signalled
        assert victim.running, "the victim's open stream ended before the new streams did"
        reached = victim.streams() - before
        drained = await asyncio.gather(*running)
    print(f"HAProxy checking /healthz: SIGTERM to {victim.host}; {len(new)} new streams {2.5:g}-{during:.1f} s "
          f"after it: {sum(o.code == grpc.StatusCode.OK for o in new)} OK without a retry, {reached:.0f} reached "
          f"the draining server")
    assert [(o.code, o.text, o.retries) for o in new] == [(grpc.StatusCode.OK, ref, 0) for _, ref in new_clips], new
    assert reached == 0
    assert [o.code for o in drained] == [grpc.StatusCode.OK] * len(HOSTS), drained
