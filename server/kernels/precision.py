"""Numeric precision of the engine's networks: which precisions run where, and which Linear
back end each one gets, applied once at load time.

``apply_precision(module, precision)`` converts the engine's own copies of the networks (the
streaming encoder, the predictor and joiner) in place; nothing casts around each step:

* ``fp32``: every ``Linear`` on CPU becomes a ``BlockedLinear`` (the active native back
  end's kernel, ``server.kernels.native``) or, on the torch path, a ``PackedLinear``: oneDNN's
  fp32 GEMM on weights reordered once at load time. Both give every row the same bits
  whatever the batch; MKL's ``addmm`` behind ``nn.Linear`` does not (a row's last bits
  change with the number of rows), and at the 5-80 rows of a typical step it ran 2-4x
  slower than oneDNN.
* ``bf16`` / ``fp16``: weights and activations in that dtype end to end (the
  left-context state and the LSTM state follow the weights' dtype; LayerNorm and
  softmax accumulate in fp32 inside their kernels); on CPU every ``Linear`` a ``BucketedLinear``.
* ``int8``: every ``Linear`` (Emformer projections and feed-forward, the LSTM gate
  projections of the predictor, the joiner) becomes a dynamically quantised int8
  ``Linear`` (int8 weights per output channel, each activation row quantised with
  its own scale, so a stream's result never depends on what it was batched with);
  everything else stays fp32. See ``INT8_BACKEND`` for the kernel choice.

``precision_warnings`` says when a precision would be slower here than fp32 (by the CPU's
features, ``server.kernels.cpu``), and ``check_precision`` refuses the combinations this build
cannot run well. The Linear back ends are ``server.kernels.linear``; the start-up probes that
decide their kernels, and the self-check's measure, ``server.kernels.probes``.
"""

from __future__ import annotations

import warnings

import torch

from server.kernels.cpu import CpuFeatures, detect_cpu_features
from server.kernels.linear import BlockedLinear, BucketedLinear, PackedLinear, replace_linears
from server.kernels.packing import packed_linear_available
from server.kernels.probes import native_linear_f32

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
# (torchao's ``Int8DynamicActivationInt8Weight``, per-row too, was slower than both; it is
# measured by bench/precision_kernels.py alone.)
INT8_BACKEND = "rowwise"
INT8_BACKENDS = ("rowwise", "torch.ao")
# --int8-kernel choices -> backend
INT8_KERNELS = {"rowwise": "rowwise", "fbgemm": "torch.ao"}


class PrecisionError(ValueError):
    """The precision cannot run on this device; the message says why and what to use."""


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
            module = replace_linears(module, BucketedLinear)
        return module
    if precision == "int8":
        return quantize_linears_int8(module, int8_backend)
    if _module_device(module).type == "cpu" and native_linear_f32() is not None:
        return replace_linears(module, BlockedLinear)
    if _module_device(module).type == "cpu" and packed_linear_available():
        return replace_linears(module, PackedLinear)
    return module


def _module_device(module: torch.nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def quantize_linears_int8(module: torch.nn.Module, backend: str = INT8_BACKEND) -> torch.nn.Module:
    """Every ``nn.Linear`` in ``module`` -> dynamically quantised int8, with ``backend`` one of
    ``INT8_BACKENDS``: ``"rowwise"`` (``RowwiseInt8Linear``) or ``"torch.ao"`` (``quantize_dynamic``,
    fbgemm)."""
    if backend not in INT8_BACKENDS:
        raise PrecisionError(f"unknown int8 backend {backend!r}; choose one of {', '.join(INT8_BACKENDS)}")
    if backend == "rowwise":
        return replace_linears(module)
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear: qconfig}, dtype=torch.qint8,
                                                      inplace=True)
