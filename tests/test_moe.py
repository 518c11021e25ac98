"""Mixture-of-Experts feed-forward (``server.model.moe``): routing, the model format, and exact batching.

The MoE layers run by grouping a step's frames by expert; a frame's output must never depend on the
other frames of the step, in fp32 and int8, exactly as for the dense model
(``tests/test_batching_invariance.py``, ``tests/test_precision.py``).
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import soundfile
import torch

from asr.v1 import asr_pb2
from server.model.encoder import StreamingEncoder
from server.model.engine import Engine
from server.model.features import FeatureFrontEnd, utterance_windows
from server.model.loading import (RANDOM_SMALL_BLANK_BIAS, SMALL_CONFIG, ModelConfig, ModelLoadError, load_model,
                                  random_model)
from server.model.moe import MoEFeedForward, route
from server.model.vocabulary import CharTokenTable
from tests import reference
from tests.conftest import ROOT, running_server
from tests.helpers import assert_staggered_streams_equal_solo

SMALL_MOE = dataclasses.replace(SMALL_CONFIG, moe_experts=4, moe_top_k=2, moe_ffn_dim=128)


def small_moe_model(seed: int = 0):
    return random_model(SMALL_MOE, seed, blank_bias=RANDOM_SMALL_BLANK_BIAS, tokens=CharTokenTable.default(),
                        name="random-small-moe")


@pytest.fixture(scope="module")
def waves(speech) -> list[np.ndarray]:
    real = [soundfile.read(p, dtype="float32")[0] for p in sorted((ROOT / "bench" / "audio").glob("*.wav"))]
    synthetic = [a for _, a, _ in speech]
    out = synthetic + real[:4] + [real[0][: 16000 * 2], synthetic[1][:9000]]
    assert len({len(a) for a in out}) == len(out) >= 8
    return out


def test_routing_takes_the_highest_logits_and_breaks_ties_by_the_lower_expert():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0], [-1.0, -5.0, 4.0, 0.5]])
    experts, gates = route(logits, 2)
    assert experts.tolist() == [[1, 3], [0, 1], [2, 3]]
    torch.testing.assert_close(gates[0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(gates[2], torch.softmax(torch.tensor([4.0, 0.5]), 0))
    # each row routes the same alone as in any batch
    for i in range(3):
        e, g = route(logits[i:i + 1], 2)
        assert torch.equal(e[0], experts[i]) and torch.equal(g[0], gates[i])


def test_moe_layer_is_the_gated_sum_of_its_top_k_experts_and_drops_no_frame():
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, experts=4, top_k=2, activation=torch.nn.GELU(), dropout=0.1).eval()
    x = torch.randn(3, 7, 16)
    y = layer(x)
    h = layer.norm(x).reshape(-1, 16)
    experts, gates = route(layer.router(h), 2)
    want = torch.stack([sum(gates[n, j] * layer.experts[int(experts[n, j])](h[n]) for j in range(2))
                        for n in range(h.size(0))]).reshape(3, 7, 16)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    assert int(layer.last_counts.sum()) == 21 * 2  # every frame went to exactly top_k experts


def test_load_balancing_loss_is_one_when_balanced_and_grows_with_imbalance():
    layer = MoEFeedForward(8, 8, experts=4, top_k=1, activation=torch.nn.ReLU(), dropout=0.0).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # every frame to expert 0
    layer(torch.randn(10, 8))
    skewed = float(layer.aux_loss.detach())
    assert skewed > 3.0  # share 1.0 on expert 0 with most of the probability there: near E = 4
    with torch.no_grad():
        layer.router.bias.zero_()
        layer.router.weight.copy_(torch.eye(4, 8) * 50)
    x = torch.zeros(8, 8)
    x[torch.arange(8), torch.arange(8) % 4] = 1.0  # two frames for each expert
    layer(x)
    assert abs(float(layer.aux_loss.detach()) - 1.0) < 0.05


def test_dense_config_builds_the_same_model_as_before_and_moe_fields_default_off():
    config = ModelConfig()
    assert (config.moe_experts, config.moe_top_k, config.moe_ffn_dim) == (0, 0, 0)
    import torchaudio
    torch.manual_seed(3)
    ours = SMALL_CONFIG.build().state_dict()
    args = {k: v for k, v in dataclasses.asdict(SMALL_CONFIG).items() if not k.startswith("moe_")}
    torch.manual_seed(3)
    theirs = torchaudio.models.emformer_rnnt_model(**args).state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    shipped = json.loads((ROOT / "models" / "demo" / "config.json").read_text())
    assert not any(k.startswith("moe_") for k in shipped)  # the dense demo format as it was
    assert not any(isinstance(m, MoEFeedForward) for m in load_model("demo").rnnt.modules())


def test_moe_model_exports_in_the_demo_format_and_loads_with_demo_dir(tmp_path):
    model = small_moe_model(seed=2)
    torch.save(model.rnnt.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(SMALL_MOE)))
    model.stats.save(tmp_path / "global_stats.json")
    model.tokens.save(tmp_path / "tokens.txt")
    loaded = load_model(f"demo:{tmp_path}")
    assert loaded.config == SMALL_MOE
    layers = [m for m in loaded.rnnt.modules() if isinstance(m, MoEFeedForward)]
    assert len(layers) == SMALL_CONFIG.transformer_num_layers
    assert (layers[0].num_experts, layers[0].top_k) == (4, 2)
    state = loaded.rnnt.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.rnnt.state_dict().items())


@pytest.mark.parametrize("fields, message", [
    ({"moe_experts": 4, "moe_top_k": 5, "moe_ffn_dim": 64}, "moe_top_k"),
    ({"moe_experts": 4, "moe_top_k": 0, "moe_ffn_dim": 64}, "moe_top_k"),
    ({"moe_experts": 4, "moe_top_k": 2, "moe_ffn_dim": 0}, "moe_ffn_dim"),
    ({"moe_experts": -1, "moe_top_k": 0, "moe_ffn_dim": 0}, "moe_experts"),
])
def test_an_impossible_moe_config_is_refused_with_the_field_named(tmp_path, fields, message):
    model = small_moe_model()
    torch.save(model.rnnt.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps({**dataclasses.asdict(SMALL_MOE), **fields}))
    model.stats.save(tmp_path / "global_stats.json")
    model.tokens.save(tmp_path / "tokens.txt")
    with pytest.raises(ModelLoadError, match=message):
        load_model(f"demo:{tmp_path}")


def test_moe_streaming_encoder_matches_torchaudio_at_staggered_positions(waves):
    """The engine's batched MoE encoder against torchaudio's single-stream ``transcribe_streaming`` of
    the same model (its layers running ``MoEFeedForward``), streams joining and leaving mid-batch."""
    model = small_moe_model(seed=5)
    encoder = StreamingEncoder(model.rnnt.transcriber)
    assert encoder.fuse() is False  # the MoE layers run in the Python layer loop
    pool = encoder.new_pool(torch.float32, torch.device("cpu"))
    front_end = FeatureFrontEnd(model.stats)
    tensors = [torch.from_numpy(a) for a in waves]
    feats = [front_end(utterance_windows(w)) for w in tensors]
    expected = [reference.encoder_outputs(model, w) for w in tensors]
    rng = random.Random(11)
    starts = sorted(rng.randrange(0, 30) for _ in waves)
    slots, done = {}, [0] * len(waves)
    outs: list[list[torch.Tensor]] = [[] for _ in waves]
    with torch.inference_mode():
        for tick in range(1000):
            active = [i for i in range(len(waves)) if starts[i] <= tick and done[i] < feats[i].shape[0]]
            if not active:
                if all(done[i] == feats[i].shape[0] for i in range(len(waves))):
                    break
                continue
            for i in active:
                slots.setdefault(i, pool.allocate())
            rng.shuffle(active)
            y = encoder(torch.stack([feats[i][done[i]] for i in active]), pool,
                        torch.tensor([slots[i] for i in active]), torch.tensor([done[i] for i in active]))
            for j, i in enumerate(active):
                outs[i].append(y[j])
                done[i] += 1
                if done[i] == feats[i].shape[0]:
                    pool.release(slots[i])
    for i in range(len(waves)):
        torch.testing.assert_close(torch.cat(outs[i]), expected[i], rtol=0, atol=1e-4, msg=f"stream {i}")


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_moe_engine_batching_is_bit_exact_and_every_expert_runs_on_row_invariant_products(precision, kernels):
    engine = Engine(small_moe_model(seed=1), precision=precision, kernels=kernels)
    moe = [layer.moe for layer in engine.encoder.layers]
    assert all(isinstance(m, MoEFeedForward) for m in moe)
    linears = [m for layer in moe for m in layer.modules() if type(m) is torch.nn.Linear]
    assert not linears, "every router and expert Linear should run on the precision's row-invariant kernel"
    assert engine.check_batching(streams=5, chunks=4)
    # and frame by frame: one MoE layer, 37 frames at once against each frame alone
    layer = moe[0]
    x = torch.randn(37, SMALL_CONFIG.time_reduction_input_dim * 4, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        together = layer(x)
        assert int((layer.last_counts > 0).sum()) == layer.num_experts  # the batch hit every expert
        for n in range(37):
            assert torch.equal(layer(x[n:n + 1]), together[n:n + 1]), f"frame {n} changed in the batch"


def test_equal_router_logits_route_to_the_lower_experts_alone_and_batched():
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(2))
    layer = MoEFeedForward(32, 16, 4, 2, torch.nn.GELU(), 0.0).eval()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.zero_()
        together = layer(x)
    assert layer.last_counts.tolist() == [9, 9, 0, 0]  # all ties: experts 0 and 1
    with torch.no_grad():
        for n in range(9):
            torch.testing.assert_close(layer(x[n:n + 1]), together[n:n + 1], rtol=1e-6, atol=1e-7)
            assert layer.last_counts.tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("options", [{"decoding_method": asr_pb2.GREEDY},
                                     {"decoding_method": asr_pb2.BEAM_SEARCH, "beam_width": 4}],
                         ids=["greedy", "beam4"])
async def test_moe_streams_through_grpc_equal_their_solo_runs(waves, options, precision):
    async with running_server(small_moe_model(seed=7), max_batch=16, precision=precision) as (server, stub):
        info = await stub.GetModelInfo(asr_pb2.GetModelInfoRequest())
        assert info.batching_exact
        await assert_staggered_streams_equal_solo(stub, waves, options, min_chars=30)


def test_training_recipe_builds_the_compared_models_trains_resumes_and_exports_an_moe_model(tmp_path, capsys):
    """``train/train_moe.py``: the three compared models' sizes, a few MoE steps with the
    load-balancing loss logged, a resume cut short by ``stop-at``, and an export that
    ``--model demo:DIR`` loads as an MoE model."""
    import argparse
    import shutil
    import sys

    from tests.conftest import SAMPLES

    sys.path.insert(0, str(ROOT / "train"))
    import train_moe

    counts = {}
    for name, (experts, dim) in {"dense": (0, 384), "active": (8, 384), "total": (8, 96)}.items():
        model, config = train_moe.build(argparse.Namespace(experts=experts, top_k=2, expert_dim=dim), 29)
        counts[name] = train_moe.parameter_counts(model, config)
        assert any(k.startswith("moe_") for k in config) == bool(experts)
    assert counts["dense"]["parameters"] == counts["dense"]["active_parameters_per_frame"] == 4224285
    # same active parameters per frame but for each layer's router (192 x 8 + 8) and the second active
    # expert's output bias (192); same total parameters within 1 %
    assert counts["active"]["active_parameters_per_frame"] - counts["dense"]["parameters"] == 8 * (192 * 8 + 8 + 192)
    assert abs(counts["total"]["parameters"] / counts["dense"]["parameters"] - 1) < 0.01

    data = tmp_path / "corpus"
    data.mkdir()
    rows = []
    for wav in sorted(SAMPLES.glob("*.wav")):
        shutil.copy(wav, data / wav.name)
        rows.append({"audio": wav.name, "text": wav.with_suffix(".txt").read_text().strip()})
    for split in ("train", "dev"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    work = tmp_path / "work"
    common = ["--data", str(data), "--work-dir", str(work), "--experts", "4", "--top-k", "2", "--expert-dim", "64",
              "--steps", "6", "--batch-seconds", "8", "--warmup", "2", "--clean-steps", "100",
              "--dev-utterances", "1", "--threads", "1", "--checkpoint-minutes", "0"]
    assert train_moe.main(common + ["--stop-at", "3"]) == 0
    log = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["balance"] >= 1.0 - 1e-6 and abs(sum(r["expert_share"]) - 1) < 0.01 for r in steps)
    capsys.readouterr()
    assert train_moe.main(common) == 0
    assert "resumed from step 3" in capsys.readouterr().out
    out = tmp_path / "model"
    assert train_moe.main(["--work-dir", str(work), "--export", str(out)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["step"] == 6 and summary["recipe"] == "train/train_moe.py"
    loaded = load_model(f"demo:{out}")
    assert (loaded.config.moe_experts, loaded.config.moe_top_k, loaded.config.moe_ffn_dim) == (4, 2, 64)
    assert sum(isinstance(m, MoEFeedForward) for m in loaded.rnnt.modules()) == 8
