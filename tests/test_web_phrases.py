"""The browser page's phrases field, end to end: real headless Chromium (Debian's) whose fake
microphone plays a sample, the page's config message, the asr-web bridge, and the gRPC request the
bridge makes (recorded by a servicer on a real port)."""

from __future__ import annotations

import json

import pytest
import soundfile

from client import web
from server.model.loading import load_model
from tests.browser import padded_wav, transcribe_in_browser
from tests.conftest import ROOT, SAMPLES, running_server
from tests.test_phrases import recording_server


async def _page_session(url: str, wav, phrases: str, boost: str, seconds: float = 1.5, decoding: str | None = "0",
                        timeout_s: float = 60) -> list[str]:
    """Open the page, type ``phrases`` and ``boost``, stream ``seconds`` of the microphone, stop;
    returns the page's final transcripts (the page must end done, not in error)."""

    async def fill_in(page) -> None:
        await page.fill("#phrases", phrases)
        await page.fill("#boost", boost)
        if decoding is not None:  # the page served by the server's WebSocket port has no decoding choice
            await page.select_option("#decoding", decoding)

    run = await transcribe_in_browser(url, wav, stop_after_s=seconds, timeout_s=timeout_s, before_start=fill_in)
    return run.finals


async def test_page_sends_its_phrases_and_boost_through_the_bridge(tmp_path):
    wav = tmp_path / "microphone.wav"
    padded_wav(sorted(SAMPLES.glob("*.wav"))[0], wav)
    async with recording_server() as (address, servicer):
        runner, port = await web.start(web.create_app(address))
        try:
            url = f"http://127.0.0.1:{port}/"
            finals = await _page_session(url, wav, "harriet\n\n   home  depot \n", "3.5")
            assert finals == ["heard"], finals
            finals = await _page_session(url, wav, "", "")
            assert finals == ["heard"], finals
            # a boost of 0 (or none) is the server's default: the page sends none
            await _page_session(url, wav, "ikea", "0")
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
            plain = await _page_session(url, wav, "", "", seconds=seconds - 0.8, decoding="4")
            biased = await _page_session(url, wav, "beatrice", "8", seconds=seconds - 0.8, decoding="4")
        finally:
            await runner.cleanup()
    assert plain and "beatrice" not in " ".join(plain).split(), plain
    assert biased == ["video call beatrice"], biased


@pytest.mark.slow
async def test_page_served_by_the_server_sends_its_phrases_as_deepgram_keyterm_and_keywords(tmp_path):
    """The page on the server's WebSocket port (Deepgram to /v1/listen): a phrase without a boost
    goes as ``keyterm`` (the server's default boost, 8 here), with one as ``keywords=PHRASE:BOOST``;
    the demo model (the server's default beam 4) shows 'beatrice' only with the phrase."""
    bias_set = ROOT / "tests" / "data" / "bias-phrases"
    row = json.loads((bias_set / "manifest.jsonl").read_text().splitlines()[0])
    speech = tmp_path / "speech.wav"
    audio, rate = soundfile.read(str(bias_set / row["audio"]), dtype="int16")
    soundfile.write(str(speech), audio, rate, subtype="PCM_16")
    wav = tmp_path / "microphone.wav"
    seconds = padded_wav(speech, wav)
    async with running_server(model=load_model("demo"), ws_port=0, decoding_method="beam", beam_width=4,
                              default_boost=8) as (server, _):
        url = f"http://127.0.0.1:{server.ws_port}/"
        plain = await _page_session(url, wav, "", "", seconds=seconds - 0.8, decoding=None)
        keyterm = await _page_session(url, wav, "beatrice", "", seconds=seconds - 0.8, decoding=None)
        keywords = await _page_session(url, wav, "harriet\nbeatrice", "8", seconds=seconds - 0.8, decoding=None)
        weak = await _page_session(url, wav, "beatrice", "0.5", seconds=seconds - 0.8, decoding=None)
    assert plain and "beatrice" not in " ".join(plain).split(), plain
    assert keyterm == ["video call beatrice"], keyterm
    assert keywords == ["video call beatrice"], keywords
    assert "beatrice" not in " ".join(weak).split(), weak
