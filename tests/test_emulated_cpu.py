"""The server on an AVX2 + FMA CPU without AVX-512, VNNI or AMX (AMD Zen 3), as every library sees
it, whatever CPU runs the tests: ``scripts/emulated_cpu.py`` (qemu-user's EPYC-Milan model, that
CPU's flags in ``/proc/cpuinfo``). torch, fbgemm and oneDNN dispatch by the emulated CPUID, so their
int8 GEMMs sum as they would on such a CPU (u8 x s8 pairs into 16 bits, where saturation made int8
fail before), and an AVX-512 instruction anywhere would kill the server.

Each configuration starts a real ``asr-server`` on the emulated CPU and checks what it says about
itself (start-up log and ``GetModelInfo``: kernel path, precision, batching exactness, the int8
self-check) and that it transcribes the bundled samples (greedy and beam 4) exactly as a server
on this machine does on the same kernel path with torch's libraries capped to AVX2. Emulation is
10-30x slower than the host: a server takes one to three minutes to start, so the samples are
short and few."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from asr.v1 import asr_pb2, asr_pb2_grpc
from client.stream import channel
from tests.conftest import ROOT
from tests.helpers import GREEDY, beam_options, transcript

sys.path.insert(0, str(ROOT / "scripts"))
from emulated_cpu import emulated_command  # noqa: E402

pytestmark = pytest.mark.timeout(900)

SAMPLES = sorted((ROOT / "samples").glob("*.wav"))[:2]
# torch's own libraries capped to what an AVX2-only CPU runs, for the server on this machine
AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


class Server:
    """A running ``asr-server`` child: its address and every line it printed up to 'listening'."""

    def __init__(self, argv: list[str], env: dict[str, str], timeout: float, until: str = r"listening on .*:(\d+)"):
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=ROOT, start_new_session=True)
        self.log: list[str] = []
        deadline = time.monotonic() + timeout
        port = None
        while port is None and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.append(line.rstrip())
            if match := re.search(until, line):
                port = int(match.group(1)) if match.groups() else 0
        if port is None:
            self.stop()
            raise AssertionError("asr-server did not start:\n" + "\n".join(self.log[-30:]))
        self.address = f"127.0.0.1:{port}"
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def line(self, pattern: str) -> str:
        found = [line for line in self.log if re.search(pattern, line)]
        assert found, f"no start-up line matches {pattern!r}:\n" + "\n".join(self.log)
        return found[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def server_args(precision: str, kernels: str) -> list[str]:
    return ["--model", "demo", "--precision", precision, "--kernels", kernels, "--host", "127.0.0.1",
            "--port", "0", "--metrics-port", "-1", "--log-level", "info"]


async def transcripts_and_info(address: str) -> tuple[list[str], asr_pb2.ModelInfo]:
    async with channel(address) as ch:
        stub = asr_pb2_grpc.SpeechRecognitionStub(ch)
        info = await stub.GetModelInfo(asr_pb2.GetModelInfoRequest())
        texts = []
        for path in SAMPLES:
            audio, rate = soundfile.read(path, dtype="float32")
            assert rate == 16000
            for options in (GREEDY, beam_options(4)):
                texts.append(await transcript(stub, np.asarray(audio), **options))
        return texts, info


def test_the_emulated_cpu_offers_avx2_and_fma_only():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "emulated_cpu.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch CPU capability: AVX2" in out.stdout
    assert "CPU features (/proc/cpuinfo): avx2\n" in out.stdout
    assert "native kernel paths this CPU runs: avx2, portable - auto selects avx2" in out.stdout


def test_fp32_on_torch_kernels_is_batch_exact_on_an_avx2_cpu():
    """oneDNN's packed fp32 linear keeps each row's bits whatever the row count on AVX2 too. Only
    the start-up verdict: under emulation this path's step costs seconds per stream, so its
    start-up step calibration alone takes about ten minutes."""
    with tempfile.TemporaryDirectory(prefix="emulated-cpu-") as where:
        argv, env = emulated_command(["asr-server", *server_args("fp32", "torch")], Path(where))
        emulated = Server(argv, env, timeout=600, until="batching: ")
        emulated.stop()
    assert "CPU matrix features: avx2;" in emulated.line("CPU matrix features")
    assert "kernels: torch" in emulated.line(r"kernels: ")
    assert "batching: bit-exact" in emulated.line("batching: ")


@pytest.mark.parametrize("precision, kernels, path", [
    ("int8", "auto", "avx2"),     # the default path on such a CPU: the native AVX2 kernels, 7-bit weights
    ("int8", "torch", "torch"),   # torch's own int8 GEMMs, as fbgemm and oneDNN run them on AVX2
])
def test_server_on_an_avx2_cpu_is_exact_and_transcribes_as_here(precision, kernels, path):
    with tempfile.TemporaryDirectory(prefix="emulated-cpu-") as where:
        argv, env = emulated_command(["asr-server", *server_args(precision, kernels)], Path(where))
        emulated = Server(argv, env, timeout=600)
        try:
            emulated_texts, info = asyncio.run(transcripts_and_info(emulated.address))
        finally:
            emulated.stop()
    assert "CPU matrix features: avx2;" in emulated.line("CPU matrix features")
    assert f"kernels: {path}" in emulated.line(r"kernels: ")
    assert "batching: bit-exact" in emulated.line("batching: ")
    assert (info.precision, info.kernels, info.batching_exact) == (precision, path, True)
    if precision == "int8":
        check = emulated.line("precision self-check")
        error, bound = (float(x) for x in re.findall(r"relative error ([\d.e+-]+) \(bound ([\d.e+-]+)\)", check)[0])
        assert error < 0.05 < bound, check   # the saturating sums gave 0.2-0.3 here

    here = Server([str(Path(sys.executable).parent / "asr-server"), *server_args(precision, kernels)],
                  dict(os.environ, **AVX2_CAPS), timeout=300)
    try:
        texts, _ = asyncio.run(transcripts_and_info(here.address))
    finally:
        here.stop()
    references = [path.with_suffix(".txt").read_text().strip() for path in SAMPLES for _ in range(2)]
    assert texts == references, "the demo model should transcribe its bundled samples here (greedy, beam 4)"
    assert emulated_texts == texts
