"""The shipped clients reach a server that requires TLS, a client certificate and a token."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from client.connection import ConnectionOptionError, add_connection_args, connection_from_args
from server.model.loading import load_demo
from tests.conftest import SAMPLES, running_server
from tests.test_security import TOKENS, pki, token_file  # noqa: F401  (fixtures)

BIN = Path(sys.executable).parent


async def _run(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
def demo():
    return load_demo()


async def test_clients_with_mutual_tls_and_a_token(pki, token_file, demo, tmp_path):  # noqa: F811
    _, paths = pki
    sample = sorted(SAMPLES.glob("*.wav"))[0]
    reference = sample.with_suffix(".txt").read_text().strip()
    async with running_server(model=demo, tls_cert=paths["server"][0], tls_key=paths["server"][1],
                              tls_client_ca=paths["ca"][0], auth_token_file=token_file,
                              auth_exempt_health=False) as (server, _):
        address = f"127.0.0.1:{server.port}"
        secure = ["--server", address, "--tls-ca", str(paths["ca"][0]), "--tls-cert", str(paths["client"][0]),
                  "--tls-key", str(paths["client"][1])]
        rc, out, err = await _run(str(BIN / "asr-client"), str(sample), "--fast", "--no-interim", *secure,
                                  "--token-file", str(token_file))
        assert rc == 0, err
        assert out.strip() == reference

        rc, out, err = await _run(str(BIN / "asr-client"), str(sample), "--fast", *secure)  # no token
        assert rc != 0 and "UNAUTHENTICATED" in err, (rc, err)

        rc, out, err = await _run(str(BIN / "asr-client"), str(sample), "--fast", "--server", address,
                                  "--token-file", str(token_file))  # plaintext to a TLS server
        assert rc != 0 and "UNAVAILABLE" in err, (rc, err)

        token_only = tmp_path / "token"
        token_only.write_text(TOKENS[1] + "\n")
        rc, out, err = await _run(str(BIN / "asr-healthcheck"), *secure, "--token-file", str(token_only))
        assert (rc, out.strip()) == (0, "SERVING"), err

        rc, out, err = await _run(str(BIN / "asr-eval"), str(SAMPLES), *secure, "--greedy", "--json",
                                  env={"ASR_TOKEN": TOKENS[0], "PATH": str(BIN)})
        assert rc == 0, err
        assert json.loads(out)["wer"] == 0.0


def _args(argv: list[str], prefix: str = ""):
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--server", default="localhost:50051")
    add_connection_args(p, prefix=prefix)
    return p.parse_args(argv)


def test_connection_options_are_validated(tmp_path, monkeypatch):
    monkeypatch.delenv("ASR_TOKEN", raising=False)
    with pytest.raises(ConnectionOptionError, match="go together"):
        connection_from_args(_args(["--tls-cert", "c.pem"]))
    with pytest.raises(ConnectionOptionError, match="cannot be read"):
        connection_from_args(_args(["--tls-ca", str(tmp_path / "missing.pem")]))
    with pytest.raises(ConnectionOptionError, match="needs --tls"):
        connection_from_args(_args(["--tls-server-name", "asr.example"]))
    empty = tmp_path / "empty"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ConnectionOptionError, match="holds no token"):
        connection_from_args(_args(["--token-file", str(empty)]))
    plain = connection_from_args(_args([]))
    assert (plain.tls, plain.token, plain.metadata) == (False, None, ())
    monkeypatch.setenv("ASR_TOKEN", "from-the-environment")
    assert connection_from_args(_args([])).metadata == (("authorization", "Bearer from-the-environment"),)
    # the browser bridge names them --grpc-*, its own --tls-cert serves HTTPS
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    conn = connection_from_args(_args(["--grpc-tls-ca", str(ca)], prefix="grpc-"), prefix="grpc-")
    assert conn.tls and conn.ca.startswith(b"-----BEGIN")


async def test_a_bad_connection_option_exits_2_with_the_reason(tmp_path):
    rc, _, err = await _run(str(BIN / "asr-client"), str(sorted(SAMPLES.glob("*.wav"))[0]),
                            "--token-file", str(tmp_path / "nope"))
    assert rc == 2 and "--token-file" in err and "cannot be read" in err
