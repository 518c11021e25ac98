"""Streaming through gRPC yields exactly what torchaudio's own single-stream path yields."""

import pytest
import torch

from server.encoder import StreamingEncoder
from server.features import FeatureFrontEnd, utterance_windows
from tests import reference
from tests.conftest import small_model
from tests.helpers import GREEDY, beam_options, transcript


@pytest.mark.parametrize("beam", [1, 4])
async def test_beam_search_through_grpc_equals_rnntbeamsearch_infer(small_server, speech, beam):
    server, stub = small_server
    model = server.model
    compared = 0
    for name, audio, _ in speech:
        expected = reference.beam_search_tokens(model, torch.from_numpy(audio), beam)
        got = await transcript(stub, audio, **beam_options(beam))
        assert got == model.tokens.text(expected), name
        compared += len(expected)
    assert compared > 20, "the model should emit tokens, or the comparison proves little"


async def test_greedy_through_grpc_equals_single_stream_greedy(small_server, speech):
    server, stub = small_server
    model = server.model
    for name, audio, _ in speech:
        expected = reference.greedy_tokens(model, torch.from_numpy(audio))
        assert expected, "the model should emit tokens"
        got = await transcript(stub, audio, **GREEDY)
        assert got == model.tokens.text(expected), name


@pytest.fixture(params=["native", "sdpa"])
def ring_attention(request, monkeypatch):
    """Run a test with server/native's in-place ring attention, and with the gather +
    ``scaled_dot_product_attention`` path it replaces."""
    import server.encoder

    if request.param == "native":
        if server.encoder.native_ring_attention() is None:
            from server import native

            pytest.fail(f"native ring attention unavailable: {native.why_unavailable() or 'build or probe failed'}")
    else:
        monkeypatch.setattr(server.encoder, "native_ring_attention", lambda: None)
    return request.param


def test_batched_encoder_matches_transcribe_streaming_at_mixed_positions(speech, ring_attention):
    """Streams at different positions (left context filling or full) in one batch."""
    model = small_model(seed=3)
    encoder = StreamingEncoder(model.rnnt.transcriber)
    pool = encoder.new_pool(torch.float32, torch.device("cpu"))
    front_end = FeatureFrontEnd(model.stats)
    waves = [torch.from_numpy(a) for _, a, _ in speech]
    starts = [0, 2, 5, 9][:len(waves)]
    feats = [front_end(utterance_windows(w)) for w in waves]
    expected = [reference.encoder_outputs(model, w) for w in waves]
    slots = [pool.allocate() for _ in waves]
    done = [0] * len(waves)
    outs = [[] for _ in waves]
    with torch.inference_mode():
        for tick in range(200):
            active = [i for i in range(len(waves)) if starts[i] <= tick and done[i] < feats[i].shape[0]]
            if not active:
                if all(done[i] == feats[i].shape[0] for i in range(len(waves))):
                    break
                continue
            y = encoder(torch.stack([feats[i][done[i]] for i in active]), pool,
                        torch.tensor([slots[i] for i in active]), torch.tensor([done[i] for i in active]))
            for j, i in enumerate(active):
                outs[i].append(y[j])
                done[i] += 1
    for i in range(len(waves)):
        got = torch.cat(outs[i])
        assert got.shape == expected[i].shape
        torch.testing.assert_close(got, expected[i], rtol=0, atol=1e-4)


def _decode(engine, method, beam, waves, positions_apart: int):
    """Tokens and frames of every wave, decoded as streams that start ``positions_apart`` chunks
    apart (all in one batch once they run), best hypothesis first."""
    from server.engine import ChunkWork

    windows = [utterance_windows(torch.from_numpy(w)).numpy() for w in waves]
    streams = [engine.new_stream(method, beam) for _ in waves]
    step = 0
    while True:
        works = [ChunkWork(s, windows[i][step - i * positions_apart]) for i, s in enumerate(streams)
                 if 0 <= step - i * positions_apart < len(windows[i])]
        if not works and step > len(waves) * positions_apart:
            break
        if works:
            engine.run_batch(works)
        step += 1
    out = [[(h.tokens, h.frames) for h in s.decoder.hypotheses] for s in streams]
    for s in streams:
        engine.release(s)
    return out


