"""Drive the asr-web page in real headless Chromium (Debian's, never a downloaded one) whose fake
microphone plays a WAV. Used by tests/test_web.py and scripts/web_screenshot.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

CHROMIUM = Path("/usr/bin/chromium")


def chromium_args(wav: Path) -> list[str]:
    """Chromium flags: grant the microphone without asking, feed it ``wav`` (looped), stay offline."""
    return ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--no-sandbox", "--disable-background-networking",
            "--disable-component-update"]


def padded_wav(source: Path, target: Path, lead_s: float = 1.0, tail_s: float = 2.5) -> float:
    """``source`` between stretches of silence, written to ``target``: Chromium's fake microphone
    loops its file, the silence lets endpointing end the utterance before the loop comes back.
    Returns the duration in seconds."""
    audio, rate = soundfile.read(str(source), dtype="int16")
    padded = np.concatenate([np.zeros(int(lead_s * rate), np.int16), audio, np.zeros(int(tail_s * rate), np.int16)])
    soundfile.write(str(target), padded, rate, subtype="PCM_16")
    return len(padded) / rate


@dataclass
class PageRun:
    finals: list[str]  # the final transcripts the page shows
    final_latencies: list[str]  # the latency shown next to each
    saw_interim: bool  # the interim line showed text while streaming
    stats: str  # the timing line under the transcript
    sent_bytes: int  # audio the page sent over its WebSocket
    backend: str  # the backend status line
    levels: list[float]  # the input level meter's values (dBFS), polled while streaming
    warnings: set[str]  # every text the warning line showed while streaming


@contextlib.asynccontextmanager
async def chromium_page(wav: Path):
    """A new page of a headless Chromium whose fake microphone plays ``wav``."""
    from playwright.async_api import async_playwright

    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} not found: 'make test-apt' installs Debian's chromium")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(wav))
        try:
            yield await browser.new_page(viewport={"width": 900, "height": 560})
        finally:
            await browser.close()


def count_sent_audio(page) -> Callable[[], int]:
    """Count the binary (audio) bytes ``page`` sends over its WebSockets from now on; returns a
    function that reads the count. The page sends 16 kHz int16 audio: 32000 bytes a second."""
    sent = 0

    def on_websocket(ws):
        def on_frame(payload):
            nonlocal sent
            if isinstance(payload, bytes):
                sent += len(payload)

        ws.on("framesent", on_frame)

    page.on("websocket", on_websocket)
    return lambda: sent


async def stream_from_microphone(page, sent: Callable[[], int], seconds: float, timeout_s: float = 90,
                                 on_poll: Callable[[], Awaitable[None]] | None = None) -> None:
    """Press Start, wait until ``seconds`` of audio went out (``sent``, from ``count_sent_audio``),
    awaiting ``on_poll`` every 50 ms meanwhile, press Stop and wait until the page is done or in
    error (the caller checks which)."""
    await page.click("#toggle")
    await page.wait_for_function("document.body.dataset.state === 'streaming'", timeout=timeout_s * 1000)
    deadline = time.monotonic() + timeout_s
    while sent() < seconds * 32000:
        assert time.monotonic() < deadline, f"the page sent only {sent()} bytes of audio in time"
        if on_poll:
            await on_poll()
        await asyncio.sleep(0.05)
    await page.click("#toggle")
    await page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)",
                                 timeout=timeout_s * 1000)


async def transcribe_in_browser(url: str, wav: Path, stop_after_s: float, screenshot: Path | None = None,
                                timeout_s: float = 90,
                                before_start: Callable[[object], Awaitable[None]] | None = None) -> PageRun:
    """Open the page, wait for its backend check, await ``before_start(page)`` (to fill in fields),
    press Start, press Stop once ``stop_after_s`` seconds of audio were sent, wait for the last
    result; return what the page shows."""
    async with chromium_page(wav) as page:
        sent = count_sent_audio(page)
        await page.goto(url)
        await page.wait_for_function("document.body.dataset.backend", timeout=timeout_s * 1000)
        backend = await page.text_content("#backend")
        if before_start:
            await before_start(page)
        saw_interim, levels, warnings = False, [], set()

        async def watch() -> None:
            nonlocal saw_interim
            state = await page.evaluate("document.body.dataset.state")
            assert state == "streaming", await page.text_content("#status")
            saw_interim = saw_interim or bool((await page.text_content("#interim")).strip())
            levels.append(await page.evaluate("document.getElementById('level').value"))
            warnings.add(await page.text_content("#warning"))

        await stream_from_microphone(page, sent, stop_after_s, timeout_s, on_poll=watch)
        assert await page.evaluate("document.body.dataset.state") == "done", await page.text_content("#status")
        run = PageRun(finals=await page.locator("#finals li .text").all_text_contents(),
                      final_latencies=await page.locator("#finals li .latency").all_text_contents(),
                      saw_interim=saw_interim, stats=await page.text_content("#stats"), sent_bytes=sent(),
                      backend=backend, levels=levels, warnings=warnings - {""})
        if screenshot:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(screenshot), full_page=True)
        return run
