"""Contextual-biasing options of the clients (``--phrase``, ``--phrases-file``, ``--boost``).

What each client refuses before sending (empty phrases, control characters, a boost without
phrases, the server's reported limits), and the request each one builds: the console scripts
(``asr-client``, ``asr-eval``, ``asr-loadtest``) run as users run them against a gRPC server on a
real port whose servicer records the ``RecognitionConfig`` it receives (this checks the client side
of the wire only; what the server does with the phrases is tested with the server itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
from pathlib import Path

import grpc
import pytest

from asr.v1 import asr_pb2, asr_pb2_grpc
from client import cli, eval as asr_eval, loadtest
from client.phrases import Phrases, PhraseError, check_limits
from client.stream import StreamOptions
from client.web import BridgeError, parse_config
from tests.conftest import ROOT, SAMPLES

BIN = Path(sys.executable).parent
BIAS_SET = ROOT / "tests" / "data" / "bias-phrases"
LIMITS = asr_pb2.Limits(max_phrases=5, max_phrase_chars=20, min_boost=0.5, max_boost=8, default_boost=2)


def test_stream_options_carry_the_phrases_in_one_speech_context():
    config = StreamOptions(phrases=("harriet", "home depot"), boost=3.5).config(16000).config
    assert [(list(c.phrases), c.boost) for c in config.speech_contexts] == [(["harriet", "home depot"], 3.5)]
    assert not StreamOptions().config(16000).config.speech_contexts


def test_phrase_options_are_cleaned_and_joined(tmp_path):
    listed = tmp_path / "phrases.txt"
    listed.write_text("uncle walter\n\n  whole   foods \n")
    args = cli.build_parser().parse_args(["x.wav", "--phrase", "harriet", "--phrase", " taco\tbell ",
                                          "--phrases-file", str(listed), "--boost", "2.5"])
    from client.phrases import phrases_from_args
    assert phrases_from_args(args) == Phrases(("harriet", "taco bell", "uncle walter", "whole foods"), 2.5)


@pytest.mark.parametrize("options, files, message", [
    (["--phrase", ""], {}, "--phrase: empty phrase"),
    (["--phrase", "   "], {}, "--phrase: empty phrase"),
    (["--phrase", "a\nb"], {}, "line break or control character"),
    (["--phrases-file", "{missing}"], {}, "--phrases-file: no such file"),
    (["--phrases-file", "{blank}"], {"blank": "\n  \n"}, "holds no phrase"),
    (["--phrases-file", "{bad}"], {"bad": "ok\nfine\nnot\x07this\n"}, "line 3: the phrase 'not\\x07this'"),
    (["--boost", "3"], {}, "--boost needs phrases"),
    (["--phrase", "x", "--boost", "nan"], {}, "--boost: nan is not a number"),
])
def test_every_client_refuses_bad_phrase_options_before_connecting(tmp_path, capsys, options, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    options = [o.format(missing=tmp_path / "none.txt", **{n: tmp_path / n for n in files}) for o in options]
    wav = str(sorted(SAMPLES.glob("*.wav"))[0])
    manifest = str(BIAS_SET / "manifest.jsonl")
    # port 1: nothing listens there, so a client that got past its checks would fail otherwise
    for name, main, argv in (("asr-client", cli.main, [wav, "--server", "127.0.0.1:1"]),
                             ("asr-eval", asr_eval.main, [manifest, "--server", "127.0.0.1:1"]),
                             ("asr-loadtest", loadtest.main, ["--server", "127.0.0.1:1", "--duration", "1"])):
        assert main(argv + options) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"{name}: ") and message in err, (name, err)


@pytest.mark.parametrize("phrases, limits, message", [
    (Phrases(("a",) * 6), LIMITS, "6 phrases: the server takes at most 5 per request (max_phrases)"),
    (Phrases(("x" * 21,)), LIMITS, "has 21 characters: the server takes at most 20 (max_phrase_chars)"),
    (Phrases(("x",), 9.0), LIMITS, "--boost 9: the server takes a boost in [0.5, 8] (min_boost, max_boost), "
                                   "or 0 for its default (2)"),
    (Phrases(("x",), 0.25), LIMITS, "[0.5, 8]"),
    (Phrases(("x",)), asr_pb2.Limits(), "the server takes no phrases"),
])
def test_phrases_beyond_the_servers_limits_are_refused_naming_the_limit(phrases, limits, message):
    with pytest.raises(PhraseError) as refused:
        check_limits(phrases, limits)
    assert message in str(refused.value)


def test_phrases_within_the_limits_pass():
    check_limits(Phrases(("a",) * 5, 8.0), LIMITS)
    check_limits(Phrases(("x" * 20,), 0.0), LIMITS)  # 0: the server's default boost
    check_limits(Phrases(), asr_pb2.Limits())  # no phrases: nothing to check


def test_bridge_takes_phrases_and_a_boost_and_refuses_bad_ones():
    rate, options = parse_config(json.dumps({"sample_rate": 16000, "phrases": ["harriet", " home  depot "],
                                             "boost": 3}))
    assert rate == 16000 and options.phrases == ("harriet", "home depot") and options.boost == 3.0
    assert parse_config('{"sample_rate": 16000}')[1].phrases == ()
    for config, message in ((({"phrases": "harriet"}), "'phrases' must be a list of strings"),
                            (({"phrases": [1]}), "'phrases' must be a list of strings"),
                            (({"phrases": ["", "x"]}), "'phrases': empty phrase"),
                            (({"phrases": ["x"], "boost": "high"}), "'boost' must be a number"),
                            (({"boost": 2}), "'boost' needs 'phrases'")):
        with pytest.raises(BridgeError) as refused:
            parse_config(json.dumps({"sample_rate": 16000, **config}))
        assert refused.value.code == "INVALID_ARGUMENT" and message in str(refused.value), config
    assert math.isfinite(parse_config('{"sample_rate": 16000, "phrases": ["x"], "boost": 1e3}')[1].boost)


class RecordingServicer(asr_pb2_grpc.SpeechRecognitionServicer):
    """Answers GetModelInfo with ``limits`` and each stream with one final result; keeps every
    stream's RecognitionConfig."""

    def __init__(self, limits: asr_pb2.Limits):
        self.limits = limits
        self.configs: list[asr_pb2.RecognitionConfig] = []

    async def GetModelInfo(self, request, context):
        return asr_pb2.ModelInfo(model_name="recorder", sample_rate_hertz=16000, limits=self.limits)

    async def StreamingRecognize(self, request_iterator, context):
        first = True
        async for request in request_iterator:
            if first:
                self.configs.append(request.streaming_config.config)
                first = False
        yield asr_pb2.StreamingRecognizeResponse(results=[asr_pb2.StreamingRecognitionResult(
            is_final=True, alternatives=[asr_pb2.SpeechRecognitionAlternative(transcript="heard")])])


