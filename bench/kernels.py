"""Each native back end's products against the library kernels they stand beside, in one run.

For the full-size model's layer shapes (in x out) and row counts from one stream's chunk (5 rows)
to a 32-stream step (160 rows), the median time of:

* fp32: ``BlockedLinear`` on every native back end this CPU runs, ``PackedLinear`` (oneDNN's
  packed GEMM, the torch path) and ``nn.Linear`` (MKL);
* int8: ``RowwiseInt8Linear`` on every native back end, and on each torch GEMM that is exact here
  (fbgemm, oneDNN, their hybrid), each at the weight range its products are exact at.

Printed as a table with each kernel's time relative to the best library kernel of the same
precision (below 1.0: the native kernel is faster); JSON to ``bench/results/kernels.json``.

``--steps``: what decides, a whole engine step of the full-size model (greedy, 1 / 4 / 16 / 32
streams) on every kernel path, fp32 and int8, each relative to the torch path (the libraries'
kernels, no native code) in the same run.

    .venv/bin/python -m bench.kernels [--rows 1 5 20 80 160] [--repeats 30]
    .venv/bin/python -m bench.kernels --steps
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

from server.kernels import native  # noqa: E402
from server.kernels.cpu import cpu_flags  # noqa: E402
from server.kernels.linear import BlockedLinear, PackedLinear, RowwiseInt8Linear  # noqa: E402
from server.kernels.probes import exact_torch_int8_gemms, torch_int8_weight_max  # noqa: E402

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
    for gemm in exact_torch_int8_gemms()[:-1]:  # int_mm repacks its weights at every call: not a contender
        out["int8"][f"{gemm} (torch)"] = RowwiseInt8Linear(linear, gemm)
    previous = native.active()
    for backend in native.runnable():
        native.select(backend)
        out["fp32"][f"{backend} (native)"] = BlockedLinear(linear)
        out["int8"][f"{backend} (native)"] = RowwiseInt8Linear(linear, "native")
    native.select(previous)
    return out


def step_costs(sizes=(1, 4, 16, 32), repeats: int = 5) -> list[dict]:
    """Median greedy step (ms) of random-base per kernel path and precision, and x the torch path."""
    from bench.step_profile import fit_step_cost
    from server.model.engine import Engine
    from server.model.loading import load_model

    model = load_model("random-base")
    runs = []
    for precision in ("fp32", "int8"):
        base = None
        print(f"\n{precision} greedy step, ms at {' / '.join(map(str, sizes))} streams (x the torch path)")
        for path in ["torch", *native.runnable()]:
            engine = Engine(model, precision=precision, kernels=path)
            engine.warmup()
            cost = fit_step_cost(engine, sizes, repeats=repeats)
            base = base or cost.total_ms
            ratios = [t / b for t, b in zip(cost.total_ms, base)]
            print(f"{path:<10}" + " / ".join(f"{t:.1f} ({r:.2f})" for t, r in zip(cost.total_ms, ratios))
                  + f"   c0 {cost.c0_ms:.1f} + {cost.c_ms:.2f} per stream")
            runs.append({"precision": precision, "kernels": path, "streams": list(sizes), "ms": cost.total_ms,
                         "x_torch": [round(r, 3) for r in ratios], "c0_ms": round(cost.c0_ms, 2),
                         "c_ms": round(cost.c_ms, 3)})
            del engine
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 5, 20, 80, 160])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--steps", action="store_true", help="whole engine steps per kernel path instead of products")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/kernels.json, "
                   "with --steps kernel_steps.json)")
    args = p.parse_args(argv)
    args.out = args.out or ROOT / "bench" / "results" / ("kernel_steps.json" if args.steps else "kernels.json")
    if args.steps:
        runs = step_costs()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"isa": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni",
                                                                    "amx_int8"}), "runs": runs}, indent=2) + "\n")
        print(f"\nresults: {args.out}")
        return 0
    flags = cpu_flags()
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
