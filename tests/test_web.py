"""asr-web end to end: real headless Chromium whose fake microphone plays a bundled sample, the
page's AudioWorklet and WebSocket, the bridge, a real gRPC server; plus the bridge's protocol."""

import asyncio
import contextlib
import json
import logging
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soundfile
from aiohttp import web as aioweb

from client import web
from client.connection import Connection
from server.model.loading import DEMO_DIR, load_demo
from tests.browser import chromium_page, padded_wav, transcribe_in_browser
from server.app import AsrServer
from server.config import ServerSettings
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
    # The page checked the backend on load, metered the microphone (the sample between digital
    # silence), and dropped no audio.
    assert page.backend == f"Server: {model.name} (fp32, cpu), reachable.", page.backend
    assert min(page.levels) == -60 and max(page.levels) > -30, page.levels
    # (Results can lag for real here: other tests may load this machine's cores.)
    assert not [w for w in page.warnings if "dropped" in w], page.warnings
    if model_name == "demo":
        assert page.finals[0] == sample.with_suffix(".txt").read_text().strip()



@contextlib.asynccontextmanager
async def bridge(target: str | Connection, **options):
    """An in-process asr-web bridge to ``target`` on a free loopback port; yields the port."""
    runner, port = await web.start(web.create_app(target, **options))
    try:
        yield port
    finally:
        await runner.cleanup()


