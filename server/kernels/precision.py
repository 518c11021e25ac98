"""Numeric precision of the engine's networks, applied once at load time.

``apply_precision(module, precision, device)`` converts the engine's own copies of
the networks (the streaming encoder, the predictor and joiner) in place; nothing
casts around each step:

* ``fp32``: every ``Linear`` on CPU becomes a ``BlockedLinear`` (the active native back
  end's kernel, ``server.kernels.native``) or, on the torch path, a ``PackedLinear``: oneDNN's
  fp32 GEMM on weights reordered once at load time. Both give every row the same bits
  whatever the batch; MKL's ``addmm`` behind ``nn.Linear`` does not (a row's last bits
  change with the number of rows), and at the 5-80 rows of a typical step it ran 2-4x
  slower than oneDNN.
* ``bf16`` / ``fp16``: weights and activations in that dtype end to end (the
  left-context state and the LSTM state follow the weights' dtype; LayerNorm and
  softmax accumulate in fp32 inside their kernels).
* ``int8``: every ``Linear`` (Emformer projections and feed-forward, the LSTM gate
  projections of the predictor, the joiner) becomes a dynamically quantised int8
  ``Linear`` (int8 weights per output channel, each activation row quantised with
  its own scale, so a stream's result never depends on what it was batched with);
  everything else stays fp32. See ``INT8_BACKEND`` for the kernel choice.

``detect_cpu_features`` reads what the CPU offers; ``precision_warnings`` says when
a precision would be slower here than fp32, and ``check_precision`` refuses the
combinations this build cannot run well. ``relative_error`` is the self-check's
measure (``server.model.engine.Engine.self_check``).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}

# int8 kernels (bench/precision_kernels.py, BENCHMARKS.md):
# * "rowwise" (default): ``RowwiseInt8Linear``, one activation scale per row, fbgemm's
#   (or oneDNN's) int8 GEMM on pre-packed weights (VNNI / AMX); exact integer products,
#   so batching is invariant.
# * "torch.ao": ``quantize_dynamic`` (fbgemm) is fastest at small row counts, but it
#   quantises the whole batch with one activation scale: a stream's transcript then
#   depends on the other streams in its batch (measured: beam-4 WER on the demo
#   held-out split varied 19.2 - 19.8 % between identical runs). ``--int8-kernel
#   fbgemm`` for operators who trade that for throughput at small batches.
# * "torchao": ``Int8DynamicActivationInt8Weight`` (per-row too) was slower than both.
INT8_BACKEND = "rowwise"
INT8_BACKENDS = ("rowwise", "rowwise-onednn", "torch.ao", "torchao")  # rowwise-onednn: for bench comparisons
# --int8-kernel choices -> backend
INT8_KERNELS = {"rowwise": "rowwise", "fbgemm": "torch.ao"}


class PrecisionError(ValueError):
    """The precision cannot run on this device; the message says why and what to use."""


@dataclass(frozen=True)
class CpuFeatures:
    """Matrix-product features of the CPU (from /proc/cpuinfo flags)."""

    avx2: bool = False
    avx512: bool = False
    avx512_bf16: bool = False
    avx512_fp16: bool = False
    avx512_vnni: bool = False
    amx_bf16: bool = False
    amx_int8: bool = False
    amx_fp16: bool = False

    def describe(self) -> str:
        present = [name for name, on in vars(self).items() if on]
        return ", ".join(present) if present else "none of AVX2 / AVX-512 / AMX"

    @property
    def bf16_hardware(self) -> bool:
        return self.avx512_bf16 or self.amx_bf16


def detect_cpu_features(cpuinfo: str | None = None) -> CpuFeatures:
    """The features in the ``flags`` line of the given /proc/cpuinfo text (default: this CPU's,
    ``server.kernels.native.cpu_flags``)."""
    if cpuinfo is None:
        from server.kernels.native import cpu_flags

        flags = cpu_flags()
    else:
        line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
        flags = frozenset(line.partition(":")[2].split())
    return CpuFeatures(**{name: (f"{name}f" if name == "avx512" else name) in flags
                          for name in CpuFeatures.__dataclass_fields__})


def check_precision(precision: str, device: str, features: CpuFeatures | None = None) -> None:
    """Raise ``PrecisionError`` for a precision this service does not run on ``device``."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device == "cpu" and precision == "fp16":
        features = features or detect_cpu_features()
        bf16 = ("which has native AVX-512 BF16 / AMX-BF16 kernels on this CPU" if features.bf16_hardware else
                "though this CPU has no bf16 hardware either (its features: " + features.describe()
                + "): int8 or fp32 will be faster here")
        raise PrecisionError(
            "fp16 is refused on CPU: it is slower than bf16 for this model (CPU fp16 kernels convert to "
            f"fp32 around most operators); --precision bf16 has the same memory footprint, {bf16}")
    if device == "cuda" and precision == "int8":
        raise PrecisionError("int8 is implemented for CPU only; on CUDA use --precision bf16 or fp16")


