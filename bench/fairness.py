"""Fairness in seconds: do streaming clients keep their pace while one very long prompt is prefilled?

    python bench/fairness.py                                   # tiny random checkpoint, CPU
    python bench/fairness.py --device cuda --model DIR         # a real checkpoint on a GPU

`phi4mm serve` runs in a subprocess (`live_server.py`). Phase 1: --clients streaming chat clients send
requests back to back for --seconds; the gaps between the SSE content chunks of each answer are their
inter-token latency (ITL), the baseline. Phase 2: the same clients, and --seconds/3 in, one prompt of
--long-tokens tokens (100K by default) arrives, streamed, asking for a few tokens. The clients' gaps that end
while the long request is in flight are compared with the baseline: the p99 ratio, goal <= 3. The scheduler
caps prompt chunks while decodes run (EngineOptions.prefill_tokens_with_decodes), which is what keeps it low.

The long prompt is as long as the server can hold beside the clients: when its context or KV pool is
smaller than --long-tokens (the CPU pool holds 16K tokens), the largest that fits is used and the output says
so. Every request must end with finish_reason "length" (the clients ask for ignore_eos): a run with a
failed request is void (no ratio, exit 1). Bounded: every HTTP call has a timeout, each phase a deadline.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import httpx
import numpy as np
from live_server import CALL_TIMEOUT_S, ROOT, prompt_tokens, start_server, stop_server

BLOCK_TOKENS = 16  # the engine's KV block (EngineOptions.block_size; `serve` has no flag for it)
PHASE_DEADLINE_S = 900.0
GOAL_RATIO = 3.0
LONG_REPLY_TOKENS = 8
FIT_SLACK = 0.99  # of the units that fit by the count: numbers grow along the prompt
UNIT = "Line {i}: the lighthouse keeper counted {n} ships in the harbour before dawn. "


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1000, 2) if xs else None  # milliseconds


@dataclass
class Record:
    """What one client (or the long request) saw: (end time, gap) of every ITL gap, TTFTs, finish reasons."""

    gaps: list[tuple[float, float]] = field(default_factory=list)
    ttft: list[tuple[float, float]] = field(default_factory=list)  # (sent, seconds to the first chunk)
    reasons: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    sent: float = 0.0
    done: float = 0.0


def stream_chat(h: httpx.Client, base: str, body: dict, rec: Record) -> None:
    """One streamed chat completion; its gaps, TTFT and finish reason go into `rec`."""
    sent = time.perf_counter()
    times: list[float] = []
    reason = None
    with h.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            rec.failures.append(f"HTTP {r.status_code}: {r.read()[:200]!r}")
            return
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                rec.failures.append(f"error event: {msg['error'].get('message', '')[:200]}")
                return
            if msg.get("usage"):
                rec.prompt_tokens = msg["usage"]["prompt_tokens"]
            for c in msg.get("choices", []):
                if c["delta"].get("content"):
                    times.append(time.perf_counter())
                reason = c.get("finish_reason") or reason
    rec.reasons[reason] += 1
    if reason != "length":
        rec.failures.append(f"finish_reason {reason!r}")
    if times:
        rec.ttft.append((sent, times[0] - sent))
        rec.gaps += [(b, b - a) for a, b in pairwise(times)]


def chat_body(model: str, text: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def client(base: str, body: dict, keep_going, rec: Record) -> None:
    with httpx.Client(timeout=CALL_TIMEOUT_S) as h:
        while keep_going():
            try:
                stream_chat(h, base, body, rec)
            except (httpx.HTTPError, OSError, ValueError) as e:
                rec.failures.append(f"{type(e).__name__}: {e}"[:200])
                return


def long_text(units: int, task: str = "Summarise the log below in one line.") -> str:
    return task + "\n" + "".join(UNIT.format(i=i, n=i * 7 % 997) for i in range(units))


def size_long_prompt(base: str, model: str, args, client_tokens: int) -> tuple[int, str | None]:
    """-> (units of UNIT, why it is shorter than --long-tokens or None). A first guess from two short prompts
    (later units hold longer numbers, so it runs short), then the guess itself counted and scaled: a prompt
    longer than the pool holds beside the clients would be preempted again and again."""
    card = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]
    metrics = httpx.get(f"{base}/metrics", timeout=30).text
    free = re.search(r"^phi4mm_kv_blocks_free ([0-9.e+]+)$", metrics, re.MULTILINE)
    pool = int(float(free.group(1))) * BLOCK_TOKENS if free else None
    room = {"--long-tokens": args.long_tokens, "max_model_len": card.get("max_model_len", args.long_tokens)
            - LONG_REPLY_TOKENS}
    if pool is not None:  # beside the clients' sequences, each a whole number of blocks
        per_client = -(-client_tokens // BLOCK_TOKENS) * BLOCK_TOKENS
        room["KV pool"] = pool - args.clients * per_client - 4 * BLOCK_TOKENS - LONG_REPLY_TOKENS
    limit, target = min(room.items(), key=lambda kv: kv[1])

    def count(units: int) -> int:  # another first line than the run's: the run finds none of it in the cache
        return prompt_tokens(base, model, long_text(units, "Count the lines of the log below."))
    a, b = count(50), count(150)
    per_unit, head = (b - a) / 100, a - 50 * (b - a) / 100
    guess = max(int((target - head) / per_unit), 1)
    units = max(int(guess * (target - head) / (count(guess) - head) * FIT_SLACK), 1)
    why = None
    if limit != "--long-tokens":
        why = (f"the server holds {room[limit] + LONG_REPLY_TOKENS} tokens ({limit}"
               + (f", {pool} tokens, {args.clients} clients beside it" if limit == "KV pool" else "")
               + f"): the long prompt is about {target} tokens, not {args.long_tokens}")
    return units, why


def phase(base: str, model: str, args, long_units: int | None) -> dict:
    """Run the clients for --seconds (phase 2: and until the long request is done) -> its measures."""
    recs = [Record() for _ in range(args.clients)]
    longrec = Record()
    start = time.monotonic()
    long_done = threading.Event()
    if long_units is None:
        long_done.set()

    def keep_going() -> bool:
        now = time.monotonic()
        return now < start + PHASE_DEADLINE_S and (now < start + args.seconds or not long_done.is_set())

    def long_request() -> None:
        time.sleep(args.seconds / 3)
        with httpx.Client(timeout=CALL_TIMEOUT_S) as h:
            longrec.sent = time.perf_counter()
            try:
                stream_chat(h, base, chat_body(model, long_text(long_units), LONG_REPLY_TOKENS), longrec)
            except (httpx.HTTPError, OSError, ValueError) as e:
                longrec.failures.append(f"{type(e).__name__}: {e}"[:200])
            longrec.done = time.perf_counter()
        long_done.set()

    threads = [threading.Thread(target=client, args=(base, chat_body(model, f"Client {i}: write a story about "
                                                                      f"the number {i * 13}.", args.max_tokens),
                                                     keep_going, r), daemon=True) for i, r in enumerate(recs)]
    if long_units is not None:
        threads.append(threading.Thread(target=long_request, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(PHASE_DEADLINE_S + CALL_TIMEOUT_S)
    gaps = [(end, g) for r in recs for end, g in r.gaps]
    ttft = [(sent, s) for r in recs for sent, s in r.ttft]
    out = {"seconds": round(time.monotonic() - start, 1), "requests": sum(sum(r.reasons.values()) for r in recs),
           "finish_reasons": dict(sum((r.reasons for r in recs), Counter())),
           "failures": [f for r in recs + [longrec] for f in r.failures][:10],
           "failed": sum(len(r.failures) for r in recs + [longrec]),
           "itl_p50_ms": pct([g for _, g in gaps], 50), "itl_p99_ms": pct([g for _, g in gaps], 99),
           "itl_max_ms": pct([g for _, g in gaps], 100), "ttft_p50_ms": pct([s for _, s in ttft], 50),
           "ttft_p99_ms": pct([s for _, s in ttft], 99)}
    if long_units is not None:
        inside = [g for end, g in gaps if longrec.sent <= end <= (longrec.done or end)]
        began = [s for sent, s in ttft if longrec.sent <= sent <= (longrec.done or sent)]
        out["long"] = {"prompt_tokens": longrec.prompt_tokens, "finish_reasons": dict(longrec.reasons),
                       "ttft_s": round(longrec.ttft[0][1], 2) if longrec.ttft else None,
                       "in_flight_s": round(longrec.done - longrec.sent, 2) if longrec.done else None}
        out["while_long_in_flight"] = {"gaps": len(inside), "itl_p50_ms": pct(inside, 50),
                                       "itl_p99_ms": pct(inside, 99), "itl_max_ms": pct(inside, 100),
                                       "ttft_p99_ms": pct(began, 99), "requests_started": len(began)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random one made in a temp dir)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0, help="per phase (phase 2 also waits for the long one)")
    ap.add_argument("--max-tokens", type=int, default=64, help="per client request (ignore_eos)")
    ap.add_argument("--long-tokens", type=int, default=100_000)
    ap.add_argument("--graph-warmup-seconds", type=float, default=None,
                    help="passed to phi4mm serve (GPU: time spent capturing CUDA graphs before serving)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fairness_cpu.json")
    args = ap.parse_args()
    model_dir = args.model
    if model_dir is None:
        from phi4mm.tasks.make_checkpoint import make_checkpoint
        model_dir = str(make_checkpoint(tempfile.mkdtemp(prefix="phi4mm-fairness-"), "tiny", "official", seed=0))
    proc, port = start_server(["--model", model_dir, "--device", args.device, "--max-batch", str(args.clients + 8),
                               "--served-model-name", "fairness", "--max-prompt-chars", str(50 * args.long_tokens),
                               *([] if args.graph_warmup_seconds is None
                                 else ["--graph-warmup-seconds", str(args.graph_warmup_seconds)])])
    base = f"http://127.0.0.1:{port}"
    try:
        client_tokens = prompt_tokens(base, "fairness", "Client 31: write a story about the number 403.")
        units, why = size_long_prompt(base, "fairness", args, client_tokens + args.max_tokens)
        if why:
            print(f"note: {why}", flush=True)
        base_run = phase(base, "fairness", args, None)
        long_run = phase(base, "fairness", args, units)
    finally:
        stop_server(proc)
    failed = base_run["failed"] + long_run["failed"]
    inside = long_run["while_long_in_flight"]
    ratio = (round(inside["itl_p99_ms"] / base_run["itl_p99_ms"], 2)
             if not failed and inside["itl_p99_ms"] and base_run["itl_p99_ms"] else None)
    report = {"model": args.model or "tiny (random)", "device": args.device, "clients": args.clients,
              "seconds": args.seconds, "max_tokens": args.max_tokens, "long_tokens_asked": args.long_tokens,
              "long_prompt_note": why, "baseline": base_run, "with_long_prompt": long_run,
              "void": bool(failed), "itl_p99_ratio": ratio, "goal_ratio": GOAL_RATIO,
              "meets_goal": ratio is not None and ratio <= GOAL_RATIO}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if failed:
        print(f"VOID: {failed} request(s) did not finish with 'length'; no ratio", file=sys.stderr)
        return 1
    print(f"ITL p99 {base_run['itl_p99_ms']} ms alone, {inside['itl_p99_ms']} ms while a "
          f"{long_run['long']['prompt_tokens']}-token prompt was in flight: {ratio}x (goal <= {GOAL_RATIO:g}x)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
