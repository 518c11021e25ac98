"""Refusals paced per client address (server/api/auth.py, ``RefusalPacer``; docs/operations.md,
"Unauthenticated floods"): past FREE_REFUSALS_PER_S a second from one address, a call without an
accepted token waits PACED_REFUSAL_DELAY_S before its UNAUTHENTICATED, so token-less callers that
re-open their call at once cost the server one refusal per caller and second, not one per round
trip. The pacer with a fake clock, then a real server on a real port: a held refusal still ends
UNAUTHENTICATED, an authorised call meanwhile is not delayed, and a token-less flood from another
process makes the server refuse a fraction of the calls it refuses with pacing off."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from asr.v1 import asr_pb2
from server.api import auth
from server.api.auth import RefusalPacer, peer_address
from tests.conftest import running_server
from tests.observability import scrape
from tests.test_hostile_clients import attack
from tests.test_security import TOKENS, bearer

pytestmark = pytest.mark.timeout(120)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_pacer_holds_refusals_past_the_free_rate_per_address():
    clock = Clock()
    pacer = RefusalPacer(free_per_s=5.0, delay_s=1.0, max_held=3, clock=clock)
    assert [pacer.take("a") for _ in range(5)] == [False] * 5  # the free burst
    assert [pacer.take("a") for _ in range(4)] == [True, True, True, False]  # held, up to max_held
    assert not pacer.take("b")  # another address has its own bucket
    pacer.give_back()
    assert pacer.take("a") and pacer.held == 3
    clock.now = 0.2  # refills at the free rate: one more refusal at once
    assert not pacer.take("a")
    for _ in range(3):
        pacer.give_back()
    assert pacer.held == 0 and pacer.take("a")


def test_the_pacer_forgets_addresses_whose_bucket_has_refilled():
    clock = Clock()
    pacer = RefusalPacer(free_per_s=5.0, delay_s=1.0, max_held=3, clock=clock)
    for n in range(5000):
        pacer.take(f"ipv4:10.0.{n // 256}.{n % 256}")
    clock.now = 2.0  # every bucket full again: the next refusal forgets them
    assert not pacer.take("ipv4:192.0.2.1")
    assert len(pacer._buckets) == 1


def test_peer_addresses_drop_the_port():
    assert peer_address("ipv4:10.0.0.1:5000") == "ipv4:10.0.0.1"
    assert peer_address("ipv6:[::1]:41000") == "ipv6:[::1]"
    assert peer_address("unix:/run/asr.sock") == "unix:/run/asr.sock"


def refusals(server) -> float:
    return scrape(server.metrics_port).value("asr_limit_hits_total", reason="auth")


async def test_a_held_refusal_ends_unauthenticated_and_authorised_calls_are_not_delayed(tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKENS[0] + "\n")
    async with running_server(auth_token_file=token_file) as (server, stub):
        async def refused() -> float:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetModelInfo(asr_pb2.GetModelInfoRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            return time.monotonic() - started

        burst = int(auth.FREE_REFUSALS_PER_S)
        waits = await asyncio.gather(*(refused() for _ in range(burst + 10)))
        started = time.monotonic()
        await stub.GetModelInfo(asr_pb2.GetModelInfoRequest(), metadata=bearer(TOKENS[0]))
        authorised = time.monotonic() - started
        total = refusals(server)
    held = [w for w in waits if w >= auth.PACED_REFUSAL_DELAY_S]
    assert len(held) >= 5, sorted(waits)  # past the free burst, refusals waited
    assert authorised < auth.PACED_REFUSAL_DELAY_S / 2, authorised
    assert total == burst + 10  # every refusal counted, held or not


async def flood_refusals(tmp_path, paced: bool, monkeypatch) -> tuple[float, dict]:
    """Refusals the server made during 4 s of 8 token-less callers (streams of 1 MiB messages)."""
    monkeypatch.setattr(auth, "MAX_PACED_REFUSALS", 256 if paced else 0)
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKENS[0] + "\n")
    async with running_server(auth_token_file=token_file) as (server, _):
        async with attack("unauth", server.port, "--clients", "8", "--seconds", "4",
                          "--message-bytes", str(1 << 20)) as report:
            pass
        return refusals(server), report


async def test_a_token_less_flood_is_refused_a_fraction_as_often_when_paced(tmp_path, monkeypatch):
    unpaced, unpaced_report = await flood_refusals(tmp_path, False, monkeypatch)
    paced, report = await flood_refusals(tmp_path, True, monkeypatch)
    print(f"refusals in 4 s: paced {paced:.0f} ({report['outcomes']}), unpaced {unpaced:.0f}")
    # paced: the free rate (20 at once, then 20 a second) and one per caller and second
    bound = auth.FREE_REFUSALS_PER_S * (1 + 5) + 8 * (5 / auth.PACED_REFUSAL_DELAY_S + 1)
    assert paced <= bound, (paced, bound)
    assert paced < unpaced / 2, (paced, unpaced)
    assert set(report["outcomes"]) <= {"UNAUTHENTICATED", "INTERNAL"}, report
