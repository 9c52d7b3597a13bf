"""Engine throughput, each figure beside the bound measured in the same run (full-size random weights, bf16).

usage: python bench/bench_engine.py [--quick] [--cases ...] [--out bench/results/engine.json] [--skip-peer]
       python bench/bench_engine.py --smoke      (CPU, tiny checkpoint, seconds: checks the plumbing only)

The bound of a decode step is the bytes it must read (decoder weights, the adapters its rows use, every row's
KV cache) over the copy bandwidth measured here by a large device-to-device copy (read + write). Cases:
decode at batch 1 without and with the speech adapter; batch 64 with adapters none / speech / vision / a third
each (and as a ratio to none); batch 64, 128, 256 without adapter; time to first token of an 896x896 image;
batched 30 s speech recognition (real-time factor); transformers on the text cases (driven as
a transformers user would: default generate, min_new_tokens forcing full length).
`--quick` (decode cases only, short outputs, no peer) finishes in under 4 minutes on an H200, building the
weights included. Each case runs under its own deadline; results are written after every case.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DECODE_CASES = ["b=1 none", "b=1 speech", "b=64 none", "b=64 speech", "b=64 vision", "b=64 mixed",
                "b=128 none", "b=256 none"]
FULL_CASES = ["bound"] + DECODE_CASES + ["graphs vs eager", "image ttft", "asr"]
T0 = time.perf_counter()


class CaseTimeout(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rand_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1000, 190000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes per second of a large device-to-device copy, counting the read and the write."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    bw = 2 * nbytes * 10 / (time.perf_counter() - t0)
    del x, y
    if device == "cuda":
        torch.cuda.empty_cache()
    return bw


def step_bytes(net) -> dict:
    """Bytes one decode step reads: decoder weights (linears, norms, the tied vocabulary matrix; no towers) and
    each adapter's A and B over every layer; KV bytes per token of context."""
    weights = sum(p.numel() * p.element_size() for n, p in net.named_parameters()
                  if (n.startswith("layers.") and "lora_" not in n) or n in ("norm.weight", "embed_tokens.weight"))
    adapters: dict[str, int] = {}
    for n, p in net.named_parameters():
        if n.startswith("layers.") and ".lora_" in n:
            name = n.rsplit(".", 1)[-1]
            adapters[name] = adapters.get(name, 0) + p.numel() * p.element_size()
    t = net.cfg.text
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * net.embed_tokens.weight.element_size()
    return {"weights": weights, "adapters": adapters, "kv_per_token": kv}


