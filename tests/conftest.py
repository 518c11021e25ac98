"""Shared fixtures: a real grpc.aio server on a free loopback port, real audio samples."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests import tests.reference

# Under pytest-xdist (`make test-fast` runs `-n 2`) each worker gets its share of the cores for torch's
# intra-op threads, and so do the servers it starts as subprocesses (they inherit OMP_NUM_THREADS): with
# one thread per core in every worker the cores are oversubscribed, and a parallel operator waits for
# its slowest thread (server/core/threads.py), which then makes a step many times slower. Serial runs
# keep torch's default (one thread per core); an OMP_NUM_THREADS already set is left as it is. The few
# tests that ask for two threads (the thread governor's) would still find the other worker on a core:
# OpenMP's threads then sleep at a barrier instead of spinning (OMP_WAIT_POLICY=PASSIVE), or a spinning
# thread takes the CPU time that the thread it waits for needs (measured here: 5x the CPU time).
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if XDIST_WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // XDIST_WORKERS)))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from asr.v1 import asr_pb2_grpc  # noqa: E402
import torch  # noqa: E402
from server.kernels import native  # noqa: E402
from client.stream import channel  # noqa: E402
from server.app import AsrServer  # noqa: E402
from server.config import ServerSettings  # noqa: E402
from server.model.loading import LoadedModel, RANDOM_SMALL_BLANK_BIAS, SMALL_CONFIG, random_model  # noqa: E402
from server.model.vocabulary import CharTokenTable  # noqa: E402

if XDIST_WORKERS > 1:  # torch may have been imported (by a plugin) before OMP_NUM_THREADS was set
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SAMPLES = ROOT / "samples"
# every --kernels path but auto; ASR_TEST_KERNELS=active (make test-fast) keeps only the one this CPU
# selects, ASR_TEST_KERNELS=avx2,torch (a comma list) the ones named
_ALL_KERNEL_PATHS = [*native.BACKENDS, "torch"]
_CHOSEN = os.environ.get("ASR_TEST_KERNELS", "")
KERNEL_PATHS = ([native.active()] if _CHOSEN == "active" else
                [k for k in _ALL_KERNEL_PATHS if k in _CHOSEN.split(",")] if _CHOSEN else _ALL_KERNEL_PATHS)
if not KERNEL_PATHS:
    raise ValueError(f"ASR_TEST_KERNELS={_CHOSEN!r} names none of {', '.join(_ALL_KERNEL_PATHS)} (or 'active')")


def why_cpu_cannot_run(backend: str) -> str | None:
    """The instructions this CPU lacks for ``backend`` (``None``: it has them; auto and torch need none)."""
    missing = [flag for flag in native.REQUIRED_FLAGS.get(backend, ()) if flag not in native.cpu_flags()]
    return f"this CPU lacks {', '.join(missing)}: the {backend} kernels cannot run here" if missing else None


def skip_unless_cpu_runs(backend: str) -> None:
    """Skip, naming the instructions, where this CPU physically cannot run ``backend``; a back end the
    CPU could run but that was not built is a failure (``native.select`` raises), never a skip."""
    reason = why_cpu_cannot_run(backend)
    if reason:
        pytest.skip(reason)


@contextlib.contextmanager
def kernels_selected(backend: str):
    """Run the block with ``backend``'s native kernels active (``server.kernels.native.select``); engines
    and encoders built inside keep them."""
    skip_unless_cpu_runs(backend)
    previous = native.active()
    native.select(backend)
    try:
        yield backend
    finally:
        native.select(previous)


INITIAL_KERNELS = native.active()  # ASR_KERNELS, else auto
INITIAL_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _kernels_restored():
    """Each test starts on the session's kernels, whatever an engine built by an earlier one
    selected (engines keep the operators they were built with), and on the session's torch intra-op
    threads, whatever an engine built with ``threads=`` set (``torch.set_num_threads`` is global)."""
    native.select(INITIAL_KERNELS)
    if torch.get_num_threads() != INITIAL_THREADS:
        torch.set_num_threads(INITIAL_THREADS)
    yield


@pytest.fixture(params=KERNEL_PATHS)
def kernels(request):
    """Each --kernels path in turn (skipped only where the CPU lacks its instructions)."""
    with kernels_selected(request.param) as backend:
        yield backend


def small_model(seed: int = 0) -> LoadedModel:
    """A seeded random model of the demo's structure that emits a token every few frames."""
    return random_model(SMALL_CONFIG, seed, blank_bias=RANDOM_SMALL_BLANK_BIAS, tokens=CharTokenTable.default(),
                        name="random-small")


