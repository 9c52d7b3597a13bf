"""Ray replicas measured: `phi4mm serve --replicas N` and `phi4mm batch --replicas N` for N = 1 and 2.

    python bench/bench_replicas.py --device cuda --model random-full     # 2 GPUs: 128/512 clients, 2,000 clips
    python bench/bench_replicas.py --device cpu                          # smoke run: micro model, CPU replicas

Serving, per N: `phi4mm serve --replicas N --gpus-per-replica 1` (--device cpu: 0 GPUs) in a subprocess; its
start-up wall time (process start -> every replica ready) and each replica's own loading window, reported from
inside the replica by `GET /replica` with its pid, host, CUDA_VISIBLE_DEVICES and GPU name/UUID (did both load
at once? is each on its own GPU?). Then the serving load for each client count: mixed text / image / audio chat
requests, streamed, every client sending back to back for --seconds; request throughput, output tokens/s and
TTFT p50/p99. With N = 2, one more load run kills one replica's process (SIGKILL) a third of the way in: Ray
restarts it; the clients retry only on connection errors (as the openai client does, at most twice), and every
request ends as completed, lost (an HTTP error, a stream cut short, or retries spent) or answered twice (its
answer streamed on two attempts). The replica counts as back when `GET /replica` reaches a new process.

Batch: --clips clips of 30 s (synthetic, deterministic) transcribed by `phi4mm batch` in one process, then with
--replicas N: wall time, real-time factor (audio seconds per wall second, start-up included), and every output
line compared with the one-process batch.

Every step has a timeout; bench/results/replicas.json (or --out) is rewritten after every step, with the GPU
names, the Ray version and the ratios N=2 / N=1. A CPU run is a smoke test of the procedure, not a measurement.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from live_server import free_port

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000
MAX_RETRIES = 2  # the openai client's default: a request is sent at most three times
CLIENTS_PER_PROCESS = 64  # asyncio clients per load process: one Python process cannot drive 512 streams alone
KILL_AT = 1 / 3  # share of the load's duration after which a replica's process is killed
TRANSCRIBE = "Transcribe the audio clip into text."
GPU = {"clients": [128, 512], "seconds": 60.0, "clips": 2000, "max_tokens": 64, "batch_max_tokens": 128,
       "max_batch": 256, "max_waiting": 1024, "start_timeout": 900.0, "batch_timeout": 3600.0}
CPU = {"clients": [2, 4], "seconds": 12.0, "clips": 3, "max_tokens": 8, "batch_max_tokens": 16,
       "max_batch": 8, "max_waiting": 64, "start_timeout": 300.0, "batch_timeout": 600.0}


# ---- results, written after every step --------------------------------------------------------------------------


class Results:
    def __init__(self, path: Path, head: dict[str, Any]):
        self.path, self.data = path, head
        self.save()

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def environment(device: str) -> dict[str, Any]:
    import ray
    import torch
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device != "cpu" else []
    return {"ray_version": ray.__version__, "torch_version": torch.__version__, "python": platform.python_version(),
            "host": socket.gethostname(), "cpu_count": os.cpu_count(), "gpus": gpus}


# ---- inputs -------------------------------------------------------------------------------------------------------


def speechlike(seconds: float, seed: int) -> np.ndarray:
    """A deterministic voice-like signal: syllable-rate bursts of a few harmonics with drifting pitch, and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 110 + 40 * rng.random() + 20 * np.sin(2 * np.pi * 0.3 * t + rng.random() * 6)
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * (3 + rng.random()) * t), 0, None) ** 2  # ~4 syllables a second
    x = 0.3 * voice * envelope + 0.01 * rng.standard_normal(t.size)
    return (x / np.abs(x).max() * 0.8).astype(np.float32)


