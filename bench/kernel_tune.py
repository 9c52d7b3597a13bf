"""Launch settings of the paged decode attention kernel, timed on the GPU at the shapes the engine runs.

usage: python bench/kernel_tune.py [--out FILE.json]
Full-size geometry (24 query / 8 KV heads of 128, blocks of 16 tokens, bf16). Cases: one row at 768 keys (the
batch-1 bench), 64 rows at ~640 keys (the batch-64 bench), one row at 24k keys (a long audio prompt). Each
setting is timed inside a CUDA graph (triton.testing.do_bench_cudagraph), and the bytes it must read give an
effective bandwidth. Prints the best settings per case; kernels.DECODE_CONFIG holds the chosen ones.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import triton.testing

    from phi4mm.model import kernels
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/kernel_tune.json")
    args = ap.parse_args()
    H, KV, D, BS = 24, 8, 128, 16
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    cases = {"b1_768": (1, [768], 64), "b64_640": (64, [600 + i for i in range(64)], 64),
             "b1_24k": (1, [24000], 2048)}
    res: dict = {"gpu": torch.cuda.get_device_name(), "cases": {}}
    for name, (R, lens, nb) in cases.items():
        num_blocks = R * nb + 1
        kc = torch.randn(num_blocks, BS, KV, D, device=dev, dtype=dt, generator=g)
        vc = torch.randn(num_blocks, BS, KV, D, device=dev, dtype=dt, generator=g)
        tables = torch.randperm(num_blocks - 1, device=dev, generator=g)[:R * nb].view(R, nb)
        seq_lens = torch.tensor(lens, device=dev)
        q = torch.randn(R, H, D, device=dev, dtype=dt, generator=g)
        want = kernels.paged_decode_attention_torch(q, kc, vc, tables, seq_lens).float()
        nbytes = sum(lens) * KV * D * 2 * 2  # keys and values read once
        rows, seen = [], set()
        for part, bn, w, st in itertools.product((64, 128, 256), (32, 64, 128), (2, 4, 8), (2, 3)):
            cfg = {"part_tokens": part, "block_n": bn, "num_warps": w, "num_stages": st}
            key = (kernels.decode_parts(R, KV, nb * BS, part), bn, w, st)  # settings that launch the same kernel
            if part < bn or key in seen:
                continue
            seen.add(key)
            try:
                out = kernels.paged_decode_attention(q, kc, vc, tables, seq_lens, config=cfg)
                err = (out.float() - want).abs().max().item()
                ms = triton.testing.do_bench_cudagraph(
                    lambda: kernels.paged_decode_attention(q, kc, vc, tables, seq_lens, config=cfg), rep=20)
            except Exception as e:  # a setting the compiler rejects (too many registers, shared memory)
                rows.append({**cfg, "error": str(e)[:120]})
                continue
            rows.append({**cfg, "us": round(ms * 1e3, 2), "gb_s": round(nbytes / ms / 1e6, 1), "err": err,
                         "parts": kernels.decode_parts(R, KV, nb * BS, part)})
        ok = sorted((r for r in rows if "us" in r and r["err"] < 0.05), key=lambda r: r["us"])
        res["cases"][name] = {"best": ok[:5], "default": next((r for r in rows if all(
            r.get(k) == v for k, v in kernels.DECODE_CONFIG.items())), None), "errors": sum("error" in r for r in rows),
            "worst_err": max((r["err"] for r in rows if "err" in r), default=None)}
        print(name, json.dumps(res["cases"][name], indent=None), flush=True)
    # One setting for all cases: the lowest total time relative to each case's best.
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
