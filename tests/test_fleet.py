"""Serving from a fleet: a maximum connection age moves a client's new streams to a new connection
without cutting the stream that is open (unless the grace period is shorter than it), and
client-side round robin (``ipv4:`` and ``dns:///`` targets) spreads streams across real servers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import socket
import struct
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import pytest

from asr.v1 import asr_pb2_grpc
from client.connection import _is_loopback, add_connection_args, lb_policy, parse_args
from client import cli
from client.stream import Retry, StreamOptions, channel, pcm16, stream_audio
from server.app import AsrServer, connection_options
from server.config import ServerSettings
from tests.conftest import running_server, small_model
from tests.helpers import transcript
from tests.observability import scrape

pytestmark = pytest.mark.timeout(180)


async def paced(stub, audio) -> tuple[list[str], grpc.StatusCode, float]:
    """A real-time stream to its end: (final transcripts, status, seconds it took)."""
    options = StreamOptions(realtime=True, interim_results=True, endpointing=False)
    finals, started = [], time.monotonic()
    try:
        async for event in stream_audio(stub, pcm16(audio), 16000, options):
            finals += [r.alternatives[0].transcript for r in event.response.results if r.is_final]
    except grpc.aio.AioRpcError as exc:
        return finals, exc.code(), time.monotonic() - started
    return finals, grpc.StatusCode.OK, time.monotonic() - started


def test_connection_options_map_the_settings():
    off = dict(connection_options(ServerSettings(keepalive_time_seconds=0)))
    assert off["grpc.keepalive_time_ms"] == 2**31 - 1 and "grpc.max_connection_age_ms" not in off
    aged = dict(connection_options(ServerSettings(max_connection_age_seconds=300, max_connection_age_grace_seconds=30,
                                                  keepalive_permit_without_calls=True)))
    assert aged["grpc.max_connection_age_ms"] == 300_000 and aged["grpc.max_connection_age_grace_ms"] == 30_000
    assert aged["grpc.keepalive_time_ms"] == 60_000 and aged["grpc.keepalive_permit_without_calls"] == 1
    # no grace given: gRPC's own default, streams on an aged connection run as long as they last
    assert "grpc.max_connection_age_grace_ms" not in dict(connection_options(ServerSettings(max_connection_age_seconds=1)))


async def test_a_stream_outlives_its_connections_maximum_age(speech):
    """Age 1 s, stream 4 s, grace 30 s: the stream gets every final result and ends OK, and the
    client's next call works (over a new connection)."""
    _, audio, _ = speech[0]
    clip = audio[:4 * 16000]
    async with running_server(max_connection_age_seconds=1.0, max_connection_age_grace_seconds=30) as (server, _):
        async with channel(f"127.0.0.1:{server.port}") as ch:
            stub = asr_pb2_grpc.SpeechRecognitionStub(ch)
            reference = await transcript(stub, clip)  # a fast stream, on the first connection
            finals, code, took = await paced(stub, clip)
            assert code == grpc.StatusCode.OK
            assert took > 3.5  # longer than the connection's age (1 s, +-10 %)
            assert " ".join(t for t in finals if t) == reference
            assert await transcript(stub, clip) == reference  # over the next connection


async def test_a_grace_shorter_than_the_stream_cuts_it(speech):
    """The counter-case: with a 0.5 s grace the aged connection is closed under the stream."""
    _, audio, _ = speech[0]
    clip = audio[:5 * 16000]
    async with running_server(max_connection_age_seconds=1.0, max_connection_age_grace_seconds=0.5) as (server, _):
        async with channel(f"127.0.0.1:{server.port}") as ch:
            finals, code, took = await paced(asr_pb2_grpc.SpeechRecognitionStub(ch), clip)
    assert code == grpc.StatusCode.UNAVAILABLE and took < 4.0, (code, took)


# --- client-side balancing ------------------------------------------------------------------
@contextlib.asynccontextmanager
async def servers_on(hosts: list[str], same_port: bool = False):
    """Real servers on each of ``hosts`` (loopback addresses), on free ports, or all on the first
    one's port (``same_port``); yields them."""
    started = []
    try:
        for host in hosts:
            port = started[0].port if same_port and started else 0
            settings = ServerSettings(host=host, port=port, model="random-small", metrics_host="127.0.0.1",
                                      metrics_port=0, latency_budget_ms=0)
            server = AsrServer(settings, model=small_model())
            await server.start()
            started.append(server)
        yield started
    finally:
        for server in started:
            await server.stop(grace=0.5)


def streams_served(server) -> float:
    return sum(scrape(server.metrics_port).series("asr_streams_total").values())