@pytest.fixture(scope="session")
def speech() -> list[tuple[str, np.ndarray, str]]:
    """The bundled samples: (name, 16 kHz float32 mono waveform, reference transcript)."""
    out = []
    for wav in sorted(SAMPLES.glob("*.wav")):
        audio, rate = soundfile.read(wav, dtype="float32")
        assert rate == 16000 and audio.ndim == 1, f"{wav} must be 16 kHz mono"
        out.append((wav.stem, audio, wav.with_suffix(".txt").read_text().strip()))
    assert out, f"no samples in {SAMPLES}"
    return out


@contextlib.asynccontextmanager
async def running_server(model: LoadedModel | None = None, **overrides):
    """Start an AsrServer on 127.0.0.1:<free port> (metrics on another free port, ``server.metrics_port``);
    yields (server, stub). Load shedding is off unless asked for (``latency_budget_ms``): on a
    loaded test machine it would refuse streams the tests expect to run."""
    overrides = {"metrics_host": "127.0.0.1", "metrics_port": 0, "latency_budget_ms": 0, **overrides}
    settings = ServerSettings(host="127.0.0.1", port=0, model="random-small", **overrides)
    server = AsrServer(settings, model=model or small_model())
    port = await server.start()
    try:
        async with channel(f"127.0.0.1:{port}") as ch:
            yield server, asr_pb2_grpc.SpeechRecognitionStub(ch)
    finally:
        await server.stop(grace=0.5)


@pytest.fixture(scope="module")
async def small_server():
    async with running_server() as pair:
        yield pair


# --- test layers -------------------------------------------------------------------------------
# unit: no server, no other process (fakes where a part is needed); integration: a real server on a
# real port in this process, or this project's own processes, nothing from apt; system: programs
# from apt (Chromium, Prometheus, HAProxy, synthesizers, g++), pip builds, several server processes.
# `make test-fast` runs unit and integration; a test may carry its own layer mark instead.
LAYERS = {
    "unit": {"test_boundaries", "test_context_graph", "test_decoder", "test_features", "test_mic", "test_models",
             "test_scheduler", "test_session", "test_threads", "test_moe", "test_compose", "test_resume"},
    "integration": {"test_abuse", "test_admission", "test_bad_input", "test_batching_invariance", "test_biasing",
                    "test_cli",
                    "test_client_connection", "test_compat", "test_deepgram_keepalive", "test_docs", "test_drain", "test_equivalence",
                    "test_google_speech", "test_health", "test_interim_results", "test_limits", "test_loadtest",
                    "test_loadtest_ws", "test_metrics", "test_phrases", "test_proto", "test_refusal_pacing", "test_riva", "test_security",
                    "test_websocket", "test_websocket_limits"},
    "system": {"test_alerting", "test_bias_data", "test_demo_model", "test_deploy", "test_emulated_cpu", "test_fleet",
               "test_gc_pauses",
               "test_hostile_clients", "test_http2_abuse", "test_k8s", "test_packaging", "test_precision",
               "test_prometheus", "test_proxy_auth", "test_read_only", "test_scale_in", "test_nginx", "test_training", "test_web",
               "test_web_phrases",
               "test_websocket_browser"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(layer) for layer in LAYERS):
            continue
        module = item.path.stem
        if module not in LAYER_OF:
            raise pytest.UsageError(f"tests/{item.path.name} has no layer: add it to LAYERS in tests/conftest.py")
        item.add_marker(LAYER_OF[module])
