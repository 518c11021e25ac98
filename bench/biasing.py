"""Contextual biasing on the demo model, through the real server: phrase recall and word error rate.

Streams the committed biasing set (``tests/data/bias-phrases``: 108 utterances of the demo domain by
held-out voices, each holding a name, place or brand the model never trained on; ``train/bias_data.py``)
and the ordinary held-out subset (``tests/data/demo-heldout``, 80 utterances) through
``asr-server --model demo`` (started here, or ``--server HOST:PORT``), as ``asr-eval`` does, and
measures for each decoding mode (greedy, beam 4) and each ``--boosts`` value (0: the server's
default boost):

* ``bias, none``: the biasing set without phrases: the phrase's recall (found whole in the
  transcript) and the WER;
* ``bias, own``: each utterance with its own phrase as the request's one phrase;
* ``bias, all``: each utterance with all the set's phrases (a contact list: every phrase but one is
  absent); ``wrong`` counts transcripts holding another utterance's phrase;
* ``held-out, none`` and ``held-out, unrelated``: the ordinary held-out subset without phrases and
  with the 100 phrases of ``tests/data/bias-phrases/unrelated.txt`` (none occurs in it); ``wrong``
  counts transcripts holding one of them.

Prints a table and writes every figure and transcript to ``--out`` (JSON). A server that takes no
phrases (``GetModelInfo``'s ``limits.max_phrases`` 0) gets the conditions without phrases only.

    .venv/bin/python -m bench.biasing                      # greedy and beam 4, the default boost
    .venv/bin/python -m bench.biasing --boosts 0 1 2 3 4   # a boost sweep
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asr.v1 import asr_pb2, asr_pb2_grpc  # noqa: E402
from client.eval import Utterance, contains, evaluate, load_manifest  # noqa: E402
from client.spawn import spawned_server  # noqa: E402
from client.stream import StreamOptions, channel  # noqa: E402

BIAS_SET = ROOT / "tests" / "data" / "bias-phrases"
HELDOUT = ROOT / "tests" / "data" / "demo-heldout" / "manifest.jsonl"
MODES = {"greedy": (asr_pb2.GREEDY, 0), "beam4": (asr_pb2.BEAM_SEARCH, 4)}


def cpu_description() -> dict:
    flags, model = "", platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags") and not flags:
                flags = line
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f" {f}" in flags]
    return {"cpu": model, "cores": os.cpu_count(), "isa": isa}


async def model_info(address: str) -> asr_pb2.ModelInfo:
    async with channel(address) as ch:
        return await asr_pb2_grpc.SpeechRecognitionStub(ch).GetModelInfo(asr_pb2.GetModelInfoRequest(), timeout=30)


def wrong_phrases(results: dict, candidates: list[str]) -> int:
    """Transcripts holding one of ``candidates`` that is not among their utterance's own phrases."""
    return sum(any(contains(r["hypothesis"], c) for c in candidates if c not in r["phrases"])
               for r in results["per_utterance"])


def summary(results: dict, candidates: list[str]) -> dict:
    recall = results["phrase_recall"]
    return {"utterances": results["utterances"], "words": results["words"], "wer": results["wer"],
            "substitutions": results["substitutions"], "deletions": results["deletions"],
            "insertions": results["insertions"],
            "recall": recall["recall"] if recall else None, "found": recall["found"] if recall else None,
            "phrases": recall["phrases"] if recall else None,
            "wrong": wrong_phrases(results, candidates), "speed_vs_real_time": results["speed_vs_real_time"]}


async def measure(address: str, mode: str, boost: float | None, bias: list[Utterance],
                  heldout: list[Utterance], unrelated: list[str], concurrency: int, log) -> dict:
    """The conditions without phrases (``boost`` None), or those with phrases at ``boost``."""
    method, beam = MODES[mode]
    base = StreamOptions(realtime=False, interim_results=False, decoding_method=method, beam_width=beam,
                         endpointing=False, boost=boost or 0.0)
    set_phrases = sorted({p for u in bias for p in u.phrases})
    if boost is None:
        runs = [("bias", "none", bias, base, False), ("held-out", "none", heldout, base, False)]
    else:
        runs = [("bias", "own", bias, base, True),
                ("bias", "all", bias, replace(base, phrases=tuple(set_phrases)), False),
                ("held-out", "unrelated", heldout, replace(base, phrases=tuple(unrelated)), False)]
    out = {}
    for data, phrases, utterances, options, own in runs:
        started = time.monotonic()
        results = await evaluate(address, utterances, options, concurrency, progress=False,
                                 send_utterance_phrases=own)
        candidates = set_phrases if data == "bias" else unrelated
        row = summary(results, candidates)
        out[f"{data}, {phrases}"] = {**row, "per_utterance": results["per_utterance"]}
        recall = "" if row["recall"] is None else f" recall {row['recall'] * 100:5.1f} %"
        log(f"{mode} boost {'-' if boost is None else f'{boost:g}'} {data}, {phrases}: WER {row['wer'] * 100:5.2f} %{recall} wrong {row['wrong']} "
            f"({time.monotonic() - started:.0f} s)")
    return out


