"""Times the quantized GEMM kernel (phi4mm.model.quant_kernels) against bf16 cuBLAS on the decoder's shapes,
each call replayed from a CUDA graph, and sweeps launch settings per row count. GPU only.

    python bench/quant_kernel_tune.py [--sweep] [--out bench/results/quant_kernel_tune.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from phi4mm.model import quant, quant_kernels

SHAPES = {"qkv": (3072, 5120), "o": (3072, 3072), "gate_up": (3072, 16384), "down": (8192, 3072)}  # (in, out)
ROWS = (1, 16, 64, 256, 1024)
REPLAYS = 100


def timed(fn) -> float:
    """Microseconds per call, from CUDA-graph replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(REPLAYS):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (REPLAYS * 10) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quant_kernel_tune.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    rows_out = []
    for (name, (k, n)), m in itertools.product(SHAPES.items(), ROWS):
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x, w)
        row = {"shape": name, "rows": m, "bf16_us": round(timed(partial(F.linear, x, w)), 2)}
        for method in quant.METHODS:
            t = quant.quantize_weight(method, w, torch.bfloat16)
            if method == "fp8":
                wq, s, int4, group = t["weight"], t["weight_scale"], False, k
                if m % 16 == 0:
                    row["fp8_scaled_mm_us"] = round(timed(partial(quant._scaled_mm_fp8, x, wq, s)), 2)
            else:
                wq, s, int4, group = t["weight_packed"].view(torch.uint8), t["weight_scale"], True, quant.int4_group(k)
            y = quant_kernels.qmm(x, wq, s, int4, group, n)
            row[f"{method}_rel_err"] = round(((y.float() - ref.float()).norm() / ref.float().norm()).item(), 4)
            row[f"{method}_us"] = round(timed(partial(quant_kernels.qmm, x, wq, s, int4, group, n)), 2)
            if args.sweep:
                best = None
                for bm, bn, bk, warps, stages in itertools.product((16, 32, 64, 128), (16, 32, 64, 128), (64, 128, 256),
                                                                   (4, 8), (2, 3, 4)):
                    if bm < min(max(16, m), 128) or (int4 and bk != group) or bm > max(16, m) * 2:
                        continue
                    saved = quant_kernels.CONFIGS
                    quant_kernels.CONFIGS = ((None, bm, bn, bk, warps, stages),)
                    try:
                        us = timed(partial(quant_kernels.qmm, x, wq, s, int4, group, n))
                    except Exception:  # noqa: BLE001 - out of shared memory etc.: not a candidate
                        us = float("inf")
                    finally:
                        quant_kernels.CONFIGS = saved
                    if best is None or us < best[0]:
                        best = (round(us, 2), bm, bn, bk, warps, stages)
                row[f"{method}_best"] = best
        print(json.dumps(row), flush=True)
        rows_out.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
