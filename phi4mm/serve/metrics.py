"""Server plumbing outside the routes: Prometheus metrics and the ASGI gate (API key, body limit, counting).

The gate runs before FastAPI parses anything: a request without the key, or with a body over the limit, is
answered here (401 / 413 with OpenAI's error object) and never buffered in full.
"""
from __future__ import annotations

import json
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from phi4mm.serve.ui import public_path

# Latency buckets in seconds: sub-millisecond CPU steps up to minute-long transcriptions.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)
_OPEN_PATHS = ("/health", "/metrics")  # no API key needed: probes and scrapers


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


class Gate:
    """ASGI middleware: API key check, body-size limit, request count and latency per path."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, t0 = scope["path"], time.perf_counter()
        status = [500]

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._check_key(scope)
            if refusal is None:
                receive, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                await _reply(counted_send, *refusal)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            label = path if path.startswith("/v1/") or path in _OPEN_PATHS else "other"
            self.metrics.requests.labels(label, str(status[0])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)

    def _check_key(self, scope: dict) -> tuple | None:
        if self.api_key is None or scope["path"] in _OPEN_PATHS or public_path(scope["path"]):
            # The web page's own files load without the key: the page then asks the user for it.
            return None
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if not auth:
            return 401, "no API key: send the header 'Authorization: Bearer <key>'", "invalid_api_key"
        if auth != f"Bearer {self.api_key}":
            return 401, "the API key is wrong; send the key the server was started with", "invalid_api_key"
        return None

    async def _read_body(self, scope: dict, receive: Any) -> tuple[Any, tuple | None]:
        """Buffer the body (up to the limit) and hand the app a receive that replays it."""
        limit = self.max_body_bytes
        too_big = (413, f"the request body is over the server's limit of {limit} bytes; send smaller media "
                        "(or start the server with a larger --max-body-bytes)", "request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return receive, too_big
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive, (400, "the client disconnected while sending the body", "client_closed")
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > limit:
                return receive, too_big
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), [False]

        async def replay() -> dict:
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server's receive does

        return replay, None


async def _reply(send: Any, status: int, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
