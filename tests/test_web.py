"""asr-web end to end: real headless Chromium whose fake microphone plays a bundled sample, the
page's AudioWorklet and WebSocket, the bridge, a real gRPC server; plus the bridge's protocol."""

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soundfile

from client import web
from server.models import DEMO_DIR, load_demo
from tests.browser import padded_wav, transcribe_in_browser
from tests.conftest import SAMPLES, running_server, small_model
from tests.helpers import final_results

BIN = Path(sys.executable).parent


def _cross_correlation(signal: np.ndarray, piece: np.ndarray) -> np.ndarray:
    """``sum(signal[lag:lag + len(piece)] * piece)`` for every lag at which the piece fits."""
    n = 1 << int(np.ceil(np.log2(len(signal) + len(piece))))
    corr = np.fft.irfft(np.fft.rfft(signal, n) * np.conj(np.fft.rfft(piece, n)), n)
    return corr[:len(signal) - len(piece) + 1]


def tracked_piece_correlations(recorded: np.ndarray, reference: np.ndarray, piece: int = 4000,
                               search: int = 1600) -> list[float]:
    """Pearson correlation of each voiced ``piece``-sample stretch of ``reference`` with ``recorded``,
    following the alignment piece by piece: the whole reference fixes the first lag, each piece
    searches ``search`` samples either side of the last one's. A capture that drops a few frames
    shifts what follows; tracking keeps each piece aligned, so a drop costs only the piece it is in,
    and a piece can never match a similar-sounding stretch elsewhere."""
    if len(recorded) < len(reference):
        return [0.0]
    lag = int(np.argmax(_cross_correlation(recorded, reference)))
    loudness = np.sqrt(np.mean(reference ** 2))
    scores = []
    for start in range(0, len(reference) - piece + 1, piece):
        part = reference[start:start + piece]
        low = max(0, lag + start - search)
        high = max(low, min(len(recorded) - piece, lag + start + search))
        found = low + int(np.argmax(_cross_correlation(recorded[low:high + piece], part)))
        lag = found - start
        if np.sqrt(np.mean(part ** 2)) >= 0.3 * loudness:
            heard = recorded[found:found + piece]
            scores.append(float(np.corrcoef(heard, part)[0, 1]) if heard.std() > 0 else 0.0)
    return scores


@pytest.mark.parametrize("model_name", ["random-small", "demo"])
async def test_browser_page_shows_what_the_grpc_api_gives_for_the_microphone_audio(tmp_path, model_name):
    if model_name == "demo":
        assert (DEMO_DIR / "config.json").is_file(), f"the trained demo model must ship in {DEMO_DIR}"
    model = load_demo() if model_name == "demo" else small_model()
    sample = sorted(SAMPLES.glob("*.wav"))[0]
    speech, _ = soundfile.read(str(sample), dtype="float32")
    wav = tmp_path / "microphone.wav"
    seconds = padded_wav(sample, wav)
    async with running_server(model=model) as (server, stub):
        runner, port = await web.start(web.create_app(f"127.0.0.1:{server.port}", save_audio=tmp_path / "saved"))
        try:
            # Stop inside the trailing silence, after endpointing's 800 ms and before the loop restarts.
            page = await transcribe_in_browser(f"http://127.0.0.1:{port}/", wav, stop_after_s=seconds - 0.8,
                                               screenshot=tmp_path / "web.png")
        finally:
            await runner.cleanup()
        saved = list((tmp_path / "saved").glob("*.wav"))
        assert len(saved) == 1
        audio, rate = soundfile.read(str(saved[0]), dtype="float32")
        assert rate == 16000 and len(audio) * 2 == page.sent_bytes
        # The page captured the sample itself, resampled to 16 kHz, through Chromium's microphone.
        # On a loaded machine Chromium's fake capture can drop a few 10 ms frames; the alignment
        # follows the shifts, so only the pieces with a drop in them score lower.
        scores = tracked_piece_correlations(audio, speech)
        assert len(scores) >= 8 and np.median(scores) > 0.95, scores
        assert min(scores) > 0.25, f"a stretch of the sample is missing from what the page sent: {scores}"
        # ...and shows exactly the finals the gRPC API gives for that audio: one recognition path.
        expected = [r.alternatives[0].transcript for r in await final_results(stub, audio)]
        expected = [t for t in expected if t]
    assert expected and page.finals == expected
    assert page.saw_interim, "the page never showed an interim transcript"
    assert all(re.fullmatch(r"\d+ ms", latency) for latency in page.final_latencies), page.final_latencies
    assert re.search(r"last result: server \d+ ms \(queue \d+ ms, compute \d+ ms", page.stats), page.stats
    assert (tmp_path / "web.png").stat().st_size > 10_000
    if model_name == "demo":
        assert page.finals[0] == sample.with_suffix(".txt").read_text().strip()


