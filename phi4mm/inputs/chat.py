"""Chat prompts: OpenAI-style messages -> the exact prompt string of Phi-4's official chat template.

The official template (the published tokenizer_config.json's) is tiny, so we render it in plain Python instead of
pulling in jinja; tests check byte equality with jinja2 and with transformers' `apply_chat_template`:

    <|system|>SYS<|tool|>[tools json]<|/tool|><|end|><|user|>Q<|end|><|assistant|>A<|end|>...<|assistant|>

Choices the template leaves open (documented here because the model card does not):
- `tools=[...]` goes into the system turn as `<|tool|>JSON<|/tool|>`. With no system message we add an empty
  one first (`<|system|><|tool|>[...]<|/tool|><|end|>`): the template only places tools in a system turn, and
  an empty system prompt changes nothing else. OpenAI wrappers `{"type": "function", "function": {...}}` are
  unwrapped to the flat `{"name", "description", "parameters"}` objects the model card shows.
- JSON is written with `json.dumps(..., ensure_ascii=False)`: the default separators match the model card's
  examples; raw non-ASCII text costs fewer tokens than `\\uXXXX` escapes.
- An assistant message's OpenAI `tool_calls` are appended to its content as
  `<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>`, the format the model emits.
- Tool results (role "tool") render as `<|tool|>RESULT<|end|>`: that is what the official template produces
  for that role; `<|tool_response|>` is never used by it.
- Images and audio become `<|image_N|>` / `<|audio_N|>` placeholders, numbered from 1 in order of appearance
  across the whole conversation (the original processor matches them in order and ignores N).
- A video (`video_url` / `video` part) takes one image number here; `prepare` expands it into its frames.
- The "developer" role (newer OpenAI clients send it for instructions) renders as "system".
- `render_segments` gives the same prompt in pieces, telling the template's own text (role tokens, `<|end|>`,
  media placeholders) from what the client wrote (message text, tool JSON), so a tokenizer can keep the
  client's `<|assistant|>` or `<|endoftext10|>` plain text instead of special tokens.
"""
from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}
EOS_TOKEN = "<|endoftext|>"

# Part types that carry an image / audio, and where each keeps its payload. The payload is handed on
# untouched: decoding URLs, base64 and files is the processor's job.
_IMAGE_PARTS = {"image_url": "image_url", "image": "image"}
_AUDIO_PARTS = {"input_audio": "input_audio", "audio": "audio", "audio_url": "audio_url"}
# A video is a series of images: it joins the images as a {"video": payload, options...} dict (inputs/video.py),
# expanded into frames when the prompt is prepared. Options ride in the part's video_url object (vLLM's
# spelling) or next to "video": fps, max_frames, max_image_tokens, use_audio.
_VIDEO_PARTS = {"video_url": "video_url", "video": "video"}
_VIDEO_OPTIONS = ("fps", "max_frames", "max_image_tokens", "use_audio")


