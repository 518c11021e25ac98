"""Streaming through gRPC yields exactly what torchaudio's own single-stream path yields."""

import pytest
import torch

from server.kernels import native
from server.model.encoder import StreamingEncoder
from server.model.features import FeatureFrontEnd, utterance_windows
from tests import reference
from tests.conftest import KERNEL_PATHS, kernels_selected, running_server, skip_unless_cpu_runs, small_model
from tests.helpers import GREEDY, beam_options, transcript


@pytest.fixture(scope="module", params=KERNEL_PATHS)
async def kernel_server(request):
    """The random-small server on each --kernels path this CPU runs."""
    skip_unless_cpu_runs(request.param)
    async with running_server(kernels=request.param) as pair:
        assert pair[0].service.engine.kernels == request.param
        yield pair


@pytest.mark.parametrize("beam", [1, 4])
async def test_beam_search_through_grpc_equals_rnntbeamsearch_infer(kernel_server, speech, beam):
    server, stub = kernel_server
    model = server.model
    compared = 0
    for name, audio, _ in speech:
        expected = reference.beam_search_tokens(model, torch.from_numpy(audio), beam)
        got = await transcript(stub, audio, **beam_options(beam))
        assert got == model.tokens.text(expected), name
        compared += len(expected)
    assert compared > 20, "the model should emit tokens, or the comparison proves little"


async def test_greedy_through_grpc_equals_single_stream_greedy(kernel_server, speech):
    server, stub = kernel_server
    model = server.model
    for name, audio, _ in speech:
        expected = reference.greedy_tokens(model, torch.from_numpy(audio))
        assert expected, "the model should emit tokens"
        got = await transcript(stub, audio, **GREEDY)
        assert got == model.tokens.text(expected), name


@pytest.fixture
def ring_attention(kernels):
    """Run a test with each native back end's in-place ring attention, and (``--kernels torch``)
    with the gather + ``scaled_dot_product_attention`` path it replaces."""
    import server.model.encoder

    if kernels != "torch":
        assert server.model.encoder.native_ring_attention() is not None, f"{kernels} ring attention failed its probe"
    return kernels


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
    from server.model.engine import ChunkWork

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
    from server.model.engine import Engine
    from server.types import DecodingMethod

    model, waves = small_model(), [a for _, a, _ in speech]
    modified = _decode(Engine(model, beam_search="modified"), DecodingMethod.BEAM_SEARCH, 1, waves, 3)
    greedy = _decode(Engine(model, max_symbols_per_frame=1), DecodingMethod.GREEDY, 1, waves, 3)
    assert modified == greedy
    assert sum(len(h[0][0]) for h in greedy) > 20, "the model should emit tokens, or the comparison proves little"


def test_modified_beam_search_of_a_stream_does_not_depend_on_its_batch(speech):
    from server.model.engine import Engine
    from server.types import DecodingMethod

    engine = Engine(small_model(), beam_search="modified")
    waves = [a for _, a, _ in speech]
    batched = _decode(engine, DecodingMethod.BEAM_SEARCH, 4, waves, 2)
    alone = [_decode(engine, DecodingMethod.BEAM_SEARCH, 4, [w], 0)[0] for w in waves]
    assert batched == alone
    assert all(len(hyps) > 1 for hyps in batched)


@pytest.mark.parametrize("backend", native.BACKENDS)
def test_native_ring_attention_matches_gather_and_sdpa_and_ignores_batch_neighbours(backend):
    """server/kernels/native's ring attention against the path it replaces: the batch's ring gathered,
    the chunk's own keys appended, ``scaled_dot_product_attention`` with the context mask;
    strided inputs (views of the fused q/k/v projection), empty and full contexts; a stream's
    result is the same bits alone as in its batch; bad shapes are refused."""
    import torch.nn.functional as F

    with kernels_selected(backend):
        op = native.ring_attention()
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


@pytest.mark.parametrize("backend", native.BACKENDS)
@pytest.mark.parametrize("model_name, precision", [("random-small", "fp32"), ("random-small", "int8"),
                                                   ("demo", "fp32"), ("demo", "int8")])
