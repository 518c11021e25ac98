"""Reduced precision: applied once at load time, checked against fp32 at start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from asr.v1 import asr_pb2
from server.config import ServerSettings
from server.app import AsrServer
from server.engine import Engine
from server.precision import (CpuFeatures, PackedLinear, PrecisionError, RowwiseInt8Linear, check_precision,
                              detect_cpu_features, packed_linear_available, precision_warnings,
                              relative_error)
from tests.conftest import running_server, small_model
from tests.helpers import GREEDY, transcript

SAPPHIRE_FLAGS = "flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 avx512_fp16\n"


def test_cpu_features_are_read_from_cpuinfo_flags():
    f = detect_cpu_features("processor : 0\n" + SAPPHIRE_FLAGS)
    assert f.avx512 and f.avx512_bf16 and f.amx_bf16 and f.amx_int8 and f.avx512_vnni and not f.amx_fp16
    assert "amx_bf16" in f.describe()
    assert detect_cpu_features("flags : fpu sse avx2\n") == CpuFeatures()


def test_precision_that_would_be_slow_here_is_warned_about():
    old_cpu = CpuFeatures(avx512=True)
    assert any("slower than fp32" in w for w in precision_warnings("bf16", "cpu", old_cpu))
    assert precision_warnings("int8", "cpu", old_cpu)
    assert precision_warnings("bf16", "cpu", detect_cpu_features(SAPPHIRE_FLAGS)) == []
    assert precision_warnings("fp32", "cpu", old_cpu) == []


def test_fp16_on_cpu_and_unknown_precisions_are_refused_with_a_reason():
    with pytest.raises(PrecisionError, match="bf16"):
        check_precision("fp16", "cpu")
    with pytest.raises(PrecisionError, match="choose one of"):
        check_precision("fp8", "cpu")
    check_precision("fp16", "cuda")
    for p in ("fp32", "bf16", "int8"):
        check_precision(p, "cpu")


def test_int8_quantises_every_linear_and_leaves_the_loaded_model_fp32():
    model = small_model()
    engine = Engine(model, precision="int8")
    for network in (engine.encoder, engine.decoding):
        plain = [name for name, m in network.named_modules() if type(m) is torch.nn.Linear]
        assert not plain, f"Linear layers left in fp32: {plain}"
    quantised = [name for name, m in engine.decoding.named_modules() if isinstance(m, RowwiseInt8Linear)]
    assert any(n.startswith("predictor.") for n in quantised) and "joiner.linear" in quantised, quantised
    assert all(p.dtype == torch.float32 for p in model.rnnt.parameters())


def _int8_gemms() -> list[str]:
    """The row-wise int8 GEMMs this machine runs (fbgemm where its products are exact here)."""
    from server.precision import _onednn_int8_available, fbgemm_rowwise_exact, hybrid_int8_available, native_vnni_int8

    return [g for g, ok in (("vnni", native_vnni_int8() is not None), ("hybrid", hybrid_int8_available()),
                            ("fbgemm", fbgemm_rowwise_exact()), ("onednn", _onednn_int8_available())) if ok] + ["int_mm"]


@pytest.mark.parametrize("gemm", _int8_gemms())
@pytest.mark.parametrize("rows, in_features, out_features", [(1, 80, 512), (7, 257, 29), (40, 512, 4097)])
def test_rowwise_int8_linear_is_close_to_fp32_and_each_row_independent_of_the_batch(rows, in_features,
                                                                                      out_features, gemm):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features)
    int8 = RowwiseInt8Linear(linear, gemm)
    x = torch.randn(rows, in_features) * torch.logspace(-2, 2, rows)[:, None]  # rows of very different scale
    with torch.inference_mode():
        batched = int8(x)
        assert relative_error(linear(x), batched) < 0.02
        for i in range(rows):
            assert torch.equal(int8(x[i:i + 1]), batched[i:i + 1])
        assert torch.equal(int8(x.reshape(1, rows, in_features)), batched.reshape(1, rows, out_features))


@pytest.mark.parametrize("rows", [3, 40, 100, 150])  # below and above FBGEMM_MAX_ROWS (and the native one)
def test_rowwise_int8_gemms_give_the_same_bits(rows):
    """Whatever GEMM runs, the result is the exact integer product of the quantised rows and
    weights, scaled the same way: bit for bit the same (the hybrid's small and large batches
    must agree, or batching would change a stream's result)."""
    from server.precision import _fbgemm_pack, _fbgemm_range_row, _fbgemm_unit_product, fbgemm_rowwise_exact

    torch.manual_seed(rows)
    linear = torch.nn.Linear(2048, 70)
    x = torch.randn(rows, 2048) * torch.logspace(-3, 3, rows)[:, None]
    with torch.inference_mode():
        outputs = {gemm: RowwiseInt8Linear(linear, gemm)(x) for gemm in _int8_gemms()}
        first = next(iter(outputs.values()))
        assert all(torch.equal(out, first) for out in outputs.values()), \
            {g: (out - first).abs().max().item() for g, out in outputs.items()}
        if fbgemm_rowwise_exact():  # the pinned unit quantisation: exact, extreme values included
            w = torch.randint(-127, 128, (70, 300), dtype=torch.int8)
            units = torch.randint(-127, 128, (9, 300)).float()
            units[0], units[1] = 127.0, -127.0
            got = _fbgemm_unit_product(units, _fbgemm_pack(w, torch.ones(70)), _fbgemm_range_row(300))
            assert torch.equal(got, (units.double() @ w.double().t()).float())


@pytest.mark.skipif(not packed_linear_available(), reason="this torch build has no oneDNN packed linear")
def test_fp32_runs_every_linear_on_the_native_kernel_else_packs_the_large_ones_for_onednn():
    from server.precision import PACKED_MIN_PARAMS, BlockedLinear, apply_precision, native_linear_f32

    net = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512),
                              torch.nn.Sequential(torch.nn.Linear(512, 29)))
    x = torch.randn(7, 512)
    with torch.inference_mode():
        expected = net(x)
        converted = apply_precision(net, "fp32")
        assert relative_error(expected, converted(x)) < 1e-5
    if native_linear_f32() is not None:
        assert all(isinstance(m, BlockedLinear) for m in (converted[0], converted[2], converted[3][0]))
    else:
        assert isinstance(converted[0], PackedLinear) and isinstance(converted[2], PackedLinear)
        assert type(converted[3][0]) is torch.nn.Linear and 512 * 29 < PACKED_MIN_PARAMS


