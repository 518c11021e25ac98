"""The Linear back ends: ``nn.Linear`` replaced once at load time by a module that runs one
kernel on weights laid out for it (``server.kernels.packing``), each output row the same bits
whatever else is in the batch (``BucketedLinear``: within oneDNN's bf16 rounding).

* ``BlockedLinear``: fp32 on the active native back end's ``linear_f32``.
* ``PackedLinear``: fp32 on oneDNN's packed GEMM (the torch path).
* ``BucketedLinear``: bf16 / fp16 ``nn.Linear`` at bucketed row counts (oneDNN).
* ``RowwiseInt8Linear``: int8 with a scale per activation row, on a native back end or a torch
  GEMM (fbgemm, oneDNN, both, or ``torch._int_mm``).

Which kernel each takes by default is what the start-up probes (``server.kernels.probes``)
found exact here. ``replace_linears`` swaps the modules of a network; ``native_linear_args`` and
``native_layer_norm_args`` hand the weights to the fused native operators.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from server.kernels import native
from server.kernels.packing import (block_pack_int8, blocked_f32_weight, bucketed_rows, fbgemm_pack,
                                    fbgemm_range_row, fbgemm_rowwise, onednn_rowwise, quantize_u8,
                                    quantize_weight, row_scales)
from server.kernels.probes import (fused_quantize_u8, native_int8, native_linear_f32, torch_int8_gemm,
                                   torch_int8_weight_max)

# "hybrid": row-wise int8 products up to this many rows run on fbgemm, larger ones on oneDNN;
# the composed fbgemm path is faster than oneDNN to about 32 rows (BENCHMARKS.md, "Kernels")
FBGEMM_MAX_ROWS = 32


class BucketedLinear(torch.nn.Module):
    """``nn.Linear`` (its own weights, any dtype) run at ``row_bucket`` rows: torch runs bf16 / fp16
    products on CPU through oneDNN, which keeps a kernel per row count (measured: 100 MiB for one
    512 x 2048 layer over 200 row counts)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, count = bucketed_rows(x, self.in_features)
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
        rows, count = bucketed_rows(x, self.in_features)
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
      (``fbgemm_unit_product``).
    * ``"onednn"``: oneDNN's int8 GEMM on weights packed once (``onednn.qlinear_pointwise``,
      given rows already quantised, with scale 1), at bucketed row counts (``row_bucket``:
      oneDNN keeps a kernel per row count).
    * ``"int_mm"``: ``torch._int_mm``, which repacks the weights at every call (1.4-2x slower).

    ``weight_max`` (default: what the GEMM sums exactly here: ``native.int8_weight_max`` or
    ``torch_int8_weight_max``) is 127, or 63 where a CPU sums pairs of u8 x s8 products in 16
    bits (AVX2, AVX-512 without VNNI): one bit of weight precision for exact products.

    ``quantize_rows`` (hybrid and oneDNN GEMMs): the activation quantisation handed to oneDNN
    (default: the native one-pass ``fused_quantize_u8`` where it gives the composed bits, else the
    composed ``server.kernels.packing.quantize_u8``).
    """

    GEMMS = ("native", "torch", "hybrid", "fbgemm", "onednn", "int_mm")

    def __init__(self, linear: torch.nn.Linear, gemm: str | None = None, weight_max: int | None = None,
                 quantize_rows: Callable | None = None):
        super().__init__()
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
        quantised, scale = quantize_weight(linear.weight.detach().float(), weight_max)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if gemm == "native":
            weight_blocks, colsum = block_pack_int8(quantised)
            self.register_buffer("weight_blocks", weight_blocks)
            self.register_buffer("weight_colsum", colsum)
        if gemm in ("hybrid", "fbgemm"):
            self._fbgemm = fbgemm_pack(quantised, scale)
            self.register_buffer("range_row", fbgemm_range_row(self.in_features))
        self.fbgemm_max_rows = {"hybrid": FBGEMM_MAX_ROWS, "fbgemm": 1 << 62}.get(gemm, -1)
        self.quantize_rows = None
        if gemm in ("hybrid", "onednn"):
            self.quantize_rows = quantize_rows or fused_quantize_u8() or quantize_u8
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
        if rows.size(0) <= self.fbgemm_max_rows:
            out, scale = fbgemm_rowwise(rows, self._fbgemm, self.range_row)
        elif self.gemm != "int_mm":
            out, scale = onednn_rowwise(rows, self._onednn, self.weight_scale, self.weight_zero_points,
                                        self.quantize_rows)
        else:
            scale = row_scales(rows)
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


def replace_linears(module: torch.nn.Module, kind: Callable[[torch.nn.Linear], torch.nn.Module] | None = None,
                    min_params: int = 0) -> torch.nn.Module:
    """Every plain ``nn.Linear`` in ``module`` of at least ``min_params`` weights -> ``kind(linear)``
    (default ``RowwiseInt8Linear``); returns the module to use."""
    kind = kind or RowwiseInt8Linear
    if type(module) is torch.nn.Linear:
        return kind(module) if module.weight.numel() >= min_params else module
    for name, child in list(module.named_children()):
        setattr(module, name, replace_linears(child, kind, min_params))
    return module
