"""Reduced precision: applied once at load time, checked against fp32 at start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from asr.v1 import asr_pb2
from server.app import AsrServer
from server.config import ServerSettings
from server.kernels import native
from server.kernels.cpu import CpuFeatures, cpu_flags, detect_cpu_features
from server.kernels.linear import PackedLinear, RowwiseInt8Linear
from server.kernels.packing import packed_linear_available
from server.kernels.precision import PrecisionError, check_precision, precision_warnings
from server.kernels.probes import relative_error
from server.model.engine import Engine
from tests.conftest import (KERNEL_PATHS, kernels_selected, running_server, skip_unless_cpu_runs, small_model,
                            why_cpu_cannot_run)
from tests.helpers import GREEDY, transcript

SAPPHIRE_FLAGS = "flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 avx512_fp16\n"


def test_cpu_features_are_read_from_cpuinfo_flags():
    f = detect_cpu_features("processor : 0\n" + SAPPHIRE_FLAGS)
    assert f.avx512 and f.avx512_bf16 and f.amx_bf16 and f.amx_int8 and f.avx512_vnni and not f.amx_fp16
    assert "amx_bf16" in f.describe()
    assert detect_cpu_features("flags : fpu sse avx2\n") == CpuFeatures(avx2=True)
    assert detect_cpu_features("flags : fpu sse\n") == CpuFeatures()


def test_precision_that_would_be_slow_here_is_warned_about():
    old_cpu = CpuFeatures(avx512=True)
    assert any("slower than fp32" in w for w in precision_warnings("bf16", "cpu", old_cpu))
    assert precision_warnings("int8", "cpu", old_cpu) == []  # exact int8 kernels on AVX-512 and AVX2
    assert precision_warnings("int8", "cpu", CpuFeatures(avx2=True)) == []
    assert precision_warnings("int8", "cpu", CpuFeatures())
    assert precision_warnings("bf16", "cpu", detect_cpu_features(SAPPHIRE_FLAGS)) == []
    assert precision_warnings("fp32", "cpu", old_cpu) == []


def test_fp16_on_cpu_and_unknown_precisions_are_refused_with_a_reason():
    with pytest.raises(PrecisionError, match="bf16"):
        check_precision("fp16", "cpu")
    with pytest.raises(PrecisionError, match="no bf16 hardware either .*avx2") as refused:
        check_precision("fp16", "cpu", CpuFeatures(avx2=True))
    assert "native AVX-512 BF16" not in str(refused.value)
    with pytest.raises(PrecisionError, match="native AVX-512 BF16 / AMX-BF16 kernels on this CPU"):
        check_precision("fp16", "cpu", detect_cpu_features(SAPPHIRE_FLAGS))
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
    """The row-wise int8 GEMMs of the torch path this machine runs exactly (at
    ``torch_int8_weight_max``), then each native back end's (``native:<backend>``)."""
    from server.kernels.probes import exact_torch_int8_gemms

    return exact_torch_int8_gemms() + [f"native:{b}" for b in native.BACKENDS]


def _rowwise(linear: torch.nn.Linear, gemm: str, weight_max: int | None = None) -> RowwiseInt8Linear:
    """``RowwiseInt8Linear`` on ``gemm`` (``native:<backend>``: that back end's kernel; skipped only
    where the CPU lacks its instructions)."""
    if not gemm.startswith("native:"):
        return RowwiseInt8Linear(linear, gemm, weight_max)
    with kernels_selected(gemm.partition(":")[2]):
        return RowwiseInt8Linear(linear, "native", weight_max)


@pytest.mark.parametrize("gemm", _int8_gemms())
@pytest.mark.parametrize("rows, in_features, out_features", [(1, 80, 512), (7, 257, 29), (40, 512, 4097)])
def test_rowwise_int8_linear_is_close_to_fp32_and_each_row_independent_of_the_batch(rows, in_features,
                                                                                      out_features, gemm):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features)
    int8 = _rowwise(linear, gemm)
    x = torch.randn(rows, in_features) * torch.logspace(-2, 2, rows)[:, None]  # rows of very different scale
    with torch.inference_mode():
        batched = int8(x)
        assert relative_error(linear(x), batched) < 0.02
        for i in range(rows):
            assert torch.equal(int8(x[i:i + 1]), batched[i:i + 1])
        assert torch.equal(int8(x.reshape(1, rows, in_features)), batched.reshape(1, rows, out_features))