def test_fused_predictor_step_gives_the_modules_bits(model_name, precision, backend):
    """server/kernels/native's one-call prediction network step (``FusedPredictorStep``) against
    torchaudio's ``_Predictor`` modules in the engine's precision: the same output and states,
    bit for bit, at several row counts; ``step_rows`` advances exactly the given rows of a
    batch's state, in place, and leaves the others alone."""
    from server.model.engine import Engine
    from server.model.loading import load_model

    skip_unless_cpu_runs(backend)
    model = small_model() if model_name == "random-small" else load_model(model_name)
    predictor = Engine(model, precision=precision, kernels=backend).predictor
    fused = predictor.fused
    assert fused is not None, f"{precision} on the {backend} kernels: the predictor step should be fused"
    _, initial_state = predictor.initial()
    vocabulary = model.rnnt.predictor.embedding.num_embeddings
    with torch.inference_mode():
        for rows in (1, 3, 8):
            g = torch.Generator().manual_seed(rows)
            tokens = torch.randint(0, vocabulary, (rows,), generator=g)
            state = [[torch.randn(rows, t.size(1), generator=g) for t in layer] for layer in initial_state]
            predictor.fused = None
            expected_out, expected_state = predictor.step(tokens, state)
            predictor.fused = fused
            out, new_state = predictor.step(tokens, state)
            assert torch.equal(out, expected_out)
            for got_layer, want_layer in zip(new_state, expected_state):
                assert all(torch.equal(a, b) for a, b in zip(got_layer, want_layer))
            # the same streams as rows 1, 3, 5, ... of a larger batch, advanced in place
            batch = [[torch.randn(2 * rows + 1, t.size(1), generator=g) for t in layer] for layer in state]
            chosen = torch.arange(rows) * 2 + 1
            for layer, given in zip(batch, state):
                for full, part in zip(layer, given):
                    full[chosen] = part
            before = [[t.clone() for t in layer] for layer in batch]
            assert torch.equal(predictor.step_rows(tokens, batch, chosen), expected_out)
            others = torch.arange(0, 2 * rows + 1, 2)
            for layer, old, want in zip(batch, before, expected_state):
                for full, full_before, part in zip(layer, old, want):
                    assert torch.equal(full[chosen], part)
                    assert torch.equal(full[others], full_before[others])
        fresh_out, _ = predictor.step(torch.tensor([predictor.blank]), None)  # a zero state
        predictor.fused = None
        assert torch.equal(fresh_out, predictor.step(torch.tensor([predictor.blank]), None)[0])


@pytest.mark.parametrize("backend", native.BACKENDS)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_fused_encoder_layers_give_the_layer_loops_bits(speech, precision, backend):
    """server/kernels/native's one-call layer loop (``FusedLayers``) against ``StreamingEncoder``'s
    Python loop over the same layers: the same encoder output and left-context state, bit for
    bit, for streams at different positions, some bringing several chunks to one step (their
    earlier chunks' keys carried within the step), greedy tokens alike."""
    import random

    from server.model.engine import MAX_CHUNKS_PER_STREAM, ChunkWork, Engine
    from server.types import DecodingMethod

    skip_unless_cpu_runs(backend)
    engine = Engine(small_model(seed=5), precision=precision, kernels=backend)
    fused = engine.encoder.fused_layers
    assert fused is not None, f"{precision} on the {backend} kernels: the encoder layers should be fused"
    windows = [utterance_windows(torch.from_numpy(a)).numpy() for _, a, _ in speech]
    outputs: list[torch.Tensor] = []
    engine.encoder.register_forward_hook(lambda module, args, out: outputs.append(out.clone()))

    def run(layers) -> tuple[list, list, torch.Tensor]:
        engine.encoder.fused_layers = layers
        outputs.clear()
        rng = random.Random(11)
        streams = [engine.new_stream(DecodingMethod.GREEDY, 1) for _ in windows]
        position = [-3 * i for i in range(len(windows))]  # staggered starts
        while any(p < len(w) for p, w in zip(position, windows)):
            works = []
            for i, s in enumerate(streams):
                take = min(len(windows[i]) - max(position[i], 0), rng.randint(1, MAX_CHUNKS_PER_STREAM))
                if position[i] < 0:
                    position[i] += 1
                    continue
                for _ in range(take):
                    works.append(ChunkWork(s, windows[i][position[i]]))
                    position[i] += 1
            if works:
                engine.run_batch(works)
        tokens = [s.decoder.best.tokens for s in streams]
        state = torch.stack([engine.pool.kv[s.slot] for s in streams])  # each stream's left context
        for s in streams:
            engine.release(s)
        return tokens, list(outputs), state

    with torch.inference_mode():
        fused_tokens, fused_out, fused_state = run(fused)
        loop_tokens, loop_out, loop_state = run(None)
    assert len(fused_out) == len(loop_out) > 10
    assert any(out.size(0) > len(windows) for out in fused_out), "some step should carry several chunks of a stream"
    assert all(torch.equal(a, b) for a, b in zip(fused_out, loop_out))
    assert torch.equal(fused_state, loop_state)
    assert fused_tokens == loop_tokens and sum(map(len, loop_tokens)) > 0