def test_modified_beam_search_with_one_hypothesis_is_greedy_with_one_symbol_per_frame(speech):
    from server.config import DecodingMethod
    from server.engine import Engine

    model, waves = small_model(), [a for _, a, _ in speech]
    modified = _decode(Engine(model, beam_search="modified"), DecodingMethod.BEAM_SEARCH, 1, waves, 3)
    greedy = _decode(Engine(model, max_symbols_per_frame=1), DecodingMethod.GREEDY, 1, waves, 3)
    assert modified == greedy
    assert sum(len(h[0][0]) for h in greedy) > 20, "the model should emit tokens, or the comparison proves little"


def test_modified_beam_search_of_a_stream_does_not_depend_on_its_batch(speech):
    from server.config import DecodingMethod
    from server.engine import Engine

    engine = Engine(small_model(), beam_search="modified")
    waves = [a for _, a, _ in speech]
    batched = _decode(engine, DecodingMethod.BEAM_SEARCH, 4, waves, 2)
    alone = [_decode(engine, DecodingMethod.BEAM_SEARCH, 4, [w], 0)[0] for w in waves]
    assert batched == alone
    assert all(len(hyps) > 1 for hyps in batched)


def test_native_ring_attention_matches_gather_and_sdpa_and_ignores_batch_neighbours():
    """server/native's ring attention against the path it replaces: the batch's ring gathered,
    the chunk's own keys appended, ``scaled_dot_product_attention`` with the context mask;
    strided inputs (views of the fused q/k/v projection), empty and full contexts; a stream's
    result is the same bits alone as in its batch; bad shapes are refused."""
    import torch.nn.functional as F

    from server import native

    op = native.ring_attention()
    assert op is not None, native.why_unavailable() or "build failed"
    torch.manual_seed(0)
    slots_total, layers, ring, rows, dim, heads, batch = 12, 3, 32, 5, 256, 4, 7
    kv = torch.randn(slots_total, layers, 2, ring + rows, dim)
    q, k, v = torch.randn(batch, rows, 3 * dim).split(dim, dim=-1)
    slots = torch.randperm(slots_total)[:batch]
    valid = torch.rand(batch, ring) > 0.5
    valid[0], valid[1] = False, True
    layer_kv = kv[:, 1]
    keys, values = layer_kv.index_select(0, slots).unbind(1)
    keys, values = torch.cat([keys[:, :ring], k], 1), torch.cat([values[:, :ring], v], 1)
    mask = torch.cat([valid, valid.new_ones(batch, rows)], 1)[:, None, None, :]
    split = lambda t: t.reshape(batch, -1, heads, dim // heads).transpose(1, 2)  # noqa: E731
    want = F.scaled_dot_product_attention(split(q), split(keys), split(values), attn_mask=mask, scale=0.125)
    want = want.transpose(1, 2).reshape(batch, rows, dim)
    got = op(q, k, v, layer_kv, slots, valid, None, heads, 0.125)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for i in (0, 3):
        alone = op(q[i:i + 1], k[i:i + 1], v[i:i + 1], layer_kv, slots[i:i + 1], valid[i:i + 1], None, heads, 0.125)
        assert torch.equal(alone[0], got[i])
    # group 4 carries group 2's chunk (ring positions 8..11 <- its rows 1..4), as a stream behind does
    carried = torch.full((batch, ring), -1, dtype=torch.long)
    carried[4, 8:12] = torch.arange(4) + 2 * rows + 1
    valid[4, 8:12] = True
    keys[4, 8:12], values[4, 8:12] = k[2, 1:], v[2, 1:]
    mask = torch.cat([valid, valid.new_ones(batch, rows)], 1)[:, None, None, :]
    want = F.scaled_dot_product_attention(split(q), split(keys), split(values), attn_mask=mask, scale=0.125)
    got = op(q, k, v, layer_kv, slots, valid, carried, heads, 0.125)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(batch, rows, dim), rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        op(q, k, v, layer_kv, slots, valid, None, 5, 0.125)
    with pytest.raises(RuntimeError, match="slot out of range"):
        op(q, k, v, layer_kv, slots + slots_total, valid, None, heads, 0.125)
    with pytest.raises(RuntimeError, match="carried row out of range"):
        op(q, k, v, layer_kv, slots, valid, carried + batch * rows, heads, 0.125)