@pytest.mark.parametrize("weight_max", [127, 63])
@pytest.mark.parametrize("rows", [3, 40, 100, 150])  # below and above FBGEMM_MAX_ROWS
def test_rowwise_int8_gemms_give_the_exact_bits(rows, weight_max):
    """Whatever GEMM runs, the result is the exact integer product of the quantised rows and
    weights, scaled the same way: bit for bit ``exact_rowwise_int8`` (the hybrid's small and large
    batches must agree, or batching would change a stream's result). Every native back end at its
    own weight range, the torch GEMMs at the range they are exact at here."""
    from server.kernels.packing import exact_rowwise_int8, fbgemm_pack, fbgemm_range_row, fbgemm_unit_product
    from server.kernels.probes import fbgemm_rowwise_exact, torch_int8_weight_max

    torch.manual_seed(rows)
    linear = torch.nn.Linear(2048, 70)
    x = torch.randn(rows, 2048) * torch.logspace(-3, 3, rows)[:, None]
    compared = 0
    with torch.inference_mode():
        for gemm in _int8_gemms():
            if gemm.startswith("native:"):
                backend = gemm.partition(":")[2]
                if any(f not in cpu_flags() for f in native.REQUIRED_FLAGS[backend]):
                    continue  # the CPU lacks its instructions (the tests above say which)
                int8 = _rowwise(linear, gemm)
                if int8.weight_max != weight_max:
                    continue
            elif weight_max > torch_int8_weight_max():
                continue
            else:
                int8 = _rowwise(linear, gemm, weight_max)
            want = exact_rowwise_int8(x, torch.round(linear.weight / int8.weight_scale[:, None]).to(torch.int8),
                                      int8.weight_scale, linear.bias)
            got = int8(x)
            assert torch.equal(got, want), (gemm, (got - want).abs().max().item())
            compared += 1
        if fbgemm_rowwise_exact(weight_max):  # the pinned unit quantisation: exact, extreme values included
            w = torch.randint(-weight_max, weight_max + 1, (70, 300), dtype=torch.int8)
            units = torch.randint(-127, 128, (9, 300)).float()
            units[0], units[1] = 127.0, -127.0
            got = fbgemm_unit_product(units, fbgemm_pack(w, torch.ones(70)), fbgemm_range_row(300))
            assert torch.equal(got, (units.double() @ w.double().t()).float())
    assert compared or weight_max == 127, "at 63 the avx2 back end, at least, runs on every x86-64 CPU with AVX2"


def test_int8_weight_range_is_seven_bits_where_pairs_are_summed_in_16_bits():
    """u8 x s8 pairs summed in 16 bits (vpmaddubsw: AVX2, AVX-512 without VNNI) saturate at
    2 x 255 x 127; 63 keeps them exact. VNNI and the portable loops sum in int32."""
    from server.kernels.probes import torch_int8_weight_max

    expected = {"avx512": 127 if "avx512_vnni" in cpu_flags() else 63, "avx2": 63, "portable": 127}
    for backend in native.runnable():
        with kernels_selected(backend):
            assert native.int8_weight_max() == expected[backend], backend
    with kernels_selected("torch"):
        assert native.int8_weight_max() == 127
    assert torch_int8_weight_max() in (63, 127)


@pytest.mark.skipif(not packed_linear_available(), reason="this torch build has no oneDNN packed linear")
def test_fp32_runs_every_linear_on_the_native_kernel_else_on_onednn(kernels):
    from server.kernels.linear import BlockedLinear
    from server.kernels.precision import apply_precision

    net = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512),
                              torch.nn.Sequential(torch.nn.Linear(512, 29)))
    x = torch.randn(7, 512)
    with torch.inference_mode():
        expected = net(x)
        converted = apply_precision(net, "fp32")
        assert relative_error(expected, converted(x)) < 1e-5
    kind = PackedLinear if kernels == "torch" else BlockedLinear
    assert all(isinstance(m, kind) for m in (converted[0], converted[2], converted[3][0]))


@pytest.mark.parametrize("rows, in_features, out_features, bias", [(1, 512, 2048, True), (5, 2048, 512, False),
                                                                   (7, 37, 29, True), (45, 1024, 4097, True),
                                                                   (200, 512, 1536, False)])
