"""The console scripts as users run them: asr-server options, asr-client against a real server."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import ServerSettings
from tests.conftest import SAMPLES, running_server

BIN = Path(sys.executable).parent


def run(*args, env=None, timeout=60):
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_server_help_lists_every_option_with_its_environment_variable():
    out = run("asr-server", "--help").stdout
    for name in ServerSettings.model_fields:
        assert f"--{name.replace('_', '-')}" in out
        assert f"ASR_{name.upper()}" in out


@pytest.mark.parametrize("args, env, option", [
    (["--port", "70000"], {}, "--port"),
    (["--max-batch", "0"], {}, "--max-batch"),
    ([], {"ASR_PRECISION": "fp64"}, "--precision"),
    (["--model", "nonsense"], {}, "--model"),
    (["--model", "bundle:/does/not/exist"], {}, "--model"),
    (["--beam-width", "20", "--max-beam-width", "8"], {}, "--beam-width"),
    (["--kernels", "sse"], {}, "--kernels"),
    ([], {"ASR_KERNELS": "avx1024"}, "--kernels"),
])
def test_server_refuses_invalid_options_naming_them(args, env, option):
    result = run("asr-server", *args, env=env)
    assert result.returncode == 2
    assert option in result.stderr, result.stderr


def test_readme_documents_every_option():
    readme = (SAMPLES.parent / "README.md").read_text()
    for name in ServerSettings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in readme and f"`ASR_{name.upper()}`" in readme, name


async def _client(*args):
    proc = await asyncio.create_subprocess_exec(str(BIN / "asr-client"), *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_file_client_prints_finals_and_json(small_server):
    server, _ = small_server
    wav = sorted(SAMPLES.glob("*.wav"))[1]
    address = f"127.0.0.1:{server.port}"
    rc, out, err = await _client(str(wav), "--server", address, "--fast", "--no-endpointing")
    assert rc == 0, err
    lines = [line for line in out.splitlines() if line and not line.startswith("…")]
    assert len(lines) == 1 and lines[0].strip(), out  # one final transcript line
    rc, out, err = await _client(str(wav), "--server", address, "--fast", "--json", "--words", "--request-id", "r-7")
    assert rc == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    assert docs and all(d["request_id"] == "r-7" for d in docs)
    finals = [r for d in docs for r in d["results"] if r.get("is_final")]
    assert finals and finals[-1]["alternatives"][0]["transcript"]
    assert any("client_latency_ms" in d for d in docs)


async def test_file_client_real_time_pace_takes_the_audio_duration(small_server):
    server, _ = small_server
    wav = sorted(SAMPLES.glob("*.wav"))[3]
    import soundfile

    seconds = soundfile.info(str(wav)).duration
    start = asyncio.get_running_loop().time()
    rc, out, err = await _client(str(wav), "--server", f"127.0.0.1:{server.port}")
    assert rc == 0, err
    assert asyncio.get_running_loop().time() - start >= seconds * 0.9


async def test_file_client_exits_nonzero_with_the_server_status(tmp_path):
    async with running_server(max_message_bytes=4096) as (server, _):
        wav = sorted(SAMPLES.glob("*.wav"))[0]
        rc, out, err = await _client(str(wav), "--server", f"127.0.0.1:{server.port}", "--fast",
                                     "--chunk-ms", "1000")
        assert rc == 1
        assert "RESOURCE_EXHAUSTED" in err
    rc, out, err = await _client(str(tmp_path / "missing.wav"))
    assert rc == 2 and "no such file" in err and "System error" not in err
    (tmp_path / "garbage.wav").write_bytes(b"RIFF nonsense")
    rc, out, err = await _client(str(tmp_path / "garbage.wav"))
    assert rc == 2 and "cannot read" in err


# every format soundfile writes that a user may hand over, and how close each comes to the 16-bit original
WAV_FORMATS = [("FLOAT", 0), ("DOUBLE", 0), ("PCM_24", 0), ("PCM_32", 0), ("PCM_U8", 1 / 128), ("ULAW", 0.03),
               ("ALAW", 0.03)]


@pytest.mark.parametrize("subtype, tolerance", WAV_FORMATS)
def test_read_wav_decodes_every_sample_format_to_the_same_pcm(tmp_path, subtype, tolerance):
    """A float, 24-bit, 32-bit, 8-bit or A-law / mu-law WAV of a 16-bit sample decodes to that sample's
    PCM (exactly where the format holds 16 bits), never to near-silence."""
    import numpy as np
    import soundfile

    from client.cli import read_wav

    wav = sorted(SAMPLES.glob("*.wav"))[0]
    original, rate = soundfile.read(str(wav), dtype="int16")
    converted = tmp_path / f"{subtype}.wav"
    soundfile.write(str(converted), original.astype(np.float64) / 32768, rate, subtype=subtype)
    pcm, got_rate, channels = read_wav(converted)
    got = np.frombuffer(pcm, "<i2").astype(np.float64) / 32768
    assert (got_rate, channels, len(got)) == (rate, 1, len(original))
    error = np.abs(got - original / 32768)
    if tolerance == 0:
        assert error.max() == 0, subtype
    else:  # companded / 8-bit formats: relative to the signal, and loud, not near-silent
        assert np.sqrt(np.mean(error ** 2)) < tolerance * np.sqrt(np.mean((original / 32768) ** 2)) + 1 / 256
    assert np.abs(got).max() > 0.1


async def test_file_client_transcribes_a_float_wav_as_its_16_bit_original(small_server, tmp_path):
    import soundfile

    server, _ = small_server
    wav = sorted(SAMPLES.glob("*.wav"))[1]
    data, rate = soundfile.read(str(wav), dtype="float32")
    soundfile.write(str(tmp_path / "float.wav"), data, rate, subtype="FLOAT")
    address = f"127.0.0.1:{server.port}"
    outputs = []
    for path in (wav, tmp_path / "float.wav"):
        rc, out, err = await _client(str(path), "--server", address, "--fast", "--no-endpointing", "--no-interim")
        assert rc == 0, err
        outputs.append(out.strip())
    assert outputs[0] and outputs[1] == outputs[0]


async def test_start_up_errors_come_before_the_model_loads(tmp_path, monkeypatch):
    """A certificate that is not PEM, a taken metrics port or a taken gRPC port stop the server before
    it loads the model (a full-size model takes tens of seconds), with a message naming the option."""
    import socket

    import server.app
    from server.app import AsrServer

    loads = []
    monkeypatch.setattr(server.app, "load_model", lambda *args: loads.append(args))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    cases = [({"tls_cert": tmp_path / "cert.pem", "tls_key": tmp_path / "key.pem"}, ValueError, "--tls-cert"),
             ({"metrics_port": busy}, OSError, "--metrics-port"),
             ({"port": busy}, OSError, "--port")]
    try:
        for overrides, error, option in cases:
            settings = ServerSettings(**{"host": "127.0.0.1", "port": 0, "metrics_host": "127.0.0.1",
                                         "metrics_port": 0, "model": "random-base", **overrides})
            server = AsrServer(settings)
            with pytest.raises(error, match=option):
                await server.start()
            assert server.metrics_port == 0 and server.server is None, "what was started is stopped again"
    finally:
        taken.close()
    assert loads == [], "the model must not be loaded before the options that can fail are checked"