async def _ws_session(port: int, first, audio: bytes = b"", chunk: int = 5120, headers=None) -> list[dict]:
    """One WebSocket session: ``first``, the audio, ``end``; returns the bridge's messages, then
    ``{"closed": code}`` for how the bridge closed the WebSocket."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{port}/ws", headers=headers) as ws:
            await (ws.send_str(first if isinstance(first, str) else json.dumps(first)) if isinstance(first, (str, dict))
                   else ws.send_bytes(first))
            with contextlib.suppress(ConnectionResetError):
                for offset in range(0, len(audio), chunk):
                    await ws.send_bytes(audio[offset:offset + chunk])
                await ws.send_str("end")
            messages = [json.loads(msg.data) async for msg in ws]
            return messages + [{"closed": ws.close_code}]


async def test_bridge_forwards_results_with_timing_and_server_errors(small_server):
    server, stub = small_server
    speech, _ = soundfile.read(str(sorted(SAMPLES.glob("*.wav"))[1]), dtype="int16")
    async with bridge(f"127.0.0.1:{server.port}") as port:
        messages = await _ws_session(port, {"sample_rate": 16000, "endpointing": False}, speech.tobytes())
        assert messages[0] == {"type": "ready", "model": "random-small"} and messages[-2:] == [{"type": "end"},
                                                                                                {"closed": 1000}]
        results = messages[1:-2]
        assert results and all(m["type"] == "result" for m in results)
        assert any(not m["is_final"] for m in results)
        assert all(m["latency_ms"] >= 0 and m["batch_size"] >= 1 for m in results)
        finals = [m["transcript"] for m in results if m["is_final"]]
        expected = await final_results(stub, speech.astype(np.float32) / 32768, endpointing=False)
        assert finals == [r.alternatives[0].transcript for r in expected]
        # What the bridge lets through and the server refuses: the server's status, on one line.
        messages = await _ws_session(port, {"sample_rate": 16000, "beam": 32}, b"\0\0" * 100)
        assert messages[-2]["type"] == "error" and messages[-2]["code"] == "INVALID_ARGUMENT"
        assert "beam" in messages[-2]["message"] and "\n" not in messages[-2]["message"]


BAD_CONFIGS = [  # (first message, a word the one-line reason must name)
    (b"\0\0", "JSON config"), ("not json", "JSON config"), ("[16000]", "JSON config"), ("x" * 5000, "JSON config"),
    ({}, "sample_rate"), ({"sample_rate": "16000"}, "sample_rate"), ({"sample_rate": 10**12}, "sample_rate"),
    ({"sample_rate": 16000.5}, "sample_rate"), ({"sample_rate": True}, "sample_rate"),
    ({"sample_rate": 1000}, "sample_rate"), ({"sample_rate": 16000, "beam": "abc"}, "beam"),
    ({"sample_rate": 16000, "beam": -1}, "beam"), ({"sample_rate": 16000, "beam": [4]}, "beam"),
    ({"sample_rate": 16000, "endpointing": "no"}, "endpointing"),
    ({"sample_rate": 16000, "request_id": {"a": 1}}, "request_id"),
    ({"sample_rate": 16000, "request_id": "r" * 129}, "request_id"),
    ({"sample_rate": 16000, "lang": "en"}, "'lang'"),
]


async def test_bridge_answers_bad_configs_and_messages_with_one_line_and_a_clean_close(small_server, caplog):
    server, _ = small_server
    caplog.set_level(logging.WARNING)
    async with bridge(f"127.0.0.1:{server.port}") as port:
        for first, word in BAD_CONFIGS:
            messages = await _ws_session(port, first, b"\0\0" * 1600)
            assert len(messages) == 2 and messages[-1] == {"closed": 1000}, (first, messages)
            error = messages[0]
            assert error["type"] == "error" and error["code"] == "INVALID_ARGUMENT", (first, error)
            assert word in error["message"] and "\n" not in error["message"] and len(error["message"]) <= 200, error
        assert server.active_sessions == 0
        # After the config: a message over 64 KiB, or text other than "end".
        messages = await _ws_session(port, {"sample_rate": 16000}, b"\0" * (web.MAX_MESSAGE_BYTES + 2),
                                     chunk=web.MAX_MESSAGE_BYTES + 2)
        assert messages[0]["type"] == "ready" and messages[-1] == {"closed": 1009}, messages
        assert messages[-2] == {"type": "error", "code": "RESOURCE_EXHAUSTED", "message":
                                f"a message of {web.MAX_MESSAGE_BYTES + 2} bytes is over the bridge's limit of "
                                f"{web.MAX_MESSAGE_BYTES}"}
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                await ws.send_str(json.dumps({"sample_rate": 16000}))
                await ws.send_str('{"sample_rate": 8000}')
                replies = [json.loads(msg.data) async for msg in ws]
                assert replies[-1]["code"] == "INVALID_ARGUMENT" and ws.close_code == 1000, replies
            # Beyond 4x the limit aiohttp closes with 1009 without reading the message whole.
            async with http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                await ws.send_bytes(b"\0" * (web.HARD_MESSAGE_BYTES + 2))
                assert [msg async for msg in ws] == [] and ws.close_code == 1009
        # Nothing raised in the bridge, and it still serves.
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
        messages = await _ws_session(port, {"sample_rate": 16000}, b"\0\0" * 16000)
        assert messages[0]["type"] == "ready" and messages[-2:] == [{"type": "end"}, {"closed": 1000}]


async def test_bridge_cancels_the_grpc_stream_when_the_browser_goes_away(small_server):
    server, _ = small_server
    async with bridge(f"127.0.0.1:{server.port}") as port:
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


async def _get(url: str, headers=None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers) as response:
            return response.status, await response.text()


async def test_bridge_refuses_other_origins_and_foreign_hosts(small_server, caplog):
    server, _ = small_server
    caplog.set_level(logging.WARNING)
    async with bridge(f"127.0.0.1:{server.port}", allow_origins=["https://app.example:8443"]) as port:
        own = f"http://127.0.0.1:{port}"
        refused = [{"Origin": "http://evil.example"}, {"Origin": f"http://127.0.0.1:{port + 1}"},
                   {"Origin": f"https://127.0.0.1:{port}"}, {"Origin": "null"}, {"Origin": "https://app.example"},
                   # DNS rebinding: a name of the attacker's that resolves to this machine
                   {"Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}"}]
        for headers in refused:
            for path in ("/ws", "/api/status"):
                status, text = await _get(own + path, headers)
                assert status == 403 and text.startswith("asr-web: ") and text.count("\n") == 1, (headers, text)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
                await _ws_session(port, {"sample_rate": 16000}, headers=headers)
            assert refusal.value.status == 403
        assert "origin 'http://evil.example' may not use this bridge" in caplog.text
        assert f"Host 'evil.example:{port}' is not this bridge's" in caplog.text
        allowed = [None, {"Origin": own}, {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"},
                   {"Origin": "https://app.example:8443"}, {"Origin": "https://APP.example:8443/"},
                   {"Origin": "https://app.example:8443", "Host": "app.example:8443"}]
        for headers in allowed:
            status, text = await _get(own + "/api/status", headers)
            assert status == 200 and json.loads(text) == {"reachable": True, "model": "random-small",
                                                          "precision": "fp32", "device": "cpu"}, (headers, text)
            messages = await _ws_session(port, {"sample_rate": 16000}, b"\0\0" * 1600, headers=headers)
            assert messages[0]["type"] == "ready" and messages[-2]["type"] == "end", (headers, messages)
        assert (await _get(own + "/", {"Origin": "http://evil.example"}))[0] == 200  # the page itself is public


ATTACKER_PAGE = """<!doctype html><script>
window.outcome = new Promise((resolve) => {
  const got = [];
  const ws = new WebSocket('ws://127.0.0.1:%d/ws');
  ws.onopen = () => ws.send(JSON.stringify({sample_rate: 16000}));
  ws.onmessage = (event) => {
    got.push(JSON.parse(event.data));
    if (got.length === 1) ws.send(new Int16Array(16000).buffer), ws.send('end');
  };
  ws.onclose = (event) => resolve({got, code: event.code});
});
window.apiStatus = fetch('http://127.0.0.1:%d/api/status').then((r) => r.text(), (err) => 'refused: ' + err.name);
</script>"""


async def test_a_page_on_another_site_cannot_use_the_bridge_or_its_token(tmp_path):
    """The red team's attack, in a real browser: a page from another origin opens the bridge's
    WebSocket, which carries a token to a server that requires one, and reads its status."""
    token = "bridge-token-0123456789abcdef"
    (tmp_path / "tokens").write_text(token + "\n")
    wav = tmp_path / "microphone.wav"
    padded_wav(sorted(SAMPLES.glob("*.wav"))[0], wav)
    bridge_port = {}
    attacker = aioweb.Application()

    async def page(request):
        return aioweb.Response(text=ATTACKER_PAGE % (bridge_port["port"], bridge_port["port"]),
                                content_type="text/html")

    attacker.router.add_get("/", page)
    runner, attacker_port = await web.start(attacker)
    try:
        async with running_server(auth_token_file=tmp_path / "tokens") as (server, _):
            target = Connection(f"127.0.0.1:{server.port}", token=token)
            for allowed in ([], [f"http://127.0.0.1:{attacker_port}"]):
                async with bridge(target, allow_origins=allowed) as bridge_port["port"]:
                    async with chromium_page(wav) as tab:
                        await tab.goto(f"http://127.0.0.1:{attacker_port}/")
                        outcome = await tab.evaluate("window.outcome")
                        status = await tab.evaluate("window.apiStatus")
                if allowed:  # the check is what stops it: allowed, the same page uses the server
                    assert outcome["got"][0] == {"type": "ready", "model": "random-small"}, outcome
                    assert json.loads(status)["reachable"] is True, status
                else:
                    assert outcome == {"got": [], "code": 1006}, outcome
                    assert status == "refused: TypeError", status
    finally:
        await runner.cleanup()


async def _spawn_asr_web(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(str(BIN / "asr-web"), "--port", "0", *args,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def _page_url(proc: asyncio.subprocess.Process) -> tuple[str, int]:
    """The URL ``asr-web`` prints once it serves, and its port."""
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    match = re.search(r"open (http://127\.0\.0\.1:(\d+)/)", line)
    assert match, (line, (await proc.stderr.read()).decode() if not line else "")
    return match.group(1), int(match.group(2))


@contextlib.asynccontextmanager
async def asr_web(*args: str):
    """``asr-web --port 0 ARGS`` as a process; yields it, the page's URL and port once it serves."""
    proc = await _spawn_asr_web(*args)
    try:
        yield (proc, *await _page_url(proc))
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_asr_web_checks_the_server_at_start_up_and_serves_the_page(small_server):
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    proc = await _spawn_asr_web("--server", f"127.0.0.1:{port}", "--server-wait-s", "2")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and out == b"" and time.monotonic() - started >= 2
    assert re.fullmatch(rf"asr-web: the gRPC server 127\.0\.0\.1:{port} does not answer: UNAVAILABLE: [^\n]+\n",
                        err.decode()), err
    # A server that comes up within --server-wait-s is found.
    proc = await _spawn_asr_web("--server", f"127.0.0.1:{port}", "--server-wait-s", "60")
    try:
        await asyncio.sleep(1.5)
        assert proc.returncode is None
        late = AsrServer(ServerSettings(host="127.0.0.1", port=port, model="random-small", metrics_port=0,
                                        metrics_host="127.0.0.1"), model=small_model())
        await late.start()
        try:
            url, _ = await _page_url(proc)
            assert json.loads((await _get(url + "api/status"))[1])["model"] == "random-small"
        finally:
            await late.stop(grace=0.5)
    finally:
        proc.terminate()
        await proc.wait()
    # Up: the page, its worklet and the backend's status.
    server, _ = small_server
    async with asr_web("--server", f"127.0.0.1:{server.port}") as (proc, url, _):
        status, page = await _get(url)
        assert status == 200 and "/static/app.js" in page and 'id="level"' in page
        status, worklet = await _get(url + "static/pcm-worklet.js")
        assert status == 200 and "registerProcessor('pcm16'" in worklet
        status, text = await _get(url + "api/status")
        assert status == 200 and json.loads(text) == {"reachable": True, "model": "random-small",
                                                      "precision": "fp32", "device": "cpu"}
    for bad in (["--tls-cert", "x.pem"], ["--allow-origin", "evil.example"], ["--allow-origin", "https://a.example/x"],
                ["--save-audio-max-mb", "0"]):
        done = subprocess.run([str(BIN / "asr-web"), *bad], capture_output=True, text=True)
        assert done.returncode == 2 and "asr-web: error: " in done.stderr, (bad, done.stderr)


