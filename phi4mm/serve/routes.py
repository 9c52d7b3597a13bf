"""The generation routes: chat completions, completions, audio transcriptions and translations.

Each route checks the request's caps from cheap measures first (counts, characters, bytes), then resolves
media and tokenizes on worker threads, then submits to the engine. Text a client wrote is plain text: a
`<|end|>` or `<|endoftext10|>` typed in a message is characters, not a special token (only the chat
template's own tokens and the placeholders of media parts are); /v1/completions reads its prompt the same
way unless the server runs with `--raw-completion-prompts` (the model-card prompt format, trusted clients).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

from fastapi import Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from phi4mm.engine.async_engine import RequestStream
from phi4mm.inputs.chat import flatten_content, render_segments
from phi4mm.inputs.prepare import Prepared
from phi4mm.inputs.tools import (
    ToolChoiceError,
    parse_tool_calls,
    tool_constraint,
    tool_names,
)
from phi4mm.sampling import SamplingParams
from phi4mm.serve.media import resolve_media
from phi4mm.serve.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    add_json_hint,
    chat_logprobs,
    completion_logprobs,
    find_unencodable,
    json_mode,
    repair_json,
    usage,
)
from phi4mm.serve.server import AUDIO_RATE, Server
from phi4mm.serve.streaming import SSEResponse, chat_stream, completion_stream
from phi4mm.serve.ui import ADAPTER_HEADER

CUE_SECONDS = 15.0  # longest transcription cue (subtitle-sized), whatever segment_seconds allows
MAX_FORM_TEXT = 4096  # the prompt / language fields of an audio upload
MAX_TEMPERATURE = 100.0


async def chat_completions(srv: Server, req: ChatRequest, request: Request) -> Response:
    t0 = time.perf_counter()
    adapter = srv.check_model(req.model)
    srv.check_chat(req)
    # tool_choice none / auto / required / a named function, enforced while decoding (inputs.tools).
    try:
        tools, constraint = tool_constraint(req.tools or None, req.tool_choice, srv.model.tokenizer)
    except ToolChoiceError as e:
        raise APIError(400, str(e), param="tool_choice") from None
    offered = set(tool_names(tools)) if tools and req.tool_choice != "none" else None
    jmode = json_mode(req)
    messages = add_json_hint(req.messages, req) if jmode else req.messages
    segments = render_segments(messages, tools)  # rendering is cheap: no tokenizing, no media decoding
    srv.check_prompt_chars(sum(len(text) for text, markup in segments if not markup), "messages")
    _, images, audios = flatten_content(messages)
    srv.check_media_count(images, audios)
    images = [await resolve_visual(p, i, srv) for i, p in enumerate(images)]
    audios = [await resolve_media(p, "audio", f"audio {i + 1}", srv.policy) for i, p in enumerate(audios)]
    if audios:
        audios = await asyncio.to_thread(srv.decode_audios, audios)
    prep = await srv.prepare(segments, images, audios)
    if adapter is not None:  # the client named an adapter as the model
        prep = dataclasses.replace(prep, adapter=adapter)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = srv.choice_params(prep, req, req.max_completion_tokens or req.max_tokens, logprobs, req.n)
    for p in params:
        p.constraint = constraint
    streams = await srv.start([prep], [params])
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "chat.completion", "created": created, "model": req.model}
    which = {ADAPTER_HEADER: prep.adapter or "none"}  # a header: OpenAI clients ignore it
    if req.stream:
        return SSEResponse(chat_stream(srv, streams, req, head, offered, t0), streams, srv, which)
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
                         "usage": usage(choices[0].prompt_tokens, sum(c.generated for c in choices))}, headers=which)


async def completions(srv: Server, req: CompletionRequest, request: Request) -> Response:
    t0 = time.perf_counter()
    adapter = srv.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by this model; leave it out",
                       param="suffix")
    prompts = req.prompts()
    srv.check_fanout(len(prompts) * req.n)
    srv.check_prompt_chars(sum(len(p) for p in prompts if isinstance(p, str)), "prompt")
    raw = srv.options.raw_completion_prompts
    preps: list[Prepared] = []
    texts: list[str] = []
    for p in prompts:
        if isinstance(p, list):  # token ids: the client picks every token, special ones included
            preps.append(srv.token_prompt(p))
            texts.append(srv.model.tokenizer.decode(p))
        else:
            preps.append(await srv.prepare([(p, raw)], param="prompt"))
            texts.append(p)
    if adapter is not None:  # the client named an adapter as the model
        preps = [dataclasses.replace(p, adapter=adapter) for p in preps]
    params = [srv.choice_params(prep, req, req.max_tokens, req.logprobs, req.n) for prep in preps]
    streams = await srv.start(preps, params)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
    echo = [texts[i // req.n] if req.echo else "" for i in range(len(streams))]
    if req.stream:
        return SSEResponse(completion_stream(srv, streams, req, head, echo, t0), streams, srv)
    choices = await srv.collect(streams, request, t0)
    out = [{"index": i, "text": echo[i] + c.text, "finish_reason": c.finish_reason,
            "logprobs": completion_logprobs(c.logprobs, srv.token_bytes, len(echo[i]))
            if req.logprobs is not None else None} for i, c in enumerate(choices)]
    n_prompt = sum(choices[k * req.n].prompt_tokens for k in range(len(preps)))
    return JSONResponse({**head, "choices": out, "usage": usage(n_prompt, sum(c.generated for c in choices))})


def _check_form(language: str | None, prompt: str | None, temperature: float) -> None:
    for name, value in (("language", language), ("prompt", prompt)):
        if value is not None and len(value) > MAX_FORM_TEXT:
            raise APIError(400, f"{name} has {len(value)} characters; at most {MAX_FORM_TEXT}", param=name)
        if value is not None and find_unencodable(value, name):
            raise APIError(400, f"{name} is not valid Unicode text; send UTF-8 text", param=name)
    if not 0.0 <= temperature <= MAX_TEMPERATURE:  # also false for NaN
        raise APIError(400, f"temperature must be in 0..{MAX_TEMPERATURE:g}; got {temperature}", param="temperature")


async def audio_task(srv: Server, task: str, request: Request, file: UploadFile, model: str, response_format: str,
                     language: str | None, prompt: str | None, temperature: float) -> Response:
    from phi4mm.tasks.transcribe import (
        FORMATS,
        Segment,
        format_segments,
        speech_cues,
        transcription_prompt,
    )
    t0 = time.perf_counter()
    srv.check_model(model)
    if response_format not in FORMATS:
        raise APIError(400, f"response_format {response_format[:40]!r} is not supported; use one of "
                       f"{', '.join(FORMATS)}", param="response_format")
    _check_form(language, prompt, temperature)
    if not hasattr(file, "read"):
        raise APIError(400, "'file' must be an uploaded file (multipart/form-data)", param="file")
    data = await file.read()
    if not data:
        raise APIError(400, "the uploaded 'file' is empty (0 bytes); send an audio file (wav, flac, mp3, ogg, "
                       "m4a, webm, ...)", param="file")
    try:
        text_prompt = transcription_prompt(task, language, prompt)
    except ValueError as e:  # a special token in the prompt: its message says so
        raise APIError(400, str(e), param="prompt") from None
    # Voice-activity cues (sentence-sized, no longer than segment_seconds) decode side by side.
    cues, duration = await asyncio.to_thread(speech_cues, data, min(srv.options.segment_seconds, CUE_SECONDS))
    if duration > srv.options.max_transcription_seconds:
        raise APIError(400, f"file: the audio lasts {duration:.0f} s; this server transcribes at most "
                       f"{srv.options.max_transcription_seconds:g} s per upload (--max-transcription-seconds)",
                       param="file", code="request_too_large")
    preps = await asyncio.gather(*(srv.prepare([(text_prompt, True)], [], [(c.samples, AUDIO_RATE)], param="file")
                                   for c in cues))
    params = SamplingParams(max_tokens=srv.options.transcription_max_tokens, temperature=temperature,
                            logprobs=0).validate()
    streams: list[RequestStream] = await srv.start(list(preps), [[params]] * len(preps)) if preps else []
    choices = await srv.collect(streams, request, t0) if streams else []
    segments = [Segment(c.start, c.end, ch.text.strip(), [t for t, _, _ in ch.logprobs],
                        round(sum(lp for _, lp, _ in ch.logprobs) / max(len(ch.logprobs), 1), 4),
                        c.no_speech_prob) for c, ch in zip(cues, choices)]
    body = format_segments(segments, response_format, language=language, duration=duration, task=task)
    if isinstance(body, str):
        media = {"srt": "application/x-subrip", "vtt": "text/vtt"}.get(response_format, "text/plain")
        return PlainTextResponse(body, media_type=media)
    return JSONResponse(body)


async def resolve_visual(payload: Any, i: int, srv: Server) -> Any:
    """An image payload, or a video's {"video": url, options}: the url goes through the same media policy."""
    if isinstance(payload, dict) and "video" in payload:  # a video_url part (inputs/chat.py)
        return {**payload, "video": await resolve_media(payload["video"], "video", f"video (image {i + 1})",
                                                        srv.policy)}
    return await resolve_media(payload, "image", f"image {i + 1}", srv.policy)
