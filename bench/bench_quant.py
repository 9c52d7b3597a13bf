"""Quantized weights against bf16 in one run: memory, decode speed, load-time quantization and quality
(full-size random weights, one GPU).

usage: python bench/bench_quant.py [--quick] [--methods bf16,int4,int4+head] [--work /tmp/phi4mm_bench]
                                   [--out bench/results/quant.json]

Each method runs in its own child process (memory after load is then that method's alone; a hang or crash
costs one step, not the run), under a timeout per step; results are written after every step. Measures:
- memory after load (both adapters), load seconds (quantization seconds = quantized load - bf16 load);
- decode tok/s at batch 1 and 64 through the engine with CUDA graphs (ignore_eos; every request must end
  with finish_reason "length");
- quality: mean KL(fp32 || method) over >= 2,000 prompt positions of text, image, audio and image+audio
  prompts, and top-1 agreement with fp32 (bf16 beside it: the goal is a ratio to bf16's KL).
--quick: shorter decode runs; the whole run fits in ~4 minutes on an H200 for the three plain methods, model
creation included (the two "+head" variants, the tied embedding/head quantized too, add about two more).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
METHODS = ("bf16", "fp8", "int4", "fp8+head", "int4+head")  # "+head": quantize_head=True as well
HEAD_SUFFIX = "+head"
TEXT = ("The harbour was quiet in the early morning, and the fishing boats rocked gently on the grey water "
        "while the gulls circled overhead. ")


DEVICE = os.environ.get("PHI4MM_BENCH_DEVICE", "cuda")  # cpu: a smoke run of the code paths (--size tiny)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def allocated_gib() -> float | None:
    return round(torch.cuda.memory_allocated() / 2**30, 3) if DEVICE == "cuda" else None


def load(ckpt: str, method: str):
    import phi4mm
    dtype = torch.float32 if method == "fp32" else torch.bfloat16
    head = method.endswith(HEAD_SUFFIX)
    base = method.removesuffix(HEAD_SUFFIX)
    return phi4mm.load(ckpt, device=DEVICE, dtype=dtype, quantization=None if base in ("bf16", "fp32") else base,
                       quantize_head=head)


def speed(ckpt: str, method: str, quick: bool) -> dict:
    """Memory after load and decode tok/s at b=1 and b=64 (one child process per method)."""
    from phi4mm.engine.engine import Engine, cpu_kv_blocks
    from phi4mm.inputs.prepare import Prepared
    from phi4mm.sampling import SamplingParams
    t0 = time.perf_counter()
    m = load(ckpt, method)
    sync()
    row = {"method": method, "load_s": round(time.perf_counter() - t0, 2),
           "memory_gib": allocated_gib()}
    emit(row)
    eng = Engine(m, num_blocks=cpu_kv_blocks(m.device), max_batch=64, max_tokens_per_step=4096)
    prompt_len, new = (128, 32) if quick else (512, 128)
    gen = torch.Generator().manual_seed(0)
    bad: list[str] = []

    def run(b: int, n_new: int, seed: int) -> float:
        preps = [Prepared(torch.randint(1000, 190000, (prompt_len,), generator=gen).tolist(), None, None, None,
                          "speech") for _ in range(b)]
        params = SamplingParams(max_tokens=n_new, ignore_eos=True)
        sync()
        t = time.perf_counter()
        for p in preps:
            eng.add_request(p, params=params)
        while eng.has_work():
            for o in eng.step():
                if o.finished and o.finish_reason != "length":
                    bad.append(f"{o.finish_reason}: {o.error}")
        sync()
        return time.perf_counter() - t

    for b in (1, 64):
        run(b, new, 0)  # warm-up: graphs captured, kernels compiled
        total = run(b, new, 1)
        one = run(b, 1, 2)  # prefill + first token alone: subtracted to leave decode
        row[f"decode_b{b}_tok_s"] = round(b * (new - 1) / max(total - one, 1e-9), 1)
        row["failed_requests"] = len(bad)
        if bad:
            row["first_failure"] = bad[0][:300]
        emit(row)
    return row


def prompts() -> list[tuple[str, str, list, list]]:
    """(kind, prompt, images, audios) for the quality measurement: > 2,000 positions in all."""
    from tests.conftest import scene, tone
    u = "<|user|>{}<|end|><|assistant|>"
    return [("text", u.format(TEXT * 30), [], []),
            ("image", u.format("<|image_1|>Describe the picture in detail."), [scene(448, 448)], []),
            ("audio", u.format("<|audio_1|>Transcribe the audio clip into text."), [], [tone(16.0)]),
            ("image+audio", u.format("<|image_1|><|audio_1|>Answer the question about the picture."),
             [scene(448, 448, 3)], [tone(6.0, seed=1)])]


def logprobs(m, cases) -> list[torch.Tensor]:
    """Log-probabilities (T, decodable vocab) at every prompt position, in fp32."""
    return [m.logits(text, images, audios)[:, : m.decodable].log_softmax(-1) for _, text, images, audios in cases]


def quality(ckpt: str, methods: list[str]) -> list[dict]:
    """KL(fp32 || method) and top-1 agreement, in one process: fp32 log-probs stay on the GPU, each model is
    loaded in turn."""
    m = load(ckpt, "fp32")
    preps = prompts()
    ref = logprobs(m, preps)
    del m
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    rows = []
    for method in methods:
        m = load(ckpt, method)
        got = logprobs(m, preps)
        del m
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        row = {"method": method, "positions": sum(r.shape[0] for r in ref)}
        kls, agree = [], []
        for (kind, *_), p, q in zip(preps, ref, got):
            kl = (p.exp() * (p - q)).sum(-1)  # (T,)
            kls.append(kl)
            agree.append((p.argmax(-1) == q.argmax(-1)).float())
            row[f"kl_{kind}"] = round(kl.mean().item(), 6)
        row["kl_mean"] = round(torch.cat(kls).mean().item(), 6)
        row["top1_agreement"] = round(torch.cat(agree).mean().item(), 4)
        rows.append(row)
        emit(row)
    return rows


def emit(row: dict) -> None:
    print("ROW " + json.dumps(row), flush=True)


def child(args) -> None:
    if args.child == "quality":
        quality(args.ckpt, args.methods.split(","))
    else:
        speed(args.ckpt, args.child, args.quick)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/phi4mm_bench")
    ap.add_argument("--out", default=str(ROOT / "bench/results/quant.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)} "
                    "(bf16 is the baseline the ratios need)")
    ap.add_argument("--step-timeout", type=float, default=None, help="seconds per child step (default 150 quick, 600)")
    ap.add_argument("--size", choices=["full", "tiny"], default="full", help="tiny: a smoke run (with "
                    "PHI4MM_BENCH_DEVICE=cpu), not a measurement")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: {', '.join(unknown)} unknown; use {', '.join(METHODS)}")
    if args.child:
        return child(args)
    from phi4mm.tasks.make_checkpoint import make_checkpoint
    ckpt = Path(args.work) / ("official" if args.size == "full" else "official_tiny")
    res = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__,
           "size": args.size, "quick": args.quick, "methods": methods,
           "speed": [], "quality": [], "errors": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, args.size, "official", seed=0, device=DEVICE)
    res["checkpoint_s"] = round(time.perf_counter() - t0, 1)
    timeout = args.step_timeout or (150 if args.quick else 600)
    # The repo first, then whatever the caller's PYTHONPATH holds (packages installed to a side folder).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for step in (*methods, "quality"):
        cmd = [sys.executable, __file__, "--child", step, "--ckpt", str(ckpt), "--methods", args.methods] + \
            (["--quick"] if args.quick else [])
        rows: dict = {}
        try:
            limit = timeout * (1 + len(methods)) // 2 if step == "quality" else timeout  # fp32 + a load a method
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit, check=False)
            text, err = r.stdout, (r.stderr[-1500:] if r.returncode else "")
        except subprocess.TimeoutExpired as e:
            text, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
                f"timed out after {limit:.0f} s"
        for line in text.splitlines():
            if line.startswith("ROW "):
                row = json.loads(line[4:])
                rows[row["method"]] = row  # later emits of a method complete its earlier ones
        res["quality" if step == "quality" else "speed"].extend(rows.values())
        if err:
            res["errors"].append({"step": step, "error": err})
        res["total_s"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(res, indent=2))
        print(step, json.dumps(list(rows.values())), err[-300:], flush=True)
    summarize(res)
    out.write_text(json.dumps(res, indent=2))


def summarize(res: dict) -> None:
    """Ratios to bf16 (what the quantization goals are stated in) printed as a table and stored under "ratios"."""
    speed = {r["method"]: r for r in res["speed"]}
    qual = {r["method"]: r for r in res["quality"]}
    base, qbase = speed.get("bf16", {}), qual.get("bf16", {})
    res["ratios"] = {}
    print("\n| method | memory GiB | quantize s | decode b=1 | decode b=64 | KL / bf16 KL | top-1 vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for m in res.get("methods", METHODS):
        s, q = speed.get(m, {}), qual.get(m, {})

        def ratio(key, a=s, b=base):
            return round(a[key] / b[key], 2) if key in a and b.get(key) else None
        r = {"decode_b1_x": ratio("decode_b1_tok_s"), "decode_b64_x": ratio("decode_b64_tok_s"),
             "kl_x_bf16": ratio("kl_mean", q, qbase),
             "quantize_s": round(s["load_s"] - base["load_s"], 2) if "load_s" in s and "load_s" in base else None}
        res["ratios"][m] = r
        print(f"| {m} | {s.get('memory_gib')} | {r['quantize_s']} | {s.get('decode_b1_tok_s')} ({r['decode_b1_x']}x) "
              f"| {s.get('decode_b64_tok_s')} ({r['decode_b64_x']}x) | {q.get('kl_mean')} ({r['kl_x_bf16']}x) "
              f"| {q.get('top1_agreement')} |")


if __name__ == "__main__":
    main()
