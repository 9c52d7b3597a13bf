"""State shared by the routes: the model, the engine thread, the options and metrics; the per-request caps;
turning prompts into engine inputs; collecting a request's outputs.

Caps are checked from cheap measures (characters, counts, bytes) before anything is tokenized or decoded, so
one request cannot keep the tokenizer or the towers busy for minutes while others wait. Each refusal is a
400 that names the field, the limit and the flag that sets it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from phi4mm.api import Model
from phi4mm.engine.async_engine import AsyncEngine, RequestStream
from phi4mm.engine.engine import Engine, StepOutput
from phi4mm.engine.memory import IdleReclaimer
from phi4mm.inputs.audio import load_audio
from phi4mm.inputs.chat import Segment
from phi4mm.inputs.prepare import Prepared, prepare_segments
from phi4mm.options import ServeOptions
from phi4mm.sampling import SamplingParams
from phi4mm.serve.media import MediaPolicy
from phi4mm.serve.metrics import Metrics
from phi4mm.serve.schemas import APIError, ChatRequest, sampling_params

AUDIO_RATE = 16000  # the loaders resample everything to 16 kHz


@dataclass
class Choice:
    text: str = ""
    logprobs: list = field(default_factory=list)  # (token id, logprob, top [(id, lp)])
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generated: int = 0
    last_t: float | None = None  # when its last token arrived (inter-token latency)


def too_big(param: str, what: str, seen: float, limit: float, flag: str) -> APIError:
    return APIError(400, f"{param}: {what} is {seen:g}; this server's limit is {limit:g} ({flag}); send less",
                    param=param, code="request_too_large")


class Server:
    """One per app. `drain_expired` is set when a shutdown's drain deadline passes: open requests end then."""

    def __init__(self, model: Model, engine: Engine, model_name: str, aliases: list[str], policy: MediaPolicy,
                 options: ServeOptions, mm_limits: dict[str, int] | None = None):
        self.model, self.policy, self.model_name, self.options = model, policy, model_name, options
        # The served names, the Hugging Face id of the architecture, and the adapters' names (vLLM's habit).
        self.names = list(dict.fromkeys([model_name, *aliases, *model.hub_ids, *model.config.loras]))
        self.mm_limits = mm_limits or {}  # --limit-mm-per-prompt
        self.metrics = Metrics()
        self.metrics.free_blocks.set(engine.pool.num_free)  # before the first step too
        self.engine = AsyncEngine(engine, on_step=self.metrics.on_step,
                                  reclaimer=IdleReclaimer(options.reclaim_growth_bytes,
                                                          busy=lambda: self.metrics.http_in_flight > 0))
        self.context = model.config.text.max_position_embeddings
        self.max_model_len = engine.max_model_len  # prompt + reply of one request: what the KV pool holds
        self.stop_ids = set(model.tokenizer.eos_token_ids)
        self.token_bytes = model.tokenizer.token_bytes()
        self.media_ids = {model.config.image_token_id, model.config.audio_token_id}
        self.active: set[RequestStream] = set()
        self.drain_expired = False

    def check_model(self, name: str) -> str | None:
        """404 for a name not served here; else the adapter the name asks for (None: chosen by the media)."""
        if name not in self.names:
            raise APIError(404, f"model {name[:80]!r} is not served here; use one of: {', '.join(self.names)}",
                           param="model", code="model_not_found")
        return name if name in self.model.config.loras else None

    # ------------------------------------------------------------------ caps
    def check_chat(self, req: ChatRequest) -> None:
        o = self.options
        if len(req.messages) > o.max_messages:
            raise too_big("messages", "the number of messages", len(req.messages), o.max_messages, "--max-messages")
        if req.tools is not None and len(req.tools) > o.max_tools:
            raise too_big("tools", "the number of tools", len(req.tools), o.max_tools, "--max-tools")
        schema = (req.response_format or {}).get("json_schema")
        if schema is not None:
            size = len(json.dumps(schema, ensure_ascii=False))
            if size > o.max_schema_chars:
                raise too_big("response_format", "the json_schema's size in characters", size, o.max_schema_chars,
                              "--max-schema-chars")

    def check_prompt_chars(self, chars: int, param: str) -> None:
        if chars > self.options.max_prompt_chars:
            raise too_big(param, "the prompt's length in characters", chars, self.options.max_prompt_chars,
                          "--max-prompt-chars")

    def check_fanout(self, sequences: int) -> None:
        if sequences > self.options.max_sequences:
            raise too_big("n", "n x the number of prompts", sequences, self.options.max_sequences, "--max-sequences")

    def check_media_count(self, images: list, audios: list) -> None:
        if len(images) > self.options.max_images:
            raise too_big("messages", "the number of images", len(images), self.options.max_images, "--max-images")
        for kind, items in (("image", images), ("audio", audios)):  # --limit-mm-per-prompt
            most = self.mm_limits.get(kind)
            if most is not None and len(items) > most:
                raise APIError(400, f"this request carries {len(items)} {kind} item(s); this server takes at most "
                               f"{most} per prompt (--limit-mm-per-prompt {kind}={most})", param="messages",
                               code="too_many_media")

    def decode_audios(self, audios: list) -> list[tuple[Any, int]]:
        """Decode every clip (each at most the cap, so no clip is decoded far past it), then check the total."""
        cap = self.options.max_audio_seconds
        wavs = [load_audio(a, max_seconds=cap) for a in audios]
        total = sum(w.size for w in wavs) / AUDIO_RATE
        if total > cap:
            raise too_big("messages", "the audio's total length in seconds", round(total, 1), cap,
                          "--max-audio-seconds")
        return [(w, AUDIO_RATE) for w in wavs]

    # ------------------------------------------------------------------ inputs
    async def prepare(self, segments: list[Segment], images: list | None = None, audios: list | None = None,
                      param: str = "messages") -> Prepared:
        """Segments -> engine inputs off the event loop; refuses what the context cannot hold."""
        prep = await asyncio.to_thread(prepare_segments, segments, self.model.tokenizer, self.model.config,
                                       images or [], audios or [], self.options.max_transcription_seconds)
        return self.check_context(prep, param)

    def check_context(self, prep: Prepared, param: str) -> Prepared:
        if prep.num_tokens + 1 > self.context:
            raise APIError(400, f"the prompt has {prep.num_tokens} tokens; the context holds {self.context}: shorten "
                           "it (or send smaller media)", param=param, code="context_length_exceeded")
        return prep

    def token_prompt(self, ids: list[int]) -> Prepared:
        vocab = len(self.token_bytes)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"token-id prompts need ids in 0..{vocab - 1}", param="prompt")
        if self.media_ids.intersection(ids):
            raise APIError(400, "a token-id prompt may not hold the image/audio placeholder ids "
                           f"{sorted(self.media_ids)} (no media come with /v1/completions)", param="prompt")
        return self.check_context(Prepared(list(ids), None, None, None, "speech"), "prompt")

    def choice_params(self, prep: Prepared, req: Any, max_tokens: int | None, logprobs: int | None, n: int
                      ) -> list[SamplingParams]:
        """SamplingParams for the `n` choices of a chat/completion request. Fields the request leaves out take the
        checkpoint's generation_config.json defaults, as in the CLI and the Python API; no max_tokens: what
        remains of the context the engine can hold (None, resolved by the engine)."""
        defaults = self.model.sampling_defaults
        if max_tokens is None:
            max_tokens = self.options.default_max_tokens or defaults.get("max_tokens")
            if max_tokens is not None:
                max_tokens = min(max_tokens, self.context - prep.num_tokens)
        unset = {k: v for k, v in defaults.items() if k != "max_tokens" and getattr(req, k, None) is None}
        return [dataclasses.replace(sampling_params(req, max_tokens, logprobs, i), **unset) for i in range(n)]

    # ------------------------------------------------------------------ engine
    async def start(self, preps: list[Prepared], choices: list[list[SamplingParams]]) -> list[RequestStream]:
        """Submit each prompt once per choice; all or none (a failure cancels those already queued)."""
        streams: list[RequestStream] = []
        try:
            for prep, params_list in zip(preps, choices):
                for params in params_list:
                    streams.append(await self.engine.submit(prep, params=params))
        except ValueError as e:  # the engine's admission checks (e.g. more KV cache than it has): the request's
            for s in streams:
                s.cancel()
            raise APIError(400, str(e), code="request_not_admitted") from None
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        self.active.update(streams)
        for prep in preps:
            self.metrics.prompt_tokens.inc(prep.num_tokens)
        return streams

    def release(self, streams: list[RequestStream]) -> None:
        for s in streams:
            s.cancel()  # a no-op for finished requests; frees the KV cache of the others now
            self.active.discard(s)

    def expire_drain(self) -> None:
        """The drain deadline passed: end every open request (they answer with an error)."""
        self.drain_expired = True
        for s in list(self.active):
            s.cancel()

    def shutting_down(self) -> APIError:
        return APIError(503, "the server is shutting down; retry on another replica or after the restart",
                        type="server_error", code="shutting_down")

    async def collect(self, streams: list[RequestStream], request: Request, t0: float) -> list[Choice]:
        """Wait for every stream to finish; a client hanging up cancels them all at once (a watcher reads the
        connection's disconnect message while the engine works)."""
        choices = [Choice() for _ in streams]

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            for s in streams:
                s.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            for s, c in zip(streams, choices):
                while not s.finished:
                    out = await s.get()
                    self.absorb(c, out, t0)
            if watcher.done() and not watcher.cancelled():
                raise APIError(499, "the client closed the connection", code="client_closed")
        finally:
            watcher.cancel()
            self.release(streams)
        return choices

    def absorb(self, c: Choice, out: StepOutput, t0: float) -> None:
        if out.finish_reason == "cancelled" and self.drain_expired:
            raise self.shutting_down()
        if out.finish_reason == "error":
            raise APIError(500, "the engine failed on this request; it was not completed (the server goes on)",
                           type="server_error", code="engine_error")
        if out.token_id is not None:
            self.metrics.token(c, time.perf_counter(), t0)
        c.text += out.text
        if out.logprob is not None and out.token_id not in self.stop_ids:
            c.logprobs.append((out.token_id, out.logprob, out.top_logprobs))
        c.prompt_tokens, c.generated = out.num_prompt_tokens or c.prompt_tokens, out.num_generated or c.generated
        if out.finished:
            c.finish_reason = out.finish_reason
            self.metrics.generation_tokens.inc(c.generated)
