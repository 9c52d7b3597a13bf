"""Host time of the engine's sampling step (`ModelRunner.sample`) at a full batch, on any device.

    python bench/bench_sampling.py --model CKPT [--rows 64] [--tokens 48] [--prompt-words 120] [--out FILE]

Runs `rows` seeded requests that use every sampling feature (temperature, top-k, top-p, repetition, presence
and frequency penalties) through an Engine, times each `sample` call whose batch holds all `rows` sequences
(median, mean and 90th percentile in milliseconds) and, within it, the upkeep of the persistent sampling rows
(`PersistentBatch.rows` + `record`), with a digest of every request's tokens (the same digest before and after
a sampler change means the same tokens). On a CPU the sample time is host and compute together: the sampler's
work on (rows, vocab) tensors is part of it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ["the", "fox", "ran", "over", "a", "hill", "while", "birds", "sang", "near", "old", "stone", "walls"]
PERCENTILE = 0.9


def main() -> None:
    import torch

    import phi4mm
    from phi4mm.engine.engine import Engine
    from phi4mm.sampling import SamplingParams
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=48, help="tokens each request generates")
    ap.add_argument("--prompt-words", type=int, default=120)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out")
    a = ap.parse_args()
    model = phi4mm.load(a.model, a.device, torch.float32)
    eng = Engine(model, num_blocks=a.rows * (a.prompt_words * 2 + a.tokens) // 16 + 64, max_batch=a.rows)
    times: list[float] = []
    upkeep: list[float] = []  # rows() + record() of each timed step
    full = {"now": False}

    def timer(fn, sink: list[float], gate: bool):
        def timed(*args, **kw):
            if gate:
                full["now"] = len(args[0]) == a.rows
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            if full["now"]:
                sink.append(time.perf_counter() - t0)
            return out
        return timed
    rows = eng.runner.sampling
    eng.runner.sample = timer(eng.runner.sample, times, gate=True)
    rows.rows, rows.record = timer(rows.rows, upkeep, gate=False), timer(rows.record, upkeep, gate=False)
    reqs = []
    for i in range(a.rows):
        text = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(a.prompt_words + i))
        p = SamplingParams(max_tokens=a.tokens, ignore_eos=True, temperature=0.8, top_k=50, top_p=0.9,
                           repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.1, seed=i)
        reqs.append({"prompt": f"<|user|>{text}<|end|><|assistant|>", "params": p})
    t0 = time.perf_counter()
    res = eng.generate(reqs)
    wall = time.perf_counter() - t0
    digest = hashlib.sha256(json.dumps([r["token_ids"] for r in res]).encode()).hexdigest()[:16]
    ms = sorted(t * 1e3 for t in times)
    kept = sorted((upkeep[i] + upkeep[i + 1]) * 1e3 for i in range(0, len(upkeep) - 1, 2))
    row = {"rows": a.rows, "device": a.device, "vocab": model.config.text.vocab_size, "steps_timed": len(ms),
           "sample_ms_median": round(statistics.median(ms), 3), "sample_ms_mean": round(statistics.fmean(ms), 3),
           "sample_ms_p90": round(ms[int(PERCENTILE * (len(ms) - 1))], 3),
           "rows_upkeep_ms_median": round(statistics.median(kept), 3), "wall_s": round(wall, 2),
           "torch_threads": torch.get_num_threads(), "tokens_digest": digest}
    print(json.dumps(row))
    if a.out:
        Path(a.out).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
