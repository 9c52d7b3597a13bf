"""Prometheus metrics of the server: requests by route and status, latencies, tokens, engine gauges.

Route labels are bounded: a path that is not one of the app's routes counts as "other", so random paths
cannot grow the registry. Rendering runs on a worker thread (the routes call `render` via to_thread).
"""
from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Latency buckets in seconds: sub-millisecond CPU steps up to minute-long transcriptions.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)


class Metrics:
    """One registry per app (tests start several apps in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("phi4mm_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.latency = Histogram("phi4mm_request_latency_seconds", "end-to-end request time", ["path"],
                                 buckets=_LATENCY, registry=r)
        self.ttft = Histogram("phi4mm_time_to_first_token_seconds", "request arrival to first generated token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("phi4mm_inter_token_latency_seconds", "gap between a request's tokens",
                             buckets=_TOKEN_GAP, registry=r)
        self.prompt_tokens = Counter("phi4mm_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("phi4mm_generation_tokens", "tokens generated", registry=r)
        self.waiting = Gauge("phi4mm_requests_waiting", "requests queued in the engine", registry=r)
        self.running = Gauge("phi4mm_requests_running", "requests being decoded", registry=r)
        self.free_blocks = Gauge("phi4mm_kv_blocks_free", "free KV-cache blocks", registry=r)
        self.step_time = Histogram("phi4mm_engine_step_seconds", "time of one engine step", buckets=_TOKEN_GAP,
                                   registry=r)
        self.http_in_flight = 0  # requests the gate is answering now (memory is released only at 0)

    def on_step(self, engine: Any, outs: list, seconds: float) -> None:
        """Called on the engine thread after every step."""
        self.step_time.observe(seconds)
        self.waiting.set(len(engine.waiting))
        self.running.set(len(engine.running))
        self.free_blocks.set(engine.pool.num_free)

    def token(self, choice: Any, now: float, t0: float) -> None:
        """Record a generated token of `choice` (which keeps `last_t`) for TTFT / inter-token latency."""
        if choice.last_t is None:
            self.ttft.observe(now - t0)
        else:
            self.itl.observe(now - choice.last_t)
        choice.last_t = now

    def render(self) -> bytes:
        return generate_latest(self.registry)
