"""Bounded load test of the HTTP server on loopback, against the engine's offline figures in the same run.

    python bench/bench_server.py                     # tiny random checkpoint, CPU
    python bench/bench_server.py --model DIR --device cuda --clients 32 --seconds 60

N streaming clients (threads, raw SSE over httpx) send chat requests back to back for a fixed time; each
request generates exactly --max-tokens tokens (ignore_eos). Reported: output tokens/s, p50/p99 time to first
token and inter-token latency (client side, per SSE chunk). The server runs in a subprocess (`live_server.py`)
so the clients' Python does not share its GIL. Then the same prompts go straight through `Engine` (one wave of N
requests, timestamps per step) for the offline numbers. Writes bench/results/server_cpu.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from live_server import start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int) -> list[str]:
    return [f"Client {i}: write a short story about a lighthouse keeper and the number {i * 13}." for i in range(n)]


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) * 1000 if xs else None  # milliseconds


def client_loop(port: int, prompt: str, max_tokens: int, stop_at: float, rec: dict) -> None:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=120) as h:
        while time.monotonic() < stop_at:
            t0, last = time.perf_counter(), None
            with h.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    msg = json.loads(line[6:])
                    if msg.get("usage"):
                        rec["tokens"] += msg["usage"]["completion_tokens"]
                    if not msg["choices"] or not msg["choices"][0]["delta"].get("content"):
                        continue
                    now = time.perf_counter()
                    if last is None:
                        rec["ttft"].append(now - t0)
                    else:
                        rec["itl"].append(now - last)
                    last = now
            rec["requests"] += 1


def run_server(args, model_dir: str) -> dict:
    proc, port = start_server(["--model", model_dir, "--device", args.device, "--max-batch", str(args.max_batch),
                               "--served-model-name", "bench"])
    try:
        ps = prompts(args.clients)
        # Warm-up: one request, so the first measured one does not pay for lazy initialisation.
        warm = {"tokens": 0, "ttft": [], "itl": [], "requests": 0}
        client_loop(port, ps[0], 4, time.monotonic() + 1e-3, warm)
        recs = [{"tokens": 0, "ttft": [], "itl": [], "requests": 0} for _ in ps]
        stop_at = time.monotonic() + args.seconds
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(port, p, args.max_tokens, stop_at, r))
                   for p, r in zip(ps, recs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + 300)
        wall = time.perf_counter() - t0
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        stop_server(proc)
    ttft = [x for r in recs for x in r["ttft"]]
    itl = [x for r in recs for x in r["itl"]]
    tokens = sum(r["tokens"] for r in recs)
    return {"requests": sum(r["requests"] for r in recs), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99),
            "server_errors": sum(1 for line in metrics.splitlines()
                                 if line.startswith("phi4mm_requests_total") and 'status="5' in line)}


def run_offline(args, model_dir: str) -> dict:
    import phi4mm
    from phi4mm.engine.engine import Engine
    from phi4mm.sampling import SamplingParams
    model = phi4mm.load(model_dir, device=args.device)
    eng = Engine(model, max_batch=args.max_batch)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    reqs = [dict(prompt=[{"role": "user", "content": p}], params=params) for p in prompts(args.clients)]
    eng.generate(reqs[:1])  # warm-up
    ids = {eng.add_request(**r): None for r in reqs}  # one wave: every client's prompt at once
    t0 = time.perf_counter()
    first, last, ttft, itl, tokens = {}, {}, [], [], 0
    for out in eng.stream():
        if out.token_id is None:
            continue
        now, rid = time.perf_counter(), out.request_id
        tokens += 1
        if rid not in first:
            first[rid] = now
            ttft.append(now - t0)
        else:
            itl.append(now - last[rid])
        last[rid] = now
    wall = time.perf_counter() - t0
    assert len(first) == len(ids)
    return {"requests": len(ids), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50),
            "itl_p99_ms": pct(itl, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random one made in a temp dir)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "server_cpu.json"))
    args = ap.parse_args()
    model_dir = args.model
    if model_dir is None:
        from phi4mm.tasks.make_checkpoint import make_checkpoint
        model_dir = str(make_checkpoint(tempfile.mkdtemp(prefix="phi4mm-bench-"), "tiny", "official", seed=0))
    server = run_server(args, model_dir)
    offline = run_offline(args, model_dir)
    result = {"model": "tiny (random)" if args.model is None else args.model, "device": args.device,
              "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens,
              "cpu_count": os.cpu_count(), "server": server, "offline_engine": offline}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'':16}{'tok/s':>10}{'TTFT p50':>11}{'TTFT p99':>11}{'ITL p50':>10}{'ITL p99':>10}{'requests':>10}")
    for name, r in (("server (HTTP)", server), ("engine offline", offline)):
        print(f"{name:16}{r['tokens_per_s']:10.1f}{r['ttft_p50_ms']:9.1f}ms{r['ttft_p99_ms']:9.1f}ms"
              f"{r['itl_p50_ms']:8.1f}ms{r['itl_p99_ms']:8.1f}ms{r['requests']:10d}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
