"""TLS, mutual TLS and bearer-token auth on real servers, with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError
from riva.client.proto import riva_asr_pb2 as rasr
from riva.client.proto import riva_asr_pb2_grpc as rasr_grpc

from asr.v1 import asr_pb2, asr_pb2_grpc
from client.stream import StreamOptions, pcm16, stream_audio
from server.api import auth
from server.config import ServerSettings
from tests.conftest import running_server
from tests.helpers import transcript
from tests.observability import scrape, scrape_text

BIN = Path(sys.executable).parent
TOKENS = ("s3cret-token-0123456789abcdef", "another-accepted-token-ABCDEFGH")
WRONG = "wrong-token-but-looks-real-0000"


# --- certificates --------------------------------------------------------------------------------
@dataclass
class Pem:
    cert: bytes
    key: bytes
    _cert: x509.Certificate = None
    _key: ec.EllipticCurvePrivateKey = None


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(cn: str, issuer: Pem | None = None, *, ca: bool = False, server: bool = False) -> Pem:
    """An EC P-256 certificate for ``cn``, signed by ``issuer`` (self-signed without one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(cn))
               .issuer_name(issuer._cert.subject if issuer else _name(cn))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer._key if issuer else key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM),
               key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()), cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate from the CA and one from
    an unrelated CA; written to files for the server options."""
    d = tmp_path_factory.mktemp("pki")
    ca = make_cert("test CA", ca=True)
    rogue_ca = make_cert("rogue CA", ca=True)
    files = {"ca": ca, "server": make_cert("asr server", ca, server=True),
             "client": make_cert("good client", ca), "rogue": make_cert("rogue client", rogue_ca)}
    paths = {}
    for name, pem in files.items():
        (d / f"{name}.crt").write_bytes(pem.cert)
        (d / f"{name}.key").write_bytes(pem.key)
        paths[name] = (d / f"{name}.crt", d / f"{name}.key")
    return files, paths


def tls_channel(port: int, ca: Pem, client: Pem | None = None, token: str | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca.cert, private_key=client.key if client else None,
                                         certificate_chain=client.cert if client else None)
    if token is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


async def recognise(channel, audio) -> str:
    return await transcript(asr_pb2_grpc.SpeechRecognitionStub(channel), audio)


async def transcript_with(stub, audio, metadata) -> str:
    """``transcript`` (as fast as possible, no endpointing) with call metadata."""
    options = StreamOptions(realtime=False, interim_results=False, endpointing=False)
    finals = [r.alternatives[0].transcript async for event in stream_audio(stub, pcm16(audio), 16000, options,
                                                                          metadata=metadata)
              for r in event.response.results if r.is_final]
    return " ".join(t for t in finals if t)


async def refused_code(channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asr_pb2_grpc.SpeechRecognitionStub(channel).GetModelInfo(asr_pb2.GetModelInfoRequest(), timeout=10)
    return info.value.code()


# --- TLS -----------------------------------------------------------------------------------------
async def test_tls_serves_transcripts_and_refuses_plaintext_and_unknown_cas(pki, speech):
    files, paths = pki
    clip = speech[0][1][:32000]
    async with running_server(tls_cert=paths["server"][0], tls_key=paths["server"][1]) as (server, plain_stub):
        async with tls_channel(server.port, files["ca"]) as channel:
            secured = await recognise(channel, clip)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert await refused_code(channel) == grpc.StatusCode.UNAVAILABLE
        async with tls_channel(server.port, files["rogue"]) as channel:  # server cert not trusted
            assert await refused_code(channel) == grpc.StatusCode.UNAVAILABLE
    async with running_server() as (_, stub):
        assert secured == await transcript(stub, clip)  # TLS changes nothing in the recognition


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(pki, speech):
    files, paths = pki
    async with running_server(tls_cert=paths["server"][0], tls_key=paths["server"][1],
                              tls_client_ca=paths["ca"][0]) as (server, _):
        async with tls_channel(server.port, files["ca"], files["client"]) as channel:
            secured = await recognise(channel, speech[1][1][:16000])
        async with tls_channel(server.port, files["ca"]) as channel:  # no client certificate
            assert await refused_code(channel) == grpc.StatusCode.UNAVAILABLE
        async with tls_channel(server.port, files["ca"], files["rogue"]) as channel:  # another CA's
            assert await refused_code(channel) == grpc.StatusCode.UNAVAILABLE
        assert server.active_sessions == 0
    async with running_server() as (_, stub):
        assert secured == await transcript(stub, speech[1][1][:16000])  # served, and as without TLS


def test_tls_options_are_validated(pki, tmp_path):
    _, paths = pki
    with pytest.raises(ValidationError, match="--tls-cert and --tls-key go together"):
        ServerSettings(tls_cert=paths["server"][0])
    with pytest.raises(ValidationError, match="--tls-client-ca needs --tls-cert"):
        ServerSettings(tls_client_ca=paths["ca"][0])
    with pytest.raises(ValidationError, match="--tls-key"):
        ServerSettings(tls_cert=paths["server"][0], tls_key=tmp_path / "missing.key")
    result = subprocess.run([str(BIN / "asr-server"), "--tls-cert", str(paths["server"][0])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--tls-key" in result.stderr


async def test_a_file_that_is_not_pem_stops_start_up(tmp_path):
    bogus = tmp_path / "bogus.crt"
    bogus.write_text("not a certificate")
    with pytest.raises(ValueError, match="--tls-cert"):
        async with running_server(tls_cert=bogus, tls_key=bogus):
            pass


# --- bearer tokens -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# accepted tokens\n{TOKENS[0]}\n\n  {TOKENS[1]}  \n")
    return path


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


async def test_tokens_accepted_and_refused_without_touching_the_model(token_file, speech, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    clip = speech[2][1][:32000]
    async with running_server(auth_token_file=token_file, log_level="debug") as (server, stub):
        opened = []
        real_open = server.service.sessions.open
        server.service.sessions.open = lambda api="asr.v1", client="": opened.append(api) or real_open(api, client)
        steps = server.service.scheduler.batches_run
        refusals = {}
        for label, metadata in (("none", None), ("wrong", bearer(WRONG)), ("scheme", (("authorization", TOKENS[0]),)),
                                ("empty", bearer(""))):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Recognize(asr_pb2.RecognizeRequest(
                    config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=16000),
                    audio_content=bytes(3200)), metadata=metadata)
            refusals[label] = info.value
        call = stub.StreamingRecognize(metadata=bearer(WRONG))  # one message, then read: a client
        await call.write(asr_pb2.StreamingRecognizeRequest(  # still writing when the call ends
            streaming_config=asr_pb2.StreamingRecognitionConfig()))  # may see INTERNAL (grpc#36066)
        with pytest.raises(grpc.aio.AioRpcError) as streaming:
            await call.read()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as riva:
                await rasr_grpc.RivaSpeechRecognitionStub(channel).Recognize(rasr.RecognizeRequest())
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            with pytest.raises(grpc.aio.AioRpcError) as listing:
                await reflection.read()
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert opened == [] and server.service.scheduler.batches_run == steps  # no session, no model
        accepted = [await transcript_with(stub, clip, bearer(token)) for token in TOKENS]
        assert opened == ["asr.v1", "asr.v1"]
        exposition = scrape_text(server.metrics_port)
        metrics = scrape(server.metrics_port)
    for label, error in refusals.items():
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, label
    assert "missing credentials" in refusals["none"].details()
    assert refusals["wrong"].details() == "invalid bearer token"
    assert "Bearer <token>" in refusals["scheme"].details()
    for error in (streaming.value, riva.value, listing.value):
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # exempt by default
    async with running_server() as (_, plain):
        assert accepted == [await transcript(plain, clip)] * 2
    assert metrics.value("asr_limit_hits_total", reason="auth") == 7
    assert metrics.value("asr_errors_total", code="UNAUTHENTICATED") == 7
    assert metrics.value("asr_streams_total", api="asr.v1", outcome="rejected") == 5
    assert metrics.value("asr_streams_total", api="riva", outcome="rejected") == 1
    logs = caplog.text + "".join(capfd.readouterr())
    assert "refused /asr.v1.SpeechRecognition/Recognize" in logs  # the refusals are logged ...
    for secret in (*TOKENS, WRONG):  # ... but no token, accepted or not, anywhere
        assert secret not in logs and secret not in exposition


async def test_health_needs_a_token_when_not_exempt(token_file):
    async with running_server(auth_token_file=token_file, auth_exempt_health=False) as (server, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health.Check(health_pb2.HealthCheckRequest())
            ok = await health.Check(health_pb2.HealthCheckRequest(), metadata=bearer(TOKENS[1]))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ok.status == health_pb2.HealthCheckResponse.SERVING


async def test_tokens_over_mutual_tls_with_call_credentials(pki, token_file, speech):
    """What a production client does: TLS channel credentials plus grpc's access-token call
    credentials (which send 'authorization: Bearer ...')."""
    files, paths = pki
    async with running_server(tls_cert=paths["server"][0], tls_key=paths["server"][1], tls_client_ca=paths["ca"][0],
                              auth_token_file=token_file) as (server, _):
        async with tls_channel(server.port, files["ca"], files["client"], token=TOKENS[0]) as channel:
            secured = await recognise(channel, speech[0][1][:16000])
        async with tls_channel(server.port, files["ca"], files["client"], token=WRONG) as channel:
            assert await refused_code(channel) == grpc.StatusCode.UNAUTHENTICATED
    async with running_server() as (_, stub):
        assert secured == await transcript(stub, speech[0][1][:16000])  # served, and as without TLS


def test_tokens_are_compared_in_constant_time(monkeypatch):
    interceptor = auth.TokenAuthInterceptor(TOKENS)
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    for token in (TOKENS[0], TOKENS[1], WRONG, "x", "y" * 1000):
        calls.clear()
        accepted = interceptor.accepts(token)
        assert accepted == (token in TOKENS)
        assert calls == [(32, 32)] * len(TOKENS)  # every token, fixed-length digests, no early exit


def test_token_files_are_validated_without_echoing_tokens(tmp_path):
    def settings_error(text: str) -> str:
        path = tmp_path / "tokens"
        path.write_text(text)
        with pytest.raises(ValidationError) as info:
            ServerSettings(auth_token_file=path)
        return str(info.value)

    assert "holds no token" in settings_error("# only a comment\n\n")
    message = settings_error(f"{TOKENS[0]}\nshort-secret\n")
    assert "line 2" in message and "16 characters" in message and "short-secret" not in message
    message = settings_error("has a space in-the-middle-of-it\n")
    assert "line 1" in message and "in-the-middle" not in message
    with pytest.raises(ValidationError, match="--auth-token-file"):
        ServerSettings(auth_token_file=tmp_path / "missing")
