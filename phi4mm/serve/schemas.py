"""OpenAI wire format for the server: request models, the error object, media resolution, response pieces.

Requests are pydantic models that ignore fields we do not use (clients send `user`, `store`, `metadata`...);
every field we do use is typed, so a wrong type is a 400 naming the field. Message contents are validated by
`chat.flatten_content` (roles, part types), whose ChatError is a 400 too.

Media. The processors accept file paths, so nothing a client sends may reach them as a path: every payload
is turned into bytes (or a `data:` URL, which the loaders decode without touching the filesystem) here.
http(s) URLs are fetched only with `allow_remote_media`, local files (`file://` or a plain path) read only
with `allow_local_files`; both are off by default.
"""
from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from phi4mm.sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 16
REMOTE_TIMEOUT_S = 15.0
JSON_HINT = ("Respond with one valid JSON object and nothing else: no prose, no code fences.")


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}` object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ------------------------------------------------------------------------------------------------ requests
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's extra sampling fields, for clients that send them
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None


def sampling_params(req: _Request, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
    """The engine's SamplingParams for choice `choice` of `req` (seeded choices get seed + choice)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, seed=None if req.seed is None else req.seed + choice,
        stop=stop, logprobs=logprobs, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos).validate()


# ------------------------------------------------------------------------------------------------ tools / JSON
def select_tools(req: ChatRequest) -> tuple[list[dict] | None, bool]:
    """(tools to put in the prompt, whether to parse tool calls out of the output).

    tool_choice "none": tools stay described but output is plain content; a named function: only that tool is
    offered. "required" cannot be enforced without constrained decoding; it is treated as "auto".
    """
    tools = req.tools or None
    if tools is None:
        if isinstance(req.tool_choice, dict) or req.tool_choice == "required":
            raise APIError(400, "tool_choice asks for a tool call but no tools were given; add 'tools'",
                           param="tool_choice")
        return None, False
    if req.tool_choice == "none":
        return tools, False
    if isinstance(req.tool_choice, dict):
        name = (req.tool_choice.get("function") or {}).get("name")
        picked = [t for t in tools if (t.get("function") or t).get("name") == name]
        if not picked:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in 'tools'", param="tool_choice")
        tools = picked
    return tools, True


def json_mode(req: ChatRequest) -> bool:
    """response_format: "text" (default), "json_object", or "json_schema" (the schema goes into the hint)."""
    rf = req.response_format
    if rf is None:
        return False
    kind = rf.get("type")
    if kind == "text":
        return False
    if kind not in ("json_object", "json_schema"):
        raise APIError(400, f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
                       "'json_schema'", param="response_format")
    return True


def add_json_hint(messages: list[dict], req: ChatRequest) -> list[dict]:
    """A system instruction asking for JSON (the schema, when one is given). Not constrained decoding."""
    hint = JSON_HINT
    schema = (req.response_format or {}).get("json_schema")
    if isinstance(schema, dict) and "schema" in schema:
        hint += " It must match this JSON schema: " + json.dumps(schema["schema"], ensure_ascii=False)
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0]["content"] = (out[0]["content"] + "\n" + hint).strip()
    else:
        out.insert(0, {"role": "system", "content": hint})
    return out


def repair_json(text: str) -> str:
    """The text if it is a JSON object; else the first balanced {...} inside it that parses; else the text.

    Best effort only (the model was asked for JSON, not forced): the raw text is kept rather than lost.
    """
    s = text.strip()
    if s.startswith("```"):
        s = s.strip("`").removeprefix("json").strip()
    try:
        if isinstance(json.loads(s), dict):
            return s
    except json.JSONDecodeError:
        pass
    dec = json.JSONDecoder()
    for i, c in enumerate(s):
        if c == "{":
            try:
                obj, end = dec.raw_decode(s, i)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return s[i:end]
    return text


