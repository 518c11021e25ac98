"""Which kernels to use for each precision: one engine step, every candidate, one run.

The choices behind ``server/kernels/precision.py`` and ``server/kernels/linear.py``, measured on the full-size model
(``random-base``), greedy, streams past their left-context warm-up:

* fp32 on oneDNN with packed weights (``PackedLinear``)  vs  MKL (``nn.Linear``);
* bf16 weights and activations end to end  vs  fp32 weights under ``torch.autocast(bf16)``;
* fp16 weights and activations (is it worth offering on CPU?);
* int8 with the server's ``RowwiseInt8Linear`` (a scale per activation row,
  fbgemm's int8 GEMM where exact, else oneDNN's; both measured)  vs  ``torch.ao.quantization.quantize_dynamic`` (fbgemm, one
  activation scale per batch, so not batch-invariant)  vs  torchao's
  ``Int8DynamicActivationInt8WeightConfig``;
* a bare matrix product at the model's shapes per dtype, for the kernel peak.

    .venv/bin/python -m bench.precision_kernels [--batch 1 16] [--out bench/results/precision_kernels.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.types import DecodingMethod  # noqa: E402
from server.model.decoder import DecodingNetwork, GreedyDecoder, Predictor  # noqa: E402
from server.model.encoder import StreamingEncoder  # noqa: E402
from server.model.engine import ChunkWork, Engine  # noqa: E402
from server.types import WINDOW_SAMPLES  # noqa: E402
from server.model.loading import load_model  # noqa: E402
from server.kernels.linear import RowwiseInt8Linear, replace_linears  # noqa: E402
from server.kernels.precision import apply_precision  # noqa: E402

# name -> (precision given to apply_precision, int8 backend, autocast dtype); the int8 backends
# "rowwise-onednn" and "torchao" exist here only (``convert_network``), the others are the server's
CANDIDATES = {
    "fp32": ("fp32", None, None),
    "fp32 on MKL (nn.Linear, unpacked)": ("fp32-unpacked", None, None),
    "bf16 (weights + activations)": ("bf16", None, None),
    "bf16 (autocast over fp32 weights)": ("fp32-unpacked", None, torch.bfloat16),
    "fp16 (weights + activations)": ("fp16", None, None),
    "int8 rowwise (server)": ("int8", "rowwise", None),
    "int8 rowwise on oneDNN's GEMM": ("int8", "rowwise-onednn", None),
    "int8 torch.ao quantize_dynamic": ("int8", "torch.ao", None),
    "int8 torchao Int8DynamicActivationInt8Weight": ("int8", "torchao", None),
}


def convert_network(network: torch.nn.Module, precision: str, backend: str | None) -> torch.nn.Module:
    """``network`` in ``precision`` with the int8 ``backend`` (bypassing the server's refusals):
    ``fp32-unpacked``: plain ``nn.Linear`` on MKL, what ``fp32`` ran before ``PackedLinear``;
    ``rowwise-onednn``: ``RowwiseInt8Linear`` forced onto oneDNN's GEMM; ``torchao``: torchao's
    ``Int8DynamicActivationInt8WeightConfig``; else the server's ``apply_precision``."""
    if precision == "fp32-unpacked":
        return network
    if backend == "rowwise-onednn":
        return replace_linears(network, lambda linear: RowwiseInt8Linear(linear, "onednn"))
    if backend == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(network, Int8DynamicActivationInt8WeightConfig())
        return network
    return apply_precision(network, precision, backend or "rowwise")


def convert(engine: Engine, precision: str, backend: str | None) -> None:
    """Give an engine fresh copies of the networks in ``precision`` (``convert_network``), and a
    predictor and greedy decoder on them (the step measured is greedy)."""
    engine.encoder = convert_network(StreamingEncoder(engine.rnnt.transcriber).to(engine.device), precision, backend)
    engine.pool = engine.encoder.new_pool(engine.encoder.dtype, engine.device)
    engine.decoding = convert_network(DecodingNetwork(engine.rnnt).to(engine.device), precision, backend)
    engine.predictor = Predictor(engine.decoding, engine.model.blank, engine.device)
    engine.greedy = GreedyDecoder(engine.predictor, engine.greedy.max_symbols_per_frame)
    with torch.inference_mode():
        engine.predictor.initial()


def step_ms(engine: Engine, batch: int, autocast, repeats: int = 6) -> float:
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    rng = np.random.default_rng(0)
    streams = [engine.new_stream(DecodingMethod.GREEDY, 1) for _ in range(batch)]
    times = []
    with ctx:
        for i in range(9 + repeats):
            works = [ChunkWork(s, (rng.standard_normal(WINDOW_SAMPLES) * 0.05).astype(np.float32)) for s in streams]
            t0 = time.perf_counter()
            engine.run_batch(works)
            if i >= 9:  # past the left-context warm-up
                times.append(time.perf_counter() - t0)
    for s in streams:
        engine.release(s)
    return float(np.median(times) * 1000)


def matmul_peaks(rows: int = 160, repeats: int = 30) -> dict:
    """GFLOP/s of (rows x 512) @ (512 x 2048) per dtype / int8 backend."""
    out = {}
    lin = torch.nn.Linear(512, 2048).eval()
    x = torch.randn(rows, 512)
    flops = 2 * rows * 512 * 2048
    import copy
    variants = {"fp32 (MKL)": (lin, x), "fp32 packed (oneDNN)": (apply_precision(
                    torch.nn.Sequential(copy.deepcopy(lin)), "fp32"), x),
                "bf16": (copy.deepcopy(lin).bfloat16(), x.bfloat16()),
                "fp16": (copy.deepcopy(lin).half(), x.half())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants["int8 rowwise"] = (apply_precision(torch.nn.Sequential(copy.deepcopy(lin)), "int8", "rowwise"), x)
        variants["int8 torch.ao"] = (apply_precision(torch.nn.Sequential(copy.deepcopy(lin)), "int8", "torch.ao"), x)
        variants["int8 torchao"] = (convert_network(torch.nn.Sequential(copy.deepcopy(lin)), "int8", "torchao"), x)
    with torch.inference_mode():
        for name, (m, inp) in variants.items():
            for _ in range(5):
                m(inp)
            t0 = time.perf_counter()
            for _ in range(repeats):
                m(inp)
            out[name] = round(flops * repeats / (time.perf_counter() - t0) / 1e9, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.precision_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "precision_kernels.json")
    args = p.parse_args(argv)
    model = load_model("random-base")
    results: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(), "step_ms": {}}
    results["matmul_gflops_160x512x2048"] = matmul_peaks()
    print("matrix product peaks (GFLOP/s):", results["matmul_gflops_160x512x2048"], flush=True)
    for name, (precision, backend, autocast) in CANDIDATES.items():
        engine = Engine(model, precision="fp32")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(engine, precision, backend)
        results["step_ms"][name] = {str(b): round(step_ms(engine, b, autocast), 2) for b in args.batch}
        print(f"{name:<48}" + "".join(f"  B={b}: {v:7.1f} ms" for b, v in results["step_ms"][name].items()),
              flush=True)
        del engine
    base = results["step_ms"]["fp32"]
    results["speedup_vs_fp32"] = {name: {b: round(base[b] / v, 2) for b, v in times.items()}
                                  for name, times in results["step_ms"].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("speed-up vs fp32:", json.dumps(results["speedup_vs_fp32"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
