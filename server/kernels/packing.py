"""The operands the Linear back ends (``server.kernels.linear``) and their start-up probes
(``server.kernels.probes``) hand to each kernel, and the exact int8 reference they are held to.

* Row counts: ``row_bucket`` (the row counts oneDNN's products run at) and ``bucketed_rows``.
* Weight layouts, made once at load time: ``blocked_f32_weight`` (the native ``linear_f32``),
  ``quantize_weight`` and ``block_pack_int8`` (the native ``rowwise_int8``), ``fbgemm_pack``.
* Activation quantisation, per row: ``row_scales``, ``quantize_u8`` (oneDNN's uint8 operand).
* torch's int8 GEMM calls: ``fbgemm_unit_product`` (with ``fbgemm_range_row``) and
  ``onednn_int8_available``; ``packed_linear_available`` for oneDNN's fp32 packed linear.
* ``exact_rowwise_int8``: the bits every row-wise int8 GEMM must give.
"""

from __future__ import annotations

import warnings

import torch

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


def bucketed_rows(x: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int]:
    """``x`` (..., in_features) as rows zero-padded to ``row_bucket`` rows, and the real row count."""
    rows = x.reshape(-1, in_features)
    count = rows.size(0)
    padded = row_bucket(count)
    if padded != count:
        rows = torch.nn.functional.pad(rows, (0, 0, 0, padded - count))
    return rows, count


def packed_linear_available() -> bool:
    """Whether this torch build has oneDNN's packed fp32 linear (``PackedLinear``)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_int8_available() -> bool:
    """Whether this torch build has oneDNN's int8 linear (``qlinear_prepack`` / ``qlinear_pointwise``)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")


def blocked_f32_weight(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` -> ``server.kernels.native.linear_f32``'s ``(blocks, in, 16)``: ``[b, j, c] = w[16 b + c, j]``,
    zero-padded to whole blocks."""
    out_features, in_features = weight.shape
    blocks = -(-out_features // 16)
    padded = weight.new_zeros(blocks * 16, in_features)
    padded[:out_features] = weight
    return padded.reshape(blocks, 16, in_features).permute(0, 2, 1).contiguous()


def quantize_weight(weight: torch.Tensor, weight_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 weights ``(out, in)`` -> int8 weights quantised per output channel (symmetric, to at
    most ``weight_max`` in magnitude) and their scales ``(out,)``."""
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / float(weight_max)
    return torch.round(weight / scale[:, None]).to(torch.int8), scale


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


def fbgemm_pack(quantised: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed form of int8 weights ``quantised`` (out, in) with per-row ``scale``, no bias."""
    with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's prepack still takes one
        warnings.simplefilter("ignore")
        qweight = torch.quantize_per_channel(quantised.float() * scale[:, None], scale.double(),
                                             torch.zeros(scale.numel(), dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qweight, None)


def fbgemm_range_row(in_features: int) -> torch.Tensor:
    """The row appended to ``fbgemm_unit_product``'s input: -128, 127, then zeros."""
    row = torch.zeros(1, in_features)
    row[0, 0], row[0, 1] = -128.0, 127.0
    return row


def fbgemm_unit_product(unit: torch.Tensor, packed, range_row: torch.Tensor) -> torch.Tensor:
    """``unit @ dequantised_weight.T`` for ``unit`` (rows, in) holding integers in [-127, 127] as
    floats. fbgemm's dynamic linear quantises its input with one scale from the input's min and
    max; the appended range row (-128 ... 127) pins that to scale 1, zero point 128, so every
    value is quantised exactly and each row's result depends on that row alone."""
    return torch.ops.quantized.linear_dynamic(torch.cat([unit, range_row]), packed, False)[:-1]


def row_scales(rows: torch.Tensor) -> torch.Tensor:
    """(n, k) -> (n, 1): each row's int8 scale, max |row| / 127 (at least 1e-12 / 127)."""
    # abs().amax(): measured 10x faster here than linalg.vector_norm(ord=inf) or aminmax
    return rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127.0)


def quantize_u8(rows: torch.Tensor, padded_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) float32 -> ((padded_rows, k) uint8, (n, 1) scales): each row as int8 values
    round(row / scale) shifted to uint8 around zero point 128 (oneDNN's activation type), rounded
    before the shift (v + 128 in float32 can itself round, then ties fall otherwise); padding rows
    are 128 (zero). ``server.kernels.native``'s ``rowwise_quantize_u8`` gives the same bits in one pass."""
    scale = row_scales(rows)
    quantised = rows.div(scale).round_().add_(128).to(torch.uint8)
    if padded_rows != rows.size(0):
        quantised = torch.nn.functional.pad(quantised, (0, 0, 0, padded_rows - rows.size(0)), value=128)
    return quantised, scale


def exact_rowwise_int8(x: torch.Tensor, quantised: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """The bits every ``RowwiseInt8Linear`` GEMM gives, computed exactly in float64: rows ``x (n, k)``
    quantised per row, times int8 weights ``quantised (out, k)``, then ``* w_scale`` and the row
    scales and ``bias`` in one ``addcmul``. The reference of the start-up probes and the tests."""
    scale = row_scales(x)
    acc = (x.div(scale).round_().double() @ quantised.double().t()).float()
    out = acc.mul_(w_scale)
    return out.mul_(scale) if bias is None else torch.addcmul(bias, out, scale)


def fbgemm_rowwise(rows: torch.Tensor, packed, range_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise int8 product of float32 ``rows (n, k)`` on fbgemm: the exact integer products
    scaled by the weight scales (``fbgemm_pack``'s), and the row scales ``(n, 1)``. fbgemm rounds
    rows / scale itself (exactly: ``fbgemm_unit_product``'s unit scale)."""
    scale = row_scales(rows)
    return fbgemm_unit_product(rows.div(scale), packed, range_row), scale


def onednn_rowwise(rows: torch.Tensor, packed, weight_scale: torch.Tensor, zero_points: torch.Tensor,
                   quantize=quantize_u8) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise int8 product of float32 ``rows (n, k)`` on oneDNN (``packed``: ``qlinear_prepack``'s
    weights), run at ``row_bucket`` rows (oneDNN keeps a kernel per row count): the exact integer
    products times ``weight_scale``, and the row scales ``(n, 1)``. ``quantize``: ``quantize_u8`` or
    a native one-pass equal of it."""
    count = rows.size(0)
    quantised, scale = quantize(rows, row_bucket(count))
    out = torch.ops.onednn.qlinear_pointwise(quantised, 1.0, 128, packed, weight_scale, zero_points, None, 1.0, 0,
                                             torch.float32, "none", [], "")[:count]
    return out, scale
