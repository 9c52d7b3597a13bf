"""`phi4mm serve` in a subprocess on 127.0.0.1, for the benches that measure it over HTTP (soak.py, fairness.py,
bench_server.py, serve_bench.py); the server's memory as the kernel counts it; the length of a prompt in the
server's tokens.

The server runs in its own process so the clients' Python does not share its GIL and its RSS is its own.
Import it from a bench script as `from live_server import start_server` (scripts run as `python bench/X.py`
have bench/ on their path).
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300.0  # loading a full checkpoint and warming the engine on a GPU
POLL_S = 0.2
CALL_TIMEOUT_S = 600.0


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(serve_args: list[str], *, timeout_s: float = START_TIMEOUT_S, log: Path | None = None
                 ) -> tuple[subprocess.Popen, int]:
    """`phi4mm serve --host 127.0.0.1 --port P SERVE_ARGS...` from this checkout; returns once /health answers
    200. log: where its stderr goes (default: nowhere). Exits the bench when it dies or does not come up."""
    port = free_port()
    cmd = [sys.executable, "-m", "phi4mm.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port),
           *serve_args]
    if log is None:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        with open(log, "w") as err:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    where = f"; see {log}" if log is not None else ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}{where}")
        time.sleep(POLL_S)
    proc.kill()
    raise SystemExit(f"the server did not answer /health within {timeout_s:g} s{where}")


def stop_server(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` in MiB (NaN when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class RssSampler:
    """Samples a process's RSS on a thread: the peak every `peak_every_s`, and a (seconds, MiB, phase) series
    every `every_s`; `phase` labels the samples that follow."""

    def __init__(self, pid: int, every_s: float = 5.0, peak_every_s: float = 0.25):
        self.pid, self.every_s, self.peak_every_s = pid, every_s, peak_every_s
        self.phase = "start"
        self.t0 = time.monotonic()
        self.peak = rss_mib(pid)
        self.series: list[tuple[float, float, str]] = [(0.0, round(self.peak, 1), self.phase)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> float:
        return round(rss_mib(self.pid), 1)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.peak_every_s):
            mib = rss_mib(self.pid)
            self.peak = max(self.peak, mib)
            if time.monotonic() - last >= self.every_s:
                last = time.monotonic()
                self.series.append((round(last - self.t0, 1), round(mib, 1), self.phase))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def prompt_tokens(base: str, model: str, text: str) -> int:
    """How many tokens the server makes of a one-message chat (its usage, for one generated token)."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1, "temperature": 0}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=CALL_TIMEOUT_S)
    r.raise_for_status()
    return r.json()["usage"]["prompt_tokens"]
