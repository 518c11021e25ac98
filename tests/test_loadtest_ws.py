"""asr-loadtest --protocol grpc | ws-openai | ws-deepgram: a few seconds of real streams against a
real server (its gRPC port, or its WebSocket port), each giving per-chunk client latencies."""

import asyncio
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import running_server

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
async def server():
    async with running_server(ws_port=0) as pair:
        yield pair


async def loadtest(*args: str) -> tuple[int, dict | None, str]:
    proc = await asyncio.create_subprocess_exec(str(BIN / "asr-loadtest"), *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, json.loads(out) if proc.returncode == 0 else None, err.decode()


@pytest.mark.parametrize("protocol", ["grpc", "ws-openai", "ws-deepgram"])
async def test_loadtest_measures_chunk_latency_over_each_protocol(server, protocol):
    srv, _ = server
    port = srv.port if protocol == "grpc" else srv.ws_port
    code, doc, err = await loadtest("--protocol", protocol, "--server", f"127.0.0.1:{port}", "--streams", "2",
                                    "--duration", "4", "--ramp-up", "1", "--json")
    assert code == 0, err
    assert doc["model"] == "random-small" and doc["protocol"] == protocol
    assert doc["errors"] == {} and doc["streams_completed"] >= 2 and doc["audio_seconds"] > 0
    latency = doc["chunk_latency_ms"]
    # 2 streams for 4 s of 160 ms chunks: about 50 results; OpenAI's deltas only where the text grows
    assert latency["count"] >= (20 if protocol != "ws-openai" else 5), latency
    assert 0 < latency["p50"] <= latency["p99"] < 2000, latency
    assert doc["time_to_first_result_ms"]["count"] >= 2 and doc["final_result_latency_ms"]["count"] >= 2
    server_timed = doc["server_chunk_latency_ms"]["count"]
    assert server_timed == (latency["count"] if protocol == "grpc" else 0)
    assert (doc["stream_rtf"]["count"] > 0) == (protocol == "grpc")


async def test_loadtest_reports_a_refused_websocket_stream():
    async with running_server(ws_port=0, max_streams=1) as (srv, _):
        import websockets
        async with websockets.connect(f"ws://127.0.0.1:{srv.ws_port}/v1/realtime"):  # holds the one place
            code, _, err = await loadtest("--protocol", "ws-deepgram", "--server", f"127.0.0.1:{srv.ws_port}",
                                          "--streams", "1", "--duration", "1", "--ramp-up", "0")
    assert code != 0 and ("HTTP_429" in err or "429" in err), err