def wav_bytes(x: np.ndarray) -> bytes:
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, x, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def request_bodies(max_tokens: int) -> list[dict[str, Any]]:
    """The mixed traffic: a text, an image and an audio chat request, each generating exactly max_tokens."""
    from PIL import Image
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((336, 448, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    png = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    wav = base64.b64encode(wav_bytes(speechlike(4.0, 1))).decode()
    contents = [
        "Write a short story about a lighthouse keeper.",
        [{"type": "image_url", "image_url": {"url": png}}, {"type": "text", "text": "Describe the image."}],
        [{"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}, {"type": "text", "text": TRANSCRIBE}],
    ]
    return [{"model": "phi4mm", "messages": [{"role": "user", "content": c}], "max_tokens": max_tokens,
             "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            for c in contents]


def write_clips(folder: Path, n: int, seconds: float) -> Path:
    """n clips of `seconds` and a `phi4mm batch` prompt file transcribing each."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        (folder / f"clip{i:05d}.wav").write_bytes(wav_bytes(speechlike(seconds, 100 + i)))
        lines.append({"id": i, "messages": [{"role": "user", "content": [
            {"type": "audio_url", "audio_url": {"url": f"clip{i:05d}.wav"}}, {"type": "text", "text": TRANSCRIBE}]}]})
    f = folder / "clips.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return f


# ---- the server ---------------------------------------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "phi4mm.cli.main", *args]


class Server:
    """`phi4mm serve --replicas N` in its own process group (its Ray cluster ends with it)."""

    def __init__(self, a: argparse.Namespace, n: int, log: Path):
        self.port, self.n, self.log = free_port(), n, log
        self.url = f"http://127.0.0.1:{self.port}"
        gpus = "1" if a.device != "cpu" else "0"
        cmd = cli("serve", "--model", a.model, "--replicas", str(n), "--gpus-per-replica", gpus, "--device",
                  a.device, "--port", str(self.port), "--max-batch", str(a.max_batch), "--max-waiting",
                  str(a.max_waiting))
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        """Seconds from process start until it says every replica is serving."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "serving" in self.log.read_text():
                return time.perf_counter() - self.t0
            if self.proc.poll() is not None:
                raise RuntimeError(f"phi4mm serve exited with {self.proc.returncode}: {tail(self.log)}")
            time.sleep(0.2)
        raise TimeoutError(f"the replicas were not ready after {timeout:.0f} s: {tail(self.log)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # serve_forever shuts Serve and Ray down
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


def tail(log: Path, n: int = 600) -> str:
    return " ".join(log.read_text()[-n:].split()) if log.is_file() else ""


def replicas_seen(url: str, n: int, timeout: float, exclude_pids: frozenset[int] = frozenset()) -> list[dict]:
    """`GET /replica` until n different replicas (none of them a process in exclude_pids) have answered."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=10) as h:
        while time.monotonic() < deadline:
            try:
                r = h.get(f"{url}/replica")
                if r.status_code == 200 and r.json()["pid"] not in exclude_pids:
                    seen.setdefault(r.json()["replica"], r.json())
            except httpx.HTTPError:
                pass
            if len(seen) >= n:
                break
            time.sleep(0.05)
    return list(seen.values())


def placement(infos: list[dict], n: int, device: str) -> dict[str, Any]:
    """Where the replicas run, checked from their own answers."""
    starts = [i["load_started"] for i in infos]
    ends = [i["load_started"] + i["load_seconds"] for i in infos]
    out = {"replicas": infos, "answered": len(infos), "distinct_pids": len({i["pid"] for i in infos}),
           "load_seconds": [i["load_seconds"] for i in infos],
           # Loading at once: the replicas' load windows overlap; their union is about one replica's load.
           "load_union_seconds": round(max(ends) - min(starts), 3) if infos else None}
    if device != "cpu":
        out["distinct_gpus"] = len({i["gpu_uuid"] for i in infos})
        out["each_on_its_own_gpu"] = len(infos) == n and out["distinct_gpus"] == n
    return out


# ---- the load -----------------------------------------------------------------------------------------------------


RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}  # what the openai client also re-sends (--retry openai)


async def one_request(h: httpx.AsyncClient, url: str, body: dict, timeout: float, retry: str) -> dict[str, Any]:
    """One logical request, re-sent after a connection error (a refused or dropped connection, a stream cut
    short), at most MAX_RETRIES times; with retry="openai" also after an HTTP status the openai client re-sends.
    outcome: completed, twice (an earlier attempt had already streamed part of an answer) or lost."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"attempts": 0, "answered": 0, "ttft": None, "tokens": 0, "outcome": "lost",
                           "error": None}
    for _ in range(MAX_RETRIES + 1):
        rec["attempts"] += 1
        got_content = done = False
        failed = None
        try:
            async with h.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as r:
                if r.status_code != 200:
                    rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                    if retry == "openai" and r.status_code in RETRY_STATUSES:
                        continue
                    return rec
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                        continue
                    if not line.startswith("data: {"):
                        continue
                    msg = json.loads(line[6:])
                    if msg.get("usage"):
                        rec["tokens"] = msg["usage"]["completion_tokens"]
                    if not got_content and msg.get("choices") and msg["choices"][0]["delta"].get("content"):
                        got_content = True
                        rec["answered"] += 1
                        rec["ttft"] = time.perf_counter() - t0
                    if "error" in msg:  # an error event mid-stream: the server gave up on this request
                        failed = str(msg["error"])[:200]
        except httpx.TransportError as e:
            rec["error"] = f"{type(e).__name__}: {e}"[:200]
            continue
        if done and failed is None:
            rec["outcome"] = "twice" if rec["answered"] > 1 else "completed"
        else:
            rec["error"] = failed or "the stream ended without [DONE]"
        return rec
    return rec


async def client_group(url: str, bodies: list[dict], first: int, count: int, stop_at: float,
                       timeout: float, retry: str) -> list[dict]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    out: list[dict] = []

    async def client(c: int) -> None:
        k = c
        while time.time() < stop_at:
            rec = await one_request(h, url, bodies[k % len(bodies)], timeout, retry)
            rec["kind"], rec["end"] = ("text", "image", "audio")[k % len(bodies)], time.time()
            out.append(rec)
            k += 1

    async with httpx.AsyncClient(limits=limits) as h:
        await asyncio.gather(*(client(first + c) for c in range(count)))
    return out


def _ready(_: int) -> None:
    time.sleep(0.2)


def _group_process(args: tuple) -> list[dict]:
    return asyncio.run(client_group(*args))


def run_load(url: str, bodies: list[dict], clients: int, seconds: float, timeout: float, retry: str,
             kill: Any = None) -> dict[str, Any]:
    """clients streaming clients for `seconds` (in processes of CLIENTS_PER_PROCESS); kill(): called once, a
    third of the way in, from this process."""
    groups = [(g, min(CLIENTS_PER_PROCESS, clients - g)) for g in range(0, clients, CLIENTS_PER_PROCESS)]
    killed: dict[str, Any] = {}
    with mp.get_context("spawn").Pool(len(groups)) as pool:
        pool.map(_ready, range(len(groups)), chunksize=1)  # the clock starts once every load process runs
        t0 = time.time()
        stop_at = t0 + seconds
        if kill is not None:
            timer = threading.Timer(seconds * KILL_AT, lambda: killed.update(kill()))
            timer.start()
        parts = pool.map(_group_process, [(url, bodies, g, n, stop_at, timeout, retry) for g, n in groups])
    recs = [r for p in parts for r in p]
    wall = max([r["end"] for r in recs], default=time.time()) - t0
    ok = [r for r in recs if r["outcome"] != "lost"]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    res = {"clients": clients, "seconds": seconds, "wall_s": round(wall, 3), "requests": len(recs),
           "completed": sum(r["outcome"] == "completed" for r in recs),
           "lost": sum(r["outcome"] == "lost" for r in recs),
           "answered_twice": sum(r["outcome"] == "twice" for r in recs),
           "retried": sum(r["attempts"] > 1 for r in recs),
           "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
           "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1) if wall > 0 else None,
           "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
           "by_kind": {k: sum(r["kind"] == k and r["outcome"] != "lost" for r in recs)
                       for k in ("text", "image", "audio")},
           "errors": sorted({r["error"] for r in recs if r["outcome"] == "lost" and r["error"]})[:5]}
    if kill is not None:
        timer.join()
        res["killed"] = killed
    return res


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1000, 2) if xs else None  # milliseconds


# ---- steps --------------------------------------------------------------------------------------------------------


def serve_step(a: argparse.Namespace, n: int, work: Path, bodies: list[dict]) -> dict[str, Any]:
    server = Server(a, n, work / f"serve-{n}.log")
    res: dict[str, Any] = {"replicas": n}
    try:
        res["startup_wall_s"] = round(server.wait_ready(a.start_timeout), 3)
        res["placement"] = placement(replicas_seen(server.url, n, 60), n, a.device)
        # Warm-up: every kind of request once, so no measured request pays for lazy initialisation.
        run_load(server.url, bodies, len(bodies), 0.001, a.request_timeout, a.retry)
        res["load"] = {str(c): run_load(server.url, bodies, c, a.seconds, a.request_timeout, a.retry)
                       for c in a.clients}
        if n >= 2:
            res["kill"] = kill_step(a, server, n, bodies)
    except (RuntimeError, TimeoutError) as e:
        res["error"] = str(e)
    finally:
        server.stop()
    return res


def check_is_replica(pid: int) -> None:
    """Refuse to kill a process that is not a Ray Serve replica on this machine (a pid from another host)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    name = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace") if cmdline.is_file() else ""
    if "ServeReplica" not in name:
        raise RuntimeError(f"process {pid} is not a Ray Serve replica here ({name[:80]!r}); run the bench on "
                           "the machine that runs the replicas")


def kill_step(a: argparse.Namespace, server: Server, n: int, bodies: list[dict]) -> dict[str, Any]:
    """The load again, one replica's process killed a third of the way in; then wait for its successor."""
    victim = replicas_seen(server.url, n, 60)[0]
    back: dict[str, Any] = {}

    def watch(killed_at: float) -> None:
        found = replicas_seen(server.url, n, a.start_timeout, exclude_pids=frozenset({victim["pid"]}))
        back.update(replicas_answering=len(found), back_after_s=round(time.time() - killed_at, 3)
                    if len(found) >= n else None, new_pids=[r["pid"] for r in found])

    watcher: list[threading.Thread] = []

    def kill() -> dict[str, Any]:
        check_is_replica(victim["pid"])
        os.kill(victim["pid"], signal.SIGKILL)
        at = time.time()
        watcher.append(threading.Thread(target=watch, args=(at,)))
        watcher[0].start()
        return {"replica": victim["replica"], "pid": victim["pid"], "at": at}

    res = run_load(server.url, bodies, a.clients[0], a.seconds, a.request_timeout, a.retry, kill)
    for w in watcher:
        w.join()
    # Back: n replicas answer again, none of them the killed process (Ray started a new one).
    res["replica_back"] = back
    res["restarted"] = back.get("back_after_s") is not None
    return res


def batch_step(a: argparse.Namespace, clips: Path, n: int | None, work: Path, seconds_audio: float) -> dict:
    out = work / f"batch-{n or 'here'}.jsonl"
    cmd = cli("batch", "--model", a.model, str(clips), str(out), "--device", a.device,
              "--max-tokens", str(a.batch_max_tokens), "--max-batch", str(a.max_batch))
    if n is not None:
        cmd += ["--replicas", str(n), "--gpus-per-replica", "1" if a.device != "cpu" else "0"]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=a.batch_timeout)
    except subprocess.TimeoutExpired:
        return {"replicas": n, "error": f"timed out after {a.batch_timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"replicas": n, "error": f"exit {p.returncode}: {' '.join(p.stderr[-600:].split())}"}
    return {"replicas": n, "clips": a.clips, "audio_seconds": seconds_audio, "wall_s": round(wall, 3),
            "real_time_factor": round(seconds_audio / wall, 2), "out": str(out)}


def compare(here: Path, there: Path) -> dict[str, Any]:
    a = [json.loads(x) for x in here.read_text().splitlines()]
    b = [json.loads(x) for x in there.read_text().splitlines()]
    differ = [x["line"] for x, y in zip(a, b) if x != y]
    return {"lines": len(b), "equal_lines": len(a) == len(b) and not differ, "differing": len(differ) +
            abs(len(a) - len(b)), "first_differing_lines": differ[:10]}


def ratios(res: dict[str, Any]) -> dict[str, Any]:
    """N=2 over N=1 for every figure both runs have."""
    s1, s2 = res.get("serve_1", {}), res.get("serve_2", {})
    out: dict[str, Any] = {}
    for c, l1 in s1.get("load", {}).items():
        l2 = s2.get("load", {}).get(c)
        if l2 and l1.get("requests_per_s") and l1.get("ttft_p99_ms"):
            out[f"throughput_{c}_clients"] = round(l2["requests_per_s"] / l1["requests_per_s"], 3)
            out[f"ttft_p99_{c}_clients"] = round(l2["ttft_p99_ms"] / l1["ttft_p99_ms"], 3)
    u1 = s1.get("placement", {}).get("load_union_seconds")
    u2 = s2.get("placement", {}).get("load_union_seconds")
    if u1 and u2:
        out["load_wall"] = round(u2 / u1, 3)  # goal: <= 1.3 (both replicas load at once)
    if s1.get("startup_wall_s") and s2.get("startup_wall_s"):
        out["startup_wall"] = round(s2["startup_wall_s"] / s1["startup_wall_s"], 3)
    b1, b2 = res.get("batch_1", {}), res.get("batch_2", {})
    if b1.get("real_time_factor") and b2.get("real_time_factor"):
        out["batch_real_time_factor"] = round(b2["real_time_factor"] / b1["real_time_factor"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory; 'random-full': a random full-size "
                    "Phi-4-multimodal made here (GPU); default: the embedded micro model")
    ap.add_argument("--device", default="cuda", help="cuda: one GPU per replica; cpu: a smoke run")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clients", type=int, nargs="+", default=None)
    ap.add_argument("--seconds", type=float, default=None, help="each load run")
    ap.add_argument("--clips", type=int, default=None, help="30 s clips for the batch")
    ap.add_argument("--clip-seconds", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=None, help="per chat request (ignore_eos)")
    ap.add_argument("--batch-max-tokens", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--max-waiting", type=int, default=None)
    ap.add_argument("--start-timeout", type=float, default=None)
    ap.add_argument("--batch-timeout", type=float, default=None)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--retry", choices=["connection", "openai"], default="connection", help="what the clients "
                    "re-send: after connection errors only, or also after the HTTP statuses the openai client "
                    "re-sends (408, 409, 429, 5xx)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["serve", "batch"])
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "replicas.json"))
    a = ap.parse_args()
    for k, v in (GPU if a.device != "cpu" else CPU).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    work = Path(a.work or tempfile.mkdtemp(prefix="phi4mm-replicas-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.model is None:
        from phi4mm.micro.recipe import default_model_dir
        a.model = str(default_model_dir())
    elif a.model == "random-full":
        from phi4mm.tasks.make_checkpoint import make_checkpoint
        a.model = str(make_checkpoint(work / "random-full", "full", device=a.device))
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")  # a busy machine starts Ray's node slowly
    res = Results(Path(a.out), {
        "smoke_run": a.device == "cpu",
        "note": "CPU smoke run: proves the procedure end to end; its timings are no measurement" if a.device == "cpu"
        else "measured", **environment(a.device),
        "config": {k: getattr(a, k) for k in ("model", "device", "replicas", "clients", "seconds", "clips",
                                              "clip_seconds", "max_tokens", "batch_max_tokens", "max_batch",
                                              "max_waiting", "retry")}})
    if "serve" not in a.skip:
        bodies = request_bodies(a.max_tokens)
        for n in a.replicas:
            print(f"serve: {n} replica(s)", flush=True)
            res.put(f"serve_{n}", serve_step(a, n, work, bodies))
            res.put("ratios", ratios(res.data))
    if "batch" not in a.skip:
        clips = write_clips(work / "clips", a.clips, a.clip_seconds)
        audio = a.clips * a.clip_seconds
        print("batch: one process", flush=True)
        here = batch_step(a, clips, None, work, audio)
        res.put("batch_here", here)
        for n in a.replicas:
            print(f"batch: {n} replica(s)", flush=True)
            r = batch_step(a, clips, n, work, audio)
            if "out" in r and "out" in here:
                r["vs_one_process"] = compare(Path(here["out"]), Path(r["out"]))
            res.put(f"batch_{n}", r)
            res.put("ratios", ratios(res.data))
    print(json.dumps(res.data.get("ratios", {}), indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
