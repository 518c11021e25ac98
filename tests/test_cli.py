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
    assert rc == 2 and "cannot read" in err
