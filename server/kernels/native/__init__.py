"""The server's native kernels: one back end per instruction set, built at install, chosen at start-up.

Each back end is the same C++ operators (``operators.h``) over its own primitives, compiled ahead
of time by ``setup.py`` into ``server/kernels/native/_<backend>.so`` (``pip install`` builds them; the
Docker image at build time). Nothing is compiled at run time.

==========  ==========================================  ========================================
back end    instructions (``/proc/cpuinfo`` flags)       products
==========  ==========================================  ========================================
avx512      avx512f, avx512bw, avx512vl, avx512dq,      fp32 16-lane fma tiles; int8 on VNNI
            avx2, fma                                   (``vpdpbusd``) where present, else
                                                        16-bit pair sums with 7-bit weights
avx2        avx2, fma                                   fp32 8-lane fma tiles (the avx512 back
                                                        end's bits); int8 16-bit pair sums with
                                                        7-bit weights (exact)
portable    none (the compiler's baseline)              plain loops; int8 summed in int32
torch       (no native code)                            torch's kernels: oneDNN, fbgemm, MKL
==========  ==========================================  ========================================

``select(kernels)`` chooses the back end for this process (``auto``: the first of avx512, avx2,
portable that is built and that this CPU runs, else ``torch``); the server calls it at start-up
from ``--kernels`` / ``ASR_KERNELS``. Until then ``active()`` resolves ``ASR_KERNELS`` (default
``auto``). The accessors (``linear_f32()``, ``rowwise_int8()``, ...) return the active back end's
operator, or ``None`` on the ``torch`` path; callers then run torch's operators.

    python -m server.kernels.native     # which back ends are built and which this CPU runs
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from server.kernels.cpu import cpu_flags

log = logging.getLogger(__name__)

BACKENDS = ("avx512", "avx2", "portable")  # native back ends, fastest first
KERNELS = ("auto", *BACKENDS, "torch")  # values of --kernels
OPERATORS = ("int8_weight_max", "rowwise_quantize_u8", "ring_attention", "rowwise_int8", "linear_f32",
             "predictor_step", "emformer_layers")
REQUIRED_FLAGS = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"),
    "avx2": ("avx2", "fma"),
    "portable": (),
}
HERE = Path(__file__).parent
_active: str | None = None


class KernelError(ValueError):
    """A ``--kernels`` value that cannot run here; the message says why."""


def library(backend: str) -> Path | None:
    """The built shared library of ``backend``, or ``None`` where it was not built."""
    found = sorted(HERE.glob(f"_{backend}*.so"))
    return found[0] if found else None


def why_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run here (``None``: it can)."""
    if backend == "torch":
        return None
    if backend not in BACKENDS:
        raise KernelError(f"unknown kernels {backend!r}; choose one of {', '.join(KERNELS)}")
    missing = [flag for flag in REQUIRED_FLAGS[backend] if flag not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if library(backend) is None:
        return ("not built: reinstall with a C++ compiler (apt install g++; "
                "pip install --no-build-isolation -e .), see setup.py")
    return None


def runnable() -> list[str]:
    """The native back ends this machine can run, fastest first (``torch`` always can)."""
    return [b for b in BACKENDS if why_unavailable(b) is None]


def resolve(kernels: str) -> str:
    """``kernels`` (one of ``KERNELS``) -> the back end it runs here; ``KernelError`` where it cannot."""
    if kernels not in KERNELS:
        raise KernelError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
    if kernels == "auto":
        return next(iter(runnable()), "torch")
    reason = why_unavailable(kernels)
    if reason:
        raise KernelError(f"--kernels {kernels} cannot run here: {reason}; this machine runs "
                          f"{', '.join([*runnable(), 'torch'])}")
    return kernels


@functools.cache
def _load(backend: str) -> None:
    torch.ops.load_library(str(library(backend)))
    namespace = getattr(torch.ops, f"asr_{backend}")
    missing = [op for op in OPERATORS if not hasattr(namespace, op)]
    if missing:
        raise KernelError(f"{library(backend)} lacks {', '.join(missing)}: rebuild it (pip install -e .)")


def select(kernels: str) -> str:
    """Run this process's native operators on ``kernels`` (see ``resolve``) from now on; returns
    the back end. Engines built before keep the operators they were built with."""
    global _active
    backend = resolve(kernels)
    if backend != "torch":
        _load(backend)
    _active = backend
    return backend


def active() -> str:
    """The back end in use: the last ``select``, else ``ASR_KERNELS`` (default ``auto``) resolved."""
    if _active is None:
        select(os.environ.get("ASR_KERNELS", "auto"))
    return _active


def describe(backend: str) -> str:
    """``backend``'s kernels on this CPU, in words (the start-up log)."""
    if backend == "avx512":
        int8 = "VNNI" if "avx512_vnni" in cpu_flags() else "16-bit pair sums, 7-bit weights (no VNNI)"
        return f"AVX-512 register tiles; int8 on {int8}"
    return {"avx2": "AVX2 + FMA register tiles; int8 on 16-bit pair sums, 7-bit weights",
            "portable": "portable C++ loops",
            "torch": "torch's own kernels (oneDNN, fbgemm, MKL), no native code"}[backend]


def _op(name: str):
    backend = active()
    return None if backend == "torch" else getattr(getattr(torch.ops, f"asr_{backend}"), name)


def int8_weight_max() -> int:
    """Largest int8 weight magnitude the active back end's ``rowwise_int8`` sums exactly (127, or 63
    where it sums pairs of u8 x s8 products in 16 bits); 127 on the torch path."""
    op = _op("int8_weight_max")
    return 127 if op is None else int(op())


def rowwise_quantize_u8():
    return _op("rowwise_quantize_u8")


def ring_attention():
    return _op("ring_attention")


def rowwise_int8():
    return _op("rowwise_int8")


def linear_f32():
    return _op("linear_f32")


def predictor_step():
    return _op("predictor_step")


def emformer_layers():
    return _op("emformer_layers")