def _rss(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024


async def test_bridge_keeps_no_audio_in_memory_and_saves_it_to_disk_as_it_comes(small_server, tmp_path):
    """180 s of 48 kHz audio (17 MB) through the real asr-web process: its memory does not grow with
    the audio, with or without --save-audio; the WAV is on disk while the session runs, and holds
    --save-audio-max-seconds of it."""
    server, _ = small_server
    rate, seconds, cap = 48000, 180, 60
    audio = (np.random.default_rng(0).standard_normal(seconds * rate) * 3000).astype("<i2").tobytes()
    config = {"sample_rate": rate, "endpointing": False}
    saved = tmp_path / "saved"
    for save in ([], ["--save-audio", str(saved), "--save-audio-max-seconds", str(cap)]):
        async with asr_web("--server", f"127.0.0.1:{server.port}", *save) as (proc, url, port):
            await _ws_session(port, config, audio[:3 * 2 * rate], chunk=15360)  # warm up
            before = _rss(proc.pid)
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                    await ws.send_str(json.dumps(config))
                    for offset in range(0, len(audio), 15360):
                        await ws.send_bytes(audio[offset:offset + 15360])
                        if save and offset == len(audio) // 2 // 15360 * 15360:  # halfway: already on disk
                            newest = lambda: max(saved.glob("*.wav"), key=lambda p: p.stat().st_mtime_ns)  # noqa
                            for _ in range(600):
                                if newest().stat().st_size >= cap * rate:
                                    break
                                await asyncio.sleep(0.05)
                            assert newest().stat().st_size >= cap * rate, "the audio is not written as it comes"
                    await ws.send_str("end")
                    messages = [json.loads(msg.data) async for msg in ws]
            assert messages[-1] == {"type": "end"}, messages[-3:]
            growth = _rss(proc.pid) - before
            assert growth < len(audio) / 4, f"asr-web grew by {growth / 1e6:.1f} MB over a session of " \
                                            f"{len(audio) / 1e6:.1f} MB of audio ({save or 'no --save-audio'})"
        if save:
            files = sorted(saved.glob("*.wav"), key=lambda p: p.stat().st_mtime_ns)
            assert len(files) == 2 and soundfile.info(str(files[0])).frames == 3 * rate
            info = soundfile.info(str(files[1]))
            assert info.samplerate == rate and info.frames == cap * rate
            kept, _ = soundfile.read(str(files[1]), dtype="int16")
            assert kept.tobytes() == audio[:cap * rate * 2]
            assert f"reached --save-audio-max-seconds ({cap} s)" in (await proc.stderr.read()).decode()


async def test_save_audio_stops_when_the_folder_is_full(small_server, tmp_path, caplog):
    server, _ = small_server
    caplog.set_level(logging.WARNING)
    saved = tmp_path / "saved"
    audio = (np.random.default_rng(1).standard_normal(15 * 48000) * 3000).astype("<i2").tobytes()  # 1.44 MB
    config = {"sample_rate": 48000, "endpointing": False}
    async with bridge(f"127.0.0.1:{server.port}", save_audio=saved, save_audio_max_mb=1) as port:
        assert (await _ws_session(port, config, audio, chunk=15360))[-2] == {"type": "end"}
        files = list(saved.glob("*.wav"))
        assert len(files) == 1 and 900_000 < files[0].stat().st_size <= 1_000_100
        assert "--save-audio-max-mb is 1.0: not saving audio" in caplog.text
        # Full: the next session is recognised and saves nothing; once there is room, saving resumes.
        caplog.clear()
        assert (await _ws_session(port, config, audio[:96000], chunk=15360))[-2] == {"type": "end"}
        assert list(saved.glob("*.wav")) == files and "not saving audio" in caplog.text
        files[0].unlink()
        assert (await _ws_session(port, config, audio[:96000], chunk=15360))[-2] == {"type": "end"}
        assert [soundfile.info(str(f)).frames for f in saved.glob("*.wav")] == [48000]


async def test_page_shows_the_backend_and_errors_on_one_line(tmp_path):
    wav = tmp_path / "microphone.wav"
    padded_wav(sorted(SAMPLES.glob("*.wav"))[0], wav)

    async def error_shown(tab) -> str:
        await tab.click("#toggle")
        await tab.wait_for_function("document.body.dataset.state === 'error'", timeout=60_000)
        status = await tab.text_content("#status")
        assert "\n" not in status and "{" not in status and "Traceback" not in status and len(status) <= 200, status
        return status

    async with contextlib.AsyncExitStack() as servers:
        server, _ = await servers.enter_async_context(running_server(max_beam_width=4))
        async with bridge(f"127.0.0.1:{server.port}") as port, chromium_page(wav) as tab:
            await tab.goto(f"http://127.0.0.1:{port}/")
            await tab.wait_for_function("document.body.dataset.backend === 'up'", timeout=30_000)
            assert await tab.text_content("#backend") == "Server: random-small (fp32, cpu), reachable."
            await tab.select_option("#decoding", "8")  # over the server's --max-beam-width
            assert re.fullmatch(r"error: INVALID_ARGUMENT: .*beam.*", await error_shown(tab))
            await servers.aclose()  # the server goes away
            await tab.reload()
            await tab.wait_for_function("document.body.dataset.backend === 'down'", timeout=30_000)
            backend = await tab.text_content("#backend")
            assert backend.startswith("Server unreachable: UNAVAILABLE: ") and "\n" not in backend, backend
            assert (await error_shown(tab)).startswith("error: UNAVAILABLE: ")


@contextlib.asynccontextmanager
async def slow_uplink(port: int, bytes_per_second: float):
    """A TCP proxy to ``port`` that passes what the browser sends at ``bytes_per_second`` (the
    answers at full speed), with small socket buffers: a slow network link. Yields its port."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)  # keeps the sender's buffer small too
    listener.bind(("127.0.0.1", 0))
    tasks = set()

    async def pipe(reader, writer, rate):
        with contextlib.suppress(OSError):
            while data := await reader.read(512 if rate else 65536):
                writer.write(data)
                await writer.drain()
                if rate:
                    await asyncio.sleep(len(data) / rate)
        writer.close()

    async def connection(reader, writer):
        tasks.add(asyncio.current_task())
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, upstream_writer, bytes_per_second), pipe(upstream_reader, writer, None))

    proxy = await asyncio.start_server(connection, sock=listener, limit=1024)
    try:
        yield listener.getsockname()[1]
    finally:
        proxy.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_page_meters_the_microphone_and_warns_of_lag_and_dropped_audio(small_server, tmp_path):
    """Over a link slower than the audio (1 kB/s for 32 kB/s), results fall behind and the
    WebSocket backs up: the page says so, and drops audio instead of queueing it without end."""
    server, _ = small_server
    wav = tmp_path / "microphone.wav"
    padded_wav(sorted(SAMPLES.glob("*.wav"))[0], wav)
    async with bridge(f"127.0.0.1:{server.port}") as port, slow_uplink(port, 1000) as slow_port:
        async with chromium_page(wav) as tab:
            await tab.goto(f"http://127.0.0.1:{slow_port}/")
            await tab.wait_for_function("document.body.dataset.backend === 'up'", timeout=30_000)
            await tab.click("#toggle")
            warnings, levels = set(), []
            deadline = time.monotonic() + 90
            while not any("dropped" in w for w in warnings) and time.monotonic() < deadline:
                warnings.add(await tab.text_content("#warning"))
                levels.append(await tab.evaluate("document.getElementById('level').value"))
                await asyncio.sleep(0.1)
            session = await tab.evaluate("({sent: session.sent, dropped: session.dropped})")
    lag = [float(m.group(1)) for w in warnings if (m := re.search(r"results lag the audio by (\d+\.\d) s", w))]
    assert lag and max(lag) > 1, warnings
    dropped = [w for w in warnings if "dropped" in w]
    assert dropped and re.search(r"\d+\.\d s of audio dropped: the connection to the bridge is too slow", dropped[0])
    assert session["dropped"] > 0 and max(levels) > -30, (session, levels)
