"""A non-editable install: the wheel holds the server, the clients, the stubs and the demo model
(package data), and the server's own requirements hold no client, plotting, audio-device or
evaluation package (those are the ``client``, ``eval`` and ``train`` extras)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import grpc
import pytest
import soundfile

from asr.v1 import asr_pb2, asr_pb2_grpc
from tests.conftest import ROOT

CLIENT_ONLY = {"matplotlib", "sounddevice", "jiwer", "aiohttp", "tqdm", "psutil", "soundfile", "playwright",
               "pytest", "openai", "deepgram-sdk"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # the native kernels are left out here (ASR_BUILD_KERNELS=0): a minute of g++ per back end;
    # `make venv` and the Dockerfile build them, and the server runs torch's kernels without them
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, cwd=out, env={**os.environ, "ASR_BUILD_KERNELS": "0"}, timeout=300)
    (path,) = out.glob("*.whl")
    return path


def requirements(wheel: Path) -> tuple[set[str], dict[str, set[str]]]:
    """The wheel's requirements: its own, and each extra's."""
    with zipfile.ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    own, extras = set(), {}
    for req in meta.get_all("Requires-Dist"):
        name = req.split(";")[0].split("==")[0].split("[")[0].strip().lower()
        if "extra ==" in req:
            extras.setdefault(req.split("extra ==")[1].strip().strip("'\""), set()).add(name)
        else:
            own.add(name)
    return own, extras


def test_the_server_install_pulls_no_client_or_evaluation_package(wheel):
    own, extras = requirements(wheel)
    assert {"torch", "grpcio", "prometheus-client", "websockets"} <= own
    assert not own & CLIENT_ONLY, own & CLIENT_ONLY
    assert {"matplotlib", "sounddevice", "aiohttp"} <= extras["client"]
    assert "jiwer" in extras["eval"] and "jiwer" in extras["train"]
    assert "pytest" in extras["dev"]


def test_the_wheel_holds_the_layers_and_the_demo_model(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("server/api", "server/core", "server/model", "server/kernels", "server/kernels/native",
                    "server/observability", "client", "asr/v1"):
        assert f"{package}/__init__.py" in names, package
    for name in ("config.json", "model.pt", "tokens.txt", "global_stats.json"):
        assert f"server/model/demo/{name}" in names
    assert "server/kernels/native/operators.h" in names
    assert not any(n.startswith(("tests/", "train/", "bench/", "models/")) for n in names)


def test_an_installed_server_serves_the_demo_model_outside_the_source_tree(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=120)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "ASR_LOG_LEVEL": "info"}
    where = subprocess.run([sys.executable, "-c", "import server.model.loading as m; print(m.DEMO_DIR)"],
                           cwd=run_dir, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the installed copy, not the source tree
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--model", "demo", "--host", "127.0.0.1",
                             "--port", "0", "--metrics-port", "-1"], cwd=run_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "listening on" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
            assert line, "the server stopped before listening"
        port = int(line.rsplit(":", 1)[1])
        wav = sorted((ROOT / "samples").glob("*.wav"))[0]
        audio, rate = soundfile.read(wav, dtype="int16")
        config = asr_pb2.StreamingRecognitionConfig(config=asr_pb2.RecognitionConfig(
            encoding=asr_pb2.LINEAR16, sample_rate_hertz=rate))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = asr_pb2_grpc.SpeechRecognitionStub(channel)
            info = stub.GetModelInfo(asr_pb2.GetModelInfoRequest(), timeout=30)
            requests = [asr_pb2.StreamingRecognizeRequest(streaming_config=config)]
            requests += [asr_pb2.StreamingRecognizeRequest(audio_content=audio[i:i + 3200].tobytes())
                         for i in range(0, len(audio), 3200)]
            finals = [r.alternatives[0].transcript for response in stub.StreamingRecognize(iter(requests), timeout=120)
                      for r in response.results if r.is_final]
        assert info.model_name == "demo"
        # the samples are utterances the demo model gets right
        assert " ".join(finals).split() == wav.with_suffix(".txt").read_text().lower().split(), finals
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
