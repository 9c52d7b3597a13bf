"""Tool-call output parsing, whole-text and streaming.

Phi-4 writes calls as `<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>`, but in
practice the closing tag is often missing, parallel calls are sometimes separate objects instead of a list,
and some fine-tunes say `parameters` instead of `arguments`. We accept all of these. Anything we cannot read
(malformed JSON, an object without a name) stays in the content, so no model output is ever lost.

One state machine serves both entry points: `parse_tool_calls(text)` is the streaming parser fed the whole
text at once. The parser decides something only when no further text could change the decision (a JSON
value is read once its closing bracket arrives; content is released once it cannot begin `<|tool_call|>`),
so any chunking of the stream gives the same result as the whole text.

A parser given the offered tools' names (`offered`) never returns a call to any other name: such a block stays
content. `tool_constraint` turns OpenAI's `tool_choice` into a decoding constraint (sampling.TokenConstraint).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

from phi4mm.sampling import TokenConstraint

OPEN = "<|tool_call|>"
CLOSE = "<|/tool_call|>"
_WS = " \t\r\n"


@dataclass(frozen=True)
class ToolCall:
    """One function call. `arguments` is a JSON string, as in OpenAI's API."""
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ContentDelta:
    """Text for the visible answer."""
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A complete call, in OpenAI's streaming shape (`index` counts calls within the response)."""
    index: int
    id: str
    name: str
    arguments: str


Event = Union[ContentDelta, ToolCallDelta]


def _as_calls(value: Any) -> list[tuple[str | None, str, str]] | None:
    """A decoded JSON value -> [(id or None, name, arguments JSON)], or None if it is not a call (list)."""
    objs = value if isinstance(value, list) else [value]
    if not objs:
        return None
    calls = []
    for obj in objs:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        # A string is taken to already be JSON text (OpenAI style); objects/arrays are serialised.
        arg_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        call_id = obj.get("id") if isinstance(obj.get("id"), str) else None
        calls.append((call_id, obj["name"], arg_text))
    return calls


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _partial_tag_at_end(s: str, i: int) -> bool:
    """Is s[i:] a non-empty proper prefix of one of the tags (so more text might complete it)?"""
    rest = s[i:]
    return any(len(rest) < len(tag) and tag.startswith(rest) for tag in (OPEN, CLOSE)) and rest != ""


class _ValueScanner:
    """Finds where a JSON object/array ends, resuming where it stopped as more text arrives.

    Tracks bracket depth outside strings. A tag outside a string means the model gave up on the JSON.
    """

    def __init__(self, start: int) -> None:
        self.start = start
        self.pos = start
        self.depth = 0
        self.in_str = False
        self.escape = False

    def scan(self, s: str, final: bool) -> int | None | bool:
        """End index (exclusive) once closed; None if more text is needed; False if malformed."""
        i = self.pos
        while i < len(s):
            c = s[i]
            if self.in_str:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_str = False
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.pos = i + 1
                    return i + 1
            elif c == "<":
                if s.startswith(OPEN, i) or s.startswith(CLOSE, i):
                    return False
                if _partial_tag_at_end(s, i) and not final:
                    self.pos = i  # resume here: the tag test needs the next characters
                    return None
            i += 1
        self.pos = i
        return False if final else None