async def spread(target: str, lb: str, audio, streams: int = 6) -> list:
    """``streams`` fast streams, one after another, through one channel as asr-client and
    asr-loadtest open it (``--server TARGET --lb LB``); returns their transcripts."""
    args = argparse.ArgumentParser()
    args.add_argument("--server")
    add_connection_args(args)
    connection = parse_args(args, ["--server", target, "--lb", lb]).connection
    async with channel(connection) as ch:
        await asyncio.wait_for(ch.channel_ready(), 20)
        stub = asr_pb2_grpc.SpeechRecognitionStub(ch)
        await asyncio.sleep(0.5)  # round_robin: let the other addresses' connections come up too
        return [await transcript(stub, audio) for _ in range(streams)]


def test_multi_address_targets_default_to_round_robin():
    assert lb_policy("ipv4:127.0.0.1:1,127.0.0.2:1") == lb_policy("dns:///asr-headless:50051") == "round_robin"
    assert lb_policy("localhost:50051") == "pick_first" and lb_policy("dns:///a:1", "pick_first") == "pick_first"
    assert _is_loopback("ipv4:127.0.0.1:1,127.0.0.2:1") and not _is_loopback("ipv4:127.0.0.1:1,10.0.0.2:1")
    assert not _is_loopback("dns:///localhost:1")  # whatever a name resolves to is not known here


async def test_ipv4_target_spreads_streams_across_two_servers(speech):
    _, audio, _ = speech[1]
    clip = audio[:16000]
    async with servers_on(["127.0.0.1", "127.0.0.1"]) as (a, b):
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        texts = await spread(target, "auto", clip)
        assert len(set(texts)) == 1  # the same model on both: the same transcript
        counts = [streams_served(a), streams_served(b)]
        assert sorted(counts) == [3, 3], counts  # round robin: even
        # the counter-case: pick_first sends every stream to one server
        await spread(target, "pick_first", clip)
        more = sorted([streams_served(a) - counts[0], streams_served(b) - counts[1]])
        assert more == [0, 6], more


class HostsDNS(asyncio.DatagramProtocol):
    """A DNS server for the test: every A query is answered with ``addresses``, anything else
    with no records."""

    def __init__(self, addresses: list[str]):
        self.addresses = addresses
        self.queries = 0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data: bytes, peer):
        self.queries += 1
        end = 12
        while data[end]:
            end += data[end] + 1
        question = data[12:end + 5]
        qtype = struct.unpack(">H", data[end + 1:end + 3])[0]
        answers = [b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 5, 4) + socket.inet_aton(a)
                   for a in self.addresses] if qtype == 1 else []
        header = data[:2] + struct.pack(">HHHHH", 0x8180, 1, len(answers), 0, 0)
        self.transport.sendto(header + question + b"".join(answers), peer)


async def test_dns_target_spreads_streams_across_every_address_of_a_name(speech):
    """dns:/// as against a headless Service: a name with two addresses (127.0.0.1 and
    127.0.0.2, one server each on the same port), resolved by a real DNS server on loopback."""
    _, audio, _ = speech[1]
    clip = audio[:16000]
    loop = asyncio.get_running_loop()
    transport, dns = await loop.create_datagram_endpoint(lambda: HostsDNS(["127.0.0.1", "127.0.0.2"]),
                                                         local_addr=("127.0.0.1", 0))
    try:
        dns_port = transport.get_extra_info("sockname")[1]
        async with servers_on(["127.0.0.1", "127.0.0.2"], same_port=True) as (a, b):
            assert a.port == b.port
            texts = await spread(f"dns://127.0.0.1:{dns_port}/asr-headless.test:{a.port}", "auto", clip)
            assert len(set(texts)) == 1 and dns.queries > 0
            counts = [streams_served(a), streams_served(b)]
            assert sorted(counts) == [3, 3], counts
    finally:
        transport.close()


