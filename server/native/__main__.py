"""``python -m server.native``: which kernel back ends are built and which this CPU runs."""

import sys

from server.native import BACKENDS, library, resolve, why_unavailable

for backend in BACKENDS:
    reason = why_unavailable(backend)
    print(f"{backend:9s} {'runs here' if reason is None else reason}  ({library(backend) or 'not built'})")
print(f"--kernels auto runs: {resolve('auto')}")
sys.exit(0 if resolve("auto") != "torch" else 1)
