"""OpenAI-compatible HTTP server over the engine: `phi4mm serve --model DIR`.

    POST /v1/chat/completions    text, image_url (data URLs), input_audio; tools; stream; n; logprobs; JSON mode
    POST /v1/completions         raw prompts in the model-card format (or token ids)
    POST /v1/audio/transcriptions, /v1/audio/translations   multipart upload; long audio split in segments
    GET  /v1/models, /health, /metrics, /version

Model names: the served names, the Hugging Face id of the architecture, and the adapters' names; a request that
names an adapter (`speech`, `vision`, a --lora-modules name) runs every prompt through that adapter, as vLLM does.
tool_choice none / auto / required / a named function is enforced while decoding (inputs.tools.tool_constraint).

One `AsyncEngine` thread steps the engine; handlers tokenize and preprocess media on worker threads
(`asyncio.to_thread`), so the engine thread only runs towers and decoder steps. Every client mistake is a 4xx
with OpenAI's error object; an engine failure is a 500 (or an error event mid-stream) and the server goes on.

response_format json_object / json_schema: a system instruction asks for JSON, and a non-streamed answer is
repaired to the first parseable JSON object in it when it is not one already (`repair_json`). This is not
constrained decoding: a model that ignores the instruction still answers in prose (kept as is, never lost);
streamed answers are passed through unrepaired.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

import phi4mm
from phi4mm.api import Model
from phi4mm.engine.async_engine import AsyncEngine, RequestStream, merge
from phi4mm.engine.engine import Engine, EngineBusy, StepOutput
from phi4mm.inputs.chat import flatten_content
from phi4mm.inputs.prepare import Prepared
from phi4mm.inputs.tools import (
    ContentDelta,
    ToolCallStreamParser,
    ToolChoiceError,
    parse_tool_calls,
    tool_constraint,
    tool_names,
)
from phi4mm.sampling import SamplingParams
from phi4mm.serve.metrics import Gate, Metrics
from phi4mm.serve.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    MediaPolicy,
    add_json_hint,
    chat_logprobs,
    completion_logprobs,
    error_body,
    json_mode,
    repair_json,
    resolve_media,
    sampling_params,
    sse,
    usage,
)

AUDIO_RATE = 16000  # the loaders resample everything to 16 kHz
DISCONNECT_POLL_S = 1.0  # how often a non-streamed request checks that its client is still there


@dataclass
class _Choice:
    text: str = ""
    logprobs: list = field(default_factory=list)  # (token id, logprob, top [(id, lp)])
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generated: int = 0
    last_t: float | None = None  # when its last token arrived (inter-token latency)


class _Server:
    """State shared by the routes: the model, the engine thread, options and metrics."""

    def __init__(self, model: Model, engine: Engine, model_name: str, aliases: list[str], policy: MediaPolicy,
                 default_max_tokens: int | None, transcription_max_tokens: int, segment_seconds: float,
                 mm_limits: dict[str, int] | None = None):
        self.model, self.policy, self.model_name = model, policy, model_name
        self.names = list(dict.fromkeys([model_name, *aliases, *model.hub_ids, *model.config.loras]))
        self.mm_limits = mm_limits or {}
        self.metrics = Metrics()
        self.engine = AsyncEngine(engine, on_step=self.metrics.on_step)
        self.default_max_tokens = default_max_tokens
        self.transcription_max_tokens, self.segment_seconds = transcription_max_tokens, segment_seconds
        self.context = model.config.text.max_position_embeddings
        self.stop_ids = set(model.tokenizer.eos_token_ids)
        self.token_bytes = model.tokenizer.token_bytes()

    def check_model(self, name: str) -> str | None:
        """404 for a name not served here; else the adapter the name asks for (None: chosen by the media)."""
        if name not in self.names:
            raise APIError(404, f"model {name} is not served here; use one of: {', '.join(self.names)}",
                           param="model", code="model_not_found")
        return name if name in self.model.config.loras else None

    def check_media(self, images: list, audios: list) -> None:
        """--limit-mm-per-prompt: a 400 naming the limit."""
        for kind, items in (("image", images), ("audio", audios)):
            most = self.mm_limits.get(kind)
            if most is not None and len(items) > most:
                raise APIError(400, f"this request carries {len(items)} {kind} item(s); this server takes at most "
                               f"{most} per prompt (--limit-mm-per-prompt {kind}={most})", param="messages",
                               code="too_many_media")

    async def prepare(self, prompt: Any, images: list | None = None, audios: list | None = None,
                      tools: list | None = None) -> Prepared:
        if isinstance(prompt, Prepared):
            prep = prompt
        else:
            prep = await asyncio.to_thread(self.model.prepare, prompt, images, audios, tools)
        if prep.num_tokens + 1 > self.context:
            raise APIError(400, f"the prompt has {prep.num_tokens} tokens; the context holds {self.context}: shorten "
                           "it (or send smaller media)", param="messages", code="context_length_exceeded")
        return prep

    def choice_params(self, prep: Prepared, req: Any, max_tokens: int | None, logprobs: int | None, n: int
                      ) -> list[SamplingParams]:
        """SamplingParams for the `n` choices of a chat/completion request (max_tokens defaults to the room left)."""
        # Fields the request leaves out take the checkpoint's generation_config.json defaults, as in the CLI and
        # the Python API; no max_tokens: what remains of the context the engine can hold (None).
        defaults = self.model.sampling_defaults
        if max_tokens is None:
            max_tokens = self.default_max_tokens or defaults.get("max_tokens")
            if max_tokens is not None:
                max_tokens = min(max_tokens, self.context - prep.num_tokens)
        unset = {k: v for k, v in defaults.items() if k != "max_tokens" and getattr(req, k, None) is None}
        return [dataclasses.replace(sampling_params(req, max_tokens, logprobs, i), **unset) for i in range(n)]

    async def start(self, prep: Prepared, choices: list[SamplingParams]) -> list[RequestStream]:
        """Submit one prompt once per choice; all or none (a failure cancels those already queued)."""
        streams: list[RequestStream] = []
        try:
            for params in choices:
                streams.append(await self.engine.submit(prep, params=params))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        self.metrics.prompt_tokens.inc(prep.num_tokens)
        return streams

    async def collect(self, streams: list[RequestStream], request: Request, t0: float) -> list[_Choice]:
        """Wait for every stream to finish; cancel them all if the client hangs up first."""
        choices = [_Choice() for _ in streams]
        try:
            for s, c in zip(streams, choices):
                while not s.finished:
                    try:
                        out = await s.get(DISCONNECT_POLL_S)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            raise APIError(499, "the client closed the connection", code="client_closed")
                        continue
                    self.absorb(c, out, t0)
        finally:
            for s in streams:
                s.cancel()
        return choices

    def absorb(self, c: _Choice, out: StepOutput, t0: float) -> None:
        if out.finish_reason == "error":
            raise APIError(500, f"the engine failed on this request: {out.error}", type="server_error")
        if out.token_id is not None:
            self.metrics.token(c, time.perf_counter(), t0)
        c.text += out.text
        if out.logprob is not None and out.token_id not in self.stop_ids:
            c.logprobs.append((out.token_id, out.logprob, out.top_logprobs))
        c.prompt_tokens, c.generated = out.num_prompt_tokens or c.prompt_tokens, out.num_generated or c.generated
        if out.finished:
            c.finish_reason = out.finish_reason
            self.metrics.generation_tokens.inc(c.generated)


def create_app(model: Model, engine: Engine | None = None, *, model_name: str = "phi-4-multimodal-instruct",
               aliases: tuple[str, ...] = ("phi4mm", "speech", "vision"), api_key: str | None = None,
               num_blocks: int | None = None, max_batch: int = 64, max_waiting: int = 1024,
               allow_remote_media: bool = False, allow_local_files: bool = False, max_body_bytes: int = 64 << 20,
               default_max_tokens: int | None = None, transcription_max_tokens: int = 448,
               segment_seconds: float = 30.0, merge_adapter: str | None = None,
               mm_limits: dict[str, int] | None = None) -> FastAPI:
    """The FastAPI app. `engine` defaults to `Engine(model, num_blocks, max_batch=..., max_waiting=...,
    merge_adapter=...)`. mm_limits: the most images / audio clips per request ({"image": 3})."""
    engine = engine or Engine(model, num_blocks=num_blocks, max_batch=max_batch, max_waiting=max_waiting,
                              merge_adapter=merge_adapter)
    policy = MediaPolicy(allow_remote_media=allow_remote_media, allow_local_files=allow_local_files,
                         max_bytes=max_body_bytes)
    srv = _Server(model, engine, model_name, list(aliases), policy, default_max_tokens, transcription_max_tokens,
                  segment_seconds, mm_limits)
    app = FastAPI(title="phi4mm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=max_body_bytes, metrics=srv.metrics)
    app.router.add_event_handler("shutdown", srv.engine.shutdown)
    _install_error_handlers(app)

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
        return Response(srv.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "phi4mm",
                                            "root": srv.model_name, "parent": None if i == 0 else srv.model_name}
                                           for i, n in enumerate(srv.names)]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        adapter = srv.check_model(req.model)
        try:
            tools, constraint = tool_constraint(req.tools or None, req.tool_choice, srv.model.tokenizer)
        except ToolChoiceError as e:
            raise APIError(400, str(e), param="tool_choice") from None
        offered = set(tool_names(tools)) if tools and req.tool_choice != "none" else None
        jmode = json_mode(req)
        flat, images, audios = flatten_content(add_json_hint(req.messages, req) if jmode else req.messages)
        srv.check_media(images, audios)
        images = [await resolve_media(p, "image", f"image {i + 1}", srv.policy) for i, p in enumerate(images)]
        audios = [await resolve_media(p, "audio", f"audio {i + 1}", srv.policy) for i, p in enumerate(audios)]
        prep = await srv.prepare(flat, images, audios, tools)
        if adapter is not None:
            prep = dataclasses.replace(prep, adapter=adapter)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = srv.choice_params(prep, req, req.max_completion_tokens or req.max_tokens, logprobs, req.n)
        for p in params:
            p.constraint = constraint
        streams = await srv.start(prep, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": req.model}
        if req.stream:
            return _sse(_chat_stream(srv, streams, req, head, offered, t0), streams)
        choices = await srv.collect(streams, request, t0)
        out = []
        for i, c in enumerate(choices):
            content, calls = parse_tool_calls(c.text, f"call_{rid[9:21]}_{i}_", offered) if offered is not None \
                else (c.text, [])
            if jmode and not calls:
                content = repair_json(content)
            msg: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
            if calls:
                msg["tool_calls"] = [{"id": t.id, "type": "function",
                                      "function": {"name": t.name, "arguments": t.arguments}} for t in calls]
            reason = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
            out.append({"index": i, "message": msg, "finish_reason": reason,
                        "logprobs": chat_logprobs(c.logprobs, srv.token_bytes) if logprobs is not None else None})
        return JSONResponse({**head, "choices": out,
                             "usage": usage(choices[0].prompt_tokens, sum(c.generated for c in choices))})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        adapter = srv.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported by this model; leave it out",
                           param="suffix")
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
            else [req.prompt]
        if not prompts:
            raise APIError(400, "prompt is an empty list; send a string or a list of strings", param="prompt")
        preps, texts = [], []
        for p in prompts:
            if isinstance(p, list):  # token ids
                vocab = len(srv.token_bytes)
                if not p or any(not 0 <= t < vocab for t in p):
                    raise APIError(400, f"token-id prompts must be non-empty with ids in 0..{vocab - 1}", param="prompt")
                preps.append(await srv.prepare(Prepared(list(p), None, None, None, "speech")))
                texts.append(srv.model.tokenizer.decode(p))
            else:
                preps.append(await srv.prepare(p))
                texts.append(p)
        if adapter is not None:
            preps = [dataclasses.replace(p, adapter=adapter) for p in preps]
        streams: list[RequestStream] = []
        try:
            for prep in preps:
                streams += await srv.start(prep, srv.choice_params(prep, req, req.max_tokens, req.logprobs, req.n))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
        echo = [texts[i // req.n] if req.echo else "" for i in range(len(streams))]
        if req.stream:
            return _sse(_completion_stream(srv, streams, req, head, echo, t0), streams)
        choices = await srv.collect(streams, request, t0)
        out = [{"index": i, "text": echo[i] + c.text, "finish_reason": c.finish_reason,
                "logprobs": completion_logprobs(c.logprobs, srv.token_bytes, len(echo[i]))
                if req.logprobs is not None else None} for i, c in enumerate(choices)]
        n_prompt = sum(choices[k * req.n].prompt_tokens for k in range(len(preps)))
        return JSONResponse({**head, "choices": out, "usage": usage(n_prompt, sum(c.generated for c in choices))})

    async def _audio(task: str, request: Request, file: UploadFile, model: str, response_format: str,
                     language: str | None, prompt: str | None, temperature: float) -> Response:
        from phi4mm.inputs.audio import load_audio
        from phi4mm.tasks.transcribe import (
            FORMATS,
            Segment,
            format_segments,
            split_audio,
            transcription_prompt,
        )
        t0 = time.perf_counter()
        srv.check_model(model)
        if response_format not in FORMATS:
            raise APIError(400, f"response_format {response_format!r} is not supported; use one of "
                           f"{', '.join(FORMATS)}", param="response_format")
        data = await file.read()
        if not data:
            raise APIError(400, "the uploaded 'file' is empty; send an audio file (wav, flac, mp3, ogg)", param="file")
        wav = await asyncio.to_thread(load_audio, data)
        text_prompt = transcription_prompt(task, language, prompt)
        pieces = split_audio(wav, srv.segment_seconds)
        # Every segment goes to the engine at once: they decode side by side in the same batches.
        preps = await asyncio.gather(*(srv.prepare(text_prompt, audios=[(chunk, AUDIO_RATE)]) for _, _, chunk in pieces))
        params = SamplingParams(max_tokens=srv.transcription_max_tokens, temperature=temperature).validate()
        streams: list[RequestStream] = []
        try:
            for prep in preps:
                streams += await srv.start(prep, [params])
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        choices = await srv.collect(streams, request, t0)
        segments = [Segment(start, end, c.text.strip()) for (start, end, _), c in zip(pieces, choices)]
        body = format_segments(segments, response_format, language=language, duration=len(wav) / AUDIO_RATE,
                               task=task)
        if isinstance(body, str):
            media = {"srt": "application/x-subrip", "vtt": "text/vtt"}.get(response_format, "text/plain")
            return PlainTextResponse(body, media_type=media)
        return JSONResponse(body)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request, file: UploadFile = File(...), model: str = Form(...),
                             response_format: str = Form("json"), language: str | None = Form(None),
                             prompt: str | None = Form(None), temperature: float = Form(0.0)) -> Response:
        return await _audio("transcribe", request, file, model, response_format, language, prompt, temperature)

    @app.post("/v1/audio/translations")
    async def translations(request: Request, file: UploadFile = File(...), model: str = Form(...),
                           response_format: str = Form("json"), language: str | None = Form(None),
                           prompt: str | None = Form(None), temperature: float = Form(0.0)) -> Response:
        return await _audio("translate", request, file, model, response_format, language, prompt, temperature)

    return app


# ------------------------------------------------------------------------------------------------ streaming
class _SSEResponse(StreamingResponse):
    """Streams while listening for the client hanging up: a disconnect cancels the requests at once (whatever
    the ASGI version), instead of when the next token fails to send."""

    def __init__(self, body: AsyncIterator[str], streams: list[RequestStream]):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def run() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-send
                    tg.cancel_scope.cancel()
                tg.start_soon(run)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            for s in self._streams:
                s.cancel()  # a no-op for finished requests; frees the KV cache of the others now
            await self.body_iterator.aclose()


def _sse(body: AsyncIterator[str], streams: list[RequestStream]) -> Response:
    return _SSEResponse(body, streams)


async def _chat_stream(srv: _Server, streams: list[RequestStream], req: ChatRequest, head: dict,
                       offered: set[str] | None, t0: float) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    choices = [_Choice() for _ in streams]
    parsers = [ToolCallStreamParser(f"call_{head['id'][9:21]}_{i}_", offered) if offered is not None else None
               for i in range(len(streams))]
    n_calls = [0] * len(streams)
    want_lp = req.logprobs

    def chunk(i: int, delta: dict, reason: str | None = None, lp: list | None = None) -> str:
        logprobs = chat_logprobs(lp, srv.token_bytes) if want_lp and lp is not None else None
        return sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]})

    def deltas(i: int, events: list) -> list[dict]:
        out = []
        for ev in events:
            if isinstance(ev, ContentDelta):
                out.append({"content": ev.text})
            else:  # as OpenAI streams a call: id and name first, then the arguments
                n_calls[i] += 1
                out.append({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                            "function": {"name": ev.name, "arguments": ""}}]})
                out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.arguments}}]})
        return out

    for i in range(len(streams)):
        yield chunk(i, {"role": "assistant", "content": ""})
    try:
        async for i, out, new_lp in _absorbed(srv, streams, choices, t0):
            events = parsers[i].feed(out.text) if parsers[i] and out.text else (
                [ContentDelta(out.text)] if out.text else [])
            if out.finished and parsers[i]:
                events += parsers[i].finish()
            ds = deltas(i, events)
            for k, d in enumerate(ds):
                yield chunk(i, d, lp=new_lp if k == 0 else None)
            if not ds and new_lp:
                yield chunk(i, {"content": ""}, lp=new_lp)
            if out.finished:
                reason = "tool_calls" if n_calls[i] and out.finish_reason == "stop" else out.finish_reason
                yield chunk(i, {}, reason)
    except APIError as e:
        yield sse(e.body())
    else:
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage(choices[0].prompt_tokens,
                                                             sum(c.generated for c in choices))})
    yield "data: [DONE]\n\n"


async def _absorbed(srv: _Server, streams: list[RequestStream], choices: list[_Choice], t0: float
                    ) -> AsyncIterator[tuple[int, StepOutput, list]]:
    """(choice index, output, its new logprobs) for each engine output, once its choice has absorbed it.
    An APIError from absorbing (e.g. a stop the request cannot meet) ends the stream: the caller reports it."""
    async for i, out in merge(streams):
        c = choices[i]
        n_lp = len(c.logprobs)
        srv.absorb(c, out, t0)
        yield i, out, c.logprobs[n_lp:]


async def _completion_stream(srv: _Server, streams: list[RequestStream], req: CompletionRequest, head: dict,
                             echo: list[str], t0: float) -> AsyncIterator[str]:
    choices = [_Choice() for _ in streams]
    for i, e in enumerate(echo):
        if e:
            yield sse({**head, "choices": [{"index": i, "text": e, "logprobs": None, "finish_reason": None}]})
    try:
        async for i, out, new_lp in _absorbed(srv, streams, choices, t0):
            lp = completion_logprobs(new_lp, srv.token_bytes) if req.logprobs is not None else None
            if out.text or out.finished or lp:
                yield sse({**head, "choices": [{"index": i, "text": out.text, "logprobs": lp,
                                                "finish_reason": out.finish_reason if out.finished else None}]})
    except APIError as e:
        yield sse(e.body())
    else:
        if req.include_usage:
            n_prompt = sum(choices[k].prompt_tokens for k in range(0, len(choices), req.n))
            yield sse({**head, "choices": [], "usage": usage(n_prompt, sum(c.generated for c in choices))})
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------------ errors
def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> Response:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
        if first.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}); " \
                  "send a JSON object"
        else:
            where = ".".join(loc) or "body"
            msg = f"{where}: {first.get('msg', 'invalid value')} (got {str(first.get('input'))[:80]!r}); fix " \
                  "this field and retry"
        return JSONResponse(error_body(msg, param=".".join(loc) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error" if e.status_code < 500 else
                                       "server_error"), status_code=e.status_code)

    @app.exception_handler(EngineBusy)
    async def busy(_: Request, e: EngineBusy) -> Response:
        return JSONResponse(error_body(str(e), "rate_limit_error", code="engine_busy"), status_code=429,
                            headers={"Retry-After": "1"})

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, e: ValueError) -> Response:
        # phi4mm's input errors (ChatError, InputError, ImageError, AudioError, SamplingParams) say what to fix.
        return JSONResponse(error_body(str(e)), status_code=400)

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> Response:
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "cpu", dtype: str | None = None, max_batch: int = 64, max_waiting: int = 1024,
          allow_remote_media: bool = False, allow_local_files: bool = False, num_blocks: int | None = None,
          max_body_bytes: int = 64 << 20, model_name: str | None = None, merge_adapter: str | None = None) -> None:
    """Load the checkpoint and serve it until interrupted."""
    from pathlib import Path

    import uvicorn

    import phi4mm
    model = phi4mm.load(model_dir, device=device, dtype=dtype)
    engine = None
    if model.device.type == "cuda":
        # Compile the kernels and capture the first graphs now, not on the first user's request.
        engine = Engine(model, num_blocks=num_blocks, max_batch=max_batch, max_waiting=max_waiting,
                        merge_adapter=merge_adapter)
        print(f"engine warm-up: {engine.warmup():.1f} s", flush=True)
    app = create_app(model, engine, model_name=model_name or Path(model_dir).resolve().name, api_key=api_key,
                     num_blocks=num_blocks, max_batch=max_batch, max_waiting=max_waiting,
                     allow_remote_media=allow_remote_media, allow_local_files=allow_local_files,
                     max_body_bytes=max_body_bytes, merge_adapter=merge_adapter)
    uvicorn.run(app, host=host, port=port, log_level="info")
