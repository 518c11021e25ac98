"""A stream's result never depends on who it was batched with.

Streams of different lengths start at staggered times, so new streams join while
others are mid-stream (left context still filling for some, full for others) and
some end in the middle of a batch; freed left-context slots are reused by later
streams. Every stream must get exactly what it gets alone: the same transcript
and word timings through the real gRPC server (greedy and beam search), and the
same encoder output as torchaudio's single-stream ``transcribe_streaming``.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import soundfile
import torch

from asr.v1 import asr_pb2
from server.model.encoder import StreamingEncoder
from server.model.features import FeatureFrontEnd, utterance_windows
from tests import reference
from tests.conftest import ROOT, running_server, small_model
from tests.helpers import assert_staggered_streams_equal_solo

BENCH_AUDIO = ROOT / "bench" / "audio"


@pytest.fixture(scope="module")
def waves(speech) -> list[np.ndarray]:
    """Ten streams of different lengths: the synthetic samples, real speech, and cuts of both."""
    real = [soundfile.read(p, dtype="float32")[0] for p in sorted(BENCH_AUDIO.glob("*.wav"))]
    assert len(real) >= 5, f"expected real speech in {BENCH_AUDIO}"
    synthetic = [a for _, a, _ in speech]
    out = synthetic + real
    out += [real[0][: 16000 * 2], synthetic[1][: 9000]]
    lengths = [len(a) for a in out]
    assert len(set(lengths)) == len(lengths) and len(out) >= 10
    return out


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("options", [{"decoding_method": asr_pb2.GREEDY},
                                     {"decoding_method": asr_pb2.BEAM_SEARCH, "beam_width": 4}],
                         ids=["greedy", "beam4"])
async def test_staggered_streams_through_grpc_equal_their_solo_runs(waves, options, precision, kernels):
    async with running_server(max_batch=16, precision=precision, kernels=kernels) as (server, stub):
        info = await stub.GetModelInfo(asr_pb2.GetModelInfoRequest())
        assert (info.kernels, info.precision) == (kernels, precision)
        assert info.batching_exact, "the start-up probe should find batching bit-exact on this path"
        await assert_staggered_streams_equal_solo(stub, waves, options, min_chars=50)
        assert server.active_sessions == 0


@pytest.mark.slow
def test_encoder_output_at_staggered_positions_with_slot_reuse_matches_torchaudio(waves):
    """Engine-level: encoder outputs of every stream within 1e-4 of its solo torchaudio run."""
    model = small_model(seed=5)
    encoder = StreamingEncoder(model.rnnt.transcriber)
    pool = encoder.new_pool(torch.float32, torch.device("cpu"))
    front_end = FeatureFrontEnd(model.stats)
    tensors = [torch.from_numpy(a) for a in waves]
    feats = [front_end(utterance_windows(w)) for w in tensors]
    expected = [reference.encoder_outputs(model, w) for w in tensors]
    rng = random.Random(11)
    starts = sorted(rng.randrange(0, 40) for _ in waves)
    slots: dict[int, int] = {}
    done = [0] * len(waves)
    outs: list[list[torch.Tensor]] = [[] for _ in waves]
    reused = set()
    released: set[int] = set()
    with torch.inference_mode():
        for tick in range(1000):
            active = [i for i in range(len(waves)) if starts[i] <= tick and done[i] < feats[i].shape[0]]
            for i in active:
                if i not in slots:
                    slots[i] = pool.allocate()
                    if slots[i] in released:
                        reused.add(slots[i])
            if not active:
                if all(done[i] == feats[i].shape[0] for i in range(len(waves))):
                    break
                continue
            rng.shuffle(active)  # batch order must not matter either
            y = encoder(torch.stack([feats[i][done[i]] for i in active]), pool,
                        torch.tensor([slots[i] for i in active]), torch.tensor([done[i] for i in active]))
            for j, i in enumerate(active):
                outs[i].append(y[j])
                done[i] += 1
                if done[i] == feats[i].shape[0]:  # ends mid-batch: its slot goes back to the pool
                    pool.release(slots[i])
                    released.add(slots[i])
    assert reused, "a later stream should reuse a released slot"
    for i in range(len(waves)):
        got = torch.cat(outs[i])
        assert got.shape == expected[i].shape
        torch.testing.assert_close(got, expected[i], rtol=0, atol=1e-4, msg=f"stream {i}")


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_consecutive_chunks_of_a_stream_in_one_step_equal_one_chunk_per_step(waves, method):
    """A stream that is behind brings several chunks to one step (``MAX_CHUNKS_PER_STREAM``):
    every chunk's result, endpoint (a short trailing silence ends utterances often, so the
    decoder restarts between chunks of one step) and encoder state equal the one-by-one run."""
    from server.model.engine import MAX_CHUNKS_PER_STREAM, ChunkWork, Engine
    from server.types import DecodingMethod, Endpointing

    engine = Engine(small_model())
    decoding = DecodingMethod.GREEDY if method == "greedy" else DecodingMethod.BEAM_SEARCH
    rule = Endpointing(trailing_silence_ms=240, max_utterance_ms=2000)
    windows = [utterance_windows(torch.from_numpy(w)).numpy() for w in waves[:6]]

    def run(grouped: bool) -> list[list[tuple]]:
        rng = random.Random(7)
        streams = [engine.new_stream(decoding, 3, rule) for _ in windows]
        position = [0] * len(windows)
        out: list[list[tuple]] = [[] for _ in windows]
        while any(p < len(w) for p, w in zip(position, windows)):
            works, owners = [], []
            for i, s in enumerate(streams):
                left = len(windows[i]) - position[i]
                take = min(left, rng.randint(1, MAX_CHUNKS_PER_STREAM) if grouped else 1)
                for _ in range(take):
                    works.append(ChunkWork(s, windows[i][position[i]]))
                    owners.append(i)
                    position[i] += 1
            for i, r in zip(owners, engine.run_batch(works)):
                out[i].append(([(a.tokens, a.frames) for a in r.alternatives], r.frames_done,
                               r.utterance_start_frame, r.endpoint))
        for s in streams:
            engine.release(s)
        return out

    one_by_one, grouped = run(False), run(True)
    assert grouped == one_by_one
    assert sum(r[3] is not None for rs in one_by_one for r in rs) >= 3, "expected endpoints in between"


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_switching_intra_op_threads_mid_stream_changes_no_result(waves, precision, kernels):
    """The thread governor (``server.core.threads``) may switch between one thread per core and 1 at any
    step: every chunk's alternatives, confidences and timings equal a run that never switched."""
    from server.model.engine import ChunkWork, Engine
    from server.model.loading import load_model
    from server.types import DecodingMethod

    engine = Engine(load_model("random-base", 0), precision=precision, threads=2)
    windows = [utterance_windows(torch.from_numpy(w)).numpy()[:12] for w in waves[:3]]

    def run(switch: bool) -> list:
        streams = [engine.new_stream(DecodingMethod.BEAM_SEARCH, 3) for _ in windows]
        out = []
        for step in range(12):
            if switch:
                engine.set_threads(1 if step % 4 < 2 else 2)
            works = [ChunkWork(s, w[step]) for s, w in zip(streams, windows)]
            out += [[(a.tokens, a.frames, a.confidence) for a in r.alternatives] for r in engine.run_batch(works)]
        engine.set_threads(2)
        for s in streams:
            engine.release(s)
        return out

    steady, switched = run(False), run(True)
    assert switched == steady
    assert any(alts[0][0] for alts in steady), "expected some tokens"
