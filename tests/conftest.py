"""Shared fixtures: tiny random checkpoints in both layouts, made once per test session."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SERVER_START_S = 30  # a thread-hosted uvicorn binds in well under a second; a loaded CI machine is slower
SERVER_STOP_S = 10
CLI_SERVER_START_S = 180  # `phi4mm serve` in a subprocess: a loaded CI machine takes a while to import torch
CLI_SERVER_STOP_S = 20


@pytest.fixture(scope="session")
def tiny_official(tmp_path_factory):
    from phi4mm.tasks.make_checkpoint import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("tiny_official"), "tiny", "official", seed=0)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    from phi4mm.tasks.make_checkpoint import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("tiny_hf"), "tiny", "hf", seed=0)


def scene(w: int, h: int, seed: int = 0) -> Image.Image:
    """A picture with structure (shapes on a gradient), not pure noise."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([x.repeat(h, 0), y.repeat(w, 1), (x + y).repeat(1, 1) / 2 * np.ones((h, w, 1))], -1)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        d.ellipse([x0, y0, x0 + w // 4 + 1, y0 + h // 4 + 1], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def tone(seconds: float, rate: int = 16000, seed: int = 0) -> tuple[np.ndarray, int]:
    """A chirp with a little noise: speech-like energy across the mel range."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * (200 + 900 * t / max(seconds, 1e-3)) * t) + 0.02 * rng.standard_normal(t.size)
    return wav.astype(np.float32), rate


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_thread(server) -> Iterator[threading.Thread]:
    """Run a uvicorn.Server in a daemon thread; yields the thread once the server has started, and asks the
    server to exit (waiting up to SERVER_STOP_S) when the block ends."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_S
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield thread
    finally:
        server.should_exit = True
        thread.join(SERVER_STOP_S)


@contextmanager
def serve_app(app, log_level: str = "warning") -> Iterator[tuple[int, threading.Thread]]:
    """Run an ASGI app under uvicorn on a free loopback port in a thread; yields (port, thread)."""
    import uvicorn
    port = free_port()
    with server_thread(uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                     log_level=log_level))) as thread:
        yield port, thread


@contextmanager
def phi4mm_serve(*flags: str, start_s: float = CLI_SERVER_START_S) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """`python -m phi4mm serve FLAGS --port P` from this checkout, in a subprocess, until /health answers;
    yields (base URL, process, its stderr log)."""
    import httpx
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"phi4mm-serve-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "phi4mm", "serve", *flags, "--port", str(port)],
                                stdout=err, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_s
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start:\n" + log.read_text()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield base, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(CLI_SERVER_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.unlink(missing_ok=True)
