"""Bearer tokens checked by the real HAProxy in front of a real server (deploy/haproxy/haproxy.cfg,
unchanged, with ASR_PROXY_TOKEN_DIGESTS; docs/operations.md, "Unauthenticated floods"): a call
without an accepted token gets UNAUTHENTICATED from the proxy and never reaches the server, an
authorised one passes with its transcript, health checks pass without a token, and a token-less
flood through the proxy leaves the server untouched (its auth refusals stay at 0)."""

from __future__ import annotations

import re
import subprocess

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr.v1 import asr_pb2, asr_pb2_grpc
from client.stream import channel
from server.model.loading import load_demo
from tests.attacks import audio as attack_audio, config as attack_config
from tests.conftest import running_server
from tests.observability import scrape
from tests.test_hostile_clients import attack, p99, victim
from tests.test_http2_abuse import HAPROXY_CFG, haproxy
from tests.test_security import TOKENS, WRONG, bearer

pytestmark = pytest.mark.timeout(180)

# the stream rate per address well above the flood's, so that only the token check acts here
NO_RATE_LIMIT = {"ASR_PROXY_MAX_STREAM_RATE_PER_IP": 10**7, "ASR_PROXY_MAX_CONN_RATE_PER_IP": 10**6}


@pytest.fixture(scope="module")
def demo():
    return load_demo()


def documented_digest_command() -> str:
    """The shell line of haproxy.cfg's comment that makes the digest file from tokens.txt."""
    line = next(line for line in HAPROXY_CFG.read_text().splitlines() if "sha256sum" in line)
    return re.sub(r"^\s*#\s*", "", line)


def digests_file(tmp_path, tokens: list[str]):
    """tokens.txt as asr-server reads it (a comment, a blank line), and the digest file made from
    it by the command haproxy.cfg documents."""
    (tmp_path / "tokens.txt").write_text("# tenants\n\n" + "\n".join(tokens) + "\n")
    subprocess.run(["bash", "-c", documented_digest_command()], cwd=tmp_path, check=True, timeout=30)
    return tmp_path / "tokens.txt", tmp_path / "tokens.sha256"


def auth_refusals(server) -> float:
    return scrape(server.metrics_port).samples.get(("asr_limit_hits_total", frozenset({("reason", "auth")})), 0.0)


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_the_proxy_refuses_calls_without_an_accepted_token_and_passes_the_others(tmp_path, speech, demo):
    name, clip, reference = speech[0]
    tokens, digests = digests_file(tmp_path, list(TOKENS))
    assert len(digests.read_text().split()) == len(TOKENS)
    async with running_server(model=demo, auth_token_file=tokens) as (server, _), \
            haproxy(server.port, ASR_PROXY_TOKEN_DIGESTS=digests, **NO_RATE_LIMIT) as port:
        async with channel(f"127.0.0.1:{port}") as ch:
            stub = asr_pb2_grpc.SpeechRecognitionStub(ch)
            errors = [await refused(stub.GetModelInfo(asr_pb2.GetModelInfoRequest(), metadata=metadata))
                      for metadata in (None, bearer(WRONG), (("authorization", TOKENS[0]),))]

            async def config_only():
                yield attack_config()
                yield attack_audio(3200)

            errors.append(await refused(_drain(stub.StreamingRecognize(config_only()))))
            heard, _ = await victim(stub, clip, bearer(TOKENS[1]))
            info = await stub.GetModelInfo(asr_pb2.GetModelInfoRequest(), metadata=bearer(TOKENS[0]))
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        reached = auth_refusals(server)
    for error in errors:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        assert "checked by the proxy" in error.details(), error.details()
    assert reached == 0  # none of them reached the server
    assert heard == reference, name
    assert info.model_name
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def _drain(call) -> None:
    async for _ in call:
        pass


@pytest.mark.slow
async def test_a_token_less_flood_through_the_proxy_never_reaches_the_server(tmp_path, speech):
    """6 token-less callers re-opening streams of 4 MiB messages through the proxy for 6 s, beside
    an authorised real-time stream through it: the attacker's calls are answered by the proxy
    (UNAUTHENTICATED, or CANCELLED / INTERNAL for a call still writing then), the server refuses
    none (it never sees them) and the real-time stream keeps its transcript."""
    clip = np.concatenate([speech[0][1], speech[1][1]])
    tokens, digests = digests_file(tmp_path, list(TOKENS))
    async with running_server(auth_token_file=tokens, max_message_bytes=4 << 20) as (server, _), \
            haproxy(server.port, ASR_PROXY_TOKEN_DIGESTS=digests, **NO_RATE_LIMIT) as port:
        async with channel(f"127.0.0.1:{port}") as ch:
            stub = asr_pb2_grpc.SpeechRecognitionStub(ch)
            reference, _ = await victim(stub, clip, bearer(TOKENS[0]))
            async with attack("unauth", port, "--clients", "6", "--seconds", "6",
                              "--message-bytes", str(4 << 20)) as report:
                heard, latencies = await victim(stub, clip, bearer(TOKENS[1]))
        reached = auth_refusals(server)
    outcomes = report["outcomes"]
    print(f"through the proxy: attack {outcomes}, victim p99 {p99(latencies) * 1000:.0f} ms")
    # a call still writing when the proxy answers gets RST_STREAM(CANCEL) after the status: grpcio's
    # asyncio client then reports CANCELLED or INTERNAL (grpc/grpc#36066), as with the server's refusal
    assert set(outcomes) <= {"UNAUTHENTICATED", "CANCELLED", "INTERNAL"}, outcomes
    assert sum(outcomes.values()) >= 20, outcomes
    assert reached == 0
    assert heard == reference
