"""The decoder's 128 LoRA linears alone (32 layers x qkv, o, gate_up, down at full size, random bf16), captured
as one CUDA graph per variant: base GEMMs only, + the segmented kernels, + the former masked path (per adapter:
shrink GEMM, scale, mask, expand GEMM), + one adapter unmasked, + a stacked layout ([A_0; W; A_1] in one GEMM,
[B_0 | B_1] in one expand; whole, or one adapter's contiguous slice). Each beside the bound: the bytes read (base weights + the adapters in
use) over the copy bandwidth measured in the same run. For tuning lora_kernels.CONFIG.

usage: python bench/lora_kernels_bench.py [--rows 1,64,256] [--out bench/results/lora_kernels.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PHI4MM_LORA_KERNELS"] = "1"  # the kernels are opt-in; this bench times them against the fallback
from phi4mm.model import lora_kernels  # noqa: E402

SHAPES = [(3072, 5120), (3072, 3072), (3072, 16384), (8192, 3072)]  # (in, out): qkv, o, gate_up, down
RANKS = {"speech": 320, "vision": 256}
SCALES = {"speech": 1.0, "vision": 2.0}
LAYERS = 32


def timed(fn, reps: int = 20) -> float:
    """Seconds per call of fn captured in a CUDA graph (launch cost as in the engine's decode graphs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,16,64,128,256")
    ap.add_argument("--out", default=str(ROOT / "bench/results/lora_kernels.json"))
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    x = torch.empty(4 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t0)
    del x, y
    torch.cuda.empty_cache()
    names = tuple(sorted(RANKS))
    r0, r1 = RANKS[names[0]], RANKS[names[1]]
    layers = []
    stacked = []
    for _ in range(LAYERS):
        lins, stk = [], []
        for k, n in SHAPES:
            w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
            a = [torch.randn(RANKS[nm], k, device=dev, dtype=dt) * 0.02 for nm in names]
            b = [torch.randn(n, RANKS[nm], device=dev, dtype=dt) * 0.02 for nm in names]
            lins.append((w, a, b, lora_kernels.AdapterTable.build(a, b, [SCALES[nm] for nm in names])))
            # Stacked storage: rows [A_0; W; A_1] in one tensor, so W, [A_0; W] and [W; A_1] are contiguous row
            # slices (one GEMM gives the base output and one adapter's shrink), and [B_0 | B_1] side by side.
            stk.append((torch.cat([a[0], w, a[1]]), torch.cat([b[0], b[1]], dim=1)))
        layers.append(lins)
        stacked.append(stk)
    base_bytes = sum(w.numel() * 2 for lins in layers for w, *_ in lins)
    ad_bytes = {nm: sum((a[i].numel() + b[i].numel()) * 2 for lins in layers for _, a, b, _ in lins)
                for i, nm in enumerate(names)}
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_tb_s": round(bw / 1e12, 3),
           "base_gb": round(base_bytes / 1e9, 3), "adapter_gb": {k: round(v / 1e9, 3) for k, v in ad_bytes.items()},
           "config": lora_kernels.CONFIG, "rows": []}
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}), flush=True)
    for m in [int(r) for r in args.rows.split(",")]:
        xs = {k: torch.randn(m, k, device=dev, dtype=dt) for k in {s[0] for s in SHAPES}}
        for mix in ("none", "speech", "vision", "mixed"):
            slots = {"none": [-1], "speech": [names.index("speech")], "vision": [names.index("vision")],
                     "mixed": [-1, 0, 1]}[mix]
            ids = torch.tensor([slots[i % len(slots)] for i in range(m)], device=dev)
            present = {names[s] for s in slots if s >= 0}
            masks = [(ids == i).to(dt)[:, None] for i in range(len(names))]

            # one (rows, r0 + r1) multiplier per step for every layer: each row's adapter scale in its own columns
            colmask = torch.cat([masks[0].expand(m, r0) * SCALES[names[0]], masks[1].expand(m, r1) * SCALES[names[1]]],
                                dim=1)

            def single():
                name = next(iter(present))
                i = names.index(name)
                for lins in layers:
                    for (w, a, b, t), (k, _) in zip(lins, SHAPES):
                        torch.addmm(F.linear(xs[k], w), F.linear(xs[k], a[i]) * SCALES[name], b[i].t())

            def stacked_single():
                name = next(iter(present))
                for stk in stacked:
                    for (k, n), (s_, bc) in zip(SHAPES, stk):
                        if name == names[0]:
                            h = F.linear(xs[k], s_[:r0 + n])
                            torch.addmm(h[:, r0:], h[:, :r0] * SCALES[name], bc[:, :r0].t())
                        else:
                            h = F.linear(xs[k], s_[r0:])
                            torch.addmm(h[:, :n], h[:, n:] * SCALES[name], bc[:, r0:].t())

            def stacked_mixed():
                for stk in stacked:
                    for (k, n), (s_, bc) in zip(SHAPES, stk):
                        h = F.linear(xs[k], s_)
                        lo = torch.cat([h[:, :r0], h[:, r0 + n:]], dim=1) * colmask
                        torch.addmm(h[:, r0:r0 + n], lo, bc.t())

            def base():
                for lins in layers:
                    for (w, a, b, t), (k, _) in zip(lins, SHAPES):
                        F.linear(xs[k], w)

            def segmented():
                rows = lora_kernels.segments(ids, len(names))
                for lins in layers:
                    for (w, a, b, t), (k, _) in zip(lins, SHAPES):
                        lora_kernels.apply(F.linear(xs[k], w), xs[k], t, rows)

            def masked():
                for lins in layers:
                    for (w, a, b, t), (k, _) in zip(lins, SHAPES):
                        yv = F.linear(xs[k], w)
                        for i, nm in enumerate(names):
                            if nm in present:
                                yv = torch.addmm(yv, F.linear(xs[k], a[i]) * SCALES[nm] * masks[i], b[i].t())

            bound = (base_bytes + sum(ad_bytes[p] for p in present)) / bw
            row = {"rows": m, "adapters": mix, "bound_ms": round(bound * 1e3, 3)}
            variants = [("base", base), ("segmented", segmented)]
            if mix != "none":
                variants += [("masked", masked), ("stacked_mixed", stacked_mixed)]
            if mix in ("speech", "vision"):
                variants += [("single", single), ("stacked_single", stacked_single)]
            for label, fn in variants:
                try:
                    t = timed(fn)
                    row[f"{label}_ms"] = round(t * 1e3, 3)
                    row[f"{label}_of_bound"] = round(bound / t, 3)
                except Exception as e:  # noqa: BLE001 - one variant failing must not hide the others
                    row[f"{label}_error"] = f"{type(e).__name__}: {e}"[:300]
            print(json.dumps(row), flush=True)
            out["rows"].append(row)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
