"""Hostile and careless clients against a real server, each attack at a small, bounded scale
run from another process (tests/attacks.py): the attacker's calls end with documented codes,
authorised real-time streams beside it keep their transcript and their latency, and the
server's memory comes back (docs/operations.md, "Hostile clients")."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sys

import grpc
import numpy as np
import psutil
import pytest
from riva.client.proto import riva_asr_pb2 as rasr
from riva.client.proto import riva_asr_pb2_grpc as rasr_grpc
from riva.client.proto import riva_audio_pb2 as raudio
from riva.client.proto import riva_common_pb2 as rcommon

from asr.v1 import asr_pb2
from client.stream import StreamOptions, pcm16, stream_audio
from server.config import ServerSettings
from tests.conftest import running_server
from tests.observability import scrape
from tests.test_security import TOKENS, bearer

RSS_BOUND = 100 * 1024 * 1024  # what an attack may leave behind in the server's memory
VICTIM_P99_S = 1.0  # authorised real-time streams' chunk latency beside an attack (a loaded 2-core CI)


@contextlib.asynccontextmanager
async def attack(kind: str, port: int, *args: str):
    """Run ``python -m tests.attacks kind`` against ``port`` for the body of the ``with``;
    yields a dict that holds its JSON report (``outcomes``, ...) once the attack has ended."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.attacks", kind, "--port", str(port), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    report: dict = {}
    try:
        yield report
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, err.decode()[-2000:]
        report.update(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def victim(stub, audio: np.ndarray, metadata=None) -> tuple[str, list[float]]:
    """Stream ``audio`` in real time; the final transcript and each response's client-side latency (s)."""
    finals, latencies = [], []
    async for event in stream_audio(stub, pcm16(audio), 16000, StreamOptions(endpointing=False),
                                    metadata=metadata):
        if event.client_latency_s is not None:
            latencies.append(event.client_latency_s)
        finals += [r.alternatives[0].transcript for r in event.response.results if r.is_final]
    return " ".join(t for t in finals if t), latencies


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


async def settled_rss(baseline: int, seconds: float = 20.0) -> int:
    """The server's RSS over ``baseline``, waited for (up to ``seconds``) to come back under RSS_BOUND."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (grown := rss() - baseline) > RSS_BOUND and loop.time() < deadline:
        await asyncio.sleep(0.5)
    return grown


async def test_unauthenticated_flood_is_refused_unparsed_and_costs_no_memory(tmp_path, speech):
    token_file = tmp_path / "tokens"
    token_file.write_text("\n".join(TOKENS) + "\n")
    clip = np.concatenate([speech[0][1], speech[1][1]])
    async with running_server(auth_token_file=token_file, max_message_bytes=4 << 20) as (server, stub):
        reference, _ = await victim(stub, clip, bearer(TOKENS[0]))
        baseline, cpu = rss(), psutil.Process().cpu_times()
        async with attack("unauth", server.port, "--clients", "6", "--seconds", "6",
                          "--message-bytes", str(4 << 20)) as report:
            heard, latencies = await victim(stub, clip, bearer(TOKENS[1]))
        used = sum(psutil.Process().cpu_times()[:2]) - sum(cpu[:2])
        grown = await settled_rss(baseline)
    outcomes = report["outcomes"]
    print(f"attack {outcomes}, victim p99 {p99(latencies) * 1000:.0f} ms, RSS +{grown / 2**20:.0f} MiB, "
          f"server CPU {used:.1f} s")
    # UNAUTHENTICATED, or INTERNAL where grpcio's asyncio client loses the status (grpc/grpc#36066)
    assert set(outcomes) <= {"UNAUTHENTICATED", "INTERNAL"}, outcomes
    assert sum(outcomes.values()) >= 50, outcomes  # the flood did reach the server
    assert heard == reference
    assert p99(latencies) < VICTIM_P99_S, latencies
    assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.0f} MiB"


async def test_client_strings_are_bounded_in_responses_messages_and_logs(tmp_path, caplog):
    """A megabyte id or model name: INVALID_ARGUMENT with a short message and a short log line,
    never echoed whole; ids up to the documented limit are echoed as sent."""
    huge = "x" * (1 << 20)
    caplog.set_level(logging.INFO)
    async with running_server(max_message_bytes=4 << 20) as (server, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}",
                                             options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
            riva = rasr_grpc.RivaSpeechRecognitionStub(ch)
            config = rasr.RecognitionConfig(encoding=raudio.LINEAR_PCM, sample_rate_hertz=16000)
            errors = {}
            for label, request in (
                    ("riva id", rasr.RecognizeRequest(config=config, audio=bytes(3200),
                                                      id=rcommon.RequestId(value=huge))),
                    ("riva model", rasr.RecognizeRequest(config=rasr.RecognitionConfig(
                        encoding=raudio.LINEAR_PCM, sample_rate_hertz=16000, model=huge), audio=bytes(3200)))):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await riva.Recognize(request)
                errors[label] = info.value
            kept = await riva.Recognize(rasr.RecognizeRequest(config=config, audio=bytes(3200),
                                                              id=rcommon.RequestId(value="r" * 128)))
    for label, error in errors.items():
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (label, error.code())
        assert len(error.details()) < 300, (label, len(error.details()))
    assert "at most 128 characters" in errors["riva id"].details()
    assert "(1048576 characters)" in errors["riva model"].details()
    assert kept.id.value == "r" * 128
    assert max(len(r.getMessage()) for r in caplog.records) < 1000


async def test_refused_calls_log_one_line_per_reason_and_interval(tmp_path, caplog):
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKENS[0] + "\n")
    caplog.set_level(logging.INFO)
    async with running_server(auth_token_file=token_file) as (server, stub):
        for _ in range(30):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetModelInfo(asr_pb2.GetModelInfoRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metrics = scrape(server.metrics_port)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert len(lines) == 1, lines
    assert metrics.value("asr_limit_hits_total", reason="auth") == 30  # every refusal is still counted


def test_metrics_listen_on_this_host_only_by_default():
    assert ServerSettings().metrics_host == "127.0.0.1"