class Results:
    """Rows written to `out` after every case (a run cut short keeps what it measured)."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.data = out, dict(meta, ours=[])
        out.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict, key: str = "ours") -> None:
        self.data.setdefault(key, []).append(row)
        print(json.dumps(row), flush=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.out)


def ours(ckpt: str, cases: list[str], res: Results, args) -> None:
    import phi4mm
    from phi4mm.engine.engine import Engine
    from phi4mm.inputs.prepare import Prepared
    from phi4mm.sampling import SamplingParams
    from tests.conftest import scene
    device = "cpu" if args.smoke else "cuda"
    log(f"loading {ckpt}")
    m = phi4mm.load(ckpt, device=device, dtype=torch.float32 if args.smoke else torch.bfloat16)
    sizes = step_bytes(m.net)
    log("measuring copy bandwidth")
    bw = copy_bandwidth(device, (64 << 20) if args.smoke else (4 << 30))
    bound_row = {"case": "bound", "copy_tb_s": round(bw / 1e12, 3), "step_weight_gb": round(sizes["weights"] / 1e9, 3),
                 "adapter_gb": {k: round(v / 1e9, 3) for k, v in sizes["adapters"].items()},
                 "kv_kb_per_token": round(sizes["kv_per_token"] / 1e3, 1),
                 "bound_b1_tok_s": round(bw / sizes["weights"], 1)}
    for name, nbytes in sizes["adapters"].items():
        bound_row[f"bound_b1_{name}_tok_s"] = round(bw / (sizes["weights"] + nbytes), 1)
    res.add(bound_row)
    batches = [int(c.split()[0][2:]) for c in cases if c in DECODE_CASES]
    eng = Engine(m, max_batch=max(batches + [64]), max_tokens_per_step=4096)
    steps: list[float] = []  # wall time of each step after the first token of the last run
    failures: list[str] = []  # requests that ended in error: a timing that includes them is void
    deadline = [float("inf")]

    after = [0]  # tokens of the last run emitted once every row had its first token

    def run(preps, new):
        """-> (seconds until every row had its first token, seconds in all, tokens emitted after that point);
        `steps` gets the wall time of each step after that point."""
        p = SamplingParams(max_tokens=new, ignore_eos=True)
        sync()
        t0 = time.perf_counter()
        first = None
        ids = [eng.add_request(x, params=p) for x in preps]
        started: set[str] = set()
        steps.clear()
        after[0] = 0
        while eng.has_work():
            if time.perf_counter() > deadline[0]:
                for i in ids:
                    eng.cancel(i)
                while eng.has_work():
                    eng.step()
                raise CaseTimeout(f"past the case's {args.case_timeout} s deadline")
            s0 = time.perf_counter()
            outs = eng.step()
            for o in outs:
                if o.token_id is not None and first is None:
                    started.add(o.request_id)
                if o.finished and o.finish_reason not in ("length", "stop"):
                    failures.append(f"{o.finish_reason}: {o.error}")
            if first is not None:
                steps.append(time.perf_counter() - s0)
                after[0] += sum(o.token_id is not None for o in outs)
            elif len(started) == len(ids):
                sync()
                first = time.perf_counter() - t0
        sync()
        return first, time.perf_counter() - t0, after[0]

    none_rate: dict[int, float] = {}
    for case in cases:
        if case == "bound":
            continue
        log(f"case {case!r}")
        deadline[0] = time.perf_counter() + args.case_timeout
        try:
            if case in DECODE_CASES:
                row = decode_case(case, run, steps, Prepared, sizes, bw, args)
                b = row["batch"]
                if row["adapters"] == "none":
                    none_rate[b] = row["decode_tok_s"]
                elif b in none_rate:
                    row["vs_no_adapter"] = round(row["decode_tok_s"] / none_rate[b], 3)
            else:
                row = other_case(case, m, eng, run, Prepared, scene, SamplingParams, Engine)
        except Exception as e:  # one failed case must not lose the others
            row = {"case": case, "error": f"{type(e).__name__}: {e}"[:400]}
        if device == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if failures:
            row["void"] = f"{len(failures)} request(s) failed, first: {failures[0][:300]}"
            failures.clear()
        res.add(row)


def decode_case(case: str, run, steps, Prepared, sizes: dict, bw: float, args) -> dict:
    """Decode tok/s of `b` rows with 512-token prompts (after the first token), and the
    bound: weights + the adapters present + every row's KV cache read once per step."""
    b = int(case.split()[0][2:])
    which = case.split()[1]
    cycle = {"none": [None], "speech": ["speech"], "vision": ["vision"], "mixed": [None, "speech", "vision"]}[which]
    prompt = 24 if args.smoke else 512
    new = 4 if args.smoke else (128 if b == 1 else 64) if args.quick else (256 if b == 1 else 128)
    preps = [Prepared(rand_prompt(prompt, i), None, None, cycle[i % len(cycle)], "speech") for i in range(b)]
    for _ in range(1 if args.quick or args.smoke else 2):
        run(preps, new)  # warm-up: graph buckets captured, kernels compiled, prompts in the prefix cache
    first, total, emitted = run(preps, new)
    timed = sorted(steps[1:])
    med = timed[len(timed) // 2] if timed else float("nan")
    slowest = timed[-1] if timed else float("nan")
    _, one, _ = run(preps, 1)
    # Decode rate: the tokens emitted once every row had its first token, over the time since then (a row
    # prefilled later than the others would otherwise count its prefill as decode time).
    rate = emitted / max(total - first, 1e-9)
    present = {a for a in cycle if a}
    step = sizes["weights"] + sum(sizes["adapters"].get(a, 0) for a in present) \
        + b * (prompt + new / 2) * sizes["kv_per_token"]  # KV at the mean context of the timed steps
    bound = b * bw / step
    return {"case": f"decode {case}", "batch": b, "adapters": which, "prompt": prompt, "new": new,
            "decode_tok_s": round(rate, 1), "bound_tok_s": round(bound, 1), "of_bound": round(rate / bound, 3),
            "step_gb": round(step / 1e9, 3), "decode_step_ms_median": round(med * 1e3, 3),
            "decode_step_ms_max": round(slowest * 1e3, 3), "first_token_s": round(first or float("nan"), 4),
            "one_token_run_s": round(one, 4), "total_s": round(total, 4),
            "tokens_timed": emitted}


def other_case(case: str, m, eng, run, Prepared, scene, SamplingParams, Engine) -> dict:
    if case == "graphs vs eager":
        preps = [Prepared(rand_prompt(200 + 37 * i, 100 + i), None, None, "speech", "speech") for i in range(6)]
        p = SamplingParams(max_tokens=48, ignore_eos=True)
        with_graphs = [o["token_ids"] for o in eng.generate([dict(prompt=x, params=p) for x in preps])]
        eager = Engine(m, num_blocks=2048, static_decode=False)
        plain = [o["token_ids"] for o in eager.generate([dict(prompt=x, params=p) for x in preps])]
        del eager
        same = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(with_graphs, plain)]
        return {"case": "graphs vs eager (bf16 greedy, 6 x 48 tokens)", "first_divergence": same,
                "identical": sum(s == 48 for s in same)}
    if case == "image ttft":
        prompt = "<|user|><|image_1|>Describe.<|end|><|assistant|>"
        run([m.prepare(prompt, images=[scene(896, 896)])], 2)
        whole, engine_only = [], []
        for k in range(3):  # new images each time: no media-cache or prefix-cache hit
            sync()
            t0 = time.perf_counter()
            prep = m.prepare(prompt, images=[scene(896, 896, 7 + k)])
            ttft, _, _ = run([prep], 1)
            whole.append(time.perf_counter() - t0)
            engine_only.append(ttft)
        return {"case": "image ttft 896x896", "media_tokens": prep.num_tokens,
                "ttft_s_incl_preprocess": round(sorted(whole)[1], 4), "ttft_s_engine": round(sorted(engine_only)[1], 4)}
    if case == "asr":
        wav = (0.1 * np.random.default_rng(0).standard_normal(16000 * 30)).astype(np.float32)
        preps = [m.prepare("<|user|><|audio_1|>Transcribe the audio to text.<|end|><|assistant|>",
                           audios=[(wav + 1e-4 * i, 16000)]) for i in range(128)]
        run(preps[64:], 100)  # warm-up on other clips (no media-cache hit in the timed run)
        _, total, _ = run(preps[:64], 100)
        return {"case": "asr b=64 30s new=100", "rtfx": round(64 * 30 / total, 1), "total_s": round(total, 2)}
    raise ValueError(f"unknown case {case!r}; known: {', '.join(FULL_CASES)}")


