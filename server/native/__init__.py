"""The server's own C++ operators, compiled on first use and cached.

``rowwise_int8_gemm()`` returns ``torch.ops.asr_native.rowwise_int8_gemm`` (see
``operators.cpp``: ``RowwiseInt8Linear`` on fbgemm in one call, the same bits),
``rowwise_quantize_u8()`` its oneDNN path's activation quantisation in one pass,
``ring_attention()`` ``StreamingEncoder``'s attention reading the left-context pool in place,
``rowwise_int8_vnni()`` every ``RowwiseInt8Linear`` product on AVX-512 VNNI (the same bits) and
``linear_f32()`` fp32 products on AVX-512 (``BlockedLinear``), ``predictor_step()`` one step of the
RNN-T prediction network over those two kernels (``server.decoder.Predictor``) and
``emformer_layers()`` every encoder layer of a step over them (``StreamingEncoder``), each ``None``
where it cannot be built or this CPU lacks its instructions: no C++ compiler, no AVX2 / FMA
(AVX-512, and VNNI for ``rowwise_int8_vnni``, for the last four), ``ASR_NATIVE_KERNELS=0``, or a
build error. Callers then run the composed Python path or torch's kernels, which give the same
results (fp32 and attention to float rounding), slower. The first build takes 10-30 s (a C++
compiler and ninja: ``g++`` from apt, ``ninja`` from pip); later processes load the cached library
in well under a second.

Cache: ``$ASR_NATIVE_CACHE``, else ``~/.cache/asr-server/native``, one folder per torch version
and compiler flags (the build is for this CPU).

    python -m server.native     # build now (the Docker image does this at build time)
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("operators.cpp")
SHIM = Path(__file__).with_name("asmjit_shim")  # headers torch's fbgemm headers include, not shipped (see there)
OPERATORS = ("rowwise_int8_gemm", "rowwise_quantize_u8", "ring_attention", "rowwise_int8_vnni", "linear_f32",
             "predictor_step", "emformer_layers")
# -ffp-contract=off: no a * b + c fused where torch's ops do not fuse (the same bits);
# -fopenmp: at::parallel_for runs threads (torch's own OpenMP runtime, already loaded)
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-DUSE_FBGEMM"]
VNNI_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")  # /proc/cpuinfo's names
_loaded: bool | None = None


def _cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return all(f in line.split() for f in flags)


def _cache_dir() -> Path:
    sources = [SOURCE, *sorted(SHIM.rglob("*.h"))]
    text = "".join(p.read_text() for p in sources) + torch.__version__ + " ".join(FLAGS)
    tag = hashlib.sha256(text.encode()).hexdigest()[:12]
    root = Path(os.environ.get("ASR_NATIVE_CACHE") or Path.home() / ".cache" / "asr-server" / "native")
    path = root / f"torch-{torch.__version__.replace('+', '-')}-{tag}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".writable"
        probe.touch()
        return path
    except OSError:  # a read-only home (containers): build in a private temporary folder
        return Path(tempfile.mkdtemp(prefix="asr-native-"))


def why_unavailable() -> str | None:
    """Why the operators cannot be built here (``None``: they can be tried)."""
    if os.environ.get("ASR_NATIVE_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        return "ASR_NATIVE_KERNELS=0"
    if not _cpu_has("avx2", "fma"):
        return "the CPU lacks AVX2 / FMA"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        return "no C++ compiler (apt install g++)"
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch build has no fbgemm"
    return None


def load() -> bool:
    """Build (or find in the cache) and load the operators; ``True`` if they are loaded."""
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = False
    reason = why_unavailable()
    if reason:
        log.info("native int8 operator not built: %s; the composed path runs instead", reason)
        return False
    # importing cpp_extension warns that no CUDA runtime is found: irrelevant to a CPU operator
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    bin_dir = str(Path(sys.executable).parent)  # ninja comes with the virtual environment
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path
    try:
        cpp_extension.load(name="asr_native", sources=[str(SOURCE)], extra_cflags=FLAGS,
                           extra_include_paths=[str(SHIM)], build_directory=str(_cache_dir()),
                           is_python_module=False, verbose=False)
        _loaded = all(hasattr(torch.ops.asr_native, op) for op in OPERATORS)
    except Exception as e:  # noqa: BLE001 - any build failure falls back to the composed path
        log.warning("native int8 operator could not be built (%s); the composed path runs instead",
                    str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
    return _loaded


def rowwise_quantize_u8():
    """``torch.ops.asr_native.rowwise_quantize_u8``, or ``None`` where it cannot be built."""
    return torch.ops.asr_native.rowwise_quantize_u8 if load() else None


def rowwise_int8_gemm():
    """``torch.ops.asr_native.rowwise_int8_gemm``, or ``None`` where it cannot be built."""
    return torch.ops.asr_native.rowwise_int8_gemm if load() else None


def ring_attention():
    """``torch.ops.asr_native.ring_attention``, or ``None`` where it cannot be built."""
    return torch.ops.asr_native.ring_attention if load() else None


def rowwise_int8_vnni():
    """``torch.ops.asr_native.rowwise_int8_vnni``, or ``None`` where it cannot be built or this CPU
    lacks AVX-512 VNNI."""
    return torch.ops.asr_native.rowwise_int8_vnni if _cpu_has(*VNNI_FLAGS) and load() else None


def linear_f32():
    """``torch.ops.asr_native.linear_f32``, or ``None`` where it cannot be built or this CPU lacks
    AVX-512."""
    return torch.ops.asr_native.linear_f32 if _cpu_has("avx512f") and load() else None


def predictor_step():
    """``torch.ops.asr_native.predictor_step``, or ``None`` where it cannot be built or this CPU lacks
    AVX-512 (its products are ``linear_f32`` and ``rowwise_int8_vnni``)."""
    return torch.ops.asr_native.predictor_step if _cpu_has("avx512f") and load() else None


def emformer_layers():
    """``torch.ops.asr_native.emformer_layers``, or ``None`` where it cannot be built or this CPU lacks
    AVX-512 (its products are ``linear_f32`` and ``rowwise_int8_vnni``)."""
    return torch.ops.asr_native.emformer_layers if _cpu_has("avx512f") and load() else None
