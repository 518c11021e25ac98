"""Mixture-of-Experts feed-forward against the dense one, for CPU streaming with cross-stream batching
(``docs/moe.md``).

One run measures, on this machine:

1. **WER** (held-out subset ``tests/data/demo-heldout``, greedy and beam 4, fp32, through a real
   ``asr-server --model demo:DIR``) of the trained runs in ``--models`` (``train/train_moe.py``:
   ``dense``, ``moe-active``, ``moe-total``);
2. **routing**: each trained MoE model's expert shares per layer over the held-out audio, and the
   full-size random-weight MoE model's over ``bench/audio``;
3. **encoder step cost** against the batch (1-32 streams of real speech past their left-context
   warm-up, each at its own position), fp32 and int8, for the trained demo-size models and for the
   full-size ``random-base`` against ``random-base-moe``; the dense encoders also with their native
   one-call layer loop switched off (the MoE layers run in the Python layer loop), so the cost of
   the routing and of losing that loop show apart; ``random-base-moe`` also with uniform routing
   (``UniformRouter``: its random router sends nearly every frame to the same two experts). Models
   interleave round by round; medians;
4. **weight bytes read per step**: the encoder's weights, counting in each MoE layer only the
   experts that the step's frames actually hit (measured in 3);
5. optionally (``--capacity``) ``bench.capacity --quick`` for ``random-base`` and
   ``random-base-moe`` (real-time streams at p99 chunk latency <= 160 ms).

Figures and ratios go to stdout, the raw record to ``--out`` (``bench/results/moe-*.json``).

    .venv/bin/python -m bench.moe --models data/moe/models --capacity
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.capacity import cpu_description  # noqa: E402
from server.model.engine import Engine  # noqa: E402
from server.model.features import utterance_windows  # noqa: E402
from server.model.loading import load_model  # noqa: E402
from server.model.moe import MoEFeedForward  # noqa: E402

HELDOUT = ROOT / "tests" / "data" / "demo-heldout" / "manifest.jsonl"
AUDIO = ROOT / "bench" / "audio"
RUNS = ("dense", "moe-active", "moe-total")
BATCHES = (1, 2, 4, 8, 16, 32)


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- audio


def heldout_waves() -> list[np.ndarray]:
    rows = [json.loads(line) for line in open(HELDOUT)]
    return [soundfile.read(HELDOUT.parent / r["audio"], dtype="float32")[0] for r in rows]


def bench_waves() -> list[np.ndarray]:
    return [soundfile.read(p, dtype="float32")[0] for p in sorted(AUDIO.glob("*.wav"))]


def chunk_features(engine: Engine, waves: list[np.ndarray]) -> list[torch.Tensor]:
    """Each wave's streaming windows through the engine's front end: ``(chunks, 21, 80)``."""
    with torch.inference_mode():
        return [engine.front_end(utterance_windows(torch.from_numpy(w))) for w in waves]


def moe_modules(engine: Engine) -> list[MoEFeedForward]:
    return [layer.moe for layer in engine.encoder.layers if getattr(layer, "moe", None) is not None]


# ---------------------------------------------------------------- weights


def linear_bytes(in_features: int, out_features: int, precision: str) -> int:
    """Bytes a product reads for one ``Linear``'s weights, bias (and int8 row scales)."""
    if precision == "int8":
        return in_features * out_features + 4 * out_features * 2
    return 4 * (in_features * out_features + out_features)


def weight_bytes(model, precision: str) -> dict:
    """The encoder's weight bytes: everything but the experts, and one expert of an MoE layer."""
    transcriber = model.rnnt.transcriber
    fixed, expert, moe_layers = 0, 0, 0
    for module in transcriber.modules():
        if isinstance(module, MoEFeedForward):
            moe_layers += 1
            one = module.experts[0]
            expert = linear_bytes(one[0].in_features, one[0].out_features, precision) + linear_bytes(
                one[3].in_features, one[3].out_features, precision)
            continue
        if isinstance(module, torch.nn.Linear) and not _inside_expert(transcriber, module):
            fixed += linear_bytes(module.in_features, module.out_features, precision)
        elif isinstance(module, torch.nn.LayerNorm):
            fixed += 4 * module.weight.numel() * 2
    return {"fixed": fixed, "expert": expert, "moe_layers": moe_layers}