@pytest.mark.parametrize("rows, in_features, out_features, bias", [(1, 512, 2048, True), (5, 2048, 512, False),
                                                                   (7, 37, 29, True), (45, 1024, 4097, True),
                                                                   (200, 512, 1536, False)])
def test_native_fp32_kernel_matches_linear_and_each_row_is_independent_of_the_batch(rows, in_features,
                                                                                    out_features, bias):
    """server/native's fp32 kernel (the fp32 default where the CPU has AVX-512): within float
    rounding of ``F.linear``, and each row's result the same bits alone as in any batch, for widths
    that are not whole blocks and row counts that are not whole register tiles."""
    from server import native
    from server.precision import BlockedLinear, blocked_f32_weight, native_linear_f32

    assert native.why_unavailable() is not None or native.load(), "the native operators failed to build"
    if native_linear_f32() is None:
        pytest.skip(f"no native fp32 kernel here: {native.why_unavailable() or 'the CPU lacks AVX-512'}")
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    blocked = BlockedLinear(linear)
    x = torch.randn(rows, in_features * 2)[:, ::2]  # not contiguous
    with torch.inference_mode():
        batched = blocked(x)
        assert relative_error(linear(x), batched) < 1e-5
        for i in sorted({0, rows // 2, rows - 1}):
            assert torch.equal(blocked(x[i:i + 1]), batched[i:i + 1])
        assert torch.equal(blocked(x.reshape(1, rows, in_features)), batched.reshape(1, rows, out_features))
        op = native.linear_f32()
        weight = blocked_f32_weight(linear.weight)
        with pytest.raises(RuntimeError, match="columns"):
            op(torch.randn(2, in_features + 1), weight, None, out_features)
        with pytest.raises(RuntimeError, match="out_features"):
            op(torch.randn(2, in_features), weight, None, out_features + 16)
        with pytest.raises(RuntimeError, match="float32"):
            op(torch.randn(2, in_features), weight.double(), None, out_features)


@pytest.mark.skipif(not packed_linear_available(), reason="this torch build has no oneDNN packed linear")
@pytest.mark.parametrize("rows, in_features, out_features", [(1, 80, 512), (7, 257, 29), (45, 512, 2048)])
def test_packed_linear_matches_linear_and_each_row_is_independent_of_the_batch(rows, in_features, out_features):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features)
    packed = PackedLinear(linear)
    x = torch.randn(rows, in_features)
    with torch.inference_mode():
        batched = packed(x)
        assert relative_error(linear(x), batched) < 1e-5
        for i in range(rows):
            assert torch.equal(packed(x[i:i + 1]), batched[i:i + 1])
        assert torch.equal(packed(x.reshape(1, rows, in_features)), batched.reshape(1, rows, out_features))


def test_bf16_keeps_weights_and_streaming_state_in_bf16():
    engine = Engine(small_model(), precision="bf16")
    assert {p.dtype for p in engine.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in engine.decoding.parameters()} == {torch.bfloat16}
    assert engine.pool.kv.dtype == torch.bfloat16
    out, state = engine.predictor.initial()
    assert out.dtype == torch.bfloat16 and state[0][0].dtype == torch.bfloat16


@pytest.mark.parametrize("precision, bound", [("bf16", 0.05), ("int8", 0.1)])
def test_self_check_measures_a_small_error_and_refuses_over_the_bound(precision, bound):
    engine = Engine(small_model(), precision=precision)
    error = engine.self_check(max_error=1.0)
    assert 0 < error < bound
    assert relative_error(torch.ones(4), torch.ones(4)) == 0.0
    with pytest.raises(PrecisionError, match="--max-precision-error"):
        engine.self_check(max_error=error / 10)


async def test_server_refuses_to_start_when_the_self_check_fails():
    settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, model="random-small",
                              precision="int8", max_precision_error=1e-6)
    server = AsrServer(settings, model=small_model())
    with pytest.raises(PrecisionError):
        await server.start()
    await server.stop(grace=0)