@contextlib.asynccontextmanager
async def recording_server(limits: asr_pb2.Limits = LIMITS):
    servicer = RecordingServicer(limits)
    server = grpc.aio.server()
    asr_pb2_grpc.add_SpeechRecognitionServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


async def _run(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(str(BIN / args[0]), *args[1:], stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def _contexts(config: asr_pb2.RecognitionConfig) -> list[tuple[list[str], float]]:
    return [(list(c.phrases), c.boost) for c in config.speech_contexts]


async def test_asr_client_sends_its_phrases_and_boost(tmp_path):
    listed = tmp_path / "phrases.txt"
    listed.write_text("whole foods\nhome depot\n")
    wav = str(sorted(SAMPLES.glob("*.wav"))[0])
    async with recording_server() as (address, servicer):
        rc, out, err = await _run("asr-client", wav, "--server", address, "--fast", "--phrase", "harriet",
                                  "--phrases-file", str(listed), "--boost", "3")
        assert rc == 0 and out.strip() == "heard", err
        rc, out, err = await _run("asr-client", wav, "--server", address, "--fast")
        assert rc == 0, err
    assert [_contexts(c) for c in servicer.configs] == [[(["harriet", "whole foods", "home depot"], 3.0)], []]


async def test_asr_client_refuses_phrases_beyond_the_servers_limits_without_streaming():
    wav = str(sorted(SAMPLES.glob("*.wav"))[0])
    async with recording_server() as (address, servicer):
        rc, _, err = await _run("asr-client", wav, "--server", address, "--phrase", "a phrase of many characters")
        assert rc == 2 and "has 27 characters: the server takes at most 20 (max_phrase_chars)" in err, err
        rc, _, err = await _run("asr-client", wav, "--server", address, "--phrase", "x", "--boost", "20")
        assert rc == 2 and "(min_boost, max_boost)" in err, err
    async with recording_server(asr_pb2.Limits()) as (address, servicer_without):
        rc, _, err = await _run("asr-client", wav, "--server", address, "--phrase", "x")
        assert rc == 2 and "the server takes no phrases" in err, err
    assert servicer.configs == [] and servicer_without.configs == []


async def test_asr_eval_sends_the_shared_phrases_and_each_utterances_own(tmp_path):
    rows = [json.loads(line) for line in (BIAS_SET / "manifest.jsonl").read_text().splitlines()][:3]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(dict(r, audio=str(BIAS_SET / r["audio"]))) + "\n" for r in rows))
    async with recording_server() as (address, servicer):
        rc, out, err = await _run("asr-eval", str(manifest), "--server", address, "--json", "--concurrency", "1",
                                  "--phrase", "taco bell", "--boost", "2", "--phrase-field", "phrase",
                                  "--send-phrase-field")
        assert rc == 0, err
        sent_own = [_contexts(c) for c in servicer.configs]
        servicer.configs.clear()
        rc, out, err = await _run("asr-eval", str(manifest), "--server", address, "--json", "--concurrency", "1",
                                  "--phrase-field", "phrase")
        assert rc == 0, err
        sent_none = [_contexts(c) for c in servicer.configs]
    assert sent_own == [[(["taco bell", r["phrase"]], 2.0)] for r in rows]
    assert sent_none == [[] for _ in rows]
    doc = json.loads(out)
    # the recorder says "heard" every time: no phrase is found
    assert doc["phrase_recall"] == {"phrases": 3, "found": 0, "recall": 0.0}
    assert [u["phrases"] for u in doc["per_utterance"]] == [[r["phrase"]] for r in rows]


