"""Soak test of the HTTP server on loopback: N clients for T minutes with hang-ups, malformed requests and the
requests that once broke other requests mixed into normal traffic.

    python bench/soak.py                                  # the embedded micro model, 16 clients, 2 minutes
    python bench/soak.py --model DIR --clients 32 --minutes 10 --out bench/results/soak.json

The server runs as `phi4mm serve` in a subprocess on 127.0.0.1 (nothing else is reachable: no host option).
Each client draws its next action from a seeded generator: a greedy chat (streamed or not, text or image), a
greedy completion, a transcription, a hang-up (a stream closed after a few chunks, or a non-streamed request
abandoned after a moment), a malformed request, or a kill case. Greedy answers are compared with the same
request sent alone before the run: any difference is a "mixed answer". Reported: requests, responses by
status, mixed answers, client-side errors, server RSS over time, and whether /metrics agrees with the clients
(request totals; no request left running or waiting; the KV cache back to its idle size). Bounded: at most
64 clients and 30 minutes, every HTTP call with a timeout.

Then a heavy phase, one request at a time: two 4000x3000 images, eight 900x700 images, eight 1600x1200 images
(more tokens than a CPU pool holds: refused after decoding), 30 minutes of audio to /v1/audio/transcriptions,
10 minutes in a chat, and a prompt of 3/4 of the context. The server's RSS after warm-up (the reference
requests, then idle), its peak, and --settle-seconds after the heavy phase are reported against the goal:
back within 20 % of the warmed-up value (docs/reliability.md). --settle-seconds 0 leaves the phase out.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import random
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from live_server import RssSampler, prompt_tokens, start_server, stop_server
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
MAX_CLIENTS, MAX_MINUTES = 64, 30.0
CALL_TIMEOUT_S = 120.0
RSS_EVERY_S = 5.0
WARM_IDLE_S = 3.0  # after the reference requests: "after warm-up" is the idle value
MEMORY_GOAL = 1.2  # RSS --settle-seconds after the heavy phase / after warm-up
LONG_SHARE = 0.75  # of the context, for the heavy phase's long prompt...
LONG_MAX_CHARS = 390_000  # ...within the server's default --max-prompt-chars (400,000)
PROMPTS = ["Tell me about the sea.", "What is two plus two?", "Name three colours.", "Describe a cat.",
           "Write a haiku about rain.", "What is the capital of France?", "Count to five.", "Say hello."]
ACTIONS = {"chat": 30, "chat_stream": 20, "image": 6, "completion": 8, "transcription": 4, "hangup_stream": 10,
           "hangup_wait": 6, "bad": 10, "kill": 6}


def image_part() -> dict:
    data = base64.b64encode((DATA / "coffee_300x200.jpg").read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + data}}


def chat_body(content, max_tokens: int = 16, **kw) -> dict:
    return {"model": "soak", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **kw}


KILL = [("/v1/chat/completions", chat_body("x", top_k=2**63)), ("/v1/chat/completions", chat_body("x", min_tokens=2**63)),
        ("/v1/completions", {"model": "soak", "prompt": [200010, 200010, 5], "max_tokens": 2}),
        ("/v1/completions", {"model": "soak", "prompt": "<|endoftext10|><|endoftext11|>", "max_tokens": 2})]
BAD = [b"{not json", b'{"model": "soak", "messages": 5}', b'{"model": "soak", "messages": [{"role": "x"}]}',
       json.dumps(chat_body("\ud800")).encode(), json.dumps(chat_body("hi", n=999)).encode(),
       json.dumps(chat_body("hi", tool_choice={"type": "function", "function": "f"}, tools=[{"name": "f"}])).encode(),
       json.dumps({**chat_body("hi"), "messages": [{"role": "system", "content": "s", "tools": 5}]}).encode()]


class Soak:
    def __init__(self, port: int, model_name: str, seed: int):
        self.base, self.model_name, self.seed = f"http://127.0.0.1:{port}", model_name, seed
        self.lock = threading.Lock()
        self.statuses: Counter = Counter()
        self.actions: Counter = Counter()
        self.client_errors: Counter = Counter()
        self.mixed: list[dict] = []
        self.greedy_checked = 0
        self.sent = 0
        self.reference: dict[str, str] = {}
        self.img = image_part()
        self.clip = (DATA / "flite_quick_brown_fox.flac").read_bytes()

    # ------------------------------------------------------------------ requests
    def body(self, b: dict) -> dict:
        return {**b, "model": self.model_name}

    def chat(self, h: httpx.Client, content, stream: bool) -> tuple[int, str | None]:
        body = self.body(chat_body(content, stream=stream))
        if not stream:
            r = h.post(f"{self.base}/v1/chat/completions", json=body)
            return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
        text = ""
        with h.stream("POST", f"{self.base}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, None
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    msg = json.loads(line[6:])
                    if "error" in msg:
                        return 599, None  # an error event mid-stream (counted apart from HTTP statuses)
                    text += "".join(c["delta"].get("content") or "" for c in msg["choices"])
        return 200, text

    def completion(self, h: httpx.Client, prompt: str) -> tuple[int, str | None]:
        r = h.post(f"{self.base}/v1/completions", json=self.body({"prompt": prompt, "max_tokens": 16,
                                                                   "temperature": 0}))
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else None

    def transcription(self, h: httpx.Client) -> tuple[int, str | None]:
        r = h.post(f"{self.base}/v1/audio/transcriptions", files={"file": ("fox.flac", self.clip)},
                   data={"model": self.model_name})
        return r.status_code, r.json()["text"] if r.status_code == 200 else None

    def greedy(self, h: httpx.Client, key: str, stream: bool = False) -> tuple[int, str | None]:
        kind, _, prompt = key.partition(":")
        if kind == "chat":
            return self.chat(h, prompt, stream)
        if kind == "image":
            return self.chat(h, [self.img, {"type": "text", "text": prompt}], stream)
        if kind == "completion":
            return self.completion(h, prompt)
        return self.transcription(h)

    def references(self) -> None:
        keys = [f"chat:{p}" for p in PROMPTS] + [f"image:{p}" for p in PROMPTS[:2]] + \
            [f"completion:{p}" for p in PROMPTS[:4]] + ["transcription:fox"]
        with httpx.Client(timeout=CALL_TIMEOUT_S) as h:
            for k in keys:
                status, text = self.greedy(h, k)
                if status != 200:
                    raise SystemExit(f"reference request {k} failed with HTTP {status}")
                self.reference[k] = text

    # ------------------------------------------------------------------ clients
    def client(self, i: int, stop_at: float) -> None:
        rng = random.Random(self.seed * 1000 + i)
        names, weights = list(ACTIONS), list(ACTIONS.values())
        with httpx.Client(timeout=CALL_TIMEOUT_S) as h:
            while time.monotonic() < stop_at:
                action = rng.choices(names, weights)[0]
                try:
                    status = self.act(h, action, rng)
                except (httpx.HTTPError, OSError, ValueError) as e:
                    status = None
                    with self.lock:
                        self.client_errors[f"{action}: {type(e).__name__}"] += 1
                with self.lock:
                    self.sent += 1
                    self.actions[action] += 1
                    if status is not None:
                        self.statuses[status] += 1

    def act(self, h: httpx.Client, action: str, rng: random.Random) -> int | None:
        if action in ("chat", "chat_stream", "image", "completion", "transcription"):
            kind = "chat" if action == "chat_stream" else action
            key = rng.choice([k for k in self.reference if k.startswith(kind + ":")])
            status, text = self.greedy(h, key, stream=action == "chat_stream")
            if status == 200:
                with self.lock:
                    self.greedy_checked += 1
                    if text != self.reference[key]:
                        self.mixed.append({"request": key, "alone": self.reference[key], "under_load": text})
            return status
        if action == "hangup_stream":
            body = self.body(chat_body(rng.choice(PROMPTS), max_tokens=400, stream=True, ignore_eos=True))
            with h.stream("POST", f"{self.base}/v1/chat/completions", json=body) as r:
                for k, _ in enumerate(r.iter_lines()):
                    if k >= rng.randint(1, 8):
                        break
                return r.status_code
        if action == "hangup_wait":
            body = self.body(chat_body(rng.choice(PROMPTS), max_tokens=400, ignore_eos=True))
            try:
                httpx.post(f"{self.base}/v1/chat/completions", json=body, timeout=rng.uniform(0.1, 1.0))
            except httpx.TimeoutException:
                return None  # the client gave up: that is the point
            return None
        if action == "bad":
            body = rng.choice(BAD).replace(b'"soak"', json.dumps(self.model_name).encode())
            r = h.post(f"{self.base}/v1/chat/completions", content=body,
                       headers={"Content-Type": "application/json"})
            return r.status_code
        path, body = rng.choice(KILL)
        return h.post(f"{self.base}{path}", json=self.body(body)).status_code


def picture(w: int, h: int, seed: int) -> str:
    """A data URL of a smooth random JPEG (a few MB at 4000x3000, like a phone photo)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (h // 100 + 1, w // 100 + 1, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def chirp_flac(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    noise = 0.02 * np.random.default_rng(0).standard_normal(t.size)
    wav = 0.3 * np.sin(2 * np.pi * (200 + 900 * (t % 30) / 30) * t) + noise  # a chirp every 30 s
    buf = io.BytesIO()
    sf.write(buf, wav.astype(np.float32), rate, format="FLAC")
    return buf.getvalue()


def heavy_phase(soak: Soak, max_model_len: int) -> dict[str, int]:
    """The heavy requests, one at a time -> HTTP status by request."""
    q = {"type": "text", "text": "What is in the picture?"}

    def images(n: int, w: int, h: int, seed: int) -> list[dict]:
        return [{"type": "image_url", "image_url": {"url": picture(w, h, seed + k)}} for k in range(n)] + [q]

    line = "Line {i}: the lighthouse keeper counted {n} ships in the harbour before dawn. "
    per_line = (prompt_tokens(soak.base, soak.model_name, "".join(line.format(i=i, n=i * 7) for i in range(100)))
                / 100)
    lines = int(min(LONG_SHARE * max_model_len / per_line, LONG_MAX_CHARS / len(line.format(i=999, n=999))))
    audio = base64.b64encode(chirp_flac(600)).decode()
    chats = {"4000x3000 image": images(1, 4000, 3000, 0), "another 4000x3000 image": images(1, 4000, 3000, 1),
             "eight 900x700 images": images(8, 900, 700, 10), "eight 1600x1200 images": images(8, 1600, 1200, 20),
             "10 min audio in a chat": [{"type": "input_audio", "input_audio": {"data": audio, "format": "flac"}}, q],
             f"long prompt ({lines} lines)": "".join(line.format(i=i, n=i * 7) for i in range(lines))}
    statuses = {}
    with httpx.Client(timeout=CALL_TIMEOUT_S) as h:
        for label, content in chats.items():
            statuses[label] = h.post(f"{soak.base}/v1/chat/completions",
                                     json=soak.body(chat_body(content, max_tokens=4))).status_code
        statuses["30 min audio transcribed"] = h.post(
            f"{soak.base}/v1/audio/transcriptions", files={"file": ("long.flac", chirp_flac(1800))},
            data={"model": soak.model_name}).status_code
    return statuses


def metric_sum(text: str, name: str, label: str | None = None) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (label is None or label in line):
            m = re.match(rf"{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
            if m:
                total += float(m.group(2))
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded micro model)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settle-seconds", type=float, default=60.0, help="idle time after the heavy phase before "
                    "the last RSS reading (0: no heavy phase)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak_cpu.json")
    args = ap.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.minutes <= MAX_MINUTES:
        ap.error(f"--clients must be 1..{MAX_CLIENTS} and --minutes in (0, {MAX_MINUTES}]")
    serve_args = ["--max-batch", str(max(args.clients, 8))] + (["--model", args.model] if args.model else [])
    proc, port = start_server(serve_args)
    try:
        card = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]
        soak = Soak(port, card["id"], args.seed)
        rss = RssSampler(proc.pid, RSS_EVERY_S)
        rss.phase = "references"
        soak.references()
        time.sleep(WARM_IDLE_S)
        warm = rss.now()
        idle_metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        free_idle = metric_sum(idle_metrics, "phi4mm_kv_blocks_free")
        counted_before = metric_sum(idle_metrics, "phi4mm_requests_total")
        rss.phase = "soak"
        stop_at = time.monotonic() + args.minutes * 60
        threads = [threading.Thread(target=soak.client, args=(i, stop_at), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.minutes * 60 + CALL_TIMEOUT_S)
        time.sleep(2.0)  # let the abandoned requests' cancellations land
        alive = httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        after = [soak.greedy(httpx.Client(timeout=CALL_TIMEOUT_S), k) for k in soak.reference]
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        counted = metric_sum(metrics, "phi4mm_requests_total") - counted_before
        soak_peak, soak_end = rss.peak, rss.now()
        memory = {"rss_after_warmup_mib": warm, "rss_soak_peak_mib": round(soak_peak, 1), "rss_soak_end_mib": soak_end}
        if args.settle_seconds > 0:
            rss.phase = "heavy"
            heavy = heavy_phase(soak, card.get("max_model_len", 4096))
            rss.phase = "settle"
            time.sleep(args.settle_seconds)
            settled = rss.now()
            memory.update(heavy_requests=heavy, rss_peak_mib=round(rss.peak, 1), settle_seconds=args.settle_seconds,
                          rss_after_settle_mib=settled, ratio_to_warmup=round(settled / warm, 3),
                          goal_ratio=MEMORY_GOAL, meets_goal=settled <= MEMORY_GOAL * warm,
                          server_alive_after_heavy=httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200)
        rss.stop()
        report = {
            "model": args.model or "micro (embedded)", "clients": args.clients, "minutes": args.minutes,
            "seed": args.seed, "requests": soak.sent, "actions": dict(soak.actions),
            "responses_by_status": {str(k): v for k, v in sorted(soak.statuses.items())},
            "server_errors_5xx": sum(v for k, v in soak.statuses.items() if 500 <= k < 599),
            "error_events_mid_stream": soak.statuses.get(599, 0),
            "client_side_errors": dict(soak.client_errors),
            "greedy_answers_checked": soak.greedy_checked, "mixed_answers": len(soak.mixed),
            "mixed_examples": soak.mixed[:5],
            "alive_after": alive,
            "reference_answers_unchanged_after": [t for _, t in after] == list(soak.reference.values()),
            "memory": memory, "rss_mib": rss.series,
            "metrics": {
                "requests_counted_by_server": counted,
                "requests_sent_by_clients": soak.sent + len(after) + 2,  # + the checks after the run
                "running_after": metric_sum(metrics, "phi4mm_requests_running"),
                "waiting_after": metric_sum(metrics, "phi4mm_requests_waiting"),
                "kv_blocks_free_idle_before": free_idle,
                "kv_blocks_free_idle_after": metric_sum(metrics, "phi4mm_kv_blocks_free"),
            },
        }
    finally:
        stop_server(proc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("rss_mib", "mixed_examples")}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