def test_asr_server_exits_with_a_message_for_fp16_on_cpu():
    proc = subprocess.run([sys.executable, "-m", "server.cli", "--model", "random-small", "--precision", "fp16",
                           "--port", "0", "--metrics-port", "-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "fp16 is refused on CPU" in proc.stderr


@pytest.mark.parametrize("precision", ["bf16", "int8"])
async def test_reduced_precision_server_transcribes_and_reports_its_precision(speech, precision):
    async with running_server(precision=precision) as (server, stub):
        info = await stub.GetModelInfo(asr_pb2.GetModelInfoRequest())
        assert info.precision == precision
        text = await transcript(stub, speech[0][1], **GREEDY)
        assert text, "the reduced-precision model should still emit tokens"


def test_row_buckets_cover_every_row_count_with_few_kernels():
    from server.precision import row_bucket

    buckets = [row_bucket(n) for n in range(1, 2049)]
    assert all(b >= n for n, b in zip(range(1, 2049), buckets))
    assert buckets == sorted(buckets)
    assert len(set(b for b in buckets[:640])) <= 30 and len(set(buckets)) <= 40
    assert all(b <= 1.25 * n for n, b in zip(range(1, 2049), buckets) if n > 20)  # waste <= 25 %
    assert all(row_bucket(5 * streams) == 5 * streams for streams in range(1, 17))  # the encoder never pads


def test_bf16_linears_run_at_bucketed_row_counts_with_the_same_result():
    from server.precision import BucketedLinear, apply_precision

    linear = torch.nn.Linear(64, 96)
    net = apply_precision(torch.nn.Sequential(torch.nn.Linear(64, 96)), "bf16")
    net[0].load_state_dict({k: v.to(torch.bfloat16) for k, v in linear.state_dict().items()})
    assert isinstance(net[0], BucketedLinear)
    x = torch.randn(5, 3, 64).to(torch.bfloat16)
    with torch.inference_mode():
        # (oneDNN may round a padded batch's bf16 products differently: close, not equal)
        assert relative_error(torch.nn.functional.linear(x, net[0].weight, net[0].bias), net(x)) < 1e-2


@pytest.mark.parametrize("rows, in_features, out_features, bias", [(1, 512, 2048, True), (5, 2048, 512, True),
                                                                   (32, 80, 29, False), (17, 300, 4097, True),
                                                                   (128, 512, 1536, True), (160, 1024, 70, False)])
def test_native_rowwise_int8_operator_gives_the_composed_paths_bits(rows, in_features, out_features, bias):
    """server/native's one-call fbgemm operator (built here: g++ comes with ``make test-apt``)
    and the composed Python path compute the same products to the bit, so which one runs never
    changes a transcript."""
    from server import native
    from server.precision import NATIVE_FBGEMM_MAX_ROWS, fbgemm_rowwise_exact, hybrid_int8_available

    if not fbgemm_rowwise_exact():
        pytest.skip("fbgemm's int8 GEMM is not exact on this CPU: the fused operator is not used")
    assert native.why_unavailable() is not None or native.load(), "the native operator failed to build"
    op = native.rowwise_int8_gemm()
    if op is None:
        pytest.skip(f"native operator unavailable here: {native.why_unavailable()}")
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    composed = RowwiseInt8Linear(linear, "fbgemm")
    composed._fused = None
    x = (torch.randn(rows, in_features * 2) * torch.logspace(-3, 3, rows)[:, None])[:, ::2]  # not contiguous
    x[0] = 0.0  # an all-zero row: the scale's clamp
    assert not x.is_contiguous()
    with torch.inference_mode():
        assert torch.equal(op(x, composed._fbgemm, composed.bias), composed(x))
        fused = RowwiseInt8Linear(linear, "hybrid")  # the fbgemm GEMMs pick the fused operator up
        assert fused._fused is not None
        if hybrid_int8_available():
            assert fused.fbgemm_max_rows == NATIVE_FBGEMM_MAX_ROWS
        assert torch.equal(fused(x.reshape(1, rows, in_features)), composed(x).reshape(1, rows, out_features))
        with pytest.raises(RuntimeError, match="columns"):
            op(torch.randn(2, in_features + 1), composed._fbgemm, composed.bias)


@pytest.mark.parametrize("rows, in_features, out_features, bias", [(1, 512, 2048, True), (5, 2048, 512, False),
                                                                   (6, 1024, 4097, True), (7, 37, 29, False),
                                                                   (40, 301, 70, True), (200, 512, 1536, True)])
def test_native_vnni_int8_kernel_gives_the_other_gemms_bits(rows, in_features, out_features, bias):
    """server/native's AVX-512 VNNI kernel (the default int8 GEMM where the CPU has VNNI) computes
    the same products, to the bit, as fbgemm's (or oneDNN's) GEMM, for widths that are not whole
    blocks and row counts that are not whole register tiles; each row independent of the batch."""
    from server import native
    from server.precision import _onednn_int8_available, fbgemm_rowwise_exact, native_vnni_int8, vnni_pack

    assert native.why_unavailable() is not None or native.load(), "the native operators failed to build"
    if native_vnni_int8() is None:
        pytest.skip(f"no VNNI kernel here: {native.why_unavailable() or 'the CPU lacks AVX-512 VNNI'}")
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    reference = RowwiseInt8Linear(linear, "fbgemm" if fbgemm_rowwise_exact() else
                                  "onednn" if _onednn_int8_available() else "int_mm")
    vnni = RowwiseInt8Linear(linear)  # the default where the kernel works
    assert vnni.gemm == "vnni"
    x = (torch.randn(rows, in_features * 2) * torch.logspace(-3, 3, rows)[:, None])[:, ::2]  # not contiguous
    x[0] = 0.0
    with torch.inference_mode():
        want = reference(x)
        assert torch.equal(vnni(x), want)
        assert torch.equal(vnni(x[-1:]), want[-1:])
        assert torch.equal(vnni(x.reshape(1, rows, in_features)), want.reshape(1, rows, out_features))
        op = native.rowwise_int8_vnni()
        weight, colsum = vnni_pack(torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8))
        with pytest.raises(RuntimeError, match="columns"):
            op(torch.randn(2, in_features + 4), weight, colsum, vnni.weight_scale, None, out_features)
        with pytest.raises(RuntimeError, match="out_features"):
            op(torch.randn(2, in_features), weight, colsum, vnni.weight_scale, None, out_features + 16)
        with pytest.raises(RuntimeError, match="int8"):
            op(torch.randn(2, in_features), weight.float(), colsum, vnni.weight_scale, None, out_features)


@pytest.mark.parametrize("rows, padded, in_features", [(33, 40, 512), (160, 160, 2048), (41, 45, 37), (1, 5, 1024)])
def test_native_int8_quantisation_gives_the_composed_paths_bits(rows, padded, in_features):
    """The large-product (oneDNN) path's one-pass activation quantisation in server/native equals
    the composed torch ops bit for bit (ties round to even, padding rows are zero point 128),
    and a RowwiseInt8Linear using it equals one without it."""
    from server import native
    from server.precision import _onednn_int8_available, _quantize_u8

    assert native.why_unavailable() is not None or native.load(), "the native operator failed to build"
    op = native.rowwise_quantize_u8()
    if op is None:
        pytest.skip(f"native operator unavailable here: {native.why_unavailable()}")
    torch.manual_seed(rows)
    x = (torch.randn(rows, in_features * 2) * torch.logspace(-4, 4, rows)[:, None])[:, ::2]  # not contiguous
    x[0] = 0.0
    x[-1, :4] = torch.tensor([0.5, 1.5, -2.5, 126.5]) * (x[-1].abs().max() / 127.0)  # ties at the row's scale
    want_q, want_s = _quantize_u8(x, padded)
    got_q, got_s = op(x, padded)
    assert got_q.dtype == torch.uint8 and got_q.shape == (padded, in_features)
    assert torch.equal(got_q, want_q) and torch.equal(got_s, want_s)
    assert (got_q[rows:] == 128).all()
    if _onednn_int8_available():  # the GEMM that uses it
        linear = torch.nn.Linear(in_features, 96)
        fused, composed = RowwiseInt8Linear(linear, "onednn"), RowwiseInt8Linear(linear, "onednn")
        composed._quantize_u8 = _quantize_u8
        assert fused._quantize_u8 is op
        with torch.inference_mode():
            assert torch.equal(fused(x), composed(x))
