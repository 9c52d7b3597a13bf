"""OpenAI wire format for the server: request models, the error object, media resolution, response pieces.

Requests are pydantic models that ignore fields we do not use (clients send `user`, `store`, `metadata`...);
every field we do use is typed, so a wrong type is a 400 naming the field. Message contents are validated by
`chat.flatten_content` (roles, part types), whose ChatError is a 400 too.

Every number has bounds and every string and list a length cap, so no value can overflow the engine's
64-bit fields or make the server spend minutes on one field; a string the UTF-8 codec cannot write (a lone
surrogate such as "\\ud800", which JSON allows) is refused with its location. Media resolution is in `media.py`.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from phi4mm.sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 16
MAX_INT_FIELD = 1 << 24  # token counts, top_k: far above any context or vocabulary, far below int64
MAX_SEED = (1 << 63) - 1 - MAX_N  # choice i of a seeded request uses seed + i, still an int64
MAX_NAME_CHARS = 256
MAX_STOP = 16
MAX_STOP_CHARS = 1024
MAX_PROMPTS = 1024  # a /v1/completions prompt list (the fan-out cap, n x prompts, is the server's option)
MAX_LIST_ITEMS = 100_000  # a hard ceiling for any list; the server's own caps are lower and say which flag
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
    # A message may quote the client's input: keep it writable as UTF-8 whatever it holds (lone surrogates).
    return {"error": {"message": writable(message), "type": type, "param": None if param is None else writable(param),
                      "code": code}}


def writable(text: str) -> str:
    """`text` with anything UTF-8 cannot encode replaced by U+FFFD."""
    return text.encode("utf-8", "replace").decode("utf-8")


def find_unencodable(value: Any, where: str, depth: int = 0) -> str | None:
    """The location of the first string (key or value) inside `value` that is not valid Unicode, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if depth > 64:  # pydantic refuses deeper JSON anyway; never recurse without end
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and find_unencodable(k, where, depth + 1):
                return f"{where}.{writable(k)[:40]}"
            bad = find_unencodable(v, f"{where}.{writable(str(k))[:40]}", depth + 1)
            if bad:
                return bad
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = find_unencodable(v, f"{where}[{i}]", depth + 1)
            if bad:
                return bad
    return None


# ------------------------------------------------------------------------------------------------ requests
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(max_length=MAX_NAME_CHARS)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT_FIELD)
    temperature: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    seed: int | None = Field(None, ge=-(1 << 63), le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    # vLLM's extra sampling fields, for clients that send them (top_k -1 is vLLM's "off", as 0)
    top_k: int | None = Field(None, ge=-1, le=MAX_INT_FIELD)
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0, le=MAX_INT_FIELD)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _valid_text(self) -> _Request:
        if isinstance(self.stop, str) and len(self.stop) > MAX_STOP_CHARS or isinstance(self.stop, list) and any(
                len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop: each stop string may have at most {MAX_STOP_CHARS} characters")
        for name in type(self).model_fields:
            bad = find_unencodable(getattr(self, name), name)
            if bad:
                raise ValueError(f"{bad} holds a string that is not valid Unicode (a lone surrogate such as "
                                 "\\ud800); send valid UTF-8 text")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_LIST_ITEMS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT_FIELD)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_LIST_ITEMS)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=MAX_INT_FIELD)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = Field(None, max_length=MAX_STOP_CHARS)

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (a string or a list of token ids each); empty ones refused."""
        p = self.prompt
        prompts = p if isinstance(p, list) and p and not isinstance(p[0], int) else [p]
        if not prompts:
            raise APIError(400, "prompt is an empty list; send a string or a list of strings", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"prompt is a list of {len(prompts)} prompts; at most {MAX_PROMPTS} per request",
                           param="prompt")
        for i, one in enumerate(prompts):
            if len(one) == 0:
                raise APIError(400, f"prompt[{i}] is empty; send some text (or token ids)" if len(prompts) > 1
                               else "prompt is empty; send some text (or token ids)", param="prompt")
        return prompts


def sampling_params(req: _Request, max_tokens: int | None, logprobs: int | None, choice: int) -> SamplingParams:
    """The engine's SamplingParams for choice `choice` of `req` (seeded choices get seed + choice)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({req.min_tokens}) is larger than max_tokens ({max_tokens}); lower "
                       "min_tokens or raise max_tokens", param="min_tokens")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0), min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, seed=None if req.seed is None else req.seed + choice,
            stop=stop, logprobs=logprobs, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos).validate()
    except ValueError as e:  # SamplingParams says which field and what range
        field = str(e).removeprefix("SamplingParams.").split("=", 1)[0]
        raise APIError(400, str(e).removeprefix("SamplingParams."), param=field) from None


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
        fn = req.tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                           "'function': {'name': NAME}}", param="tool_choice")
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
    if kind == "json_schema" and rf.get("json_schema") is not None and not isinstance(rf.get("json_schema"), dict):
        raise APIError(400, "response_format.json_schema must be an object {'name': ..., 'schema': {...}}",
                       param="response_format")
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
    if out and out[0].get("role") in ("system", "developer") and isinstance(out[0].get("content"), str):
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
