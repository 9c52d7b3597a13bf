"""OpenAI-compatible HTTP server over the engine: `phi4mm serve --model DIR`.

    POST /v1/chat/completions    text, image_url (data URLs), input_audio; tools; stream; n; logprobs; JSON mode
    POST /v1/completions         prompts as plain text (or token ids); the model-card format with --raw-completion-prompts
    POST /v1/audio/transcriptions, /v1/audio/translations   multipart upload; long audio split in segments
    GET  /v1/models, /health, /metrics

One `AsyncEngine` thread steps the engine; handlers tokenize and preprocess media on worker threads
(`asyncio.to_thread`), so the engine thread only runs towers and decoder steps. Every client mistake is a 4xx
with OpenAI's error object that names the field; an engine failure is a 500 (or an error event mid-stream)
without internal details, and the server goes on. What each request may hold is capped (`ServeOptions`).

response_format json_object / json_schema: a system instruction asks for JSON, and a non-streamed answer is
repaired to the first parseable JSON object in it when it is not one already (`repair_json`). This is not
constrained decoding: a model that ignores the instruction still answers in prose (kept as is, never lost);
streamed answers are passed through unrepaired.

Shutdown: on SIGTERM the server stops accepting connections and gives open requests `drain_timeout_s`; then
they end (an error event on streams, 503 otherwise) and the process exits.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import phi4mm
from phi4mm.api import Model
from phi4mm.engine.engine import Engine, EngineBusy
from phi4mm.engine.memory import freeze_startup_objects, limit_malloc_arenas
from phi4mm.inputs.audio import AudioError
from phi4mm.inputs.av_audio import DecodeError
from phi4mm.inputs.chat import ChatError
from phi4mm.inputs.image import ImageError
from phi4mm.inputs.prepare import InputError
from phi4mm.inputs.tokenizer import TokenizerError
from phi4mm.inputs.video import VideoError
from phi4mm.options import ServeOptions
from phi4mm.serve.gate import LOOPBACK_HOSTS, DeadlineH11Protocol, Gate
from phi4mm.serve.media import MediaPolicy
from phi4mm.serve.routes import audio_task, chat_completions, completions
from phi4mm.serve.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    error_body,
    writable,
)
from phi4mm.serve.server import Server
from phi4mm.serve.ui import mount_ui

# their messages say what to fix, quoting only what the client sent
INPUT_ERRORS = (ChatError, InputError, ImageError, AudioError, TokenizerError, DecodeError, VideoError)
MAX_ECHO_CHARS = 80  # of a rejected value, quoted back in the error message
GRACE_AFTER_DRAIN_S = 5  # after the drain deadline: time for the error events to go out before uvicorn cuts
log = logging.getLogger("phi4mm.serve")


def create_app(model: Model, engine: Engine | None = None, *, model_name: str = "phi-4-multimodal-instruct",
               aliases: tuple[str, ...] = ("phi4mm", "speech", "vision"), api_key: str | None = None,
               num_blocks: int | None = None, max_batch: int = 64, max_waiting: int = 1024,
               allow_remote_media: bool = False, allow_local_files: bool = False, max_body_bytes: int = 64 << 20,
               default_max_tokens: int | None = None, transcription_max_tokens: int = 448,
               segment_seconds: float = 30.0, merge_adapter: str | None = None, options: ServeOptions | None = None,
               media_policy: MediaPolicy | None = None, mm_limits: dict[str, int] | None = None,
               ui: bool = True) -> FastAPI:
    """The FastAPI app. `engine` defaults to `Engine(model, num_blocks, max_batch=..., max_waiting=...,
    merge_adapter=...)`. `options` carries the caps and the newer settings (the keyword arguments above win
    where both are given); `media_policy` replaces the one built from the options (tests use it to fetch from
    a local HTTP server). mm_limits: the most images / audio clips per request ({"image": 3},
    --limit-mm-per-prompt). ui: serve the web page at `/`."""
    opts = (options or ServeOptions()).but(
        default_max_tokens=default_max_tokens if default_max_tokens is not None else (options or ServeOptions()
                                                                                      ).default_max_tokens,
        transcription_max_tokens=transcription_max_tokens, segment_seconds=segment_seconds)
    if allow_local_files and opts.allowed_media_dir is None:
        raise ValueError("allow_local_files needs allowed_media_dir: local media are read only under one directory "
                         "(--allowed-media-dir DIR)")
    engine = engine or Engine(model, num_blocks=num_blocks, max_batch=max_batch, max_waiting=max_waiting,
                              merge_adapter=merge_adapter)
    policy = media_policy or MediaPolicy(allow_remote_media=allow_remote_media or opts.allow_remote_media,
                                         allowed_media_dir=opts.allowed_media_dir, max_bytes=opts.max_media_bytes,
                                         remote_timeout_s=opts.remote_media_timeout_s)
    srv = Server(model, engine, model_name, list(aliases), policy, opts, mm_limits)
    app = FastAPI(title="phi4mm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    app.add_middleware(Gate, api_key=api_key if api_key is not None else opts.api_key,
                       max_body_bytes=max_body_bytes, metrics=srv.metrics,
                       known_paths=lambda: {getattr(r, "path", "") for r in app.routes},
                       loopback_only=_is_loopback(opts.host), allowed_origins=opts.allowed_origins,
                       read_timeout_s=opts.read_timeout_s)
    if opts.allowed_origins:  # outside the gate: answers the browsers' preflight requests for those origins
        app.add_middleware(CORSMiddleware, allow_origins=list(opts.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.router.add_event_handler("shutdown", srv.engine.shutdown)
    _install_error_handlers(app)
    if ui:
        mount_ui(app)

    @app.get("/health")
    async def health() -> Response:
        if not srv.engine.alive:
            return JSONResponse(error_body("the engine thread has stopped", "server_error"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict:
        return {"version": phi4mm.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        body = await asyncio.to_thread(srv.metrics.render)  # never on the event loop
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "phi4mm",
                                            "root": srv.model_name, "parent": None if i == 0 else srv.model_name,
                                            "max_model_len": srv.max_model_len}  # as vLLM's model cards
                                           for i, n in enumerate(srv.names)]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Response:
        return await chat_completions(srv, req, request)

    @app.post("/v1/completions")
    async def complete(req: CompletionRequest, request: Request) -> Response:
        return await completions(srv, req, request)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request, file: UploadFile = File(...), model: str = Form(..., max_length=256),
                             response_format: str = Form("json", max_length=64),
                             language: str | None = Form(None), prompt: str | None = Form(None),
                             temperature: float = Form(0.0)) -> Response:
        return await audio_task(srv, "transcribe", request, file, model, response_format, language, prompt,
                                temperature)

    @app.post("/v1/audio/translations")
    async def translations(request: Request, file: UploadFile = File(...), model: str = Form(..., max_length=256),
                           response_format: str = Form("json", max_length=64),
                           language: str | None = Form(None), prompt: str | None = Form(None),
                           temperature: float = Form(0.0)) -> Response:
        return await audio_task(srv, "translate", request, file, model, response_format, language, prompt,
                                temperature)

    return app


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------ errors
def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> Response:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [writable(str(x))[:MAX_ECHO_CHARS] for x in first.get("loc", ()) if x not in ("body",)]
        if first.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}); " \
                  "send a JSON object"
        else:
            where = ".".join(loc) or "body"
            msg = f"{where}: {first.get('msg', 'invalid value')}"
            value = first.get("input")
            if isinstance(value, (str, int, float, bool)) or value is None:  # never render a big structure
                msg += f" (got {str(value)[:MAX_ECHO_CHARS]!r})"
            msg += "; fix this field and retry"
        return JSONResponse(error_body(msg, param=".".join(loc) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error" if e.status_code < 500 else
                                       "server_error"), status_code=e.status_code)

    @app.exception_handler(EngineBusy)
    async def busy(_: Request, e: EngineBusy) -> Response:
        return JSONResponse(error_body(str(e), "rate_limit_error", code="engine_busy"), status_code=429,
                            headers={"Retry-After": "1"})

    for cls in INPUT_ERRORS:
        @app.exception_handler(cls)
        async def bad_input(_: Request, e: Exception) -> Response:
            # phi4mm's input errors say what to fix; they quote only what the client sent.
            return JSONResponse(error_body(str(e)), status_code=400)
    # Anything else is a bug: the gate logs it and answers a generic 500 (it never echoes the exception).


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "cpu", dtype: str | None = None, max_batch: int = 64, max_waiting: int = 1024,
          allow_remote_media: bool = False, allow_local_files: bool = False, num_blocks: int | None = None,
          max_body_bytes: int = 64 << 20, model_name: str | None = None, merge_adapter: str | None = None,
          options: ServeOptions | None = None) -> None:
    """Load the checkpoint and serve it until interrupted (SIGTERM/SIGINT drain first; see the module doc)."""
    from pathlib import Path
    limit_malloc_arenas()  # before loading starts threads: engine/memory.py says why

    import phi4mm
    opts = (options or ServeOptions()).but(host=host, port=port)
    model = phi4mm.load(model_dir, device=device, dtype=dtype)
    engine = None
    if model.device.type == "cuda":
        # Compile the kernels and capture the first graphs now, not on the first user's request.
        engine = Engine(model, num_blocks=num_blocks, max_batch=max_batch, max_waiting=max_waiting,
                        merge_adapter=merge_adapter)
        seconds = engine.warmup()
        print(f"engine warm-up: {seconds:.1f} s ({engine.graphs_ready[0]} decode and {engine.graphs_ready[1]} "
              "prompt CUDA graphs captured)", flush=True)
    app = create_app(model, engine, model_name=model_name or Path(model_dir).resolve().name, api_key=api_key,
                     num_blocks=num_blocks, max_batch=max_batch, max_waiting=max_waiting,
                     allow_remote_media=allow_remote_media, allow_local_files=allow_local_files,
                     max_body_bytes=max_body_bytes, merge_adapter=merge_adapter, options=opts)
    run_server(app, opts)


def run_server(app: FastAPI, opts: ServeOptions, log_level: str = "info") -> None:
    """uvicorn with the slow-client deadlines and the drain deadline of `opts` (blocks until shut down)."""
    server = draining_server(app, opts, log_level)
    freeze_startup_objects()  # engine/memory.py: full collections stop pausing the streams for ~0.2 s
    server.run()


def draining_server(app: FastAPI, opts: ServeOptions, log_level: str = "info") -> Any:
    """A uvicorn.Server whose exit signal starts the drain: after `drain_timeout_s` the app's open requests
    end with an error, and uvicorn itself gives up on connections a little later."""
    import uvicorn

    srv: Server = app.state.server
    loops: list[asyncio.AbstractEventLoop] = []

    async def remember_loop() -> None:
        loops.append(asyncio.get_running_loop())

    app.router.add_event_handler("startup", remember_loop)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit and loops:  # a signal handler: hand the timer to the server's loop
                loops[0].call_soon_threadsafe(loops[0].call_later, opts.drain_timeout_s, srv.expire_drain)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=log_level,
                            http=DeadlineH11Protocol.with_header_timeout(opts.read_timeout_s),
                            timeout_keep_alive=opts.timeout_keep_alive_s,
                            timeout_graceful_shutdown=int(opts.drain_timeout_s) + GRACE_AFTER_DRAIN_S)
    return DrainingServer(config)