def table(runs: list[dict]) -> str:
    """One line per mode and boost: recall and WER on the biasing set, the held-out WER and its rise."""
    head = (f"{'mode':<7}{'boost':>6}  {'recall own':>10}{'WER own':>9}{'recall all':>11}{'WER all':>9}"
            f"{'wrong all':>10}{'held-out WER':>13}{'rise':>8}{'wrong':>6}")
    lines = [head]
    plain = {r["mode"]: r["conditions"] for r in runs if r["boost"] is None}
    for run in runs:
        c = run["conditions"]
        if run["boost"] is None:
            b, h = c["bias, none"], c["held-out, none"]
            lines.append(f"{run['mode']:<7}{'-':>6}  {b['recall'] * 100:>8.1f} %{b['wer'] * 100:>7.2f} %"
                         f"{'':>11}{'':>9}{'':>10}{h['wer'] * 100:>11.2f} %{'':>8}{h['wrong']:>6}")
            continue
        own, every, h = c["bias, own"], c["bias, all"], c["held-out, unrelated"]
        rise = (h["wer"] - plain[run["mode"]]["held-out, none"]["wer"]) * 100
        lines.append(f"{run['mode']:<7}{run['boost_label']:>6}  {own['recall'] * 100:>8.1f} %{own['wer'] * 100:>7.2f} %"
                     f"{every['recall'] * 100:>9.1f} %{every['wer'] * 100:>7.2f} %{every['wrong']:>10}"
                     f"{h['wer'] * 100:>11.2f} %{rise:>+8.2f}{h['wrong']:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.biasing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", help="measure a running server HOST:PORT (its model should be demo)")
    where.add_argument("--spawn", default="--model demo", metavar="ARGS",
                       help="start 'asr-server ARGS' for the measurement (default: %(default)s)")
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["greedy", "beam4"])
    p.add_argument("--boosts", nargs="+", type=float, default=[0.0],
                   help="boosts to measure; 0 is the server's default (default: 0)")
    p.add_argument("--concurrency", type=int, default=8, help="streams at once (default: %(default)s)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="only the first N utterances of each set "
                   "(a quick check; the figures are for the whole sets)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "biasing.json")
    args = p.parse_args(argv)

    bias = load_manifest(BIAS_SET / "manifest.jsonl", args.limit, phrase_field="phrase")
    heldout = load_manifest(HELDOUT, args.limit)
    unrelated = (BIAS_SET / "unrelated.txt").read_text().split("\n")
    unrelated = [u for u in unrelated if u]

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    async def run_all(address: str) -> dict:
        info = await model_info(address)
        limits = info.limits
        biasing = limits.max_phrases > 0
        if not biasing:
            log("the server takes no phrases (limits.max_phrases 0): measuring without phrases only")
        runs = []
        for mode in args.modes:
            conditions = await measure(address, mode, None, bias, heldout, unrelated, args.concurrency, log)
            runs.append({"mode": mode, "boost": None, "boost_label": "-", "conditions": conditions})
            for boost in args.boosts if biasing else []:
                conditions = await measure(address, mode, boost, bias, heldout, unrelated, args.concurrency, log)
                label = f"{boost:g}" if boost else f"{limits.default_boost:g}*"
                runs.append({"mode": mode, "boost": boost or limits.default_boost, "boost_label": label,
                             "conditions": conditions})
        return {"model": info.model_name, "precision": info.precision,
                "limits": {"max_phrases": limits.max_phrases, "max_phrase_chars": limits.max_phrase_chars,
                           "min_boost": limits.min_boost, "max_boost": limits.max_boost,
                           "default_boost": limits.default_boost},
                "machine": cpu_description(), "bias_set": str(BIAS_SET.relative_to(ROOT)),
                "bias_utterances": len(bias), "bias_phrases": len({p for u in bias for p in u.phrases}),
                "heldout": str(HELDOUT.relative_to(ROOT)), "heldout_utterances": len(heldout),
                "unrelated_phrases": len(unrelated), "runs": runs}

    try:
        if args.server:
            out = asyncio.run(run_all(args.server))
        else:
            with spawned_server(*shlex.split(args.spawn), env={"ASR_LATENCY_BUDGET_MS": "0"}) as (address, _):
                out = asyncio.run(run_all(address))
    except grpc.RpcError as exc:
        print(f"bench.biasing: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    out["command"] = "python -m bench.biasing " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"model {out['model']} ({out['precision']}); {out['bias_utterances']} biasing utterances, "
          f"{out['bias_phrases']} phrases; {out['heldout_utterances']} held-out utterances, "
          f"{out['unrelated_phrases']} unrelated phrases; * = the server's default boost\n"
          "own: each utterance with its own phrase; all: with all the set's phrases; wrong: transcripts "
          "holding a phrase that is not the utterance's; rise: held-out WER with the unrelated phrases "
          "minus without (points)")
    print(table(out["runs"]))
    print(f"raw results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
