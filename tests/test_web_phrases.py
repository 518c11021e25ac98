"""The browser page's phrases field, end to end: real headless Chromium (Debian's) whose fake
microphone plays a sample, the page's config message, the asr-web bridge, and the gRPC request the
bridge makes (recorded by a servicer on a real port)."""

from __future__ import annotations

import asyncio
import json
import time

import soundfile

from client import web
from server.model.loading import load_model
from tests.browser import chromium_page, padded_wav
from tests.conftest import ROOT, SAMPLES, running_server
from tests.test_phrases import recording_server


async def _page_session(url: str, wav, phrases: str, boost: str, seconds: float = 1.5, decoding: str = "0",
                        timeout_s: float = 60) -> tuple[str, list[str]]:
    """Open the page, type ``phrases`` and ``boost``, stream ``seconds`` of the microphone, stop;
    returns the page's final state and its final transcripts."""
    sent = 0

    def on_websocket(ws):
        def on_frame(payload):
            nonlocal sent
            if isinstance(payload, bytes):
                sent += len(payload)

        ws.on("framesent", on_frame)

    async with chromium_page(wav) as page:
        page.on("websocket", on_websocket)
        await page.goto(url)
        await page.wait_for_function("document.body.dataset.backend", timeout=timeout_s * 1000)
        await page.fill("#phrases", phrases)
        await page.fill("#boost", boost)
        await page.select_option("#decoding", decoding)
        await page.click("#toggle")
        await page.wait_for_function("document.body.dataset.state === 'streaming'", timeout=timeout_s * 1000)
        deadline = time.monotonic() + timeout_s
        while sent < seconds * 32000:
            assert time.monotonic() < deadline, f"the page sent only {sent} bytes of audio in time"
            await asyncio.sleep(0.05)
        await page.click("#toggle")
        await page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)",
                                     timeout=timeout_s * 1000)
        state = await page.evaluate("document.body.dataset.state") + ": " + await page.text_content("#status")
        return state, await page.locator("#finals li .text").all_text_contents()


async def test_page_sends_its_phrases_and_boost_through_the_bridge(tmp_path):
    wav = tmp_path / "microphone.wav"
    padded_wav(sorted(SAMPLES.glob("*.wav"))[0], wav)
    async with recording_server() as (address, servicer):
        runner, port = await web.start(web.create_app(address))
        try:
            url = f"http://127.0.0.1:{port}/"
            state, finals = await _page_session(url, wav, "harriet\n\n   home  depot \n", "3.5")
            assert state == "done: done" and finals == ["heard"], (state, finals)
            state, finals = await _page_session(url, wav, "", "")
            assert state == "done: done" and finals == ["heard"], (state, finals)
            # a boost of 0 (or none) is the server's default: the page sends none
            state, _ = await _page_session(url, wav, "ikea", "0")
            assert state == "done: done", state
        finally:
            await runner.cleanup()
    sent = [[(list(c.phrases), c.boost) for c in config.speech_contexts] for config in servicer.configs]
    assert sent == [[(["harriet", "home depot"], 3.5)], [], [(["ikea"], 0.0)]]


async def test_page_phrase_makes_the_demo_model_recognise_a_name_it_misses(tmp_path):
    """The phrases reach the real server: the fake microphone says 'video call beatrice' (a held-out
    voice; the demo model never heard 'beatrice'); with beam 4 the page shows the name only when
    'beatrice' is in its phrases field."""
    bias_set = ROOT / "tests" / "data" / "bias-phrases"
    row = json.loads((bias_set / "manifest.jsonl").read_text().splitlines()[0])
    assert (row["text"], row["phrase"]) == ("video call beatrice", "beatrice")
    speech = tmp_path / "speech.wav"
    audio, rate = soundfile.read(str(bias_set / row["audio"]), dtype="int16")
    soundfile.write(str(speech), audio, rate, subtype="PCM_16")
    wav = tmp_path / "microphone.wav"
    seconds = padded_wav(speech, wav)
    async with running_server(model=load_model("demo")) as (server, _):
        runner, port = await web.start(web.create_app(f"127.0.0.1:{server.port}"))
        try:
            url = f"http://127.0.0.1:{port}/"
            # stop inside the trailing silence, after endpointing's 800 ms
            plain_state, plain = await _page_session(url, wav, "", "", seconds=seconds - 0.8, decoding="4")
            state, biased = await _page_session(url, wav, "beatrice", "8", seconds=seconds - 0.8, decoding="4")
        finally:
            await runner.cleanup()
    assert plain_state == "done: done" and state == "done: done", (plain_state, state)
    assert plain and "beatrice" not in " ".join(plain).split(), plain
    assert biased == ["video call beatrice"], biased
