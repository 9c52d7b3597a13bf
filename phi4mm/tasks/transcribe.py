"""Speech recognition and translation on top of the engine: prompts, cue cutting, subtitle formats.

    segments = transcribe(engine, "talk.m4a")                     # [Segment(start, end, text, ...), ...]
    print(format_segments(segments, "srt"))
    for seg in transcribe_stream(engine, "-"):                    # hours of audio from stdin, in order
        print(seg.start, seg.text)

Phi-4-multimodal is an instruction model, not a timestamping ASR model: it returns one text per audio prompt.
So timestamps come from how we cut the audio: the file is decoded as a stream (av_audio.stream_audio), a
voice-activity detector (Silero VAD, inputs/vad.py) finds the speech and cuts it into sentence-sized cues of
at most `max_seconds` (15 s by default), and each cue is one request. Cues go to the engine while fewer than
`max_in_flight` are decoding, so memory stays flat however long the recording is, and segments come back in
time order. Each segment carries the mean log-probability of its generated tokens and the VAD's no-speech
probability (Whisper's `avg_logprob` and `no_speech_prob`).
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phi4mm.inputs.audio import SAMPLE_RATE, load_audio
from phi4mm.inputs.av_audio import STDIN, stream_audio
from phi4mm.inputs.vad import MAX_CUE_SECONDS, Cue, CueCutter, cut_cues
from phi4mm.sampling import SamplingParams

log = logging.getLogger(__name__)

# --- prompts (model card, "Speech-Language Format") -----------------------------------------------------------
ASR_PROMPT = "Transcribe the audio clip into text."
AST_PROMPT = "Translate the audio to {lang}."
# The card's chain-of-thought speech translation: transcript, then `<sep>`, then the translation.
ASR_AST_PROMPT = ("Transcribe the audio to text, and then translate the audio to {lang}. Use <sep> as a separator "
                  "between the original transcript and the translation.")
SEP = "<sep>"
TASKS = ("transcribe", "translate")
# The model card's audio languages; keys are ISO 639-1 codes (what OpenAI's `language` field carries).
SPEECH_LANGUAGES = {"en": "English", "zh": "Chinese", "de": "German", "fr": "French", "it": "Italian",
                    "ja": "Japanese", "es": "Spanish", "pt": "Portuguese"}
_SPECIAL = re.compile(r"<\|[^|>]*\|>")

# --- formats --------------------------------------------------------------------------------------------------
FORMATS = ("json", "text", "txt", "srt", "vtt", "verbose_json")
FORMAT_EXTENSIONS = {"json": "json", "text": "txt", "txt": "txt", "srt": "srt", "vtt": "vtt",
                     "verbose_json": "json"}


@dataclass
class Segment:
    """One timed piece of a transcript; times in seconds from the start of the clip.

    tokens: the generated token ids (filled by `transcribe`, reported in verbose_json; may stay empty).
    avg_logprob: mean log-probability of those tokens (0.0 when not measured).
    no_speech_prob: 1 - the VAD's mean speech probability over the cue (0.0 when not measured).
    translation: with `then_translate`, the translation after the card's `<sep>` (None otherwise).
    """

    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    translation: str | None = None


def language_name(language: str | None) -> str | None:
    """'fr' / 'french' / 'French' -> 'French'; None -> None.

    Any language *name* is accepted (a fine-tuned model may know Indonesian or Korean; the micro model knows its
    synthetic Vellish): the model is asked in words, so the name is passed through, title-cased.
    `is_card_language` tells whether the base model was trained on it. A short code that is not one of the
    card's (e.g. 'xx') cannot be turned into a name and is a ValueError listing the known ones.
    """
    if language is None:
        return None
    key = " ".join(language.split()).lower()
    if key in SPEECH_LANGUAGES:
        return SPEECH_LANGUAGES[key]
    for name in SPEECH_LANGUAGES.values():
        if key == name.lower():
            return name
    if len(key) >= 3 and all(w.isalpha() for w in key.split()):
        return key.title()
    supported = ", ".join(f"{n} ({c})" for c, n in SPEECH_LANGUAGES.items())
    raise ValueError(f"language {language!r} is neither a language name nor one of the model card's speech "
                     f"language codes: {supported}")


def is_card_language(name: str | None) -> bool:
    """Whether the published model was trained on speech in this language (the model card's list)."""
    return name is None or name in SPEECH_LANGUAGES.values()


def warn_if_not_card_language(language: str | None) -> str | None:
    """The language's name; logs a warning (never refuses) when the published model was not trained on it."""
    name = language_name(language)
    if not is_card_language(name):
        log.warning("%s is not one of the model card's speech languages (%s): the base model was not trained on it, "
                    "so expect poor output unless this checkpoint was fine-tuned for it", name,
                    ", ".join(SPEECH_LANGUAGES.values()))
    return name


def transcription_prompt(task: str = "transcribe", language: str | None = None, prompt: str | None = None,
                         then_translate: str | None = None) -> str:
    """The full prompt in the model card's speech format, e.g.

        <|user|><|audio_1|>Transcribe the audio clip into text.<|end|><|assistant|>
        <|user|><|audio_1|>Translate the audio to French.<|end|><|assistant|>

    task: "transcribe" (language is a validated hint only: the card's recognition prompt names none) or
    "translate" (language = the target, English by default). prompt: OpenAI's context / spelling hint, appended
    as a sentence after the instruction; it may not contain special tokens such as <|end|>. then_translate: a
    target language for the card's transcribe-then-translate prompt (transcript <sep> translation; transcribe
    only).
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported; use one of {', '.join(TASKS)}")
    lang = language_name(language)
    text = ASR_PROMPT if task == "transcribe" else AST_PROMPT.format(lang=lang or "English")
    if then_translate is not None:
        if task != "transcribe":
            raise ValueError("then_translate goes with transcribe (it asks for the transcript and a translation); "
                             "for translate, name the target with language")
        text = ASR_AST_PROMPT.format(lang=language_name(then_translate))
    if prompt is not None and prompt.strip():
        if _SPECIAL.search(prompt):
            raise ValueError(f"the prompt {prompt[:60]!r} contains a special token like <|end|>; send plain text")
        text += f" Context (use it for names and spelling): {' '.join(prompt.split())}"
    return f"<|user|><|audio_1|>{text}<|end|><|assistant|>"


# --- running --------------------------------------------------------------------------------------------------
def audio_blocks(audio: Any) -> Iterator[np.ndarray]:
    """16 kHz mono blocks of any audio input: files, "-" (stdin) and file objects stream; bytes are read as a file;
    arrays, tuples, data URLs and base64 go through load_audio (they are in memory already)."""
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return stream_audio(io.BytesIO(bytes(audio)), f"audio bytes ({len(audio)} bytes)")
    if isinstance(audio, os.PathLike) or (isinstance(audio, str) and (audio == STDIN or os.path.exists(audio))):
        return stream_audio(audio)
    if hasattr(audio, "read") and hasattr(audio, "seek"):
        return stream_audio(audio)
    return iter([load_audio(audio, max_seconds=float("inf"))])


def speech_cues(audio: Any, max_seconds: float = MAX_CUE_SECONDS) -> tuple[list[Cue], float]:
    """All speech cues of an input that fits in memory anyway (an upload), and its duration in seconds."""
    cutter = CueCutter(max_seconds)
    return list(cut_cues(audio_blocks(audio), cutter=cutter)), cutter.duration


def cue_request(cue_samples: np.ndarray, prompt: str, max_tokens: int, temperature: float = 0.0) -> dict:
    """Engine.add_request kwargs for one cue; logprobs=0 reports the chosen tokens' log-probabilities."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, logprobs=0).validate()
    return {"prompt": prompt, "audios": [(cue_samples, SAMPLE_RATE)], "params": params}


def run_requests(engine, jobs: Iterable[tuple[Any, dict]], max_in_flight: int = 32) -> Iterator[tuple[Any, dict]]:
    """Feed (key, add_request kwargs) pairs while fewer than `max_in_flight` are unfinished; yield (key, result) as
    each finishes, result = {"text", "token_ids", "logprobs", "finish_reason", "error"}. `jobs` is pulled lazily,
    so a generator of cues is decoded only as fast as the engine takes it."""
    jobs = iter(jobs)
    owner: dict[str, tuple[Any, dict]] = {}
    pending = True
    while pending or owner:
        while pending and len(owner) < max_in_flight:
            nxt = next(jobs, None)
            if nxt is None:
                pending = False
                break
            key, req = nxt
            try:
                owner[engine.add_request(**req)] = (key, {"text": "", "token_ids": [], "logprobs": []})
            except ValueError as e:  # refused (e.g. over the context): this job's error, the others go on
                yield key, {"text": "", "token_ids": [], "logprobs": [], "finish_reason": "error",
                            "error": " ".join(str(e).split())}
        if not owner:
            continue
        for o in engine.step():
            if o.request_id not in owner:
                continue
            key, res = owner[o.request_id]
            res["text"] += o.text
            if o.token_id is not None:
                res["token_ids"].append(o.token_id)
                if o.logprob is not None:
                    res["logprobs"].append(o.logprob)
            if o.finished:
                del owner[o.request_id]
                res["finish_reason"], res["error"] = o.finish_reason, o.error
                yield key, res


def fill_segment(seg: Segment, res: dict, then_translate: bool = False) -> Segment:
    """Put one finished request's text, tokens and mean log-probability into its segment."""
    if res["finish_reason"] == "error":
        raise RuntimeError(f"the cue {seg.start:.2f}-{seg.end:.2f} s failed: {res.get('error')}")
    text = res["text"].strip()
    if then_translate:
        text, sep, translation = text.partition(SEP)
        seg.translation = translation.strip() if sep else ""
        text = text.strip()
    seg.text, seg.tokens = text, list(res["token_ids"])
    lps = res.get("logprobs") or []
    seg.avg_logprob = round(float(np.mean(lps)), 4) if lps else 0.0
    return seg


@dataclass
class FileResult:
    """One input's outcome in transcribe_files: its segments, duration and peak, or the error that stopped it."""

    index: int
    segments: list[Segment] = field(default_factory=list)
    duration: float = 0.0
    peak: float = 0.0
    error: Exception | None = None

    @property
    def silent(self) -> bool:
        return self.error is None and not self.segments and self.peak < 1e-4


def transcribe_files(engine, sources: list[Any], task: str = "transcribe", language: str | None = None,
                     prompt: str | None = None, max_seconds: float = MAX_CUE_SECONDS, max_tokens: int = 448,
                     then_translate: str | None = None, max_in_flight: int = 32) -> Iterator[FileResult]:
    """Transcribe several inputs through one engine, cues of consecutive files decoding side by side; yield each
    file's FileResult as soon as it is complete. A file that cannot be decoded gets its `error` and the others go
    on (a cue the engine refuses is an error of its file, too)."""
    text = transcription_prompt(task, language, prompt, then_translate)
    files = [FileResult(i) for i in range(len(sources))]
    left = [0] * len(sources)  # cues of each file still decoding
    exhausted = [False] * len(sources)
    ready: list[int] = []

    def jobs() -> Iterator[tuple[tuple[int, int], dict]]:
        for i, src in enumerate(sources):
            cutter = CueCutter(max_seconds)
            try:
                for cue in cut_cues(audio_blocks(src), cutter=cutter):
                    files[i].segments.append(Segment(cue.start, cue.end, "", no_speech_prob=cue.no_speech_prob))
                    left[i] += 1
                    yield (i, len(files[i].segments) - 1), cue_request(cue.samples, text, max_tokens)
            except ValueError as e:  # AudioError, DecodeError: one sentence about this file
                files[i].error = e
            files[i].duration, files[i].peak, exhausted[i] = cutter.duration, cutter.peak, True
            if left[i] == 0:
                ready.append(i)

    for (i, k), res in run_requests(engine, jobs(), max_in_flight):
        try:
            fill_segment(files[i].segments[k], res, then_translate is not None)
        except RuntimeError as e:
            files[i].error = files[i].error or e
        left[i] -= 1
        if left[i] == 0 and exhausted[i]:
            ready.append(i)
        while ready:
            yield files[ready.pop(0)]
    while ready:
        yield files[ready.pop(0)]


def transcribe_stream(engine, audio: Any, task: str = "transcribe", language: str | None = None,
                      prompt: str | None = None, max_seconds: float = MAX_CUE_SECONDS, max_tokens: int = 448,
                      then_translate: str | None = None, max_in_flight: int = 32) -> Iterator[Segment]:
    """Segments of one input in time order, each as soon as it and all before it are done (memory flat in the
    input's length). Raises the input's decoding error (AudioError / DecodeError) when it cannot be read."""
    text = transcription_prompt(task, language, prompt, then_translate)
    segs: list[Segment] = []
    done: set[int] = set()
    emitted = 0

    def jobs():
        for cue in cut_cues(audio_blocks(audio), max_seconds):
            segs.append(Segment(cue.start, cue.end, "", no_speech_prob=cue.no_speech_prob))
            yield len(segs) - 1, cue_request(cue.samples, text, max_tokens)

    for k, res in run_requests(engine, jobs(), max_in_flight):
        fill_segment(segs[k], res, then_translate is not None)
        done.add(k)
        while emitted in done:
            done.discard(emitted)
            yield segs[emitted]
            segs[emitted] = None  # the caller has it: keep nothing per segment here
            emitted += 1


def transcribe(engine, audio: Any, task: str = "transcribe", language: str | None = None,
               prompt: str | None = None, max_seconds: float = MAX_CUE_SECONDS, max_tokens: int = 448,
               then_translate: str | None = None) -> list[Segment]:
    """Transcribe (or translate) any audio input through an `Engine`; returns the speech cues in time order
    (silence gives no segment). Drives the engine itself: do not call it while another thread steps it."""
    return list(transcribe_stream(engine, audio, task, language, prompt, max_seconds, max_tokens, then_translate))


# --- formats --------------------------------------------------------------------------------------------------
def _timestamp(seconds: float, sep: str) -> str:
    """HH:MM:SS{sep}mmm, rounded to the nearest millisecond; hours keep counting past 99."""
    ms = round(max(seconds, 0.0) * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue and "-->" starts a timing line in both formats: keep the payload unambiguous.
    return "\n".join(line.strip() for line in text.replace("-->", "->").splitlines() if line.strip())


def _compression_ratio(text: str) -> float:
    """Whisper's repetition signal: text bytes / zlib-compressed bytes (1.0 for an empty text)."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 1.0


def format_segments(segments: list[Segment], fmt: str, language: str | None = None,
                    duration: float | None = None, task: str = "transcribe") -> str | dict:
    """Render segments in one of OpenAI's response formats.

    "json" -> {"text"}; "text" / "txt" -> the text and a newline; "srt" / "vtt" -> subtitles, one cue per
    non-empty segment (SRT numbers cues from 1); "verbose_json" -> {"task", "language", "duration", "text",
    "segments"}. Segments with a translation (transcribe-then-translate) show it on a second line of their cue,
    after the transcript in text, and as "translation" fields in the JSON formats. Per segment: avg_logprob
    is the mean log-probability of its tokens, no_speech_prob the VAD's (1 - mean speech probability),
    temperature 0.0 (greedy decoding), seek = start in 10 ms frames as Whisper counts, compression_ratio from the
    text as Whisper computes it. language: the name asked for (the spoken language for transcribe, the target
    for translate, lower case Whisper style), English for translate by default, else "unknown" (the model does
    not name the language it hears). duration: given, or the end of the last segment.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    text = " ".join(s.text.strip() for s in segments if s.text.strip())
    translated = any(s.translation is not None for s in segments)
    translation = " ".join(s.translation.strip() for s in segments if (s.translation or "").strip())
    if fmt == "json":
        return {"text": text, "translation": translation} if translated else {"text": text}
    if fmt in ("text", "txt"):
        return text + "\n" + (translation + "\n" if translated else "")
    if fmt in ("srt", "vtt"):
        sep = "," if fmt == "srt" else "."
        both = [(s, _cue_text(s.text + ("\n" + s.translation if s.translation else ""))) for s in segments]
        blocks = [f"{_timestamp(s.start, sep)} --> {_timestamp(s.end, sep)}\n{t}\n" for s, t in both if t]
        if fmt == "srt":
            return "\n".join(f"{i}\n{b}" for i, b in enumerate(blocks, 1))
        return "WEBVTT\n\n" + "\n".join(blocks)
    name = language_name(language) or ("English" if task == "translate" else "unknown")
    out = {
        "task": task,
        "language": name.lower(),
        "duration": round(float(duration if duration is not None else (segments[-1].end if segments else 0.0)), 3),
        "text": text,
        "segments": [{"id": i, "seek": round(s.start * 100), "start": round(s.start, 3),
                      "end": round(s.end, 3), "text": s.text.strip(), "tokens": list(s.tokens),
                      "temperature": 0.0, "avg_logprob": s.avg_logprob,
                      "compression_ratio": round(_compression_ratio(s.text), 4), "no_speech_prob": s.no_speech_prob,
                      **({"translation": s.translation or ""} if translated else {})}
                     for i, s in enumerate(segments)],
    }
    if translated:
        out["translation"] = translation
    return out


def render(segments: list[Segment], fmt: str, **kw: Any) -> str:
    """format_segments as file contents: JSON formats serialised (UTF-8, indented), the others as they are."""
    out = format_segments(segments, fmt, **kw)
    return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, indent=2) + "\n"