def precision_warnings(precision: str, device: str, features: CpuFeatures) -> list[str]:
    """Reasons the chosen precision may be slower than fp32 on this CPU (empty when fine)."""
    if device != "cpu":
        return []
    out = []
    if precision == "bf16" and not features.bf16_hardware:
        out.append("this CPU has neither AVX-512 BF16 nor AMX-BF16: bf16 matrix products are emulated "
                   "and will likely be slower than fp32")
    if precision == "int8" and not (features.avx2 or features.avx512):
        out.append("this CPU has neither AVX2 nor AVX-512: int8 matrix products run on portable loops "
                   "and will gain little over fp32")
    return out


def apply_precision(module: torch.nn.Module, precision: str, int8_backend: str = INT8_BACKEND) -> torch.nn.Module:
    """Convert ``module`` (in place where possible) to ``precision``; returns the module to use."""
    if precision in ("bf16", "fp16"):
        module = module.to(DTYPES[precision])
        if _module_device(module).type == "cpu":  # oneDNN runs these: bound its kernels' memory
            module = _replace_linears(module, BucketedLinear)
        return module
    if precision == "int8":
        return quantize_linears_int8(module, int8_backend)
    if _module_device(module).type == "cpu" and native_linear_f32() is not None:
        return _replace_linears(module, BlockedLinear)
    if _module_device(module).type == "cpu" and packed_linear_available():
        return _replace_linears(module, PackedLinear)
    return module




