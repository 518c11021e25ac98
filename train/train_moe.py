"""Train the demo Emformer RNN-T, dense or with a Mixture-of-Experts feed-forward, for a fixed
number of steps (``docs/moe.md``).

The comparison recipe: every run gets the same data, the same number of steps, the same batches
(same seed), the same learning-rate schedule (by step, not by clock, so a busy machine does not
change it) and the same thread count; only the feed-forward differs. The model, the features, the
augmentation and the losses are ``train_demo.py``'s (its functions are used as they are); an MoE
run adds the load-balancing loss (``server.model.moe``) times ``--balance-weight``.

* ``--experts 0``: the dense demo model (``train_demo.DEMO_CONFIG``, feed-forward 768);
* ``--experts 8 --top-k 2 --expert-dim 384``: the same active feed-forward parameters per frame
  as the dense model (2 x 384 = 768), four times its feed-forward parameters in all;
* ``--experts 8 --top-k 2 --expert-dim 96``: the same total parameters as the dense model
  (8 x 96 = 768), a quarter of its active feed-forward parameters.

Checkpoints every ``--checkpoint-minutes`` into ``--work-dir`` and resumes from ``last.pt``.
``--export DIR`` writes the demo format (``model.pt``, ``config.json`` with ``moe_experts``,
``moe_top_k``, ``moe_ffn_dim`` for an MoE model, ``global_stats.json``, ``tokens.txt``,
``train_summary.json``), loadable with ``--model demo:DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo as td  # noqa: E402
from server.model.moe import MOE_FIELDS, balance_loss, moe_layers  # noqa: E402
from server.model.features import FeatureFrontEnd, GlobalStats, utterance_features  # noqa: E402
from server.model.vocabulary import CharTokenTable  # noqa: E402


def build(args, num_symbols: int):
    """The model of these options from random weights, and its config as ``config.json`` holds it
    (a dense one without the ``moe_*`` fields, as the shipped demo model)."""
    moe = {"moe_experts": args.experts, "moe_top_k": args.top_k, "moe_ffn_dim": args.expert_dim} if args.experts \
        else {}
    config = dataclasses.replace(td.DEMO_CONFIG, num_symbols=num_symbols, **moe)
    config_dict = {k: v for k, v in dataclasses.asdict(config).items() if k not in MOE_FIELDS or args.experts}
    return config.build(), config_dict


def parameter_counts(model: torch.nn.Module, config: dict) -> dict:
    total = sum(p.numel() for p in model.parameters())
    ffn_total = ffn_active = 0
    for layer in model.transcriber.transformer.emformer_layers:
        ff = layer.pos_ff
        n = sum(p.numel() for p in ff.parameters())
        ffn_total += n
        if isinstance(ff, torch.nn.Sequential):
            ffn_active += n
        else:
            per_expert = sum(p.numel() for p in ff.experts[0].parameters())
            ffn_active += n - per_expert * (ff.num_experts - ff.top_k)
    return {"parameters": total, "ffn_parameters": ffn_total, "ffn_active_parameters_per_frame": ffn_active,
            "active_parameters_per_frame": total - ffn_total + ffn_active}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/moe/corpus"))
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--experts", type=int, default=0, help="experts per layer (0: the dense feed-forward)")
    p.add_argument("--top-k", type=int, default=2, help="experts per frame")
    p.add_argument("--expert-dim", type=int, default=384, help="each expert's hidden width")
    p.add_argument("--balance-weight", type=float, default=0.01, help="weight of the load-balancing loss")
    p.add_argument("--steps", type=int, default=1000, help="training steps (the budget; the learning rate "
                   "decays over them)")
    p.add_argument("--stop-at", type=int, default=0, help="stop after this step with the schedule of --steps "
                   "unchanged (0: at --steps): the same shorter budget for every run of a comparison, decided "
                   "after they started; a number in WORK_DIR/stop-at overrides it while the run goes on)")
    p.add_argument("--batch-seconds", type=float, default=60.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--clean-steps", type=int, default=150, help="steps on clean audio before augmentation")
    p.add_argument("--ctc-weight", type=float, default=0.5)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--dev-utterances", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", type=Path, default=None, help="write the model's files here and exit")
    args = p.parse_args(argv)

    tokens = CharTokenTable.default()
    torch.set_num_threads(args.threads)
    last = args.work_dir / "last.pt"
    if args.export:
        return export(last, args.export, tokens)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rng_np = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    train = td.load_split(args.data, "train", tokens)
    dev = td.load_split(args.data, "dev", tokens, args.dev_utterances)
    model, config = build(args, tokens.size)
    ctc_head = torch.nn.Linear(td.DEMO_CONFIG.encoding_dim, tokens.size)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(ctc_head.parameters()), lr=args.lr,
                                  weight_decay=1e-3)
    step, elapsed, epoch = 0, 0.0, 0
    if last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        if ckpt["config"] != config:
            raise SystemExit(f"{last}: its model config differs from these options")
        model.load_state_dict(ckpt["model"])
        ctc_head.load_state_dict(ckpt["ctc_head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, elapsed, epoch = ckpt["step"], ckpt["elapsed"], ckpt["epoch"]
        stats = GlobalStats(**ckpt["stats"])
        rng_np.bit_generator.state = ckpt["rng_np"]
        torch.set_rng_state(ckpt["rng_torch"])
        print(f"resumed from step {step} ({elapsed / 60:.1f} min)")
    else:
        stats = td.compute_stats(FeatureFrontEnd(GlobalStats.identity()), train)
    front_end = FeatureFrontEnd(stats)
    counts = parameter_counts(model, config)
    print(f"model: {counts}; {len(train)} training utterances "
          f"({sum(len(u.audio) for u in train) / 16000 / 3600:.1f} h); {args.steps} steps, "
          f"{torch.get_num_threads()} thread(s)", flush=True)

    def lr_at(s: int) -> float:  # warm-up, then linear decay to 0.1x at the last step
        return args.lr * min(1.0, (s + 1) / args.warmup) * (1.0 - 0.9 * min(1.0, s / args.steps))

    def save(extra: dict | None = None) -> None:
        record = {"model": model.state_dict(), "ctc_head": ctc_head.state_dict(),
                  "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed, "epoch": epoch,
                  "rng_np": rng_np.bit_generator.state, "rng_torch": torch.get_rng_state(),
                  "stats": dataclasses.asdict(stats), "config": config, "counts": counts,
                  "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        record.update(extra or {})
        torch.save(record, last.with_suffix(".tmp"))
        last.with_suffix(".tmp").replace(last)

    log = open(args.work_dir / "train_log.jsonl", "a")
    model.train()
    last_ckpt = time.monotonic()
    limit = min(args.steps, args.stop_at or args.steps)
    while step < limit:
        batches = td.make_batches(train, args.batch_seconds, random.Random(args.seed * 1000 + epoch))
        skip = step - sum_steps_before(args, train, epoch)
        for batch in batches[skip:]:
            t0 = time.monotonic()
            if step < args.clean_steps:
                feats = [utterance_features(front_end, torch.from_numpy(train[i].audio.astype(np.float32) / 32768))
                         for i in batch]
            else:
                feats = [utterance_features(front_end, td.augment(train[i], train, rng_np)) for i in batch]
                feats = [td.spec_augment(td.timbre_augment(f, stats, rng_np), rng_np) for f in feats]
            sources, lengths, targets, target_lengths, prepended = td.collate(
                feats, [train[i].tokens for i in batch], tokens.blank)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step)
            loss = td.rnnt_loss(model, sources, lengths, targets, target_lengths, prepended, tokens.blank,
                                ctc_head, args.ctc_weight)
            balance = balance_loss(model)
            total = loss if balance is None else loss + args.balance_weight * balance
            optimizer.zero_grad()
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 5.0)
            optimizer.step()
            step += 1
            elapsed += time.monotonic() - t0
            row = {"step": step, "loss": round(loss.item(), 4), "grad_norm": round(float(grad_norm), 3),
                   "lr": lr_at(step), "elapsed": round(elapsed, 1), "batch": len(batch)}
            if balance is not None:
                row["balance"] = round(balance.item(), 4)
                row["expert_share"] = [round(float(c) / float(m.last_counts.sum()), 3)
                                       for m in moe_layers(model)[:1] for c in m.last_counts]
            log.write(json.dumps(row) + "\n")
            if step % 20 == 0:
                log.flush()
                print(f"step {step}: loss {loss.item():.3f}"
                      + (f", balance {balance.item():.3f}" if balance is not None else "")
                      + f", {elapsed / step:.2f} s/step", flush=True)
            stop_file = args.work_dir / "stop-at"
            if stop_file.exists():
                limit = min(args.steps, int(stop_file.read_text()))
            if step >= limit:
                break
            if time.monotonic() - last_ckpt > args.checkpoint_minutes * 60:
                save()
                last_ckpt = time.monotonic()
        else:
            epoch += 1
    wer = td.dev_wer(model, front_end, dev, tokens, torch.device("cpu"))
    log.write(json.dumps({"step": step, "dev_wer": wer, "elapsed": round(elapsed, 1)}) + "\n")
    log.close()
    save({"dev_wer": wer})
    print(f"done: {step} steps, {elapsed / 60:.1f} min, dev WER {wer:.4f} ({len(dev)} dev utterances, greedy, "
          "whole utterance)")
    return 0


def sum_steps_before(args, train, epoch: int) -> int:
    """Steps taken in the epochs before ``epoch`` (each epoch's batches are fixed by the seed)."""
    return sum(len(td.make_batches(train, args.batch_seconds, random.Random(args.seed * 1000 + e)))
               for e in range(epoch))


def export(last: Path, out_dir: Path, tokens: CharTokenTable) -> int:
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt["model"], out_dir / "model.pt")
    (out_dir / "config.json").write_text(json.dumps(ckpt["config"], indent=2) + "\n")
    GlobalStats(**ckpt["stats"]).save(out_dir / "global_stats.json")
    tokens.save(out_dir / "tokens.txt")
    summary = {"step": ckpt["step"], "trained_minutes": round(ckpt["elapsed"] / 60, 1),
               "dev_wer_greedy_whole_utterance": ckpt.get("dev_wer"), **ckpt["counts"],
               "recipe": "train/train_moe.py", "args": ckpt["args"]}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"exported step {ckpt['step']} to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