@pytest.mark.parametrize("backend", native.BACKENDS)
def test_native_fp32_kernel_matches_linear_and_each_row_is_independent_of_the_batch(rows, in_features,
                                                                                    out_features, bias, backend):
    """Each native back end's fp32 kernel (the fp32 default where one runs): within float rounding
    of ``F.linear``, and each row's result the same bits alone as in any batch, for widths that are
    not whole blocks and row counts that are not whole register tiles; avx2 gives avx512's bits."""
    from server.kernels.linear import BlockedLinear
    from server.kernels.packing import blocked_f32_weight

    skip_unless_cpu_runs(backend)
    native.select(backend)
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
        if backend == "avx2" and "avx512f" in cpu_flags():  # the same fma chains, 8 lanes at a time
            native.select("avx512")
            assert torch.equal(BlockedLinear(linear)(x), batched)


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


@pytest.mark.parametrize("precision, bound, paths", [("bf16", 0.05, ["auto"]), ("int8", 0.1, KERNEL_PATHS)])
def test_self_check_measures_a_small_error_and_refuses_over_the_bound(precision, bound, paths):
    for path in paths:  # bf16 runs torch's kernels on every path
        _self_check_measures_and_refuses(precision, bound, path)


def _self_check_measures_and_refuses(precision: str, bound: float, kernels: str) -> None:
    if kernels != "auto" and why_cpu_cannot_run(kernels):
        return  # the CPU lacks the path's instructions (named by the per-path tests' skips)
    engine = Engine(small_model(), precision=precision, kernels=kernels)
    error = engine.self_check(max_error=1.0)
    assert 0 < error < bound
    assert relative_error(torch.ones(4), torch.ones(4)) == 0.0
    with pytest.raises(PrecisionError, match="--max-precision-error"):
        engine.self_check(max_error=error / 10)


@pytest.mark.parametrize("model_name", ["random-base", "demo"])
def test_int8_passes_the_self_check_and_is_batch_exact_on_every_path(model_name, kernels):
    """The start-up checks of ``asr-server --precision int8``, full-size model included, on each
    kernel path: the self-check's error well under its bound (0.1), batching bit-exact."""
    from server.model.loading import load_model

    engine = Engine(load_model(model_name), precision="int8", kernels=kernels)
    assert 0 < engine.self_check(max_error=0.1) < 0.05
    assert engine.check_batching()


def test_start_up_probes_leave_torchs_global_random_state_alone(kernels):
    from server.kernels import probes
    from server.model.encoder import _probed_ring_attention

    probes.clear()
    _probed_ring_attention.cache_clear()
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    for mode in ("int8", "fp32"):
        engine = Engine(small_model(), precision=mode)
        engine.check_batching()
        engine.self_check(max_error=1.0)
    assert torch.equal(torch.random.get_rng_state(), state)


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
    from server.kernels.packing import row_bucket

    buckets = [row_bucket(n) for n in range(1, 2049)]
    assert all(b >= n for n, b in zip(range(1, 2049), buckets))
    assert buckets == sorted(buckets)
    assert len(set(b for b in buckets[:640])) <= 30 and len(set(buckets)) <= 40
    assert all(b <= 1.25 * n for n, b in zip(range(1, 2049), buckets) if n > 20)  # waste <= 25 %
    assert all(row_bucket(5 * streams) == 5 * streams for streams in range(1, 17))  # the encoder never pads


def test_bf16_linears_run_at_bucketed_row_counts_with_the_same_result():
    from server.kernels.linear import BucketedLinear
    from server.kernels.precision import apply_precision

    linear = torch.nn.Linear(64, 96)
    net = apply_precision(torch.nn.Sequential(torch.nn.Linear(64, 96)), "bf16")
    net[0].load_state_dict({k: v.to(torch.bfloat16) for k, v in linear.state_dict().items()})
    assert isinstance(net[0], BucketedLinear)
    x = torch.randn(5, 3, 64).to(torch.bfloat16)
    with torch.inference_mode():
        # (oneDNN may round a padded batch's bf16 products differently: close, not equal)
        assert relative_error(torch.nn.functional.linear(x, net[0].weight, net[0].bias), net(x)) < 1e-2


@pytest.mark.parametrize("rows, in_features, out_features, bias", [(1, 512, 2048, True), (5, 2048, 512, False),
                                                                   (6, 1024, 4097, True), (7, 37, 29, False),
                                                                   (40, 301, 70, True), (200, 512, 1536, True)])
