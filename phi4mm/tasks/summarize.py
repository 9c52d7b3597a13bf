"""Summaries of, and answers about, recordings longer than one prompt: map-reduce over speech chunks.

    s = summarize(engine, "meeting.m4a")                                   # Summary(text, parts, duration)
    s = summarize(engine, "lecture.webm", question="Which dates are mentioned?", chunk_minutes=5)

Map: the recording is streamed and cut into speech cues by the voice-activity detector (inputs/vad.py); cues
are gathered, in order, into chunks of at most `chunk_minutes` of speech (the silence between cues is left
out) and each chunk is one audio prompt: "summarize this part" or the question, answered from that part alone.
Reduce: the parts' texts, in order, are one text prompt that asks for the summary (or answer) of the whole;
more than REDUCE_FAN_IN parts are reduced in groups first, level by level. A recording that fits in one chunk
is one prompt, with no reduce step. Memory holds the chunks being decoded (`max_in_flight`), not the recording.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phi4mm.inputs.audio import SAMPLE_RATE
from phi4mm.inputs.vad import CueCutter, cut_cues
from phi4mm.sampling import SamplingParams
from phi4mm.tasks.transcribe import audio_blocks, run_requests

CHUNK_MINUTES = 10.0  # 7,500 audio tokens: well inside the context, long enough to keep a topic together
REDUCE_FAN_IN = 8  # parts merged by one reduce prompt
MIN_CHUNK_MINUTES = 0.05  # 3 s: shorter chunks say nothing
SUMMARY_PROMPT = "Summarize the recording in a few sentences."
MAP_SUMMARY = "This is one part of a longer recording. Summarize this part in a few sentences."
MAP_QUESTION = ("This is one part of a longer recording. {q} Answer from this part alone; if it does not say, "
                "answer \"not mentioned\".")
REDUCE_SUMMARY = ("Here are summaries of consecutive parts of one recording, in order:\n\n{parts}\n\n"
                  "Write one summary of the whole recording.")
REDUCE_QUESTION = ("Here are answers to the question \"{q}\", each from one consecutive part of a recording, in "
                   "order:\n\n{parts}\n\nGive one answer for the whole recording.")


@dataclass
class Summary:
    """The final text, each chunk's (start s, end s, text) from the map step, and the recording's duration."""

    text: str
    parts: list[tuple[float, float, str]] = field(default_factory=list)
    duration: float = 0.0


def speech_chunks(audio: Any, chunk_minutes: float = CHUNK_MINUTES, cutter: CueCutter | None = None
                  ) -> Iterator[tuple[float, float, np.ndarray]]:
    """(start s, end s, 16 kHz samples) of consecutive speech cues gathered up to chunk_minutes of speech each."""
    limit = int(chunk_minutes * 60 * SAMPLE_RATE)
    parts: list[np.ndarray] = []
    start = end = 0.0
    size = 0
    for cue in cut_cues(audio_blocks(audio), cutter=cutter):
        if parts and size + cue.samples.size > limit:
            yield start, end, np.concatenate(parts)
            parts, size = [], 0
        if not parts:
            start = cue.start
        parts.append(cue.samples)
        size += cue.samples.size
        end = cue.end
    if parts:
        yield start, end, np.concatenate(parts)


def _prompt(instruction: str, audio: bool) -> str:
    return f"<|user|>{'<|audio_1|>' if audio else ''}{instruction}<|end|><|assistant|>"


def summarize(engine, audio: Any, question: str | None = None, chunk_minutes: float = CHUNK_MINUTES,
              max_tokens: int = 256, max_in_flight: int = 2) -> Summary:
    """Summarize `audio` (any input transcribe takes: a path, "-", bytes, ...) or answer `question` about it."""
    if not chunk_minutes >= MIN_CHUNK_MINUTES:
        raise ValueError(f"chunk_minutes={chunk_minutes} is too short; use at least {MIN_CHUNK_MINUTES}")
    if question is not None and ("<|" in question or not question.strip()):
        raise ValueError("the question must be plain, non-empty text (no special tokens like <|end|>)")
    q = " ".join(question.split()) if question else None
    params = SamplingParams(max_tokens=max_tokens).validate()  # greedy
    cutter = CueCutter()
    spans: list[tuple[float, float]] = []
    whole = SUMMARY_PROMPT if q is None else q
    part = MAP_SUMMARY if q is None else MAP_QUESTION.format(q=q)
    chunks = speech_chunks(audio, chunk_minutes, cutter)
    first = next(chunks, None)
    if first is None:
        why = "is silent" if cutter.peak < 1e-4 else "has no speech the voice-activity detector could find"
        raise ValueError(f"the recording ({cutter.duration:.1f} s) {why}: there is nothing to summarize")
    second = next(chunks, None)  # one chunk: its answer is the answer, asked about the whole recording
    single = second is None

    def jobs():
        for k, (a, b, samples) in enumerate(_chain(first, second, chunks)):
            spans.append((a, b))
            yield k, {"prompt": _prompt(whole if single else part, True), "audios": [(samples, SAMPLE_RATE)],
                      "params": params}

    texts: dict[int, str] = {}
    for k, res in run_requests(engine, jobs(), max_in_flight):
        if res["finish_reason"] == "error":
            raise RuntimeError(f"part {k + 1} of the recording failed: {res.get('error')}")
        texts[k] = res["text"].strip()
    parts = [(a, b, texts[k]) for k, (a, b) in enumerate(spans)]
    level = [t for _, _, t in parts]
    while len(level) > 1:
        groups = [level[i:i + REDUCE_FAN_IN] for i in range(0, len(level), REDUCE_FAN_IN)]
        template = REDUCE_SUMMARY if q is None else REDUCE_QUESTION
        reqs = [(g, {"prompt": _prompt(template.format(q=q, parts="\n\n".join(
            f"Part {i}: {t}" for i, t in enumerate(grp, 1))), False), "params": params})
                for g, grp in enumerate(groups)]
        out: dict[int, str] = {}
        for g, res in run_requests(engine, reqs, max_in_flight=len(reqs)):
            if res["finish_reason"] == "error":
                raise RuntimeError(f"the reduce step failed: {res.get('error')}")
            out[g] = res["text"].strip()
        level = [out[g] for g in range(len(groups))]
    return Summary(level[0], parts, cutter.duration)


def _chain(first, second, rest):
    yield first
    if second is not None:
        yield second
        yield from rest


__all__ = ["CHUNK_MINUTES", "Summary", "speech_chunks", "summarize"]