def _module_device(module: torch.nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def packed_linear_available() -> bool:
    """Whether this torch build has oneDNN's packed fp32 linear (``PackedLinear``)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ROW_UNIT = 5  # the encoder's rows per chunk (4 segment frames + 1 look-ahead frame)


def row_bucket(rows: int) -> int:
    """The row count a oneDNN product runs at: ``rows`` rounded up to a multiple of 5 up to 80
    (the encoder's products, which make up nearly all of a step, then never pad: padding costs a
    copy, about 5 ms a step at one stream), of 20 up to 160, 40 up to 320, 80 up to 640, then 160.
    oneDNN builds and keeps a kernel for every row count it meets (measured: 0.5-0.7 MiB each, kept
    for good); the buckets bound them to about 30 per layer shape."""
    if rows <= 16 * ROW_UNIT:
        return max(ROW_UNIT, -(-rows // ROW_UNIT) * ROW_UNIT)
    for limit, step in ((160, 20), (320, 40), (640, 80)):
        if rows <= limit:
            return -(-rows // step) * step
    return -(-rows // 160) * 160


def _bucketed_rows(x: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int]:
    """``x`` (..., in_features) as rows zero-padded to ``row_bucket`` rows, and the real row count."""
    rows = x.reshape(-1, in_features)
    count = rows.size(0)
    padded = row_bucket(count)
    if padded != count:
        rows = torch.nn.functional.pad(rows, (0, 0, 0, padded - count))
    return rows, count


class BucketedLinear(torch.nn.Module):
    """``nn.Linear`` (its own weights, any dtype) run at ``row_bucket`` rows: torch runs bf16 / fp16
    products on CPU through oneDNN, which keeps a kernel per row count (measured: 100 MiB for one
    512 x 2048 layer over 200 row counts)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, count = _bucketed_rows(x, self.in_features)
        out = torch.nn.functional.linear(rows, self.weight, self.bias)[:count]
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` in fp32 on oneDNN, its weight reordered once into the kernel's blocked layout.

    Input ``(..., in_features)`` float32 -> output ``(..., out_features)`` float32, the same
    maths as ``nn.Linear`` (float rounding aside: it accumulates in another order). Measured
    here (2 threads, 512 x 2048): 0.13 / 0.31 / 0.48 ms at 5 / 20 / 40 rows against MKL's
    0.21 / 1.0 / 1.2 ms; and each output row is bitwise the same whatever the other rows
    (MKL changes a row's last bits with the row count), so batching cannot move a result.
    Rows are zero-padded to ``row_bucket`` (see there).
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float().contiguous()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, count = _bucketed_rows(x, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return out[:count].reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class BlockedLinear(torch.nn.Module):
    """``nn.Linear`` in fp32 on the active native back end's kernel (``native_linear_f32``), its
    weight laid out once in 16-output blocks: each output one fma chain over the inputs in order, so
    each output row is bitwise the same whatever the other rows, at any row count (batching cannot
    move a result); the avx512 and avx2 back ends give the same bits. The fp32 default where a
    native back end runs: against ``PackedLinear`` (oneDNN) it reads few-row products' weights at
    up to twice the speed (BENCHMARKS.md, "Kernels").

    Input ``(..., in_features)`` float32 -> output ``(..., out_features)`` float32.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._op = native_linear_f32()
        if self._op is None:
            raise ValueError("no native fp32 kernel on this path (server.kernels.native, --kernels)")
        self.register_buffer("weight", blocked_f32_weight(linear.weight.detach().float()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._op(x.reshape(-1, self.in_features), self.weight, self.bias, self.out_features)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def blocked_f32_weight(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` -> ``server.kernels.native.linear_f32``'s ``(blocks, in, 16)``: ``[b, j, c] = w[16 b + c, j]``,
    zero-padded to whole blocks."""
    out_features, in_features = weight.shape
    blocks = -(-out_features // 16)
    padded = weight.new_zeros(blocks * 16, in_features)
    padded[:out_features] = weight
    return padded.reshape(blocks, 16, in_features).permute(0, 2, 1).contiguous()


def probe_linear(in_features: int, out_features: int, bias: bool, generator: torch.Generator) -> torch.nn.Linear:
    """An ``nn.Linear`` with weights drawn from ``generator`` (start-up probes leave torch's global
    random state alone)."""
    linear = torch.nn.utils.skip_init(torch.nn.Linear, in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.rand(out_features, in_features, generator=generator).sub_(0.5).div_(in_features ** 0.5))
        if bias:
            linear.bias.copy_(torch.rand(out_features, generator=generator).sub_(0.5))
    return linear


def native_linear_f32():
    """The active native back end's fp32 kernel (``linear_f32``), or ``None`` on the torch path or
    where, on a probe here, it is not within float rounding of ``F.linear`` or a row's result
    depends on the other rows."""
    from server.kernels import native

    return _probed_linear_f32(native.active())


@functools.cache
def _probed_linear_f32(backend: str):
    from server.kernels import native

    op = native.linear_f32()
    if op is None:
        return None
    ok = True
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for bias, (k, n) in ((True, (301, 70)), (False, (64, 33))):
            linear = probe_linear(k, n, bias, generator)
            weight = blocked_f32_weight(linear.weight.float())
            for rows in (1, 7, 150):
                x = torch.randn(rows, k, generator=generator)
                got, want = op(x, weight, linear.bias, n), linear(x)
                ok = (ok and float((got - want).norm() / want.norm()) < 1e-5
                      and torch.equal(op(x[-1:], weight, linear.bias, n), got[-1:]))
    if not ok:
        log.warning("native fp32 kernel (%s) differs from F.linear here; not used", backend)
    return op if ok else None


def _onednn_int8_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")


def _extreme_int8_operands(k: int, n: int, weight_max: int, generator: torch.Generator):
    """int8 weights ``(n, k)`` in [-weight_max, weight_max] and integer rows ``(6, k)`` in [-127, 127]
    with the extremes that saturate 16-bit pair sums (u8 255 x s8 127) where a GEMM has them."""
    w = torch.randint(-weight_max, weight_max + 1, (n, k), dtype=torch.int8, generator=generator)
    w[0] = weight_max
    w[1, ::2], w[1, 1::2] = weight_max, -weight_max
    x = torch.randint(-127, 128, (6, k), generator=generator).float()
    x[0], x[1] = 127.0, -127.0
    return w, x


@functools.cache
def fbgemm_rowwise_exact(weight_max: int = 127) -> bool:
    """Whether fbgemm's int8 GEMM here gives exactly the integer products ``RowwiseInt8Linear``
    needs for weights of at most ``weight_max`` (checked once, on the extreme values that saturate
    the 16-bit pair sums of CPUs without VNNI: 255 x 127 does, 255 x 63 does not)."""
    exact = False
    if "fbgemm" in torch.backends.quantized.supported_engines:
        try:
            with torch.inference_mode():
                k, n = 256, 64
                w, x = _extreme_int8_operands(k, n, weight_max, torch.Generator().manual_seed(0))
                got = _fbgemm_unit_product(x, _fbgemm_pack(w, torch.ones(n)), _fbgemm_range_row(k))
                exact = bool(torch.equal(got, (x.double() @ w.double().t()).float()))
        except (RuntimeError, AttributeError) as e:  # a build without the quantized ops
            log.info("fbgemm int8 GEMM unavailable: %s", e)
    if not exact:
        log.info("fbgemm's int8 GEMM is not exact here for weights up to %d", weight_max)
    return exact


@functools.cache
def onednn_rowwise_exact(weight_max: int = 127) -> bool:
    """Whether oneDNN's int8 GEMM here gives exact integer products for weights of at most
    ``weight_max`` (the extreme-value probe of ``fbgemm_rowwise_exact``)."""
    if not _onednn_int8_available():
        return False
    with torch.inference_mode():
        k, n = 256, 64
        w, x = _extreme_int8_operands(k, n, weight_max, torch.Generator().manual_seed(0))
        packed = torch.ops.onednn.qlinear_prepack(w, [8, k])
        quantised = x.add(128).to(torch.uint8)
        got = torch.ops.onednn.qlinear_pointwise(quantised, 1.0, 128, packed, torch.ones(n),
                                                 torch.zeros(n, dtype=torch.int64), None, 1.0, 0, torch.float32,
                                                 "none", [], "")
        exact = bool(torch.equal(got, (x.double() @ w.double().t()).float()))
    if not exact:
        log.info("oneDNN's int8 GEMM is not exact here for weights up to %d", weight_max)
    return exact


@functools.cache
def torch_int8_weight_max() -> int:
    """Largest int8 weight magnitude for which torch's int8 GEMMs here (fbgemm's and oneDNN's,
    those present) give exact products: 127 where they sum in int32 (VNNI, AMX), else 63 (AVX2
    and AVX-512 without VNNI sum u8 x s8 pairs in 16 bits: 2 x 255 x 63 < 32 767)."""
    engines = [probe for probe, present in ((fbgemm_rowwise_exact, "fbgemm" in torch.backends.quantized.supported_engines),
                                            (onednn_rowwise_exact, _onednn_int8_available())) if present]
    return 127 if all(probe(127) for probe in engines) else 63


def _fbgemm_pack(quantised: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed form of int8 weights ``quantised`` (out, in) with per-row ``scale``, no bias."""
    with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's prepack still takes one
        warnings.simplefilter("ignore")
        qweight = torch.quantize_per_channel(quantised.float() * scale[:, None], scale.double(),
                                             torch.zeros(scale.numel(), dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qweight, None)


def _fbgemm_range_row(in_features: int) -> torch.Tensor:
    row = torch.zeros(1, in_features)
    row[0, 0], row[0, 1] = -128.0, 127.0
    return row


def _fbgemm_unit_product(unit: torch.Tensor, packed, range_row: torch.Tensor) -> torch.Tensor:
    """``unit @ dequantised_weight.T`` for ``unit`` (rows, in) holding integers in [-127, 127] as
    floats. fbgemm's dynamic linear quantises its input with one scale from the input's min and
    max; the appended range row (-128 ... 127) pins that to scale 1, zero point 128, so every
    value is quantised exactly and each row's result depends on that row alone."""
    return torch.ops.quantized.linear_dynamic(torch.cat([unit, range_row]), packed, False)[:-1]


def _row_scales(rows: torch.Tensor) -> torch.Tensor:
    """(n, k) -> (n, 1): each row's int8 scale, max |row| / 127 (at least 1e-12 / 127)."""
    # abs().amax(): measured 10x faster here than linalg.vector_norm(ord=inf) or aminmax
    return rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127.0)


