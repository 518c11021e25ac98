"""``python -m server.native``: build the native operators now (the Docker image does this)."""

import logging
import sys

from server.native import OPERATORS, load, why_unavailable

logging.basicConfig(level=logging.INFO, format="%(message)s")
ok = load()
print(f"asr_native operators ({', '.join(OPERATORS)}):", "built and loaded" if ok else f"unavailable ({why_unavailable() or 'build failed'})")
sys.exit(0 if ok else 1)
