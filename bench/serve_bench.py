"""Serving benchmark: mixed multimodal traffic over HTTP at Poisson arrival rates, against the offline engine and
transformers on the same requests.

    python bench/serve_bench.py --model DIR --device cuda                 # starts `phi4mm serve` itself
    python bench/serve_bench.py --url http://127.0.0.1:8000 --model DIR   # a running server (DIR: offline run)
    python bench/serve_bench.py --smoke                                   # CPU, the embedded micro model, seconds

In the manner of vLLM's benchmark_serving. The workload (seeded) is a third text (varied prompt and output
lengths), a third audio (5-30 s) and a third images (448-1344 px on a side), a quarter of those with audio
too; every request streams its answer and asks for exactly its output length (ignore_eos). Requests arrive as a
Poisson process at each rate of --rates in turn (then all at once: "inf"); rates stop rising once the server
saturates (served requests/s under SATURATED of the offered rate). Per rate: request throughput, output tok/s,
time to first token and inter-token latency p50/p99 (client side, per streamed chunk). Every request's finish
reason is checked: a rate whose timing includes a failed request is marked void. Each rate gets fresh requests
of the same mix (no media or prefix cache hit from an earlier rate). Then the offline engine runs the last
rate's requests (all queued at once, in this process: a cold cache as the server had), then transformers one
request at a time (--peer-model, GPU only).
Results go to bench/results/serve.json (GPU name, torch version), rewritten after each stage.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import live_server
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SATURATED = 0.85  # served / offered request rate below this: the server is saturated, stop raising the rate
WORDS = ("the lighthouse keeper counted ships at night while storms rolled over the grey northern sea and gulls "
         "cried above the rocks where old nets dried in the wind").split()
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Req:
    """One request of the workload: chat messages for HTTP, the same inputs as bytes for the offline engine."""
    kind: str
    text: str
    max_tokens: int
    image: bytes | None = None  # PNG
    audio: bytes | None = None  # WAV
    audio_s: float = 0.0
    image_px: tuple[int, int] | None = None

    def messages(self) -> list[dict]:
        parts: list[dict] = []
        if self.image is not None:
            parts.append({"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(self.image).decode()}})
        if self.audio is not None:
            parts.append({"type": "input_audio", "input_audio": {"data": base64.b64encode(self.audio).decode(),
                                                                 "format": "wav"}})
        parts.append({"type": "text", "text": self.text})
        return [{"role": "user", "content": parts}]


def make_image(w: int, h: int, rng: np.random.Generator) -> bytes:
    from PIL import Image, ImageDraw
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    arr = np.stack([x.repeat(h, 0), y.repeat(w, 1), (x + y) / 2], -1).clip(0, 255).astype(np.uint8)  # (h, w, 3)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        d.ellipse([x0, y0, x0 + w // 4, y0 + h // 4], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_audio(seconds: float, rng: np.random.Generator, rate: int = 16000) -> bytes:
    import soundfile as sf
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * (200 + 900 * (t % 1.7) / 1.7) * t) + 0.02 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, wav.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def rate_workload(args, i: int) -> list[Req]:
    """The requests of the i-th rate: the same mix and sizes, drawn with their own seed."""
    return workload(args.num_requests, args.seed + 1000 * i, args.smoke)


def workload(n: int, seed: int, smoke: bool) -> list[Req]:
    """A third text, a third audio, a third image (a quarter of which carry audio too), shuffled."""
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        kind = ("text", "audio", "image")[i % 3]
        out = int(rng.integers(8, 17) if smoke else rng.integers(32, 257))
        if kind == "text":
            words = int(rng.integers(8, 40) if smoke else rng.integers(20, 1500))
            body = " ".join(WORDS[j % len(WORDS)] for j in rng.integers(0, len(WORDS), words))
            reqs.append(Req("text", f"Continue this story: {body}", out))
            continue
        r = Req(kind, "Describe what you see and hear." if kind == "image" else "Transcribe the audio to text.", out)
        if kind == "image":
            side = (lambda: int(rng.integers(64, 129))) if smoke else (lambda: int(rng.integers(448, 1345)))
            r.image_px = (side(), side())
            r.image = make_image(*r.image_px, rng)
            if rng.random() < 0.25:
                r.kind = "image+audio"
        if r.kind != "image":
            r.audio_s = float(rng.uniform(0.5, 1.5) if smoke else rng.uniform(5, 30))
            r.audio = make_audio(r.audio_s, rng)
        reqs.append(r)
    order = rng.permutation(n)
    return [reqs[i] for i in order]


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    finish_reason: str | None = None
    start: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    end: float = 0.0


async def one_request(client, url: str, model: str, r: Req, timeout: float) -> Result:
    import httpx
    res = Result(start=time.perf_counter())
    body = {"model": model, "messages": r.messages(), "max_tokens": r.max_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    last = None
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                    return res
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        res.tokens = chunk["usage"]["completion_tokens"]
                    for c in chunk.get("choices", []):
                        now = time.perf_counter()
                        if c.get("delta", {}).get("content"):
                            if res.ttft is None:
                                res.ttft = now - res.start
                            elif last is not None:
                                res.itl.append(now - last)
                            last = now
                        if c.get("finish_reason"):
                            res.finish_reason = c["finish_reason"]
    except (httpx.HTTPError, TimeoutError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:300]
    res.end = time.perf_counter()
    res.ok = res.finish_reason in ("length", "stop") and not res.error and res.ttft is not None
    if not res.ok and not res.error:
        res.error = f"finish_reason {res.finish_reason!r}"
    return res


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1e3, 2) if xs else None  # milliseconds


def summarize(label: str, results: list[Result], wall: float, offered: float | None) -> dict:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    toks = sum(r.tokens for r in ok)
    itl = [x for r in ok for x in r.itl]
    row = {"rate": label, "requests": len(results), "failed": len(failed), "wall_s": round(wall, 2),
           "req_per_s": round(len(ok) / wall, 3), "output_tok_s": round(toks / wall, 1),
           "ttft_ms_p50": pct([r.ttft for r in ok], 50), "ttft_ms_p99": pct([r.ttft for r in ok], 99),
           "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99)}
    if offered:
        row["offered_req_per_s"] = offered
    if failed:
        row["void"] = f"{len(failed)} request(s) failed, first: {failed[0].error}"
    return row


async def run_rate(url: str, model: str, reqs: list[Req], rate: float, seed: int, timeout: float) -> dict:
    import httpx
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, len(reqs)) if np.isfinite(rate) else np.zeros(len(reqs))
    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=len(reqs) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        for r, gap in zip(reqs, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one_request(client, url, model, r, timeout)))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return summarize("inf" if not np.isfinite(rate) else rate, results, wall, None if not np.isfinite(rate) else rate)


def start_server(args) -> tuple[subprocess.Popen, str]:
    serve_args = ["--device", args.device, "--max-batch", str(args.max_batch),
                  "--max-waiting", str(max(256, 2 * args.num_requests))]
    serve_args += ["--model", args.model] if args.model else []
    if args.graph_warmup_seconds is not None:
        serve_args += ["--graph-warmup-seconds", str(args.graph_warmup_seconds)]
    log("starting: phi4mm serve " + " ".join(serve_args))
    proc, port = live_server.start_server(serve_args, timeout_s=args.start_timeout, log=Path(args.server_log))
    return proc, f"http://127.0.0.1:{port}"


def offline(args, reqs: list[Req]) -> dict:
    """The same requests through Engine in this process, all queued at once (the server's best case)."""
    import torch

    import phi4mm
    from phi4mm.engine.engine import Engine
    from phi4mm.inputs.chat import flatten_content
    from phi4mm.micro.recipe import default_model_dir
    from phi4mm.sampling import SamplingParams
    m = phi4mm.load(args.model or default_model_dir(), device=args.device)
    budget = {} if args.graph_warmup_seconds is None else {"graph_warmup_seconds": args.graph_warmup_seconds}
    eng = Engine(m, max_batch=args.max_batch, max_waiting=max(1024, 2 * len(reqs)), **budget)
    t0 = time.perf_counter()
    eng.warmup()
    warmup_s = time.perf_counter() - t0
    preps = []
    for r in reqs:
        flat, _, _ = flatten_content(r.messages())  # the media go in as the bytes the HTTP requests carry
        preps.append(m.prepare(flat, [r.image] if r.image else None, [r.audio] if r.audio else None))
    # Warm-up on one request of each kind (media encoders, graph buckets), as the server had its earlier rates.
    # Warm-up on one request of each kind drawn apart (media encoders, graph buckets), as the server had its
    # start and earlier rates; none of them is among the timed requests (no cache hit).
    extra = workload(12, 987654, args.smoke)
    warm = [next(r for r in extra if r.kind == k) for k in ("text", "audio", "image") if any(r.kind == k for r in extra)]
    eng.generate([dict(prompt=m.prepare(flatten_content(r.messages())[0], [r.image] if r.image else None,
                                        [r.audio] if r.audio else None),
                       params=SamplingParams(max_tokens=2, ignore_eos=True)) for r in warm])
    ids = {eng.add_request(p, params=SamplingParams(max_tokens=r.max_tokens, ignore_eos=True, temperature=0.0)): i
           for i, (p, r) in enumerate(zip(preps, reqs))}
    first, toks, failed, reasons = {}, 0, [], {}
    t0 = time.perf_counter()
    deadline = t0 + args.rate_timeout
    while eng.has_work():
        if time.perf_counter() > deadline:
            return {"error": f"offline run past its {args.rate_timeout} s deadline"}
        for o in eng.step():
            if o.token_id is not None:
                toks += 1
                first.setdefault(o.request_id, time.perf_counter() - t0)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
                if o.finish_reason not in ("length", "stop"):
                    failed.append(f"{o.finish_reason}: {o.error}")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    row = {"requests": len(ids), "failed": len(failed), "wall_s": round(wall, 2),
           "req_per_s": round((len(ids) - len(failed)) / wall, 3), "output_tok_s": round(toks / wall, 1),
           "ttft_ms_p50": pct(list(first.values()), 50), "ttft_ms_p99": pct(list(first.values()), 99),
           "warmup_s": round(warmup_s, 1), "graphs_ready": list(eng.graphs_ready)}
    if failed:
        row["void"] = f"{len(failed)} request(s) failed, first: {failed[0][:300]}"
    del eng, m
    return row


def peer(args, reqs: list[Req]) -> dict:
    """transformers, one request at a time (its processor builds the inputs), greedy, exactly max_tokens."""
    import torch
    import transformers
    from PIL import Image
    proc = transformers.AutoProcessor.from_pretrained(args.peer_model)
    ref = transformers.AutoModelForCausalLM.from_pretrained(args.peer_model, dtype=torch.bfloat16,
                                                            device_map=args.device).eval()
    toks, done, failed, ttfts = 0, 0, [], []
    t0 = time.perf_counter()
    for r in reqs:
        if time.perf_counter() - t0 > args.rate_timeout:
            failed.append("deadline")
            break
        try:
            import soundfile as sf
            prompt = "<|user|>" + ("<|image_1|>" if r.image else "") + ("<|audio_1|>" if r.audio else "") \
                + r.text + "<|end|><|assistant|>"
            kw = {"images": [Image.open(io.BytesIO(r.image))]} if r.image else {}
            if r.audio:
                kw["audio"] = [sf.read(io.BytesIO(r.audio))]
            inputs = proc(text=prompt, return_tensors="pt", **kw).to(args.device)
            s0 = time.perf_counter()
            with torch.inference_mode():
                out = ref.generate(**inputs, max_new_tokens=r.max_tokens, min_new_tokens=r.max_tokens,
                                   do_sample=False)
            torch.cuda.synchronize()
            ttfts.append(time.perf_counter() - s0)  # the whole request: generate does not stream
            toks += out.shape[1] - inputs["input_ids"].shape[1]
            done += 1
        except Exception as e:  # noqa: BLE001 - recorded: a failed request voids the timing
            failed.append(f"{r.kind}: {type(e).__name__}: {e}"[:300])
    wall = time.perf_counter() - t0
    row = {"requests": done, "failed": len(failed), "wall_s": round(wall, 2), "req_per_s": round(done / wall, 3),
           "output_tok_s": round(toks / wall, 1), "latency_ms_p50": pct(ttfts, 50),
           "transformers": transformers.__version__}
    if failed:
        row["void"] = f"{len(failed)} request(s) failed, first: {failed[0]}"
    return row


def write(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded micro model)")
    ap.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    ap.add_argument("--served-name", default=None, help="the model name the server answers to")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--num-requests", type=int, default=256, help="requests per rate")
    ap.add_argument("--rates", default="2,4,8,16,32,64", help="requests/s, ascending; 'inf' is always run last")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--rate-timeout", type=float, default=540.0, help="seconds for one rate (or the offline run)")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--peer-model", default=None, help="transformers (hf layout) checkpoint: the peer, GPU only")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--graph-warmup-seconds", type=float, default=None,
                    help="the server's and the offline engine's graph warm-up budget (default: the engine's)")
    ap.add_argument("--smoke", action="store_true", help="CPU, micro model, a few small requests: the plumbing")
    ap.add_argument("--out", default=None, help="default bench/results/serve.json (smoke: /tmp)")
    ap.add_argument("--server-log", default="/tmp/phi4mm_serve_bench_server.log")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.num_requests, args.rates, args.max_batch = "cpu", 6, "4", 8
        args.rate_timeout, args.request_timeout = 120.0, 120.0
    import torch
    out = Path(args.out or ("/tmp/phi4mm_serve_bench_smoke.json" if args.smoke else ROOT / "bench/results/serve.json"))
    data = {"bench": "serve", "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else
            "cpu (smoke: no figures)", "torch": torch.__version__, "model": args.model or "micro",
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rates": []}
    log(f"building {args.num_requests} requests")
    reqs = rate_workload(args, 0)
    kinds = {k: sum(r.kind == k for r in reqs) for k in ("text", "audio", "image", "image+audio")}
    data["workload"] = {"requests_per_rate": len(reqs), "kinds": kinds,
                        "output_tokens": sum(r.max_tokens for r in reqs)}
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    try:
        import httpx
        name = args.served_name or httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        rates = [float(x) for x in args.rates.split(",") if x != "inf"] + [float("inf")]
        for i, rate in enumerate(rates):
            # Fresh requests at each rate (same distribution, other seed): requests seen at an earlier rate
            # would hit the server's media and prefix caches and flatter the later rates.
            reqs = rate_workload(args, i)
            log(f"rate {rate} req/s: {len(reqs)} requests")
            try:
                row = asyncio.run(asyncio.wait_for(
                    run_rate(url, name, reqs, rate, args.seed + i, args.request_timeout), args.rate_timeout))
            except TimeoutError:
                row = {"rate": rate, "error": f"past the rate's {args.rate_timeout} s deadline"}
            data["rates"].append(row)
            log(json.dumps(row))
            write(out, data)
            if np.isfinite(rate) and row.get("req_per_s", 0) < SATURATED * rate and i + 2 < len(rates):
                log(f"saturated at {rate} req/s (served {row.get('req_per_s')}); skipping to 'inf'")
                data["saturated_at"] = rate
                rates[i + 1:-1] = []
    finally:
        if proc is not None:
            live_server.stop_server(proc, 30)
    if not args.skip_offline and (args.model or args.smoke or args.url is None):
        log("offline engine on the same requests")
        try:
            data["offline"] = offline(args, reqs)
        except Exception as e:  # noqa: BLE001 - recorded, the HTTP results stand
            data["offline"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        log(json.dumps(data["offline"]))
        top = max((r.get("output_tok_s", 0) for r in data["rates"]), default=0)
        if data["offline"].get("output_tok_s"):
            data["server_vs_offline"] = round(top / data["offline"]["output_tok_s"], 3)
        write(out, data)
    if args.peer_model and args.device.startswith("cuda"):
        log("transformers, one request at a time")
        try:
            data["peer"] = peer(args, reqs)
        except Exception as e:  # noqa: BLE001
            data["peer"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        log(json.dumps(data["peer"]))
        write(out, data)
    log(f"done: {out}")


if __name__ == "__main__":
    main()