# ------------------------------------------------------------------------------------------------ media
class MediaPolicy(BaseModel):
    allow_remote_media: bool = False
    allow_local_files: bool = False
    max_bytes: int = 64 << 20


async def resolve_media(payload: Any, kind: str, where: str, policy: MediaPolicy) -> Any:
    """A content part's payload -> bytes or a data: URL, never something the loaders would read as a path."""
    if kind == "audio" and isinstance(payload, dict):  # OpenAI input_audio {"data": base64, "format": ...}
        data = payload.get("data")
        if not isinstance(data, str):
            raise APIError(400, f"{where}: input_audio needs a base64 'data' string, e.g. "
                           "{'data': '<base64 wav>', 'format': 'wav'}", param=where)
        if data.startswith("data:"):
            return data
        return _b64(data, where)
    if not isinstance(payload, str):
        raise APIError(400, f"{where}: the {kind} must be a URL string (data:, or http(s)/file where this server "
                       f"allows them), got {type(payload).__name__}", param=where)
    if payload.startswith("data:"):
        return payload
    if payload.startswith(("http://", "https://")):
        if not policy.allow_remote_media:
            raise APIError(400, f"{where}: this server does not fetch http(s) URLs; send the {kind} inline as a "
                           f"data URL (data:<mime>;base64,...), or start the server with --allow-remote-media",
                           param=where, code="remote_media_disabled")
        return await _fetch(payload, where, policy.max_bytes)
    if not policy.allow_local_files:
        raise APIError(400, f"{where}: {kind} {payload[:60]!r} is not a data: URL; send the {kind} inline as "
                       "data:<mime>;base64,... (local files are read only with --allow-local-files)", param=where)
    path = Path(payload.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise APIError(400, f"{where}: local file {str(path)[:80]!r} does not exist", param=where)
    return path.read_bytes()


def _b64(data: str, where: str) -> bytes:
    compact = "".join(data.split())
    compact += "=" * (-len(compact) % 4)
    try:
        raw = base64.b64decode(compact.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not raw:
        raise APIError(400, f"{where}: input_audio 'data' is not valid base64; send base64 of the audio file's "
                       "bytes (wav, flac, mp3, ogg)", param=where, code="invalid_base64")
    return raw


async def _fetch(url: str, where: str, max_bytes: int) -> bytes:
    import httpx
    try:
        async with httpx.AsyncClient(timeout=REMOTE_TIMEOUT_S, follow_redirects=True) as client:
            async with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise APIError(400, f"{where}: fetching {url[:80]} gave HTTP {r.status_code}", param=where)
                data = bytearray()
                async for chunk in r.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise APIError(413, f"{where}: {url[:80]} is over {max_bytes} bytes", param=where)
                return bytes(data)
    except httpx.HTTPError as e:
        raise APIError(400, f"{where}: could not fetch {url[:80]} ({type(e).__name__}: {e})", param=where) from None


# ------------------------------------------------------------------------------------------------ responses
def chat_logprobs(items: list[tuple[int, float, list | None]], token_bytes: list[bytes]) -> dict[str, Any]:
    """OpenAI chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def entry(tok: int, lp: float) -> dict[str, Any]:
        b = token_bytes[tok] if 0 <= tok < len(token_bytes) else b""
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, l) for i, l in (top or [])]}
                        for t, lp, top in items]}


def completion_logprobs(items: list[tuple[int, float, list | None]], token_bytes: list[bytes],
                        offset: int = 0) -> dict[str, Any]:
    """OpenAI legacy completions `logprobs`: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    toks = [token_bytes[t].decode("utf-8", errors="replace") for t, _, _ in items]
    offsets, pos = [], offset
    for s in toks:
        offsets.append(pos)
        pos += len(s)
    tops = [{token_bytes[i].decode("utf-8", errors="replace"): l for i, l in (top or [])} for _, _, top in items]
    return {"tokens": toks, "token_logprobs": [lp for _, lp, _ in items], "top_logprobs": tops,
            "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