def _inside_expert(root: torch.nn.Module, linear: torch.nn.Module) -> bool:
    for module in root.modules():
        if isinstance(module, MoEFeedForward):
            if any(linear is m for e in module.experts for m in e.modules()):
                return True
    return False


# ---------------------------------------------------------------- routing


def routing(engine: Engine, waves: list[np.ndarray]) -> dict:
    """Per layer, the share of the top-k assignments each expert received over ``waves`` (each run
    alone, chunk by chunk)."""
    layers = moe_modules(engine)
    totals = [torch.zeros(m.num_experts, dtype=torch.long) for m in layers]
    encoder = engine.encoder
    with torch.inference_mode():
        for feats in chunk_features(engine, waves):
            pool = encoder.new_pool(encoder.dtype, engine.device)
            slot = torch.tensor([pool.allocate()])
            for c in range(feats.size(0)):
                encoder(feats[c:c + 1], pool, slot, torch.tensor([c]))
                for total, m in zip(totals, layers):
                    total += m.last_counts.cpu()
    shares = [(t.double() / t.sum()).tolist() for t in totals]
    experts = len(shares[0]) if shares else 0
    entropy = [float(-sum(p * np.log(p) for p in s if p > 0) / np.log(experts)) for s in shares]
    return {"assignments_per_layer": int(totals[0].sum()) if totals else 0,
            "shares": [[round(p, 4) for p in s] for s in shares],
            "max_share": [round(max(s), 4) for s in shares], "min_share": [round(min(s), 4) for s in shares],
            "normalised_entropy": [round(e, 4) for e in entropy]}