def _quantize_u8(rows: torch.Tensor, padded_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) float32 -> ((padded_rows, k) uint8, (n, 1) scales): each row as int8 values
    round(row / scale) shifted to uint8 around zero point 128 (oneDNN's activation type), rounded
    before the shift (v + 128 in float32 can itself round, then ties fall otherwise); padding rows
    are 128 (zero). ``server.kernels.native``'s ``rowwise_quantize_u8`` gives the same bits in one pass."""
    scale = _row_scales(rows)
    quantised = rows.div(scale).round_().add_(128).to(torch.uint8)
    if padded_rows != rows.size(0):
        quantised = torch.nn.functional.pad(quantised, (0, 0, 0, padded_rows - rows.size(0)), value=128)
    return quantised, scale


def fused_quantize_u8():
    """The active native back end's one-pass ``_quantize_u8`` (``None`` on the torch path or where
    it does not give the composed bits on a probe here: rows spanning twelve decades, ties, odd
    widths)."""
    from server.kernels import native

    return _probed_quantize_u8(native.active())


@functools.cache
def _probed_quantize_u8(backend: str):
    from server.kernels import native

    op = native.rowwise_quantize_u8()
    if op is None:
        return None
    generator = torch.Generator().manual_seed(0)
    ok = True
    for k in (300, 37, 2048):
        x = torch.randn(9, k, generator=generator) * torch.logspace(-6, 6, 9)[:, None]
        x[0, :5] = torch.tensor([0.5, 1.5, -2.5, 127.0, -127.0]) * (x[0].abs().max() / 127.0)  # ties
        x[1] = 0.0
        want, got = _quantize_u8(x, 16), op(x, 16)
        ok = ok and torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    if not ok:
        log.warning("native int8 quantisation (%s) differs from the composed path here; not used", backend)
    return op if ok else None


def block_pack_int8(quantised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights ``(out, in)`` -> ``server.kernels.native.rowwise_int8``'s layout: ``(blocks, k4, 16, 4)``
    with ``[b, j, c, i] = w[16 b + c, 4 j + i]`` (zero-padded to whole blocks), and the column sums
    ``(blocks * 16,)`` int32 (for the kernel's uint8 activation offset)."""
    out_features, in_features = quantised.shape
    blocks, k4 = -(-out_features // 16), -(-in_features // 4)
    padded = torch.zeros(blocks * 16, k4 * 4, dtype=torch.int8)
    padded[:out_features, :in_features] = quantised
    colsum = padded.sum(dim=1, dtype=torch.int32)
    return padded.reshape(blocks, 16, k4, 4).permute(0, 2, 1, 3).contiguous(), colsum


def native_int8():
    """The active native back end's row-wise int8 product (``rowwise_int8``), or ``None`` on the
    torch path or where it does not give a torch GEMM's bits on a probe here (odd widths, rows
    across six decades, a zero row, with and without bias, weights at its ``int8_weight_max``)."""
    from server.kernels import native

    return _probed_int8(native.active())


@functools.cache
def _probed_int8(backend: str):
    from server.kernels import native

    op = native.rowwise_int8()
    if op is None:
        return None
    weight_max = native.int8_weight_max()
    ok = True
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for bias, (k, n) in ((True, (301, 70)), (False, (64, 33))):
            linear = probe_linear(k, n, bias, generator)
            w = linear.weight.float()
            w_scale = w.abs().amax(dim=1).clamp_min(1e-12) / float(weight_max)
            quantised = torch.round(w / w_scale[:, None]).to(torch.int8)
            weight, colsum = block_pack_int8(quantised)
            b = None if linear.bias is None else linear.bias.detach()
            for rows in (1, 7, 150):
                x = torch.randn(rows, k, generator=generator) * torch.logspace(-3, 3, rows)[:, None]
                x[0] = 0.0
                ok = ok and torch.equal(op(x, weight, colsum, w_scale, b, n), exact_rowwise_int8(x, quantised, w_scale, b))
    if not ok:
        log.warning("native int8 kernel (%s) differs from the exact row-wise product here; not used", backend)
    return op if ok else None


def exact_rowwise_int8(x: torch.Tensor, quantised: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """The bits every ``RowwiseInt8Linear`` GEMM gives, computed exactly in float64: rows ``x (n, k)``
    quantised per row, times int8 weights ``quantised (out, k)``, then ``* w_scale`` and the row
    scales and ``bias`` in one ``addcmul``. The reference of the start-up probes and the tests."""
    scale = _row_scales(x)
    acc = (x.div(scale).round_().double() @ quantised.double().t()).float()
    out = acc.mul_(w_scale)
    return out.mul_(scale) if bias is None else torch.addcmul(bias, out, scale)


# "hybrid": row-wise int8 products up to this many rows run on fbgemm, larger ones on oneDNN;
# the composed fbgemm path is faster than oneDNN to about 32 rows (BENCHMARKS.md, "Kernels")
FBGEMM_MAX_ROWS = 32


@functools.cache
def hybrid_int8_available() -> bool:
    """Whether ``RowwiseInt8Linear`` may take fbgemm's GEMM for small products and oneDNN's for
    large ones: both exact here and bit-for-bit equal on a probe (checked once)."""
    weight_max = torch_int8_weight_max()
    if not (fbgemm_rowwise_exact(weight_max) and onednn_rowwise_exact(weight_max)):
        return False
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        linear = probe_linear(2048, 96, True, generator)
        x = torch.randn(40, 2048, generator=generator) * torch.logspace(-3, 3, 40)[:, None]
        small, large = RowwiseInt8Linear(linear, "fbgemm"), RowwiseInt8Linear(linear, "onednn")
        agree = bool(torch.equal(small(x), large(x)))
    if not agree:
        log.info("fbgemm's and oneDNN's int8 products differ here; row-wise int8 runs on fbgemm alone")
    return agree


def exact_torch_int8_gemms() -> list[str]:
    """torch's GEMMs for ``RowwiseInt8Linear`` that are exact here at ``torch_int8_weight_max``,
    preferred first (``int_mm`` always, last)."""
    weight_max = torch_int8_weight_max()
    return [g for g, ok in (("hybrid", hybrid_int8_available()), ("fbgemm", fbgemm_rowwise_exact(weight_max)),
                            ("onednn", onednn_rowwise_exact(weight_max))) if ok] + ["int_mm"]


def torch_int8_gemm() -> str:
    """The torch GEMM ``RowwiseInt8Linear`` runs where no native back end does."""
    return exact_torch_int8_gemms()[0]


class RowwiseInt8Linear(torch.nn.Module):
    """``nn.Linear`` in int8: weights quantised once per output channel (symmetric, to at most
    ``weight_max`` in magnitude), each input row quantised on the fly with its own scale (to
    [-127, 127]), products accumulated exactly in int32.

    Input ``(..., in_features)`` float32 -> output ``(..., out_features)`` float32. Each output
    row depends on its input row alone, bit for bit, whatever else is in the batch.

    GEMM (``gemm``; default: ``"native"`` where a native back end runs, else ``"torch"``). Every
    one gives the exact integer products scaled by the weight scales (``acc * w_scale``, one
    rounding), then the row scales and the bias in one ``addcmul`` (or its fma), so all give the
    same bits for the same weights:

    * ``"native"``: the active back end's ``rowwise_int8`` (``server.kernels.native``), all row counts
      in one call.
    * ``"torch"``: the best of the following that is exact here (``torch_int8_gemm``).
    * ``"hybrid"``: fbgemm up to ``FBGEMM_MAX_ROWS`` rows, oneDNN above (where
      ``hybrid_int8_available``: the two agree bit for bit).
    * ``"fbgemm"``: fbgemm's u8s8 GEMM, composed around ``quantized::linear_dynamic``, handed
      each row already divided by its scale and pinned to an exact unit quantisation
      (``_fbgemm_unit_product``).
    * ``"onednn"``: oneDNN's int8 GEMM on weights packed once (``onednn.qlinear_pointwise``,
      given rows already quantised, with scale 1), at bucketed row counts (``row_bucket``:
      oneDNN keeps a kernel per row count).
    * ``"int_mm"``: ``torch._int_mm``, which repacks the weights at every call (1.4-2x slower).

    ``weight_max`` (default: what the GEMM sums exactly here: ``native.int8_weight_max`` or
    ``torch_int8_weight_max``) is 127, or 63 where a CPU sums pairs of u8 x s8 products in 16
    bits (AVX2, AVX-512 without VNNI): one bit of weight precision for exact products.
    """

    GEMMS = ("native", "torch", "hybrid", "fbgemm", "onednn", "int_mm")

    def __init__(self, linear: torch.nn.Linear, gemm: str | None = None, weight_max: int | None = None):
        super().__init__()
        from server.kernels import native

        if gemm is None:
            gemm = "native" if native_int8() is not None else "torch"
        if gemm == "torch":
            gemm = torch_int8_gemm()
        if gemm not in self.GEMMS:
            raise ValueError(f"unknown int8 GEMM {gemm!r}; choose one of {', '.join(self.GEMMS)}")
        self.gemm = gemm
        self._native = None
        if gemm == "native":
            self._native = native_int8()
            if self._native is None:
                raise ValueError("no native int8 kernel on this path (server.kernels.native, --kernels)")
        if weight_max is None:
            weight_max = native.int8_weight_max() if gemm == "native" else torch_int8_weight_max()
        self.weight_max = weight_max
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / float(weight_max)
        quantised = torch.round(weight / scale[:, None]).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if gemm == "native":
            weight_blocks, colsum = block_pack_int8(quantised)
            self.register_buffer("weight_blocks", weight_blocks)
            self.register_buffer("weight_colsum", colsum)
        if gemm in ("hybrid", "fbgemm"):
            self._fbgemm = _fbgemm_pack(quantised, scale)
            self.register_buffer("range_row", _fbgemm_range_row(self.in_features))
        self.fbgemm_max_rows = {"hybrid": FBGEMM_MAX_ROWS, "fbgemm": 1 << 62}.get(gemm, -1)
        if gemm in ("hybrid", "onednn"):
            self._quantize_u8 = fused_quantize_u8() or _quantize_u8
            self._onednn = torch.ops.onednn.qlinear_prepack(quantised, [256, self.in_features])
            self.register_buffer("weight_zero_points", torch.zeros(self.out_features, dtype=torch.int64))
        if gemm == "int_mm":
            self.register_buffer("weight_t", quantised.t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    @property
    def uses_native(self) -> bool:
        """Whether products run on a native back end's kernel (``weight_blocks``, ``weight_colsum``)."""
        return self._native is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self._native is not None:
            return self._native(rows, self.weight_blocks, self.weight_colsum, self.weight_scale, self.bias,
                                self.out_features).reshape(*x.shape[:-1], self.out_features)
        count = rows.size(0)
        if count <= self.fbgemm_max_rows:  # fbgemm rounds rows / scale itself (exactly: unit scale)
            scale = _row_scales(rows)
            out = _fbgemm_unit_product(rows.div(scale), self._fbgemm, self.range_row)
        elif self.gemm != "int_mm":
            # bucketed row counts bound the kernels oneDNN keeps (one per row count)
            quantised, scale = self._quantize_u8(rows, row_bucket(count))
            out = torch.ops.onednn.qlinear_pointwise(
                quantised, 1.0, 128, self._onednn, self.weight_scale,
                self.weight_zero_points, None, 1.0, 0, torch.float32, "none", [], "")[:count]
        else:
            scale = _row_scales(rows)
            quantised = rows.div(scale).round_().to(torch.int8)
            out = torch._int_mm(quantised, self.weight_t).float().mul_(self.weight_scale)
        out = out.mul_(scale) if self.bias is None else torch.addcmul(self.bias, out, scale)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, gemm={self.gemm}, weight_max={self.weight_max}")


def native_linear_args(modules: list[torch.nn.Module]) -> tuple[int, list[torch.Tensor]] | None:
    """How ``server.kernels.native``'s fused operators (``predictor_step``, ``emformer_layers``) take these
    linears: ``(kind, tensors)``, kind 0 when every one is a ``BlockedLinear`` (tensors weight, bias
    per linear), 1 when every one is a native ``RowwiseInt8Linear`` (weight, column sums, weight
    scales, bias); a missing bias is a 0-element tensor. ``None`` for anything else."""
    empty = torch.empty(0)
    bias = lambda m: m.bias if m.bias is not None else empty  # noqa: E731
    if all(isinstance(m, BlockedLinear) for m in modules):
        return 0, [t for m in modules for t in (m.weight, bias(m))]
    if all(isinstance(m, RowwiseInt8Linear) and m.uses_native for m in modules):
        return 1, [t for m in modules for t in (m.weight_blocks, m.weight_colsum, m.weight_scale, bias(m))]
    return None


def native_layer_norm_args(norms: list[torch.nn.Module]) -> tuple[list[torch.Tensor], list[float]] | None:
    """``(weight, bias pairs, eps)`` of float32 affine ``LayerNorm``s over their last dimension, as
    ``server.kernels.native``'s fused operators take them; ``None`` if any is something else."""
    if not all(isinstance(n, torch.nn.LayerNorm) and n.weight is not None and n.bias is not None
               and n.weight.dtype == torch.float32 and len(n.normalized_shape) == 1 for n in norms):
        return None
    return [t.detach() for n in norms for t in (n.weight, n.bias)], [float(n.eps) for n in norms]


def _replace_linears(module: torch.nn.Module, kind: Callable[[torch.nn.Linear], torch.nn.Module] | None = None,
                     min_params: int = 0) -> torch.nn.Module:
    """Every plain ``nn.Linear`` in ``module`` of at least ``min_params`` weights -> ``kind(linear)``
    (default ``RowwiseInt8Linear``)."""
    kind = kind or RowwiseInt8Linear
    if type(module) is torch.nn.Linear:
        return kind(module) if module.weight.numel() >= min_params else module
    for name, child in list(module.named_children()):
        setattr(module, name, _replace_linears(child, kind, min_params))
    return module


def quantize_linears_int8(module: torch.nn.Module, backend: str = INT8_BACKEND) -> torch.nn.Module:
    """Every ``nn.Linear`` in ``module`` -> dynamically quantised int8, with ``backend`` one of
    ``INT8_BACKENDS``: ``"rowwise"`` (``RowwiseInt8Linear``; ``"rowwise-onednn"`` forces its
    oneDNN GEMM), ``"torch.ao"`` (``quantize_dynamic``,
    fbgemm) or ``"torchao"`` (``Int8DynamicActivationInt8Weight``)."""
    if backend not in INT8_BACKENDS:
        raise PrecisionError(f"unknown int8 backend {backend!r}; choose one of {', '.join(INT8_BACKENDS)}")
    if backend == "rowwise":
        return _replace_linears(module)
    if backend == "rowwise-onednn":
        return _replace_linears(module, lambda linear: RowwiseInt8Linear(linear, "onednn"))
    if backend == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(module, Int8DynamicActivationInt8WeightConfig())
        return module
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear: qconfig}, dtype=torch.qint8,
                                                      inplace=True)


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in fp32."""
    reference, value = reference.float(), value.float()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-12))
