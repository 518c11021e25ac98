"""Train the demo Emformer RNN-T on the synthetic corpus (``make train-demo``).

CPU-first (2 cores are enough), ``--device cuda`` where a GPU exists. Features
come from the server's own streaming front end (``server.model.features``), so the
model sees in training exactly the frames it sees when served. Augmentation:
random gain, additive noise (white / pink / brown / babble) at several SNRs,
a random vocal-tract-length warp and spectral-envelope tilt of the mel
features (new timbres from the corpus' voices), and SpecAugment (frequency and
time masks). ``--init DIR`` starts from a shipped model's weights and global
stats instead of from random weights (fine-tuning with new data or augmentation).

Checkpoints every ``--checkpoint-minutes`` into ``--work-dir`` and resumes from
the latest one. Loss goes to the progress bar and ``train_log.jsonl``; dev WER
(greedy, whole utterance) is logged at every checkpoint. ``--export DIR`` writes
the shipped model files (weights, config, tokens, stats) from the best checkpoint,
the last one, or (``--export-checkpoint average``) the mean weights of the newest
few periodic checkpoints, which the trainer keeps as ``step-NNNNNN.pt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import jiwer
import numpy as np
import soundfile
import torch
import torchaudio
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.model.features import N_MELS, FeatureFrontEnd, GlobalStats, utterance_features  # noqa: E402
from server.model.loading import ModelConfig, load_demo  # noqa: E402
from server.model.vocabulary import CharTokenTable  # noqa: E402
from server.types import RIGHT_CONTEXT_FRAMES, SAMPLE_RATE  # noqa: E402

DEMO_CONFIG = ModelConfig(
    input_dim=80, encoding_dim=256, num_symbols=29, segment_length=16, right_context_length=4,
    time_reduction_input_dim=48, time_reduction_stride=4, transformer_num_heads=4,
    transformer_ffn_dim=768, transformer_num_layers=8, transformer_dropout=0.1,
    transformer_activation="gelu", transformer_left_context_length=30, transformer_max_memory_size=0,
    transformer_weight_init_scale_strategy="depthwise", transformer_tanh_on_mem=True,
    symbol_embedding_dim=256, num_lstm_layers=1, lstm_layer_norm=True, lstm_layer_norm_epsilon=1e-3,
    lstm_dropout=0.1)


@dataclasses.dataclass
class Utterance:
    audio: np.ndarray  # int16 samples at 16 kHz
    text: str
    tokens: list[int]


def load_split(data_dir: Path, split: str, tokens: CharTokenTable, limit: int | None = None) -> list[Utterance]:
    rows = [json.loads(line) for line in open(data_dir / f"{split}.jsonl")]
    if limit:
        rows = rows[:limit]
    out = []
    for row in tqdm(rows, desc=f"loading {split}", unit="utt", leave=False):
        audio, sr = soundfile.read(data_dir / row["audio"], dtype="int16")
        assert sr == 16000, f"{row['audio']}: {sr} Hz"
        out.append(Utterance(audio, row["text"], tokens.encode(row["text"])))
    return out


def coloured_noise(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if kind == "white":
        return white
    spectrum = np.fft.rfft(white)
    f = np.arange(len(spectrum)) + 1.0
    spectrum /= np.sqrt(f) if kind == "pink" else f
    return np.fft.irfft(spectrum, n)


def augment(utt: Utterance, others: list[Utterance], rng: np.random.Generator) -> torch.Tensor:
    """Waveform in [-1, 1] with random gain and noise."""
    x = utt.audio.astype(np.float32) / 32768.0
    x = x * 10 ** (rng.uniform(-12, 3) / 20)
    r = rng.random()
    if r < 0.75:
        power = float(np.mean(x ** 2)) + 1e-10
        if r < 0.6:
            noise = coloured_noise(len(x), rng.choice(["white", "pink", "brown"]), rng)
            snr = rng.uniform(5, 35)
        else:  # babble: another utterance, well below the speech
            other = others[rng.integers(len(others))].audio.astype(np.float32)
            noise = np.resize(other, len(x))
            snr = rng.uniform(12, 25)
        noise *= math.sqrt(power / (float(np.mean(noise ** 2)) + 1e-10) / 10 ** (snr / 10))
        x = x + noise.astype(np.float32)
    return torch.from_numpy(np.clip(x, -1.0, 1.0).astype(np.float32))


_NYQUIST_HZ = SAMPLE_RATE / 2
_MEL_MAX = 2595.0 * math.log10(1.0 + _NYQUIST_HZ / 700.0)  # htk mel of the Nyquist frequency
# centre frequency (Hz) of each of the front end's htk mel filters (0 Hz to Nyquist)
_MEL_CENTRES_HZ = 700.0 * (10.0 ** (np.linspace(0.0, _MEL_MAX, N_MELS + 2)[1:-1] / 2595.0) - 1.0)


def _hz_to_mel_index(hz: np.ndarray) -> np.ndarray:
    """Fractional mel-bin index of a frequency (bin ``i`` is centred at index ``i``)."""
    return 2595.0 * np.log10(1.0 + hz / 700.0) / _MEL_MAX * (N_MELS + 1) - 1.0


def vtlp_source_index(alpha: float, boundary_hz: float = 6400.0) -> np.ndarray:
    """Where each mel bin reads from under a vocal-tract-length warp by ``alpha``.

    A speaker whose formants sit ``alpha`` times higher puts at frequency ``f`` what
    the original puts at ``f / alpha``; above ``boundary_hz * min(1, alpha)`` the map
    is linear up to the fixed Nyquist frequency (Jaitly and Hinton's piecewise warp).
    Returns ``(80,)`` fractional indices in [0, 79].
    """
    f = _MEL_CENTRES_HZ
    knee = boundary_hz * min(1.0, alpha)
    top = _NYQUIST_HZ
    src = np.where(f <= knee, f / alpha, knee / alpha + (f - knee) * (top - knee / alpha) / (top - knee))
    return np.clip(_hz_to_mel_index(src), 0.0, N_MELS - 1.0)


def timbre_augment(feats: torch.Tensor, stats: GlobalStats, rng: np.random.Generator,
                   warp: float = 0.12, tilt: float = 0.4) -> torch.Tensor:
    """A new timbre for normalised ``(frames, 80)`` features: a vocal-tract-length warp by a
    factor in [1 - warp, 1 + warp] (independent of the pitch, unlike the corpus' sox pitch
    shifts) and a smooth spectral-envelope change (three cosine terms of up to ``tilt``
    nepers each, added to the log-mel energies), each with probability 0.8."""
    mean, inv = torch.tensor(stats.mean), torch.tensor(stats.invstddev)
    x = feats / inv + mean  # back to log-mel energies
    if rng.random() < 0.8:
        idx = vtlp_source_index(float(rng.uniform(1.0 - warp, 1.0 + warp)))
        lo = np.minimum(np.floor(idx).astype(np.int64), 78)
        frac = torch.from_numpy((idx - lo).astype(np.float32))
        lo_t = torch.from_numpy(lo)
        x = x[:, lo_t] * (1.0 - frac) + x[:, lo_t + 1] * frac
    if rng.random() < 0.8:
        bins = (np.arange(80) + 0.5) / 80.0
        curve = sum(rng.uniform(-tilt, tilt) * np.cos(np.pi * k * bins) for k in (1, 2, 3))
        x = x + torch.from_numpy(curve.astype(np.float32))
    return (x - mean) * inv


def spec_augment(feats: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    feats = feats.clone()
    for _ in range(2):
        w = int(rng.integers(0, 16))
        f0 = int(rng.integers(0, 80 - w))
        feats[:, f0:f0 + w] = 0.0
    for _ in range(max(1, feats.size(0) // 150)):
        w = int(rng.integers(0, min(20, feats.size(0) // 8) + 1))
        t0 = int(rng.integers(0, feats.size(0) - w + 1))
        feats[t0:t0 + w] = 0.0
    return feats


def make_batches(utts: list[Utterance], max_seconds: float, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches of at most ``max_seconds`` of audio (padding included)."""
    order = sorted(range(len(utts)), key=lambda i: len(utts[i].audio) + rng.random() * 8000)
    batches, current, longest = [], [], 0
    for i in order:
        longest_if = max(longest, len(utts[i].audio))
        if current and longest_if * (len(current) + 1) > max_seconds * 16000:
            batches.append(current)
            current, longest_if = [], len(utts[i].audio)
        current.append(i)
        longest = longest_if
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(feats: list[torch.Tensor], targets: list[list[int]], blank: int):
    # Lengths exclude the 4 trailing right-context frames, as torchaudio's recipe does.
    lengths = torch.tensor([f.size(0) - RIGHT_CONTEXT_FRAMES for f in feats], dtype=torch.int32)
    sources = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.int32)
    padded = torch.zeros(len(targets), int(target_lengths.max()), dtype=torch.int32)
    for i, t in enumerate(targets):
        padded[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    prepended = torch.cat([torch.full((len(targets), 1), blank, dtype=torch.int32), padded], dim=1)
    return sources, lengths, padded, target_lengths, prepended


def rnnt_loss(model, sources, lengths, targets, target_lengths, prepended, blank, ctc_head=None,
              ctc_weight: float = 0.0):
    """RNN-T loss (mean over the batch of per-utterance sums), plus ``ctc_weight`` times a CTC
    loss on the encoder output when ``ctc_head`` is given (it speeds up learning the acoustics)."""
    enc, enc_lengths = model.transcriber(input=sources, lengths=lengths)
    pred, pred_lengths, _ = model.predictor(input=prepended, lengths=target_lengths + 1, state=None)
    logits, logit_lengths, _ = model.joiner(enc, enc_lengths, pred, pred_lengths)
    t_max = int(logit_lengths.max())
    logits = logits[:, :t_max].contiguous()
    assert logits.size(1) == t_max, (logits.shape, t_max)
    loss = torchaudio.functional.rnnt_loss(
        logits, targets, logit_lengths.int(), target_lengths.int(), blank=blank, reduction="mean",
        clamp=-1)
    if ctc_head is not None and ctc_weight > 0:
        logp = torch.log_softmax(ctc_head(enc[:, :t_max]), dim=-1).transpose(0, 1)
        ctc = torch.nn.functional.ctc_loss(logp, targets, enc_lengths.long(), target_lengths.long(), blank=blank,
                                           reduction="sum", zero_infinity=True) / targets.size(0)
        loss = loss + ctc_weight * ctc
    return loss


@torch.no_grad()
def greedy_decode(model, feats: torch.Tensor, blank: int, max_symbols: int = 5) -> list[int]:
    """Whole-utterance greedy decoding (for dev WER during training)."""
    enc, _ = model.transcribe(feats[None], torch.tensor([feats.size(0) - RIGHT_CONTEXT_FRAMES]))
    token = torch.tensor([[blank]])
    pred, _, state = model.predict(token, torch.tensor([1]), None)
    out = []
    for t in range(enc.size(1)):
        for _ in range(max_symbols):
            logits, _, _ = model.join(enc[:, t:t + 1], torch.tensor([1]), pred, torch.tensor([1]))
            k = int(logits[0, 0, 0].argmax())
            if k == blank:
                break
            out.append(k)
            pred, _, state = model.predict(torch.tensor([[k]]), torch.tensor([1]), state)
    return out


def dev_wer(model, front_end, dev: list[Utterance], tokens: CharTokenTable, device) -> float:
    model.eval()
    refs, hyps = [], []
    for utt in dev:
        x = torch.from_numpy(utt.audio.astype(np.float32) / 32768.0)
        feats = utterance_features(front_end, x).to(device)
        hyps.append(tokens.text(greedy_decode(model, feats, tokens.blank)) or "<empty>")
        refs.append(utt.text)
    model.train()
    return jiwer.wer(refs, hyps)


def compute_stats(front_end: FeatureFrontEnd, utts: list[Utterance], n: int = 600) -> GlobalStats:
    rng = random.Random(0)
    frames = []
    for utt in rng.sample(utts, min(n, len(utts))):
        x = torch.from_numpy(utt.audio.astype(np.float32) / 32768.0)
        frames.append(front_end.log_mel(x[None])[0])
    allf = torch.cat(frames)
    mean = allf.mean(0)
    std = allf.std(0).clamp_min(1e-3)
    return GlobalStats(mean.tolist(), (1.0 / std).tolist())


def kept_checkpoints(work_dir: Path) -> list[Path]:
    """The periodic copies ``step-NNNNNN.pt`` (``--keep-checkpoints``), oldest first."""
    return sorted(work_dir.glob("step-*.pt"))


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors; other tensors (counters) from the last state."""
    return {name: torch.stack([s[name] for s in states]).mean(0) if tensor.is_floating_point() else tensor
            for name, tensor in states[-1].items()}


def export(work_dir: Path, out_dir: Path, tokens: CharTokenTable, data_dir: Path | None = None,
           checkpoint: str = "best", init: Path | None = None, average: int = 3) -> None:
    """Write the shipped model files from ``checkpoint``: ``best`` by the logged dev WER, ``last``,
    or ``average``: the mean weights of the newest ``average`` kept checkpoints (``step-*.pt``;
    the rest of the record from the newest). Files: ``model.pt``, ``config.json``,
    ``global_stats.json``, ``tokens.txt``, ``train_summary.json``; with ``data_dir`` also
    ``words.txt`` (the training vocabulary) and ``heldout_sentences.txt`` (the test split's)."""
    averaged: list[int] = []
    if checkpoint == "average":
        paths = kept_checkpoints(work_dir)[-average:]
        if len(paths) < 2:
            raise SystemExit(f"--export-checkpoint average: {work_dir} keeps {len(paths)} step-*.pt "
                             "checkpoint(s); train with --keep-checkpoints 2 or more")
        ckpts = [torch.load(path, map_location="cpu", weights_only=False) for path in paths]
        ckpt = dict(ckpts[-1], model=average_state_dicts([c["model"] for c in ckpts]))
        averaged = [c["step"] for c in ckpts]
    else:
        ckpt = torch.load(work_dir / f"{checkpoint}.pt", map_location="cpu", weights_only=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt["model"], out_dir / "model.pt")
    (out_dir / "config.json").write_text(json.dumps(ckpt["config"], indent=2) + "\n")
    GlobalStats(**ckpt["stats"]).save(out_dir / "global_stats.json")
    tokens.save(out_dir / "tokens.txt")
    summary = {"step": ckpt["step"], "trained_minutes": round(ckpt["elapsed"] / 60, 1),
               "dev_wer_greedy_whole_utterance": round(ckpt["dev_wer"], 4),
               "parameters": sum(v.numel() for v in ckpt["model"].values())}
    if averaged:  # the dev WER is the newest checkpoint's, measured before averaging
        summary["averaged_steps"] = averaged
    # a fine-tuned model records the run it started from (that model's own summary)
    start = ckpt.get("init_summary")
    if start is None and init is not None and (init / "train_summary.json").exists():
        start = json.loads((init / "train_summary.json").read_text())
    if start:
        summary["fine_tuned_from"] = start
        summary["total_trained_minutes"] = round(summary["trained_minutes"] + start.get(
            "total_trained_minutes", start["trained_minutes"]), 1)
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if data_dir is not None:
        texts = {split: [json.loads(line)["text"] for line in open(data_dir / f"{split}.jsonl")]
                 for split in ("train", "test")}
        words = sorted({w for t in texts["train"] for w in t.split()})
        (out_dir / "words.txt").write_text("\n".join(words) + "\n")
        (out_dir / "heldout_sentences.txt").write_text("\n".join(sorted(set(texts["test"]))) + "\n")
    what = f"average of steps {averaged}" if averaged else f"{checkpoint} checkpoint, step {ckpt['step']}"
    print(f"exported {what} (dev WER {ckpt['dev_wer']:.4f}) to {out_dir}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/demo"))
    p.add_argument("--work-dir", type=Path, default=Path("data/demo-train"))
    p.add_argument("--minutes", type=float, default=55.0, help="training time budget (total, across resumes)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    p.add_argument("--batch-seconds", type=float, default=60.0, help="audio seconds per batch")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (2e-3 made the "
                   "encoder collapse to a constant output here)")
    p.add_argument("--warmup", type=int, default=400)
    p.add_argument("--checkpoint-minutes", type=float, default=6.0)
    p.add_argument("--dev-utterances", type=int, default=40)
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training utterances")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true", help="train on clean audio (for debugging)")
    p.add_argument("--clean-minutes", type=float, default=8.0, help="train on clean audio for the first "
                   "minutes (the encoder learns the alignment sooner), then with noise, gain and SpecAugment")
    p.add_argument("--ctc-weight", type=float, default=0.5, help="weight of the auxiliary CTC loss "
                   "(its head is used in training only, never shipped)")
    p.add_argument("--no-timbre", action="store_true", help="no vocal-tract-length warp or spectral "
                   "tilt (stage 1 of train/rebuild_demo.py trains without them)")
    p.add_argument("--init", type=Path, default=None, help="start from this model directory's weights "
                   "and global stats (for example models/demo) instead of random weights; ignored on resume; "
                   "with --export, the summary of the model a checkpoint without that record started from")
    p.add_argument("--export", type=Path, default=None, help="write the model's files here and exit")
    p.add_argument("--export-checkpoint", choices=["best", "last", "average"], default="best",
                   help="checkpoint to export: the lowest logged dev WER (greedy, whole utterance, "
                   "--dev-utterances of dev), the latest, or the mean weights of the newest --average "
                   "kept checkpoints")
    p.add_argument("--average", type=int, default=3, help="with --export-checkpoint average: how many")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="also keep a copy of the newest N "
                   "periodic checkpoints (step-NNNNNN.pt) to average at export (0: none)")
    args = p.parse_args(argv)

    tokens = CharTokenTable.default()
    if args.export:
        export(args.work_dir, args.export, tokens, args.data if (args.data / "train.jsonl").exists() else None,
               args.export_checkpoint, args.init, args.average)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rng_np = np.random.default_rng(args.seed)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)

    train = load_split(args.data, "train", tokens, args.train_limit or None)
    dev = load_split(args.data, "dev", tokens, args.dev_utterances)
    config = dataclasses.replace(DEMO_CONFIG, num_symbols=tokens.size)
    model = config.build().to(device)
    ctc_head = torch.nn.Linear(config.encoding_dim, config.num_symbols).to(device)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(ctc_head.parameters()), lr=args.lr,
                                  weight_decay=1e-3)

    last = args.work_dir / "last.pt"
    step, elapsed, best_wer, epoch = 0, 0.0, float("inf"), 0
    init_summary = None
    if last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        ctc_head.load_state_dict(ckpt["ctc_head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, elapsed, best_wer, epoch = ckpt["step"], ckpt["elapsed"], ckpt["best_wer"], ckpt["epoch"]
        stats = GlobalStats(**ckpt["stats"])
        rng.setstate(ckpt["rng"])
        init_summary = ckpt.get("init_summary")
        print(f"resumed from step {step} ({elapsed / 60:.1f} min trained, best dev WER {best_wer:.4f})")
    elif args.init:
        start = load_demo(args.init)  # the server's own loader: same files, same checks
        if start.config != config:
            raise SystemExit(f"--init {args.init}: its config.json differs from the recipe's model config")
        model.load_state_dict(start.rnnt.state_dict())
        stats = start.stats  # the features it was trained on
        summary_file = args.init / "train_summary.json"
        init_summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        print(f"initialised from {args.init}")
    else:
        stats = compute_stats(FeatureFrontEnd(GlobalStats.identity()), train)
    front_end = FeatureFrontEnd(stats)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters; {len(train)} training utterances "
          f"({sum(len(u.audio) for u in train) / 16000 / 3600:.1f} h)")

    def lr_at(s: int) -> float:
        warm = min(1.0, (s + 1) / args.warmup)
        return args.lr * warm * max(0.05, 1.0 - 0.9 * min(1.0, elapsed / (args.minutes * 60)))

    def save(path: Path, wer: float) -> None:
        torch.save({"model": model.state_dict(), "ctc_head": ctc_head.state_dict(),
                    "optimizer": optimizer.state_dict(), "step": step,
                    "elapsed": elapsed, "best_wer": best_wer, "epoch": epoch, "rng": rng.getstate(),
                    "stats": dataclasses.asdict(stats), "config": dataclasses.asdict(config),
                    "dev_wer": wer, "init_summary": init_summary}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)

    log = open(args.work_dir / "train_log.jsonl", "a")
    model.train()
    budget = args.minutes * 60
    last_ckpt = time.monotonic()
    bar = tqdm(total=int(budget), initial=int(elapsed), unit="s", desc="training")
    done = False
    while not done:
        batches = make_batches(train, args.batch_seconds, random.Random(args.seed * 1000 + epoch))
        skip = step % len(batches) if step and last.exists() else 0
        for bi, batch in enumerate(batches):
            if bi < skip:
                continue
            t0 = time.monotonic()
            if args.no_augment or elapsed < args.clean_minutes * 60:
                feats = [utterance_features(front_end, torch.from_numpy(train[i].audio.astype(np.float32) / 32768))
                         for i in batch]
            else:
                feats = [utterance_features(front_end, augment(train[i], train, rng_np)) for i in batch]
                if not args.no_timbre:
                    feats = [timbre_augment(f, stats, rng_np) for f in feats]
                feats = [spec_augment(f, rng_np) for f in feats]
            sources, lengths, targets, target_lengths, prepended = collate(
                feats, [train[i].tokens for i in batch], tokens.blank)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step)
            loss = rnnt_loss(model, sources.to(device), lengths.to(device), targets.to(device),
                             target_lengths.to(device), prepended.to(device), tokens.blank, ctc_head,
                             args.ctc_weight)
            optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 5.0)
            optimizer.step()
            step += 1
            dt = time.monotonic() - t0
            elapsed += dt
            bar.update(int(elapsed) - bar.n)
            bar.set_postfix(step=step, loss=f"{loss.item():.3f}", lr=f"{lr_at(step):.1e}")
            log.write(json.dumps({"step": step, "loss": round(loss.item(), 4), "grad_norm": round(float(grad_norm), 3),
                                  "lr": lr_at(step), "elapsed": round(elapsed, 1), "batch": len(batch)}) + "\n")
            out_of_time = elapsed >= budget or (args.max_steps and step >= args.max_steps)
            if out_of_time or time.monotonic() - last_ckpt > args.checkpoint_minutes * 60:
                wer = dev_wer(model, front_end, dev, tokens, device)
                tqdm.write(f"step {step}: loss {loss.item():.3f}, dev WER {wer:.4f} ({elapsed / 60:.1f} min)")
                log.write(json.dumps({"step": step, "dev_wer": wer, "elapsed": round(elapsed, 1)}) + "\n")
                log.flush()
                if wer < best_wer:
                    best_wer = wer
                    save(args.work_dir / "best.pt", wer)
                save(last, wer)
                if args.keep_checkpoints:
                    shutil.copyfile(last, args.work_dir / f"step-{step:06d}.pt")
                    for old in kept_checkpoints(args.work_dir)[:-args.keep_checkpoints]:
                        old.unlink()
                last_ckpt = time.monotonic()
            if out_of_time:
                done = True
                break
        else:
            epoch += 1
    bar.close()
    print(f"done: {step} steps, {elapsed / 60:.1f} min, best dev WER {best_wer:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