class ChatError(ValueError):
    """A message list that cannot be rendered; the message says which message and what to fix."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _payload(part: dict[str, Any], key: str, where: str) -> Any:
    if key in part:
        value = part[key]
        # {"image_url": {"url": ...}} and {"audio_url": {"url": ...}}: the url string is the payload.
        if key in ("image_url", "audio_url", "video_url") and isinstance(value, dict):
            if "url" not in value:
                raise ChatError(f"{where}: {key!r} needs a 'url' field, e.g. {{'{key}': {{'url': 'https://...'}}}}")
            return value["url"]
        return value
    # transformers-style parts: {"type": "image", "url"/"path"/"base64": ...}
    for alt in ("url", "path", "base64"):
        if alt in part:
            return part[alt]
    raise ChatError(f"{where}: a {part.get('type')!r} part needs a {key!r} field holding the data")


def flatten_content(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any], list[Any]]:
    """Replace list-of-parts contents by strings with media placeholders.

    Returns (messages with str content, image payloads, audio payloads). Placeholders are numbered globally
    in order of appearance: the k-th image anywhere in the conversation becomes `<|image_k|>`. Messages are
    shallow-copied; other keys (tool_calls, name, tools...) are kept.
    """
    out, _, images, audios = _flatten(messages)
    return out, images, audios


Segment = tuple[str, bool]  # (text, is_markup): markup is the template's own text, the rest the client's


def _flatten(messages: list[dict[str, Any]]
             ) -> tuple[list[dict[str, Any]], list[list[Segment]], list[Any], list[Any]]:
    """flatten_content, plus each message's content as segments (placeholders are markup)."""
    if not isinstance(messages, list):
        raise ChatError(f"messages must be a list of dicts, got {type(messages).__name__}")
    images: list[Any] = []
    audios: list[Any] = []
    out: list[dict[str, Any]] = []
    segments: list[list[Segment]] = []
    for m, msg in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(msg, dict):
            raise ChatError(f"{where} must be a dict with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise ChatError(f"{where} has role {repr(role)[:40]}; Phi-4 knows only {ROLES} (and 'developer', "
                            "read as 'system')")
        content = msg.get("content")
        segs: list[Segment] = []
        if isinstance(content, list):
            pieces: list[str] = []
            for p, part in enumerate(content):
                pwhere = f"{where}.content[{p}]"
                if isinstance(part, str):  # a bare string part is plain text
                    pieces.append(part)
                    segs.append((part, False))
                    continue
                if not isinstance(part, dict) or "type" not in part:
                    raise ChatError(f"{pwhere} must be a dict with a 'type' field, got {part!r:.80}")
                kind = part["type"]
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise ChatError(f"{pwhere}: a 'text' part needs a str 'text' field, got {text!r:.80}")
                    pieces.append(text)
                    segs.append((text, False))
                elif kind in _IMAGE_PARTS:
                    images.append(_payload(part, _IMAGE_PARTS[kind], pwhere))
                    pieces.append(f"<|image_{len(images)}|>")
                    segs.append((pieces[-1], True))
                elif kind in _VIDEO_PARTS:
                    holder = part.get(_VIDEO_PARTS[kind])
                    opts = {k: v for k, v in (holder if isinstance(holder, dict) else part).items()
                            if k in _VIDEO_OPTIONS}
                    images.append({"video": _payload(part, _VIDEO_PARTS[kind], pwhere), **opts})
                    pieces.append(f"<|image_{len(images)}|>")
                    segs.append((pieces[-1], True))
                elif kind in _AUDIO_PARTS:
                    audios.append(_payload(part, _AUDIO_PARTS[kind], pwhere))
                    pieces.append(f"<|audio_{len(audios)}|>")
                    segs.append((pieces[-1], True))
                else:
                    raise ChatError(f"{pwhere} has unknown type {str(kind)[:40]!r}; use one of 'text', "
                                    f"{', '.join(repr(k) for k in [*_IMAGE_PARTS, *_AUDIO_PARTS, *_VIDEO_PARTS])}")
            content = "".join(pieces)
        elif content is None:
            # OpenAI sends content None on assistant turns that only call tools.
            if role != "assistant":
                raise ChatError(f"{where} ({role}) has no content; give a str or a list of parts")
        elif not isinstance(content, str):
            raise ChatError(f"{where}.content must be a str or a list of parts, got {type(content).__name__}")
        else:
            segs.append((content, False))
        out.append({**msg, "role": role, "content": content})
        segments.append(segs)
    return out, segments, images, audios


def _tool_spec(tool: Any, i: int) -> Any:
    if not isinstance(tool, dict):
        raise ChatError(f"tools[{i}] must be a dict describing a function, got {type(tool).__name__}")
    if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        return tool["function"]
    return tool


def _render_tool_calls(calls: Any, where: str) -> list[Segment]:
    if not isinstance(calls, list):
        raise ChatError(f"{where}.tool_calls must be a list, got {type(calls).__name__}")
    rendered = []
    for c, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatError(f"{where}.tool_calls[{c}] needs a function name: "
                            "{'type': 'function', 'function': {'name': ..., 'arguments': '{...}'}}")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends arguments as a JSON string; the model writes an object
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass  # keep the string; better a faithful odd prompt than a refusal
        rendered.append({"name": fn["name"], "arguments": args})
    return [("<|tool_call|>", True), (_dumps(rendered), False), ("<|/tool_call|>", True)]


def render_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                  add_generation_prompt: bool = True, eos_token: str = EOS_TOKEN) -> str:
    """The official chat template's output for `messages`, byte for byte (see the module docstring).

    List-of-parts contents are flattened with `flatten_content` (use it directly to get the media).
    """
    return "".join(text for text, _ in render_segments(messages, tools, add_generation_prompt, eos_token))


def render_segments(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, eos_token: str = EOS_TOKEN) -> list[Segment]:
    """`render_prompt`'s text as (piece, is_markup) segments; markup pieces are the template's tokens and the
    media placeholders, the others are text the client wrote."""
    msgs, segs, _, _ = _flatten(messages)
    if tools is not None:
        if not isinstance(tools, list):
            raise ChatError(f"tools must be a list of function descriptions, got {type(tools).__name__}")
        spec = _dumps([_tool_spec(t, i) for i, t in enumerate(tools)])
        sys_at = next((i for i, m in enumerate(msgs) if m["role"] == "system"), None)
        if sys_at is None:
            msgs.insert(0, {"role": "system", "content": "", "tools": spec})
            segs.insert(0, [])
        elif msgs[sys_at].get("tools") is not None:
            raise ChatError("tools were given both as render_prompt(tools=...) and in the system message; "
                            "pass them once")
        else:
            msgs[sys_at] = {**msgs[sys_at], "tools": spec}
    parts: list[Segment] = []
    for m, msg in enumerate(msgs):
        role = msg["role"]
        parts += [(f"<|{role}|>", True), *segs[m]]
        if role == "assistant" and msg.get("tool_calls"):
            parts += _render_tool_calls(msg["tool_calls"], f"messages[{m}]")
        msg_tools = msg.get("tools")
        if role == "system" and msg_tools is not None:
            if isinstance(msg_tools, list):  # the template concatenates a string; accept a list too
                msg_tools = _dumps([_tool_spec(t, i) for i, t in enumerate(msg_tools)])
            elif not isinstance(msg_tools, str):
                raise ChatError(f"messages[{m}].tools must be a list of function descriptions (or their JSON "
                                f"text), got {type(msg_tools).__name__}")
            parts += [("<|tool|>", True), (msg_tools, False), ("<|/tool|><|end|>", True)]
        else:
            parts.append(("<|end|>", True))
    parts.append(("<|assistant|>" if add_generation_prompt else eos_token, True))
    return parts


def prepare_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                     add_generation_prompt: bool = True) -> tuple[str, list[Any], list[Any]]:
    """(prompt, images, audios): the rendered prompt with placeholders and the media in placeholder order."""
    flat, images, audios = flatten_content(messages)
    return render_prompt(flat, tools, add_generation_prompt), images, audios