class ToolCallStreamParser:
    """Feed decoded text deltas (any size, e.g. one token's text); get content and tool-call events.

    Content is released at once unless it could be the start of `<|tool_call|>`; a call is released when
    its JSON object closes. The calls of a list `[{...}, {...}]` are released together when the list closes:
    the whole-text parse accepts or rejects a list as one value, and the stream must agree with it. Call ids are `f"{id_prefix}{index}"` unless the model wrote an "id";
    give each response its own prefix when ids must be unique across responses.
    """

    def __init__(self, id_prefix: str = "call_", offered: set[str] | None = None) -> None:
        self._id_prefix = id_prefix
        self._offered = offered
        self._buf = ""
        self._mode = "content"  # content | first | after
        self._scanner: _ValueScanner | None = None
        self._n_calls = 0
        self._done = False

    def feed(self, delta: str) -> list[Event]:
        if self._done:
            raise RuntimeError("ToolCallStreamParser.feed after finish(); make a new parser per response")
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> list[Event]:
        """End of output: undecided text is settled (an unclosed JSON value becomes content)."""
        if self._done:
            return []
        events = self._run(final=True)
        self._done = True
        return events

    # -- state machine -------------------------------------------------------------------------------------
    def _run(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            step = {"content": self._content, "first": self._first, "after": self._after}[self._mode]
            if not step(events, final):
                return _merge_content(events)

    def _content(self, events: list[Event], final: bool) -> bool:
        buf = self._buf
        p = buf.find(OPEN)
        if p >= 0:
            events.append(ContentDelta(buf[:p]))
            self._buf = buf[p + len(OPEN):]
            self._enter_value("first")
            return True
        keep = 0
        if not final:  # hold back the longest suffix that could still grow into `<|tool_call|>`
            for k in range(min(len(OPEN) - 1, len(buf)), 0, -1):
                if OPEN.startswith(buf[-k:]):
                    keep = k
                    break
        events.append(ContentDelta(buf[:len(buf) - keep]))
        self._buf = buf[len(buf) - keep:]
        return False

    def _enter_value(self, mode: str) -> None:
        self._mode = mode
        self._scanner = None

    def _malformed(self, events: list[Event]) -> bool:
        # Give the tag back as text and re-read what followed it as content (it may hold a later block).
        events.append(ContentDelta(OPEN))
        self._enter_value("content")
        return True

    def _end_block(self) -> bool:
        # The block ended without a closing tag: what follows the last value is content again.
        self._enter_value("content")
        return True

    def _read_value(self, events: list[Event], start: int, final: bool) -> bool | None:
        """Scan the value at `start`: True = calls emitted, False = not a call, None = need more text."""
        if self._scanner is None:
            self._scanner = _ValueScanner(start)
        end = self._scanner.scan(self._buf, final)
        if end is None:
            return None
        if end is False:
            return False
        try:
            calls = _as_calls(json.loads(self._buf[start:end]))
        except json.JSONDecodeError:
            calls = None
        if calls is None or self._offered is not None and any(c[1] not in self._offered for c in calls):
            return False  # not a call, or a call to a function nobody offered: content
        for call_id, name, args in calls:
            index = self._n_calls
            self._n_calls += 1
            events.append(ToolCallDelta(index, call_id or f"{self._id_prefix}{index}", name, args))
        self._buf = self._buf[end:]
        self._enter_value("after")
        return True

    def _first(self, events: list[Event], final: bool) -> bool:
        buf = self._buf
        i = _skip_ws(buf, 0)
        if i == len(buf):
            return self._malformed(events) if final else False
        if buf[i] not in "{[":
            return self._malformed(events)
        got = self._read_value(events, i, final)
        if got is None:
            return False
        return True if got else self._malformed(events)

    def _after(self, events: list[Event], final: bool) -> bool:
        buf = self._buf
        i = _skip_ws(buf, 0)
        if i == len(buf):
            return self._end_block() if final else False
        if buf.startswith(CLOSE, i):
            self._buf = buf[i + len(CLOSE):]
            return self._end_block()
        if buf[i] == "<" and _partial_tag_at_end(buf, i):
            return self._end_block() if final else False
        k = i
        if buf[i] == ",":  # parallel calls written as `{...}, {...}`
            k = _skip_ws(buf, i + 1)
            if k == len(buf):
                return self._end_block() if final else False
        if buf[k] not in "{[":
            return self._end_block()
        got = self._read_value(events, k, final)
        if got is None:
            return False
        # A further value that is not a call ends the block; its text stays content.
        return True if got else self._end_block()


def _merge_content(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, ContentDelta):
            if not ev.text:
                continue
            if out and isinstance(out[-1], ContentDelta):
                out[-1] = ContentDelta(out[-1].text + ev.text)
                continue
        out.append(ev)
    return out


def collect(events: list[Event]) -> tuple[str, list[ToolCall]]:
    """Fold a stream's events into (content, calls)."""
    content = "".join(ev.text for ev in events if isinstance(ev, ContentDelta))
    calls = [ToolCall(ev.id, ev.name, ev.arguments) for ev in events if isinstance(ev, ToolCallDelta)]
    return content, calls


def parse_tool_calls(text: str, id_prefix: str = "call_", offered: set[str] | None = None
                     ) -> tuple[str, list[ToolCall]]:
    """Split model output into (content, tool calls). Never raises on malformed output. offered: the names of
    the functions that may be called (None: any)."""
    if not isinstance(text, str):
        raise TypeError(f"parse_tool_calls expects the decoded output text (str), got {type(text).__name__}")
    parser = ToolCallStreamParser(id_prefix, offered)
    return collect(parser.feed(text) + parser.finish())


# ------------------------------------------------------------------------------------------------ tool_choice
class ToolChoiceError(ValueError):
    """A tool_choice that cannot be honoured with these tools; the message names the field."""


def tool_names(tools: list[dict] | None) -> list[str]:
    """The function names of OpenAI-format tools ({"type": "function", "function": {"name": ...}}, or bare
    {"name": ...})."""
    names = []
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.append(fn["name"])
    return names


def call_prefix(name: str, tokenizer: Any) -> tuple[int, ...]:
    """The tokens a call to `name` starts with: the call tag, `[{"name": "<name>", "arguments":`, cut where the
    tokenizer's own split of a complete call agrees whatever follows (so a forced token is one the model would
    have written itself, never a merge it would not)."""
    head = f'{OPEN}[{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments":'
    runs = [tokenizer.encode(head + tail) for tail in (' {"', " {}", '{"')]
    n = 0
    while all(n < len(r) for r in runs) and len({r[n] for r in runs}) == 1:
        n += 1
    return tuple(runs[0][:n])


def tool_constraint(tools: list[dict] | None, tool_choice: str | dict | None, tokenizer: Any
                    ) -> tuple[list[dict] | None, TokenConstraint | None]:
    """OpenAI's tool_choice -> (the tools to describe in the prompt, the decoding constraint).

    "auto" / None: free. "none": the call tag is banned (the reply is plain content). "required": the reply
    starts with a call to one of the tools. {"type": "function", "function": {"name": N}}: only N is described
    and the reply starts with a call to it.
    """
    names = tool_names(tools)
    if tool_choice is None or tool_choice == "auto":
        return tools, None
    if tool_choice == "none":
        banned = frozenset([tokenizer.token_id(OPEN)]) if tokenizer.has_token(OPEN) else frozenset()
        return tools, TokenConstraint(banned=banned)
    if tool_choice == "required":
        if not names:
            raise ToolChoiceError("tool_choice is 'required' but no tools were given; add tools")
        return tools, TokenConstraint(prefixes=tuple(call_prefix(n, tokenizer) for n in dict.fromkeys(names)))
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise ToolChoiceError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                                  f'"function": {{"name": "..."}}}}; got {json.dumps(tool_choice)[:120]}')
        if name not in names:
            offered = ", ".join(names) or "none"
            raise ToolChoiceError(f"tool_choice names function {name}, which is not among the tools "
                                  f"(offered: {offered})")
        picked = [t for t in tools or [] if tool_names([t]) == [name]]
        return picked, TokenConstraint(prefixes=(call_prefix(name, tokenizer),))
    raise ToolChoiceError(f'tool_choice must be "none", "auto", "required" or a named function; got '
                          f"{json.dumps(tool_choice)[:120]}")
