"""Builds the server's native kernels (server/kernels/native) when the package is installed.

One shared library per kernel back end, each the same operators (server/kernels/native/operators.h) over
that back end's primitives, compiled for its instruction set: ``_avx512`` (AVX-512 F/BW/VL/DQ,
VNNI where present), ``_avx2`` (AVX2 + FMA) and ``_portable`` (the compiler's baseline). The
server loads the one its ``--kernels`` setting selects (``auto``: the best this CPU runs) at
start-up; nothing is compiled at run time. Only torch's public extension headers are used.

A back end that cannot be built (no C++ compiler, no torch at build time, a compiler without the
instruction set) is left out with a warning and the install goes on: the server then runs the
remaining back ends, or the pure-torch path (``--kernels torch``).
"""

import os
import platform
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# -ffp-contract=off: no a * b + c fused where the code does not ask for it (the bits stay the
# composed torch path's); -fopenmp: at::parallel_for runs on torch's OpenMP threads;
# -fvisibility-inlines-hidden: each back end keeps its own copy of inline header code (compiled
# for its instruction set), never another loaded back end's
COMMON = ["-O3", "-ffp-contract=off", "-fopenmp", "-fvisibility-inlines-hidden"]
BACKENDS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "portable": [],
}
X86_ONLY = ("avx512", "avx2")


def extensions():
    if os.environ.get("ASR_BUILD_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        print("ASR_BUILD_KERNELS=0: native kernels not built", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:  # metadata-only builds, or torch missing from the build environment
        print(f"torch is not importable at build time ({e}); native kernels not built", file=sys.stderr)
        return [], {}
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    exts = [CppExtension(f"server.kernels.native._{name}", [f"server/kernels/native/{name}.cpp"],
                         extra_compile_args=COMMON + flags, extra_link_args=["-fopenmp"])
            for name, flags in BACKENDS.items() if x86 or name not in X86_ONLY]

    class OptionalBuild(BuildExtension.with_options(no_python_abi_suffix=True)):
        """Each back end on its own, one after the other (they share the ninja build folder, so never
        in parallel): one that fails to build is left out, with the reason."""

        def build_extensions(self):
            self.failed = []
            super().build_extensions()
            self.extensions = [ext for ext in self.extensions if ext not in self.failed]  # nothing to copy

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - a missing back end is a warning, not a failed install
                self.failed.append(ext)
                print(f"warning: native kernels {ext.name} not built: {e}", file=sys.stderr)

    return exts, {"build_ext": OptionalBuild}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