# --- the browser bridge ----------------------------------------------------------------------
async def bridge_session(port: int, audio: bytes, chunk: int = 5120) -> list[dict]:
    """One asr-web WebSocket session as the page runs it: config, audio, ``end``; its messages."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
            await ws.send_str(json.dumps({"sample_rate": 16000, "endpointing": False}))
            for offset in range(0, len(audio), chunk):
                await ws.send_bytes(audio[offset:offset + chunk])
            await ws.send_str("end")
            return [json.loads(msg.data) async for msg in ws]


async def test_asr_web_spreads_browser_sessions_across_two_servers(speech):
    """``asr-web --server ipv4:A,B --grpc-lb round_robin`` (the console script): once its
    channel is up (a first session opens it), six browser sessions, one after another, are three
    on each server; every one gets its final result."""
    _, audio, _ = speech[1]
    clip = pcm16(audio[:16000])
    async with servers_on(["127.0.0.1", "127.0.0.1"]) as (a, b):
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "asr-web"), "--port", "0", "--server", target, "--grpc-lb", "round_robin",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            match = re.search(r"open http://127\.0\.0\.1:(\d+)/ \(gRPC server (\S+),", line)
            assert match and match.group(2) == target, (line, (await proc.stderr.read()).decode() if not line else "")
            port = int(match.group(1))
            await bridge_session(port, clip)  # the bridge's streaming channel connects on its first stream
            await asyncio.sleep(0.5)  # round_robin: the second address's connection comes up too
            before = [streams_served(a), streams_served(b)]
            sessions = [await bridge_session(port, clip) for _ in range(6)]
        finally:
            proc.terminate()
            await proc.wait()
        counts = sorted([streams_served(a) - before[0], streams_served(b) - before[1]])
    finals = [[m["transcript"] for m in s if m["type"] == "result" and m["is_final"]] for s in sessions]
    assert [s[-1] for s in sessions] == [{"type": "end"}] * 6, sessions
    assert all(f and f == finals[0] for f in finals), finals  # the same model on both: the same finals
    assert counts == [3, 3], counts


# --- retries ---------------------------------------------------------------------------------
def streams_of(server, outcome: str) -> float:
    return sum(v for labels, v in scrape(server.metrics_port).series("asr_streams_total").items()
               if ("outcome", outcome) in labels)


async def test_a_stream_a_draining_server_refuses_is_retried_on_the_other(speech):
    """Round robin over a draining server and a serving one, one channel: successive streams take
    turns, so some go to the draining one first; each is refused with UNAVAILABLE before its first
    response and tried again (client.stream.Retry), on the other, and every one ends with its
    transcript. Without a retry, the same refusals end the streams."""
    _, audio, _ = speech[1]
    pcm = pcm16(audio[:16000])
    options = StreamOptions(realtime=False, interim_results=False, endpointing=False)
    async with servers_on(["127.0.0.1", "127.0.0.1"]) as (draining, serving):
        reference = await _one(f"127.0.0.1:{serving.port}", pcm, options)
        assert await draining.drain(1.0)  # no stream open: returns at once, and refuses new ones
        target = f"ipv4:127.0.0.1:{draining.port},127.0.0.1:{serving.port}"
        async with channel(target, options=[("grpc.lb_policy_name", "round_robin")]) as ch:
            await asyncio.wait_for(ch.channel_ready(), 20)
            await asyncio.sleep(0.5)  # both connections up
            stub = asr_pb2_grpc.SpeechRecognitionStub(ch)
            retries = []
            texts = []
            for _ in range(4):
                finals = []
                async for event in stream_audio(stub, pcm, 16000, options, retry=Retry(attempts=2, pause_s=0.01),
                                                on_retry=lambda error, attempt: retries.append(error.code())):
                    finals += [r.alternatives[0].transcript for r in event.response.results if r.is_final]
                texts.append(" ".join(finals))
            refused = streams_of(draining, "rejected")
            # the counter-case: no retry, and the refusal ends the stream
            codes = []
            for _ in range(2):
                try:
                    async for _event in stream_audio(stub, pcm, 16000, options):
                        pass
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
    assert texts == [reference] * 4
    assert retries and set(retries) == {grpc.StatusCode.UNAVAILABLE} and len(retries) == refused, (retries, refused)
    assert sorted(codes, key=str) == sorted([grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE], key=str), codes


async def _one(target: str, pcm: bytes, options: StreamOptions) -> str:
    async with channel(target) as ch:
        finals = []
        async for event in stream_audio(asr_pb2_grpc.SpeechRecognitionStub(ch), pcm, 16000, options):
            finals += [r.alternatives[0].transcript for r in event.response.results if r.is_final]
        return " ".join(finals)


async def test_asr_client_says_each_retry_and_gives_up_after_retries(speech, tmp_path, capsys):
    """asr-client --retries N against a server that only refuses (draining): N retries, each on
    stderr, then exit 1 with UNAVAILABLE; --retries 0: at once."""
    import soundfile

    wav = tmp_path / "a.wav"
    soundfile.write(wav, speech[1][1][:8000], 16000)
    async with servers_on(["127.0.0.1"]) as (server,):
        await server.drain(1.0)
        for retries in (2, 0):
            args = cli.parse_args(cli.build_parser(), [str(wav), "--fast", "--retries", str(retries),
                                                        "--server", f"127.0.0.1:{server.port}"])
            assert await cli.run(args) == 1
            err = capsys.readouterr().err.splitlines()
            assert [line for line in err if "trying again" in line] == [
                f"asr-client: UNAVAILABLE: {_details(err)}; trying again ({i} of {retries})"
                for i in range(1, retries + 1)], err
            assert err[-1].startswith("asr-client: UNAVAILABLE: ") and "shutting down" in err[-1], err
        assert streams_of(server, "rejected") == 3 + 1


def _details(err: list[str]) -> str:
    return err[-1].removeprefix("asr-client: UNAVAILABLE: ")
