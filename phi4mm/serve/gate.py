"""The ASGI gate in front of the routes, and the HTTP protocol's read deadline.

The gate runs before FastAPI parses anything and answers with OpenAI's error object:
- Host: when the server listens on loopback only, a request must name a loopback host (a web page whose
  name was re-pointed at 127.0.0.1, "DNS rebinding", names its own host and is refused, 421).
- Origin: a browser sends it with cross-site requests; a state-changing request whose Origin is neither the
  server itself nor one of `--allowed-origins` is refused (403). Requests without Origin (API clients) pass.
- API key: `Authorization: Bearer KEY` (the scheme in any case), compared in constant time (401).
- Body: at most `max_body_bytes` (413), arriving within the read deadline (408); never buffered past the limit.
- Counting: requests by route and status; paths that are not routes share the label "other".
- Last resort: an exception no handler caught is logged with its traceback and answered with a generic 500
  that says nothing of it; the connection stays usable.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from uvicorn.protocols.http.h11_impl import H11Protocol

from phi4mm.serve.metrics import Metrics
from phi4mm.serve.ui import public_path

OPEN_PATHS = ("/health", "/metrics")  # no API key needed: probes and scrapers
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
log = logging.getLogger("phi4mm.serve")


class Gate:
    """ASGI middleware; see the module docstring."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, metrics: Metrics,
                 known_paths: Callable[[], set[str]], loopback_only: bool = False,
                 allowed_origins: tuple[str, ...] = (), read_timeout_s: float = 30.0):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics
        self.known_paths, self._known = known_paths, None
        self.loopback_only, self.allowed_origins, self.read_timeout_s = loopback_only, allowed_origins, read_timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, t0 = scope["path"], time.perf_counter()
        status = [500]
        started = [False]
        self.metrics.http_in_flight += 1

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        try:
            refusal = self._check_host_origin(scope) or self._check_key(scope)
            if refusal is None:
                receive, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                await reply(counted_send, *refusal)
            else:
                await self.app(scope, receive, counted_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            if not started[0]:
                await reply(counted_send, 500, "internal server error; the request was not completed (the server "
                            "goes on)", "internal_error", "server_error")
        finally:
            self.metrics.http_in_flight -= 1
            if self._known is None:
                self._known = set(self.known_paths())
            label = path if path in self._known else "other"
            self.metrics.requests.labels(label, str(status[0])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)

    def _check_host_origin(self, scope: dict) -> tuple | None:
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if self.loopback_only and host and _hostname(host) not in LOOPBACK_HOSTS:
            return 421, "this server answers only to localhost/127.0.0.1 (it listens on loopback)", "host_not_allowed"
        origin = headers.get(b"origin")
        if origin is None or scope.get("method", "GET") in SAFE_METHODS:
            return None
        origin_s = origin.decode("latin-1").strip()
        if "*" in self.allowed_origins or origin_s in self.allowed_origins:
            return None
        if origin_s != "null" and urlsplit(origin_s).netloc.lower() == host:
            return None  # same origin: a page served by this server
        return 403, (f"requests from the web origin {origin_s[:80]!r} are not allowed; start the server with "
                     "--allowed-origins ORIGIN to let that site call it"), "origin_not_allowed"

    def _check_key(self, scope: dict) -> tuple | None:
        # The web page's own files load without the key: the page then asks the user for it.
        if self.api_key is None or scope["path"] in OPEN_PATHS or scope.get("method") == "OPTIONS" \
                or public_path(scope["path"]):
            return None
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").strip()
        if not auth:
            return 401, "no API key: send the header 'Authorization: Bearer <key>'", "invalid_api_key"
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8", "replace"),
                                                                   self.api_key.encode("utf-8")):
            return 401, "the API key is wrong; send the key the server was started with", "invalid_api_key"
        return None

    async def _read_body(self, scope: dict, receive: Any) -> tuple[Any, tuple | None]:
        """Buffer the body (up to the limit, within the deadline) and hand the app a receive that replays it."""
        limit = self.max_body_bytes
        too_big = (413, f"the request body is over the server's limit of {limit} bytes; send smaller media "
                        "(or start the server with a larger --max-body-bytes)", "request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return receive, too_big
        chunks, total = [], 0
        try:
            async with asyncio.timeout(self.read_timeout_s):
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
        except TimeoutError:
            return receive, (408, f"the request body did not arrive within {self.read_timeout_s:g} s",
                             "request_timeout")
        body, replayed = b"".join(chunks), [False]

        async def replay() -> dict:
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server's receive does

        return replay, None


def _hostname(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '[::1]'."""
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def reply(send: Any, status: int, message: str, code: str, type: str = "invalid_request_error") -> None:
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a read deadline for request headers: a connection that has not sent a
    complete request head within `header_timeout_s` (when opened, or after its last response) is closed, so
    slow or silent clients cannot hold connections open. Set the deadline with `with_header_timeout`."""

    header_timeout_s = 30.0
    _deadline: asyncio.TimerHandle | None = None

    @classmethod
    def with_header_timeout(cls, seconds: float) -> type[DeadlineH11Protocol]:
        return type("DeadlineH11Protocol", (cls,), {"header_timeout_s": seconds})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request head arrived; the body has the gate's deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.transport.is_closing():
            self.transport.close()
