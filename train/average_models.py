"""Average the weights of exported demo models of the same size (a "model soup").

    python train/average_models.py models/demo /tmp/last --out models/demo

Every input is a directory as ``train_demo.py --export`` writes it; they must share
``config.json`` and ``tokens.txt``. ``model.pt`` becomes the element-wise mean of the inputs'
float tensors (``train_demo.average_state_dicts``); every other file (feature stats, vocabulary, held-out sentences) is copied from
the **last** input, and its ``train_summary.json`` gains ``averaged_with``: the summaries of the
others. ``--out`` may be one of the inputs (all are read before anything is written).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from train_demo import average_state_dicts  # the mean train_demo's --export-checkpoint average takes


def check_same_parameters(state_dicts: list[dict[str, torch.Tensor]]) -> None:
    """Raise ``ValueError`` unless every state dict has the same names and shapes."""
    first = state_dicts[0]
    for s in state_dicts[1:]:
        if set(s) != set(first):
            raise ValueError("the models have different parameters")
        for key, tensor in first.items():
            if s[key].shape != tensor.shape:
                raise ValueError(f"{key}: shapes differ")


def average_models(inputs: list[Path], out: Path) -> None:
    for name in ("config.json", "tokens.txt"):
        texts = {(d / name).read_text() for d in inputs}
        if len(texts) > 1:
            raise ValueError(f"the models' {name} differ: only models of one size and token table average")
    state_dicts = [torch.load(d / "model.pt", map_location="cpu", weights_only=True) for d in inputs]
    check_same_parameters(state_dicts)
    weights = average_state_dicts(state_dicts)
    summary_path = inputs[-1] / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["averaged_with"] = [json.loads((d / "train_summary.json").read_text())
                                if (d / "train_summary.json").exists() else {"directory": str(d)}
                                for d in inputs[:-1]]
    with tempfile.TemporaryDirectory() as tmp:  # --out may be an input: stage, then replace
        staged = Path(tmp) / "model"
        shutil.copytree(inputs[-1], staged)
        torch.save(weights, staged / "model.pt")
        (staged / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for f in staged.iterdir():
            shutil.copy2(f, out / f.name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="exported model directories (at least two)")
    p.add_argument("--out", type=Path, required=True, help="directory to write the averaged model to")
    args = p.parse_args(argv)
    if len(args.models) < 2:
        p.error("give at least two model directories")
    missing = [str(d) for d in args.models if not (d / "model.pt").exists()]
    if missing:
        p.error(f"no model.pt in {', '.join(missing)}")
    try:
        average_models(args.models, args.out)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {args.out} (mean of {len(args.models)} models)")


if __name__ == "__main__":
    main()
