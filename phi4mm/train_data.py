"""Training data: JSONL conversations -> token ids with assistant-only labels, batched by a token budget.

One conversation per line, OpenAI style:

    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/a.jpg"}},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}

Media are file paths relative to the JSONL file, absolute paths, data URLs or base64 (anything the processor
reads). The conversation is rendered with the official chat template (no generation prompt, so it ends in
`<|endoftext|>`), tokenised by the same `prepare` as inference, and the loss counts the assistant tokens only:
everything after each `<|assistant|>` up to and including its `<|end|>`, plus the closing `<|endoftext|>`
after a final assistant turn, as the official fine-tuning scripts do.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .chat import flatten_content, render_prompt
from .processor import Prepared

IGNORE = -100  # label of tokens the loss skips (F.cross_entropy's ignore_index)
ASSISTANT, END, ENDOFTEXT = "<|assistant|>", "<|end|>", "<|endoftext|>"


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


@dataclass
class Example:
    """A tokenised record: ids and labels of the same length, and the processor's output (media, adapter)."""

    record: Record
    prep: Prepared
    labels: list[int]
    adapter: str | None  # the adapter this sample trains through (the model's rule, or the stage's override)

    @property
    def length(self) -> int:
        return len(self.prep.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE for t in self.labels)


def read_jsonl(path: str | Path, skip_bad: bool = False) -> tuple[list[Record], list[str]]:
    """Parse and check every line. Returns (records, messages about skipped lines).

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
                records.append(_record(json.loads(line), n, path.parent))
            except (json.JSONDecodeError, ValueError) as e:
                msg = f"{path}:{n}: {e}"
                if not skip_bad:
                    raise DataError(f"{msg}; fix the line, or pass skip_bad=True to skip bad lines") from None
                bad.append(msg)
    if not records:
        raise DataError(f"{path} holds no usable conversations ({len(bad)} bad lines skipped); each line needs "
                        "{\"messages\": [..., {\"role\": \"assistant\", \"content\": ...}]}")
    return records, bad


def _record(d: Any, line: int, base: Path) -> Record:
    if not isinstance(d, dict) or not isinstance(d.get("messages"), list):
        raise DataError("a line must be a JSON object with a 'messages' list")
    flat, images, audios = flatten_content(d["messages"])
    if not any(m["role"] == "assistant" for m in flat):
        raise DataError("the conversation has no assistant message: nothing to learn from")
    return Record(line, flat, [_resolve(x, base, "image") for x in images],
                  [_resolve(x, base, "audio") for x in audios], d.get("tools"), d.get("answers"))


def _resolve(payload: Any, base: Path, kind: str) -> Any:
    """A relative media path is relative to the JSONL file; data URLs, base64 and objects pass untouched."""
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


def assistant_labels(ids: list[int], assistant: int, end: int, endoftext: int) -> list[int]:
    """Labels for `ids`: the token itself inside assistant replies (with their `<|end|>`), IGNORE elsewhere."""
    labels = [IGNORE] * len(ids)
    inside = False
    for i, t in enumerate(ids):
        if inside:
            labels[i] = t
            inside = t != end
        elif t == assistant:
            inside = True
    # The template closes the conversation with <|endoftext|>; after a reply the model learns to stop there.
    if len(ids) >= 2 and ids[-1] == endoftext and labels[-2] == end:
        labels[-1] = endoftext
    return labels


def encode(model, rec: Record, text_adapter: str | None = None) -> Example:
    """Tokenise one record with the model's processor. text_adapter: route text-only samples to that adapter."""
    text = render_prompt(rec.messages, rec.tools, add_generation_prompt=False)
    prep = model.prepare(text, rec.images, rec.audios)
    tok = model.tokenizer
    labels = assistant_labels(prep.input_ids, tok.token_id(ASSISTANT), tok.token_id(END), tok.token_id(ENDOFTEXT))
    adapter = prep.adapter
    if adapter is None and prep.images is None and prep.audios is None:
        adapter = text_adapter
    return Example(rec, prep, labels, adapter)


def make_batches(lengths: list[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches: sorted by length, cut so that (longest in batch) x (rows) <= batch_tokens.

    Ties are broken randomly and the batch order is shuffled, both from (seed, epoch): a run and its resumed
    copy see the same batches. A sample longer than the budget is a batch of its own.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lengths.__getitem__)  # stable: equal lengths keep the random order
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        if cur and max(longest, lengths[i]) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, lengths[i])
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long, right-padded
    labels: torch.Tensor  # (B, T) long, IGNORE on prompt and padding
    key_mask: torch.Tensor | None  # (B, T) bool, True on real tokens; None when nothing is padded
    lengths: torch.Tensor  # (B,) real tokens per row
    examples: list[Example]

    @property
    def num_targets(self) -> int:
        # Label t is predicted from position t-1: the first column is never a target.
        return int((self.labels[:, 1:] != IGNORE).sum())


def collate(examples: list[Example], pad_id: int) -> Batch:
    lengths = [e.length for e in examples]
    T = max(lengths)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)  # (B, T)
    for row, e in enumerate(examples):
        ids[row, :e.length] = torch.tensor(e.prep.input_ids)
        labels[row, :e.length] = torch.tensor(e.labels)
    lens = torch.tensor(lengths)
    key_mask = None if min(lengths) == T else torch.arange(T)[None] < lens[:, None]  # (B, T)
    return Batch(ids, labels, key_mask, lens, examples)