async def test_asr_eval_refuses_a_phrase_field_that_is_missing_or_not_text(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "a.wav", "text": "hi", "phrase": ["ok", 3]}\n')
    rc, _, err = await _run("asr-eval", str(manifest), "--server", "127.0.0.1:1", "--phrase-field", "phrase")
    assert rc == 2 and "field 'phrase' must be a string or a list of strings" in err, err
    rc, _, err = await _run("asr-eval", str(manifest), "--server", "127.0.0.1:1", "--phrase-field", "names")
    assert rc == 2 and "a row has no field 'names'" in err, err
    rc, _, err = await _run("asr-eval", str(manifest), "--server", "127.0.0.1:1", "--send-phrase-field")
    assert rc == 2 and "--send-phrase-field needs --phrase-field" in err, err


async def test_asr_loadtest_sends_the_phrases_with_every_stream(tmp_path):
    async with recording_server() as (address, servicer):
        rc, out, err = await _run("asr-loadtest", "--server", address, "--streams", "2", "--duration", "1",
                                  "--ramp-up", "0", "--json", "--phrase", "harriet", "--phrase", "ikea",
                                  "--boost", "1.5")
        assert rc == 0, err
        assert len(servicer.configs) >= 2
        assert all(_contexts(c) == [(["harriet", "ikea"], 1.5)] for c in servicer.configs)
        rc, _, err = await _run("asr-loadtest", "--server", address, "--duration", "1", "--phrase", "x" * 21)
        assert rc == 1 and "max_phrase_chars" in err, err
    for protocol in ("ws-openai", "ws-deepgram"):
        rc, _, err = await _run("asr-loadtest", "--server", "127.0.0.1:1", "--protocol", protocol, "--phrase", "x")
        assert rc == 2 and f"--protocol {protocol} carries no phrases" in err, err


async def test_asr_client_phrase_makes_the_demo_model_recognise_a_name_it_misses():
    """The options reach the real server: 'video call beatrice' (a held-out voice; the demo model never
    heard 'beatrice') comes out without the name, and with ``--phrase beatrice`` it comes out right."""
    from server.model.loading import load_model
    from tests.conftest import running_server

    row = json.loads((BIAS_SET / "manifest.jsonl").read_text().splitlines()[0])
    assert (row["text"], row["phrase"]) == ("video call beatrice", "beatrice")
    audio = str(BIAS_SET / row["audio"])
    async with running_server(model=load_model("demo")) as (server, _):
        address = f"127.0.0.1:{server.port}"
        base = ["asr-client", audio, "--server", address, "--fast", "--no-endpointing", "--no-interim", "--beam", "4"]
        rc, plain, err = await _run(*base)
        assert rc == 0, err
        rc, biased, err = await _run(*base, "--phrase", "beatrice", "--boost", "8")
        assert rc == 0, err
    assert "beatrice" not in plain.split(), plain
    assert biased.strip() == "video call beatrice", biased
