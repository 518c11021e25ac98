"""Each native back end's products against the library kernels they stand beside, in one run.

For the full-size model's layer shapes (in x out) and row counts from one stream's chunk (5 rows)
to a 32-stream step (160 rows), the median time of:

* fp32: ``BlockedLinear`` on every native back end this CPU runs, ``PackedLinear`` (oneDNN's
  packed GEMM, the torch path) and ``nn.Linear`` (MKL);
* int8: ``RowwiseInt8Linear`` on every native back end, and on each torch GEMM that is exact here
  (fbgemm, oneDNN, their hybrid), each at the weight range its products are exact at.

Printed as a table with each kernel's time relative to the best library kernel of the same
precision (below 1.0: the native kernel is faster); JSON to ``bench/results/kernels.json``.

    .venv/bin/python -m bench.kernels [--rows 1 5 20 80 160] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server import native  # noqa: E402
from server.precision import (BlockedLinear, PackedLinear, RowwiseInt8Linear, fbgemm_rowwise_exact,  # noqa: E402
                              hybrid_int8_available, onednn_rowwise_exact, torch_int8_weight_max)

SHAPES = ((512, 2048), (2048, 512), (512, 1536), (1024, 4097))  # ff1, ff2, qkv, joiner


def median_us(fn, x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def candidates(linear: torch.nn.Linear) -> dict[str, dict[str, torch.nn.Module]]:
    out: dict[str, dict[str, torch.nn.Module]] = {"fp32": {}, "int8": {}}
    out["fp32"]["mkl (nn.Linear)"] = linear
    out["fp32"]["onednn (PackedLinear)"] = PackedLinear(linear)
    weight_max = torch_int8_weight_max()
    torch_gemms = [g for g, ok in (("hybrid", hybrid_int8_available()), ("fbgemm", fbgemm_rowwise_exact(weight_max)),
                                   ("onednn", onednn_rowwise_exact(weight_max))) if ok]
    for gemm in torch_gemms:
        out["int8"][f"{gemm} (torch)"] = RowwiseInt8Linear(linear, gemm)
    previous = native.active()
    for backend in native.runnable():
        native.select(backend)
        out["fp32"][f"{backend} (native)"] = BlockedLinear(linear)
        out["int8"][f"{backend} (native)"] = RowwiseInt8Linear(linear, "native")
    native.select(previous)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 5, 20, 80, 160])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernels.json")
    args = p.parse_args(argv)
    flags = native.cpu_flags()
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    print(f"CPU: {' '.join(isa)}; {torch.get_num_threads()} threads; native back ends: "
          f"{', '.join(native.runnable()) or 'none'}; torch int8 weight range +-{torch_int8_weight_max()}")
    results = {"isa": isa, "threads": torch.get_num_threads(), "runs": []}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for k, n in SHAPES:
            linear = torch.nn.Linear(k, n)
            kinds = candidates(linear)
            for precision, kernels in kinds.items():
                print(f"\n{precision} {k} x {n}: median us per call (x the best library kernel)")
                print(f"{'kernel':<24}" + "".join(f"{r:>16}" for r in args.rows))
                times = {name: [median_us(m, torch.randn(r, k, generator=generator), args.repeats) for r in args.rows]
                         for name, m in kernels.items()}
                library = [t for name, t in times.items() if "native" not in name]
                best = [min(col) for col in zip(*library)] if library else None
                for name, row in times.items():
                    cells = "".join(f"{t:>9.0f} ({t / b:4.2f})" if best else f"{t:>16.0f}" for t, b in
                                    zip(row, best or row))
                    print(f"{name:<24}{cells}")
                    results["runs"].append({"precision": precision, "shape": [k, n], "kernel": name,
                                            "rows": args.rows, "us": [round(t, 1) for t in row],
                                            "x_best_library": [round(t / b, 3) for t, b in zip(row, best)] if best else None})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