class UniformRouter(torch.nn.Module):
    """A router that sends each row to 2 pseudo-random experts, uniform over the experts, from a hash of
    the row's bits (so still per row: batching stays exact). The routing assumed for random weights:
    a random router on a random network's hidden states sends nearly every frame to the same two
    experts (measured: ``routing_random_base_moe``), which would understate the experts a step reads."""

    def __init__(self, in_features: int, experts: int, seed: int = 0):
        super().__init__()
        self.experts = experts
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("mult", torch.randint(1, 1 << 16, (in_features,), generator=generator) * 2 + 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        bits = h.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFF
        key = (bits * self.mult).sum(-1)
        first = key % self.experts
        second = (first + 1 + (key // self.experts) % (self.experts - 1)) % self.experts
        logits = torch.zeros(h.size(0), self.experts, dtype=h.dtype, device=h.device)
        logits.scatter_(1, first[:, None], 2.0)
        logits.scatter_(1, second[:, None], 1.0)
        return logits


def uniform_routing(engine: Engine) -> Engine:
    for m in moe_modules(engine):
        m.router = UniformRouter(m.norm.normalized_shape[0], m.num_experts)
    return engine


# ---------------------------------------------------------------- step cost


class StepRig:
    """B streams of real speech at staggered positions on one engine's encoder, stepped chunk by chunk."""

    def __init__(self, engine: Engine, feats: list[torch.Tensor], batch: int, warm: int = 8):
        self.engine, self.feats, self.batch = engine, feats, batch
        encoder = engine.encoder
        self.pool = encoder.new_pool(encoder.dtype, engine.device)
        self.slots = torch.tensor([self.pool.allocate() for _ in range(batch)])
        self.offsets = [3 * i for i in range(batch)]
        self.done = 0
        with torch.inference_mode():
            for _ in range(warm):
                self.step()

    def inputs(self) -> torch.Tensor:
        rows = []
        for i in range(self.batch):
            f = self.feats[i % len(self.feats)]
            rows.append(f[(self.offsets[i] + self.done) % f.size(0)])
        return torch.stack(rows)

    def step(self) -> float:
        x = self.inputs()
        chunks = torch.full((self.batch,), self.done)
        t0 = time.perf_counter()
        self.engine.encoder(x, self.pool, self.slots, chunks)
        dt = time.perf_counter() - t0
        self.done += 1
        return dt


def step_costs(engines: dict[str, Engine], feats: list[torch.Tensor], batches, steps: int, rounds: int) -> dict:
    """Median encoder step (ms) per engine and batch, models interleaved round by round (each engine's B
    streams warmed up once, then stepped on); and the mean number of experts hit per MoE layer per step."""
    times = {name: {b: [] for b in batches} for name in engines}
    hits = {name: {b: [] for b in batches} for name in engines}
    with torch.inference_mode():
        rigs = {(name, b): StepRig(engine, feats, b) for b in batches for name, engine in engines.items()}
        for r in range(rounds):
            for b in batches:
                for name, engine in engines.items():
                    rig = rigs[name, b]
                    layers = moe_modules(engine)
                    for _ in range(steps):
                        times[name][b].append(rig.step() * 1000)
                        if layers:
                            hits[name][b].append(float(np.mean([int((m.last_counts > 0).sum()) for m in layers])))
            log(f"  step cost round {r + 1}/{rounds} done")
    return {name: {b: {"median_ms": round(statistics.median(times[name][b]), 3),
                       "p25_ms": round(float(np.percentile(times[name][b], 25)), 3),
                       "p75_ms": round(float(np.percentile(times[name][b], 75)), 3),
                       "experts_hit_per_layer": round(float(np.mean(hits[name][b])), 3) if hits[name][b] else None}
                   for b in batches} for name in engines}


def unfused(engine: Engine) -> Engine:
    """The same engine with the native one-call layer loop off (the Python layer loop)."""
    clone = object.__new__(Engine)
    clone.__dict__.update(engine.__dict__)
    clone.encoder = copy.copy(engine.encoder)
    clone.encoder.fused_layers = None
    return clone


def compare_family(title: str, models: dict, precisions, feats_waves, batches, steps, rounds, threads,
                   uniform: tuple[str, ...] = ()) -> dict:
    """Step cost and weight bytes of a dense model against its MoE variants, per precision; the MoE
    models named in ``uniform`` also with ``UniformRouter`` routing."""
    out = {}
    for precision in precisions:
        engines = {}
        for name, model in models.items():
            engine = Engine(model, precision=precision, threads=threads)
            engines[name] = engine
            if not moe_modules(engine) and engine.encoder.fused_layers is not None:
                engines[f"{name} (layer loop)"] = unfused(engine)
            if name in uniform:
                engines[f"{name} (uniform routing)"] = uniform_routing(Engine(model, precision=precision,
                                                                              threads=threads))
        feats = chunk_features(next(iter(engines.values())), feats_waves)
        log(f"{title} {precision}: {', '.join(engines)}; batches {list(batches)}, {steps} steps x {rounds} rounds")
        cost = step_costs(engines, feats, batches, steps, rounds)
        record = {}
        for name, engine in engines.items():
            wb = weight_bytes(engine.model, precision)
            per_b = {}
            for b in batches:
                hit = cost[name][b]["experts_hit_per_layer"]
                experts = 0 if hit is None else hit * wb["moe_layers"]
                per_b[b] = dict(cost[name][b], weight_bytes_read=int(wb["fixed"] + experts * wb["expert"]))
            record[name] = {"weights": wb, "by_batch": per_b}
        out[precision] = record
        print_table(title, precision, record, batches)
    return out


def print_table(title, precision, record, batches) -> None:
    names = list(record)
    base = names[0]
    log(f"\n{title}, {precision}: encoder step (median ms) / ratio to {base} / experts hit per layer / MB read")
    log("  B " + "".join(f"| {n:>28} " for n in names))
    for b in batches:
        cells = []
        for n in names:
            r = record[n]["by_batch"][b]
            ratio = r["median_ms"] / record[base]["by_batch"][b]["median_ms"]
            hit = "-" if r["experts_hit_per_layer"] is None else f"{r['experts_hit_per_layer']:.1f}"
            cells.append(f"| {r['median_ms']:7.2f} {ratio:5.2f}x {hit:>4} {r['weight_bytes_read'] / 1e6:6.1f} ")
        log(f"{b:3d} " + "".join(cells))


# ---------------------------------------------------------------- WER and capacity


def wer(model_dir: Path, beam: int) -> dict:
    mode = ["--beam", str(beam)] if beam else ["--greedy"]
    cmd = [str(ROOT / ".venv" / "bin" / "asr-eval"), str(HELDOUT), "--spawn",
           f"--model demo:{model_dir} --metrics-port -1", *mode, "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr[-2000:]}")
    data = json.loads(result.stdout)
    return {k: data[k] for k in ("utterances", "words", "wer", "substitutions", "deletions", "insertions",
                                 "speed_vs_real_time")}


def heldout_loss(directory: Path) -> dict:
    """RNN-T loss of the held-out subset under the model (nats per target character, the 80 utterances
    as one batch): a measure that still separates models whose greedy output is still empty."""
    sys.path.insert(0, str(ROOT / "train"))
    import train_demo as td
    from server.model.features import FeatureFrontEnd, utterance_features
    from server.model.vocabulary import CharTokenTable

    model = load_model(f"demo:{directory}")
    tokens = CharTokenTable.default()
    rows = [json.loads(line) for line in open(HELDOUT)]
    front_end = FeatureFrontEnd(model.stats)
    with torch.inference_mode():
        feats = [utterance_features(front_end, torch.from_numpy(w)) for w in heldout_waves()]
        targets = [tokens.encode(r["text"]) for r in rows]
        batch = td.collate(feats, targets, tokens.blank)
        loss = td.rnnt_loss(model.rnnt, *batch, tokens.blank)
    characters = sum(len(t) for t in targets)
    return {"utterances": len(rows), "characters": characters,
            "nats_per_character": round(float(loss) * len(rows) / characters, 4)}


def capacity(model: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.capacity", "--quick", "--no-seed", "--model", model, "--out", str(out)]
    log(f"capacity: {' '.join(cmd[1:])}")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise RuntimeError(f"capacity for {model} failed: {result.stderr[-2000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=ROOT / "data" / "moe" / "models",
                   help="directory with the exported runs dense/, moe-active/, moe-total/")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="streams per step, comma-separated")
    p.add_argument("--steps", type=int, default=12, help="timed encoder steps per batch size and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the step timings")
    p.add_argument("--skip-wer", action="store_true")
    p.add_argument("--skip-demo", action="store_true", help="skip the trained demo-size step costs")
    p.add_argument("--skip-full", action="store_true", help="skip the full-size random-weight step costs")
    p.add_argument("--capacity", action="store_true", help="also bench.capacity --quick for both full-size models")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"moe-{time.strftime('%Y%m%d-%H%M')}.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    load = os.getloadavg()
    record = {"machine": cpu_description(), "load_average_at_start": load, "threads": args.threads,
              "batches": batches, "steps": args.steps, "rounds": args.rounds}
    log(f"machine: {record['machine']}; load average {load[0]:.1f} (a shared machine: compare ratios)")
    runs = {name: args.models / name for name in RUNS if (args.models / name / "model.pt").exists()}

    if not args.skip_wer and runs:
        record["wer"] = {}
        for name, directory in runs.items():
            summary = json.loads((directory / "train_summary.json").read_text())
            row = {"train_summary": summary, "heldout_loss": heldout_loss(directory)}
            log(f"held-out RNN-T loss {name:>10}: {row['heldout_loss']['nats_per_character']:.4f} nats per character")
            for label, beam in (("greedy", 0), ("beam4", 4)):
                row[label] = wer(directory, beam)
                log(f"WER {name:>10} {label:>6}: {row[label]['wer'] * 100:6.2f} % "
                    f"({row[label]['words']} words)")
            record["wer"][name] = row

    heldout = heldout_waves()
    if runs:
        record["routing_trained"] = {}
        for name, directory in runs.items():
            engine = Engine(load_model(f"demo:{directory}"), threads=args.threads)
            if moe_modules(engine):
                r = routing(engine, heldout)
                record["routing_trained"][name] = r
                log(f"routing {name} (held-out audio): max share per layer {r['max_share']}, min {r['min_share']}, "
                    f"normalised entropy {r['normalised_entropy']}")

    if not args.skip_demo and runs:
        models = {name: load_model(f"demo:{d}") for name, d in runs.items()}
        record["step_cost_demo"] = compare_family("demo-size (trained)", models, ("fp32", "int8"), heldout[:32],
                                                  batches, args.steps, args.rounds, args.threads)
    if not args.skip_full:
        models = {"random-base": load_model("random-base"), "random-base-moe": load_model("random-base-moe")}
        engine = Engine(models["random-base-moe"], threads=args.threads)
        r = routing(engine, bench_waves())
        record["routing_random_base_moe"] = r
        log(f"routing random-base-moe (bench/audio): max share per layer {r['max_share']}, "
            f"min {r['min_share']}")
        record["step_cost_full"] = compare_family("full-size (random weights)", models, ("fp32", "int8"),
                                                  bench_waves() + heldout[:24], batches, args.steps, args.rounds,
                                                  args.threads, uniform=("random-base-moe",))
    if args.capacity:
        record["capacity"] = {}
        for model in ("random-base", "random-base-moe"):
            out = args.out.with_name(args.out.stem + f"-capacity-{model}.json")
            record["capacity"][model] = capacity(model, out)
    record["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    log(f"raw results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
