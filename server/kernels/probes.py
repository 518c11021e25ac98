"""Start-up probes: whether each kernel gives the bits it must, here, before anything runs on it.

Each probe runs once per process (per native back end where it probes one), on seeded inputs
of its own (``probe_linear``; torch's global random state is left alone), and its answer decides
which kernels the Linear back ends (``server.kernels.linear``) take:

* ``native_linear_f32``: the active native back end's fp32 kernel, if within float rounding of
  ``F.linear`` and each row independent of the others;
* ``native_int8``: its row-wise int8 product, if it gives ``exact_rowwise_int8``'s bits;
* ``fused_quantize_u8``: its one-pass activation quantisation, if it gives ``quantize_u8``'s bits;
* ``fbgemm_rowwise_exact`` / ``onednn_rowwise_exact``: whether torch's int8 GEMMs sum exactly for
  weights up to a magnitude, hence ``torch_int8_weight_max``;
* ``hybrid_int8_available``: whether fbgemm's and oneDNN's row-wise products agree bit for bit;
* ``exact_torch_int8_gemms`` / ``torch_int8_gemm``: the torch GEMMs exact here, best first.

``relative_error`` is the measure of the engine's start-up self-check against fp32
(``server.model.engine.Engine.self_check``). ``clear()`` forgets every answer (the next use
probes again).
"""

from __future__ import annotations

import functools
import logging

import torch

from server.kernels import native
from server.kernels.packing import (block_pack_int8, blocked_f32_weight, exact_rowwise_int8, fbgemm_pack,
                                    fbgemm_range_row, fbgemm_rowwise, fbgemm_unit_product, onednn_int8_available,
                                    onednn_rowwise, quantize_u8, quantize_weight)

log = logging.getLogger(__name__)


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
    return _probed_linear_f32(native.active())


@functools.cache
def _probed_linear_f32(backend: str):
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
                got = fbgemm_unit_product(x, fbgemm_pack(w, torch.ones(n)), fbgemm_range_row(k))
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
    if not onednn_int8_available():
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
                                            (onednn_rowwise_exact, onednn_int8_available())) if present]
    return 127 if all(probe(127) for probe in engines) else 63


def fused_quantize_u8():
    """The active native back end's one-pass ``quantize_u8`` (``None`` on the torch path or where
    it does not give the composed bits on a probe here: rows spanning twelve decades, ties, odd
    widths)."""
    return _probed_quantize_u8(native.active())


@functools.cache
def _probed_quantize_u8(backend: str):
    op = native.rowwise_quantize_u8()
    if op is None:
        return None
    generator = torch.Generator().manual_seed(0)
    ok = True
    for k in (300, 37, 2048):
        x = torch.randn(9, k, generator=generator) * torch.logspace(-6, 6, 9)[:, None]
        x[0, :5] = torch.tensor([0.5, 1.5, -2.5, 127.0, -127.0]) * (x[0].abs().max() / 127.0)  # ties
        x[1] = 0.0
        want, got = quantize_u8(x, 16), op(x, 16)
        ok = ok and torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    if not ok:
        log.warning("native int8 quantisation (%s) differs from the composed path here; not used", backend)
    return op if ok else None


def native_int8():
    """The active native back end's row-wise int8 product (``rowwise_int8``), or ``None`` on the
    torch path or where it does not give a torch GEMM's bits on a probe here (odd widths, rows
    across six decades, a zero row, with and without bias, weights at its ``int8_weight_max``)."""
    return _probed_int8(native.active())


@functools.cache
def _probed_int8(backend: str):
    op = native.rowwise_int8()
    if op is None:
        return None
    weight_max = native.int8_weight_max()
    ok = True
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for bias, (k, n) in ((True, (301, 70)), (False, (64, 33))):
            linear = probe_linear(k, n, bias, generator)
            quantised, w_scale = quantize_weight(linear.weight.float(), weight_max)
            weight, colsum = block_pack_int8(quantised)
            b = None if linear.bias is None else linear.bias.detach()
            for rows in (1, 7, 150):
                x = torch.randn(rows, k, generator=generator) * torch.logspace(-3, 3, rows)[:, None]
                x[0] = 0.0
                ok = ok and torch.equal(op(x, weight, colsum, w_scale, b, n), exact_rowwise_int8(x, quantised, w_scale, b))
    if not ok:
        log.warning("native int8 kernel (%s) differs from the exact row-wise product here; not used", backend)
    return op if ok else None


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
        quantised, scale = quantize_weight(linear.weight.detach().float(), weight_max)
        bias = linear.bias.detach().float()
        small, small_scale = fbgemm_rowwise(x, fbgemm_pack(quantised, scale), fbgemm_range_row(2048))
        large, large_scale = onednn_rowwise(x, torch.ops.onednn.qlinear_prepack(quantised, [256, 2048]), scale,
                                            torch.zeros(96, dtype=torch.int64), fused_quantize_u8() or quantize_u8)
        agree = bool(torch.equal(torch.addcmul(bias, small, small_scale), torch.addcmul(bias, large, large_scale)))
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


PROBES = (_probed_linear_f32, _probed_quantize_u8, _probed_int8, fbgemm_rowwise_exact, onednn_rowwise_exact,
          torch_int8_weight_max, hybrid_int8_available)


def clear() -> None:
    """Forget every probe's answer: the next use probes again."""
    for probe in PROBES:
        probe.cache_clear()


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in fp32."""
    reference, value = reference.float(), value.float()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-12))
