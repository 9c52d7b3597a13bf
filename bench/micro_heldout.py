"""Write the micro recipe's held-out sets and score a model on them: one table row per set.

    python bench/micro_heldout.py OUT [--model DIR] [--scale 0.5] [--limit N] [--device cpu]

Writes OUT/test (the scored sets of the test split, seed 1000, as `phi4mm train --recipe micro` writes them, at
`--scale`: 0.5 gives 100 samples a set and 20 a voice or condition set) and OUT/heldout.json, and prints a
Markdown table: each set's metric, score, goal and whether the voice or fonts were trained on. Each file is an
ordinary `phi4mm eval FILE --metric M` set; this script scores them through the same function. The default model
is the shipped micro model. At scale 0.5 the sets take ~1 minute to write and ~30 minutes to score on 2 CPU cores
(use --limit or a smaller --scale for a quick look).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped micro model)")
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from phi4mm.micro import data as md
    from phi4mm.micro import voices
    from phi4mm.micro.finish import evaluate_micro
    from phi4mm.micro.recipe import default_model_dir
    from phi4mm.micro.stages import GOALS
    test = args.out / "test"
    t = time.perf_counter()
    if not (test / "done").is_file():
        md.generate(test, "test", 1000, scale=args.scale, tasks=tuple(g[0] for g in GOALS))
        (test / "done").write_text("")
    written = time.perf_counter() - t
    t = time.perf_counter()
    res = evaluate_micro(args.model or default_model_dir(), test, args.device, args.limit)
    out = {"scale": args.scale, "write_seconds": round(written, 1), "score_seconds": round(time.perf_counter() - t, 1),
           "sets": res}
    (args.out / "heldout.json").write_text(json.dumps(out, indent=1))
    trained = {voices.set_name(e, v) for e, v in voices.trained_voices()}
    print("| set | metric | n | score | goal | met | trained on |\n|---|---|---|---|---|---|---|")
    for name, r in res.items():
        seen = "voice" if name in trained else "no" if name.startswith("asr@") else ""
        print(f"| {name} | {r['metric']} | {r['n']} | {r['score']:.3f} | {r['goal'] if r['goal'] is not None else '-'} "
              f"| {'' if r['met'] is None else 'yes' if r['met'] else 'no'} | {seen} |")


if __name__ == "__main__":
    main()