def peer(ckpt: str, cases: list[str], res: Results) -> None:
    """transformers on the text decode cases (b=1 and 64, no adapter), one generate call each."""
    import warnings

    import transformers
    warnings.simplefilter("ignore")
    ref = transformers.Phi4MultimodalForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map="cuda").eval()

    def gen(new, **kw):
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref.generate(**kw, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        sync()
        return time.perf_counter() - t0

    for case in cases:
        b = int(case.split()[0][2:])
        new = 256 if b == 1 else 128
        log(f"peer {case!r}")
        ids = torch.tensor([rand_prompt(512, i) for i in range(b)], device="cuda")
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        gen(2, **kw)
        ttft = gen(1, **kw)
        total = gen(new, **kw)
        res.add({"case": f"decode {case}", "ttft_s": round(ttft, 4),
                 "decode_tok_s": round(b * (new - 1) / max(total - ttft, 1e-9), 1)}, key="peer")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/phi4mm_bench")
    ap.add_argument("--out", default=None, help="default bench/results/engine.json (smoke: /tmp)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--quick", action="store_true", help="decode cases, short outputs, no peer: < 4 min on an H200")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny checkpoint: the plumbing, no figures")
    ap.add_argument("--cases", default=None, help=f"comma-separated, from: {', '.join(FULL_CASES)}")
    ap.add_argument("--case-timeout", type=float, default=None, help="seconds per case (default 240, quick 45)")
    args = ap.parse_args()
    if args.case_timeout is None:
        args.case_timeout = 45.0 if args.quick else 240.0
    cases = args.cases.split(",") if args.cases else (["bound"] + DECODE_CASES if args.quick or args.smoke
                                                      else FULL_CASES)
    if args.smoke:
        cases = [c for c in cases if c in ("bound", "b=1 none", "b=1 speech", "b=64 mixed")]
    from phi4mm.tasks.make_checkpoint import make_checkpoint
    work = Path(args.work) / ("tiny" if args.smoke else "full")
    peer_cases = [] if args.skip_peer or args.quick or args.smoke else [c for c in ("b=1 none", "b=64 none")
                                                                        if c in cases]
    for layout in ("official", "hf") if peer_cases else ("official",):
        if not (work / layout / "config.json").exists():
            log(f"building {'tiny' if args.smoke else 'full-size'} random weights ({layout} layout)")
            make_checkpoint(work / layout, "tiny" if args.smoke else "full", layout, seed=0,
                            device="cpu" if args.smoke else "cuda")
    out = Path(args.out or ("/tmp/phi4mm_bench_engine_smoke.json" if args.smoke
                            else ROOT / "bench/results/engine.json"))
    meta = {"bench": "engine", "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke
            else "cpu (smoke: no figures)", "torch": torch.__version__, "quick": args.quick,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    res = Results(out, meta)
    ours(str(work / "official"), cases, res, args)
    if peer_cases:
        torch.cuda.empty_cache()
        import transformers
        res.data["transformers"] = transformers.__version__
        peer(str(work / "hf"), peer_cases, res)
    log(f"done: {out}")
    print(f"\n{'case':<28} {'tok/s':>10} {'bound':>10} {'of bound':>9}")
    for r in res.data["ours"]:
        if "decode_tok_s" in r:
            print(f"{r['case']:<28} {r['decode_tok_s']:>10} {r['bound_tok_s']:>10} {r['of_bound']:>9.1%}")


if __name__ == "__main__":
    main()
