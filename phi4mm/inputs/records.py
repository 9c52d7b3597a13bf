"""JSONL conversation records: one chat per line, media paths relative to the file (training, batch, eval)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi4mm.inputs.chat import flatten_content


class DataError(ValueError):
    """A data set that cannot be trained on; the message names the file, the line and what to fix."""


@dataclass
class Record:
    """One conversation: messages with str contents (media as `<|image_N|>` / `<|audio_N|>`), media payloads."""

    line: int  # 1-based line number in the JSONL file
    messages: list[dict[str, Any]]
    images: list[Any]
    audios: list[Any]
    tools: list[dict] | None = None
    answers: list[str] | None = None  # optional extra references (evaluation: several VQA answers)
    id: Any = None  # the line's optional "id", echoed by batch jobs
    sampling: Any = None  # the line's optional "sampling" (SamplingParams fields), for batch jobs


def read_jsonl(path: str | Path, skip_bad: bool = False, need_answer: bool = True) -> tuple[list[Record], list[str]]:
    """Parse and check every line. Returns (records, messages about skipped lines).

    need_answer: every conversation must hold an assistant message (training, evaluation); batch prompts
    (`phi4mm batch`) need not.

    Raises DataError naming `path:line` for the first bad line (unless skip_bad), or when nothing is left.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass a JSONL file with one {{\"messages\": [...]}} per line")
    records, bad = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(_record(json.loads(line), n, path.parent, need_answer))
            except (json.JSONDecodeError, ValueError) as e:
                msg = f"{path}:{n}: {e}"
                if not skip_bad:
                    raise DataError(f"{msg}; fix the line, or skip bad lines with --skip-bad") from None
                bad.append(msg)
    if not records:
        need = ', {"role": "assistant", "content": ...}' if need_answer else ""
        raise DataError(f"{path} holds no usable conversations ({len(bad)} bad lines skipped); each line needs "
                        f'{{"messages": [...{need}]}}')
    return records, bad


def _record(d: Any, line: int, base: Path, need_answer: bool = True) -> Record:
    if not isinstance(d, dict) or not isinstance(d.get("messages"), list):
        raise DataError("a line must be a JSON object with a 'messages' list")
    flat, images, audios = flatten_content(d["messages"])
    if need_answer and not any(m["role"] == "assistant" for m in flat):
        raise DataError("the conversation has no assistant message: training needs the reply to learn from, "
                        "evaluation the reference answer")
    if not flat:
        raise DataError("the conversation has no messages")
    return Record(line, flat, [_resolve(x, base, "image") for x in images],
                  [_resolve(x, base, "audio") for x in audios], d.get("tools"), d.get("answers"), d.get("id"),
                  d.get("sampling"))


def _resolve(payload: Any, base: Path, kind: str) -> Any:
    """A relative media path is relative to the JSONL file; data URLs, base64 and objects pass untouched."""
    if kind == "image" and isinstance(payload, dict) and "video" in payload:  # a video part: resolve its file
        return {**payload, "video": _resolve(payload["video"], base, "video")}
    if not isinstance(payload, str) or payload.startswith(("data:", "http://", "https://")):
        return payload
    p = Path(payload).expanduser()
    p = p if p.is_absolute() else base / p
    if p.is_file():
        return str(p)
    # Base64 has no '.', so a dotted name or an absolute path can only have been meant as a file.
    if "." in Path(payload).name or Path(payload).is_absolute():
        raise DataError(f"{kind} file {payload!r} not found (looked for {p}); media paths are relative to the "
                        "JSONL file")
    return payload
