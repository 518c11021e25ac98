"""How large a boost the demo model needs for a phrase it never trained on, and why.

For each utterance of the biasing set (``tests/data/bias-phrases``) and the transcript the server gave
it without phrases (beam 4, from ``bench/results/biasing.json``), on the whole utterance offline:

* **margin**: ``log P(transcript) - log P(reference)`` (RNN-T log-likelihoods over all alignments,
  torchaudio's ``rnnt_loss``), divided by the phrase's tokens: the bonus per phrase token at which
  the reference would outscore the model's own transcript;
* **predictor score**: the log-probability the predictor alone (the joiner with a zero encoder
  output, an estimate of the model's internal language model) gives each reference token, averaged
  over the phrase's tokens and over the other tokens.

    .venv/bin/python -m bench.biasing_margin
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.model.features import FeatureFrontEnd, utterance_features  # noqa: E402
from server.model.loading import load_model  # noqa: E402

BIAS_SET = ROOT / "tests" / "data" / "bias-phrases"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.biasing_margin", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "biasing.json",
                   help="bench.biasing's raw results (their beam 4 transcripts without phrases)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "biasing_margin.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model("demo")
    rnnt, tokens = model.rnnt.eval(), model.tokens
    blank, front_end = model.blank, FeatureFrontEnd(model.stats)
    piece = {tokens.piece(t): t for t in range(tokens.size - 1)}
    space = piece["\u2581"]

    def ids(text: str) -> list[int]:
        out = []
        for i, word in enumerate(text.split()):
            out += ([space] if i else []) + [piece[c] for c in word]
        return out

    rows = [json.loads(line) for line in (BIAS_SET / "manifest.jsonl").read_text().splitlines()]
    results = json.loads(args.results.read_text())
    plain = next(r for r in results["runs"] if r["mode"] == "beam4" and r["boost"] is None)
    hypotheses = {u["audio"]: u["hypothesis"] for u in plain["conditions"]["bias, none"]["per_utterance"]}
    out = []
    with torch.inference_mode():
        for row in rows:
            audio, _ = soundfile.read(str(BIAS_SET / row["audio"]), dtype="float32")
            feats = utterance_features(front_end, torch.from_numpy(audio))[None]
            enc, _ = rnnt.transcribe(feats, torch.tensor([feats.shape[1]]))
            enc_len = torch.tensor([enc.shape[1]])

            def log_p(text: str) -> float:
                target = ids(text)
                pred, _, _ = rnnt.predict(torch.tensor([[blank] + target]), torch.tensor([len(target) + 1]), None)
                logits, _, _ = rnnt.join(enc, enc_len, pred, torch.tensor([len(target) + 1]))
                loss = torchaudio.functional.rnnt_loss(
                    logits, torch.tensor([target], dtype=torch.int32), enc_len.int(),
                    torch.tensor([len(target)], dtype=torch.int32), blank=blank, reduction="none")
                return -float(loss[0])

            reference, hypothesis, phrase = row["text"], hypotheses[row["audio"]], row["phrase"]
            phrase_ids = ids(phrase)
            margin = (log_p(hypothesis) - log_p(reference)) / len(phrase_ids) if hypothesis else None
            target = ids(reference)
            pred, _, _ = rnnt.predict(torch.tensor([[blank] + target]), torch.tensor([len(target) + 1]), None)
            zero = torch.zeros(1, 1, enc.shape[-1])
            ilm = torch.log_softmax(rnnt.join(zero, torch.tensor([1]), pred, torch.tensor([len(target) + 1]))[0]
                                    [0, 0, :, :blank], dim=-1)
            scores = [float(ilm[i, t]) for i, t in enumerate(target)]
            words = reference.split()
            start = next(i for i in range(len(words)) if words[i:i + len(phrase.split())] == phrase.split())
            first = len(ids(" ".join(words[:start]))) + (1 if start else 0)
            inside = scores[first:first + len(phrase_ids)]
            outside = scores[:first] + scores[first + len(phrase_ids):]
            out.append({"audio": row["audio"], "phrase": phrase, "hypothesis": hypothesis, "margin_per_token": margin,
                        "predictor_phrase": float(np.mean(inside)), "predictor_other": float(np.mean(outside))})
            print(f"{margin:6.2f} {np.mean(inside):6.2f} {np.mean(outside):6.2f}  {reference} | {hypothesis}", flush=True)
    margins = np.array([o["margin_per_token"] for o in out if o["margin_per_token"] is not None])
    summary = {"utterances": len(out), "margin_per_token_quantiles": {
        str(q): round(float(np.quantile(margins, q)), 2) for q in (0.1, 0.3, 0.5, 0.8, 0.9)},
        "predictor_per_token_phrase_median": round(float(np.median([o["predictor_phrase"] for o in out])), 2),
        "predictor_per_token_other_median": round(float(np.median([o["predictor_other"] for o in out])), 2)}
    print(json.dumps(summary, indent=1))
    args.out.write_text(json.dumps({**summary, "per_utterance": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
