"""`phi4mm chat`: a conversation held on one engine, one-shot or interactive.

On a terminal the interactive loop has line editing and a history kept across sessions (the standard library's
readline), Ctrl-C stops the answer being written (not the session) and Ctrl-D ends it. With tools, the reply's
content streams as it comes and a call is printed once, as one JSON line, when it is complete.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, TextIO

HISTORY_FILE = Path(os.environ.get("PHI4MM_HISTORY", Path.home() / ".phi4mm_history"))
HISTORY_LINES = 1000
HELP = "/image PATH, /audio PATH, /video PATH: attach to the next message; /reset: start over; /exit (or Ctrl-D): quit"


class Conversation:
    """Messages so far plus every image and audio attached (numbered across the whole conversation)."""

    def __init__(self, engine: Any, params: Any, system: str | None = None, tools: list[dict] | None = None,
                 tool_choice: str | dict | None = None, video: dict | None = None):
        self.engine, self.system, self.tools = engine, system, tools
        self.video = video or {}  # load_video's options for attached videos
        self.params = params
        if tools is not None:
            from phi4mm.inputs.tools import tool_constraint, tool_names
            # tool_choice: the tools described (a named function: only it) and the decoding constraint.
            self.tools, params.constraint = tool_constraint(tools, tool_choice, engine.model.tokenizer)
            self.offered = set(tool_names(self.tools))
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.images, self.audios, self.pending = [], [], ""

    def attach(self, kind: str, path: str) -> None:
        """Decode now (so a bad file is reported at once) and reference it in the next user message."""
        if kind == "image":
            from phi4mm.inputs.image import load_image
            self.images.append(load_image(Path(path)))
            self.pending += f"<|image_{len(self.images)}|>"
        elif kind == "video":  # its frames (and sound track) become images (and an audio) now
            from phi4mm.inputs.video import load_video
            clip = load_video(Path(path), dynamic_hd=self.engine.cfg.dynamic_hd, **self.video)
            for frame in clip.frames:
                self.images.append(frame)
                self.pending += f"<|image_{len(self.images)}|>"
            if clip.audio is not None:
                from phi4mm.inputs.audio import SAMPLE_RATE
                self.audios.append((clip.audio, SAMPLE_RATE))
                self.pending += f"<|audio_{len(self.audios)}|>"
        else:
            from phi4mm.inputs.audio import SAMPLE_RATE, load_audio
            self.audios.append((load_audio(path if path == "-" else Path(path)), SAMPLE_RATE))
            self.pending += f"<|audio_{len(self.audios)}|>"

    def say(self, text: str, out: TextIO) -> str:
        """Add a user turn, stream the reply to `out` as it is generated, keep it in the history. Ctrl-C
        (KeyboardInterrupt) stops the reply where it is; the part written so far stays in the history."""
        refs = "".join(m.group(0) for m in re.finditer(r"<\|(?:image|audio)_\d+\|>", self.pending)
                       if m.group(0) not in text)
        self.messages.append({"role": "user", "content": refs + text})
        try:
            rid = self.engine.add_request(self.messages, images=self.images, audios=self.audios, params=self.params,
                                          tools=self.tools)
        except ValueError:
            self.messages.pop()
            raise
        parser = None
        if self.tools:
            from phi4mm.inputs.tools import ToolCallStreamParser
            parser = ToolCallStreamParser(offered=self.offered)
        self.pending, reply, calls, shown = "", "", [], []
        try:
            while self.engine.has_work():
                for o in self.engine.step():
                    if o.request_id != rid:
                        continue
                    reply += o.text
                    if o.finished and o.finish_reason == "error":
                        raise RuntimeError(o.error)
                    events = parser.feed(o.text) if parser else []
                    if parser and o.finished:
                        events += parser.finish()
                    shown.append(self._show(out, o.text if parser is None else events, calls))
        except KeyboardInterrupt:
            self.engine.cancel(rid)
            while self.engine.has_work():  # collect the cancellation; nothing else runs on this engine
                self.engine.step()
            out.write(" [stopped]")
            shown.append(True)
        if any(shown) or not calls:  # a reply that is only a call prints just the call
            out.write("\n")
        if calls:  # machine-readable, one line: [{"name": ..., "arguments": {...}}]
            out.write(json.dumps([{"name": c.name, "arguments": _json_or_text(c.arguments)} for c in calls],
                                 ensure_ascii=False) + "\n")
        out.flush()
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    @staticmethod
    def _show(out: TextIO, piece: str | list, calls: list) -> bool:
        """Write content as it comes, keep calls for the end. -> whether any text was written."""
        from phi4mm.inputs.tools import ContentDelta, ToolCall
        text = piece if isinstance(piece, str) else ""
        for ev in [] if isinstance(piece, str) else piece:
            if isinstance(ev, ContentDelta):
                text += ev.text
            else:
                calls.append(ToolCall(ev.id, ev.name, ev.arguments))
        out.write(text)
        out.flush()
        return bool(text)


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _line_editing() -> None:
    """readline: arrow keys, Ctrl-R and a history file kept between sessions (where readline exists)."""
    try:
        import atexit
        import readline
    except ImportError:  # Windows without pyreadline: plain input()
        return
    try:
        readline.read_history_file(HISTORY_FILE)
    except OSError:
        pass
    readline.set_history_length(HISTORY_LINES)

    def save() -> None:
        try:
            readline.write_history_file(HISTORY_FILE)
        except OSError:
            pass  # a read-only home: no history, no error
    atexit.register(save)


def repl(chat: Conversation, user_error: type[Exception]) -> None:
    """Read lines from stdin until /exit or end of input; slash commands attach media and reset."""
    tty = sys.stdin.isatty()
    if tty:
        _line_editing()
        print(f"phi4mm chat: {HELP}; Ctrl-C stops an answer", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            if tty:
                print(file=sys.stderr)
            return
        except KeyboardInterrupt:  # at the prompt: drop the line, keep the session (as Python's REPL does)
            print(file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        cmd, _, arg = line.partition(" ")
        try:
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                chat.reset()
                print("(conversation cleared)", file=sys.stderr)
            elif cmd in ("/image", "/audio", "/video"):
                if not arg.strip():
                    raise user_error(f"{cmd} needs a file path")
                chat.attach(cmd[1:], arg.strip())
                print(f"(attached {arg.strip()} to your next message)", file=sys.stderr)
            elif cmd == "/help":
                print(HELP, file=sys.stderr)
            elif cmd.startswith("/") and cmd[1:].isalpha():
                raise user_error(f"unknown command {cmd}; try /help")
            else:
                chat.say(line, sys.stdout)
        except (ValueError, OSError) as e:  # report and keep the conversation going
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