@pytest.mark.parametrize("backend", native.BACKENDS)
def test_native_int8_kernel_gives_the_exact_bits(rows, in_features, out_features, bias, backend):
    """Each native back end's int8 kernel (the int8 default where one runs) computes the exact
    row-wise products (``exact_rowwise_int8``, to the bit) at its weight range, for widths that
    are not whole blocks and row counts that are not whole register tiles, extreme values
    included; each row independent of the batch; bad shapes refused."""
    from server.kernels.packing import block_pack_int8, exact_rowwise_int8

    skip_unless_cpu_runs(backend)
    native.select(backend)
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    int8 = RowwiseInt8Linear(linear)  # the default where a native back end runs
    assert int8.gemm == "native" and int8.weight_max == native.int8_weight_max()
    x = (torch.randn(rows, in_features * 2) * torch.logspace(-3, 3, rows)[:, None])[:, ::2]  # not contiguous
    x[0] = 0.0
    with torch.inference_mode():
        quantised = torch.round(linear.weight / int8.weight_scale[:, None]).to(torch.int8)
        want = exact_rowwise_int8(x, quantised, int8.weight_scale, linear.bias)
        assert torch.equal(int8(x), want)
        assert torch.equal(int8(x[-1:]), want[-1:])
        assert torch.equal(int8(x.reshape(1, rows, in_features)), want.reshape(1, rows, out_features))
        op = native.rowwise_int8()
        top = native.int8_weight_max()  # extremes: +-weight_max weights, +-127 activations (u8 1 and 255)
        extreme = torch.full((out_features, in_features), top, dtype=torch.int8)
        extreme[1::2, 1::2] = -top
        weight, colsum = block_pack_int8(extreme)
        ones = torch.ones(out_features)
        peaks = torch.ones(3, in_features)
        peaks[1] = -1.0
        peaks[2, 1::2] = -1.0
        assert torch.equal(op(peaks, weight, colsum, ones, None, out_features),
                           exact_rowwise_int8(peaks, extreme, ones, None))
        with pytest.raises(RuntimeError, match="columns"):
            op(torch.randn(2, in_features + 4), weight, colsum, ones, None, out_features)
        with pytest.raises(RuntimeError, match="out_features"):
            op(torch.randn(2, in_features), weight, colsum, ones, None, out_features + 16)
        with pytest.raises(RuntimeError, match="int8"):
            op(torch.randn(2, in_features), weight.float(), colsum, ones, None, out_features)


@pytest.mark.parametrize("rows, padded, in_features", [(33, 40, 512), (160, 160, 2048), (41, 45, 37), (1, 5, 1024)])
@pytest.mark.parametrize("backend", native.BACKENDS)
def test_native_int8_quantisation_gives_the_composed_paths_bits(rows, padded, in_features, backend):
    """Each native back end's one-pass activation quantisation (used by the oneDNN GEMM) equals the
    composed torch ops bit for bit (ties round to even, padding rows are zero point 128), and a
    RowwiseInt8Linear using it equals one without it."""
    from server.kernels.packing import onednn_int8_available, quantize_u8

    skip_unless_cpu_runs(backend)
    native.select(backend)
    op = native.rowwise_quantize_u8()
    torch.manual_seed(rows)
    x = (torch.randn(rows, in_features * 2) * torch.logspace(-4, 4, rows)[:, None])[:, ::2]  # not contiguous
    x[0] = 0.0
    x[-1, :4] = torch.tensor([0.5, 1.5, -2.5, 126.5]) * (x[-1].abs().max() / 127.0)  # ties at the row's scale
    want_q, want_s = quantize_u8(x, padded)
    got_q, got_s = op(x, padded)
    assert got_q.dtype == torch.uint8 and got_q.shape == (padded, in_features)
    assert torch.equal(got_q, want_q) and torch.equal(got_s, want_s)
    assert (got_q[rows:] == 128).all()
    if onednn_int8_available():  # the GEMM that uses it
        linear = torch.nn.Linear(in_features, 96)
        fused = RowwiseInt8Linear(linear, "onednn")
        composed = RowwiseInt8Linear(linear, "onednn", quantize_rows=quantize_u8)
        assert fused.quantize_rows is op and composed.quantize_rows is quantize_u8
        with torch.inference_mode():
            assert torch.equal(fused(x), composed(x))


def test_every_kernel_back_end_this_cpu_runs_was_built():
    """A back end that failed to compile at install would silently leave its CPUs on a slower path."""
    proc = subprocess.run([sys.executable, "-m", "server.kernels.native", "--strict"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "runs here" in proc.stdout
