"""``python -m server.kernels.native``: which kernel back ends are built and which this CPU runs.

``--strict``: exit 1 unless every back end this CPU can run was built (``make`` checks this after
building, so that a back end that failed to compile is an error, not a silent fallback)."""

import sys

from server.kernels.cpu import cpu_flags
from server.kernels.native import BACKENDS, REQUIRED_FLAGS, library, resolve, why_unavailable

missing = []
for backend in BACKENDS:
    reason = why_unavailable(backend)
    print(f"{backend:9s} {'runs here' if reason is None else reason}  ({library(backend) or 'not built'})")
    if library(backend) is None and all(flag in cpu_flags() for flag in REQUIRED_FLAGS[backend]):
        missing.append(backend)
print(f"--kernels auto runs: {resolve('auto')}")
if "--strict" in sys.argv[1:] and missing:
    print(f"not built, though this CPU runs them: {', '.join(missing)} (pip install -v --no-build-isolation "
          "--no-deps -e . shows the compiler's errors)", file=sys.stderr)
    sys.exit(1)
sys.exit(0 if resolve("auto") != "torch" else 1)