async def _ws_session(port: int, first, audio: bytes = b"") -> list[dict]:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
            await (ws.send_str(json.dumps(first)) if isinstance(first, dict) else ws.send_bytes(first))
            for offset in range(0, len(audio), 5120):
                await ws.send_bytes(audio[offset:offset + 5120])
            await ws.send_str("end")
            return [json.loads(msg.data) async for msg in ws]


async def test_bridge_forwards_results_with_timing_and_server_errors(small_server):
    server, stub = small_server
    speech, _ = soundfile.read(str(sorted(SAMPLES.glob("*.wav"))[1]), dtype="int16")
    runner, port = await web.start(web.create_app(f"127.0.0.1:{server.port}"))
    try:
        messages = await _ws_session(port, {"sample_rate": 16000, "endpointing": False}, speech.tobytes())
        assert messages[0] == {"type": "ready", "model": "random-small"} and messages[-1] == {"type": "end"}
        results = messages[1:-1]
        assert results and all(m["type"] == "result" for m in results)
        assert any(not m["is_final"] for m in results)
        assert all(m["latency_ms"] >= 0 and m["batch_size"] >= 1 for m in results)
        finals = [m["transcript"] for m in results if m["is_final"]]
        expected = await final_results(stub, speech.astype(np.float32) / 32768, endpointing=False)
        assert finals == [r.alternatives[0].transcript for r in expected]
        # The server validates, the bridge passes its status on.
        messages = await _ws_session(port, {"sample_rate": 1000}, b"\0\0" * 100)
        assert messages[-1]["type"] == "error" and messages[-1]["code"] == "INVALID_ARGUMENT"
        assert "sample_rate" in messages[-1]["message"]
        messages = await _ws_session(port, b"\0\0")
        assert messages == [{"type": "error", "code": "INVALID_ARGUMENT",
                             "message": 'the first message must be a JSON config such as {"sample_rate": 16000}'}]
    finally:
        await runner.cleanup()


async def test_bridge_cancels_the_grpc_stream_when_the_browser_goes_away(small_server):
    server, _ = small_server
    runner, port = await web.start(web.create_app(f"127.0.0.1:{server.port}"))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                await ws.send_str(json.dumps({"sample_rate": 16000}))
                await ws.send_bytes(b"\0\0" * 16000)
                assert (await ws.receive_json(timeout=30))["type"] == "ready"
                for _ in range(100):
                    if server.active_sessions == 1:
                        break
                    await asyncio.sleep(0.05)
                assert server.active_sessions == 1
        for _ in range(200):  # closed without "end": the session is freed, not left open
            if server.active_sessions == 0:
                break
            await asyncio.sleep(0.05)
        assert server.active_sessions == 0
    finally:
        await runner.cleanup()


def test_asr_web_serves_the_page_and_its_worklet(tmp_path):
    proc = subprocess.Popen([str(BIN / "asr-web"), "--port", "0", "--server", "127.0.0.1:1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")

        async def get(path):
            async with aiohttp.ClientSession() as http:
                async with http.get(match.group(1) + path) as response:
                    return response.status, await response.text()

        status, page = asyncio.run(get(""))
        assert status == 200 and "/static/app.js" in page
        status, worklet = asyncio.run(get("static/pcm-worklet.js"))
        assert status == 200 and "registerProcessor('pcm16'" in worklet
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert subprocess.run([str(BIN / "asr-web"), "--tls-cert", "x.pem"], capture_output=True,
                          text=True).returncode == 2
