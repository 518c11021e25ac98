"""What this CPU offers: the one reader of ``/proc/cpuinfo``.

``cpu_flags()`` is the instruction-set flags of this machine's CPU (read once);
``cpuinfo_flags(text)`` reads them from any ``/proc/cpuinfo`` text. ``detect_cpu_features``
names the matrix-product features among them (``CpuFeatures``), which the precision policy
(``server.kernels.precision``) warns and refuses by; the native back ends
(``server.kernels.native``) are chosen by the flags themselves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path


def cpuinfo_flags(cpuinfo: str) -> frozenset[str]:
    """The flags in the first ``flags`` line of ``/proc/cpuinfo`` text (empty where there is none)."""
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return cpuinfo_flags(text)


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
    ``cpu_flags``)."""
    flags = cpu_flags() if cpuinfo is None else cpuinfo_flags(cpuinfo)
    return CpuFeatures(**{name: (f"{name}f" if name == "avx512" else name) in flags
                          for name in CpuFeatures.__dataclass_fields__})
