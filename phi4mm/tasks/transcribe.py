"""Speech recognition and translation on top of the engine: prompts, long-audio splitting, subtitle formats.

    segments = transcribe(engine, "talk.flac")                    # [Segment(start, end, text), ...]
    print(format_segments(segments, "srt"))

Phi-4-multimodal is an instruction model, not a timestamping ASR model: it returns one text per audio prompt.
So timestamps come from how we cut the audio. Long audio is split into windows of at most `max_seconds`
(30 s by default; the model card suggests <= 40 s for recognition), each cut placed in the quietest 100 ms
of the last few seconds before the limit, so a cut falls in a pause rather than in a word. Every window is
one request; all windows of a clip go to the engine at once and decode as one batch.
"""
from __future__ import annotations

import itertools
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phi4mm.inputs.audio import SAMPLE_RATE, load_audio
from phi4mm.sampling import SamplingParams

# --- prompts (model card, "Speech-Language Format") -----------------------------------------------------------
ASR_PROMPT = "Transcribe the audio clip into text."
AST_PROMPT = "Translate the audio to {lang}."
TASKS = ("transcribe", "translate")
# The model card's audio languages; keys are ISO 639-1 codes (what OpenAI's `language` field carries).
SPEECH_LANGUAGES = {"en": "English", "zh": "Chinese", "de": "German", "fr": "French", "it": "Italian",
                    "ja": "Japanese", "es": "Spanish", "pt": "Portuguese"}
_SPECIAL = re.compile(r"<\|[^|>]*\|>")

# --- splitting ------------------------------------------------------------------------------------------------
SPLIT_HOP = 160  # samples = 10 ms: granularity of the cut search
SPLIT_WINDOW = 1600  # samples = 100 ms: the quiet region a cut is centred in (10 hops)
SPLIT_SEARCH_SECONDS = 5.0  # look for the quietest window in the last 5 s before each limit
SPLIT_MIN_TAIL_SECONDS = 1.0  # never leave a final piece shorter than this (or than half the search span)
MIN_MAX_SECONDS = 1.0  # segments shorter than this give the model too little context

# --- formats --------------------------------------------------------------------------------------------------
FORMATS = ("json", "text", "txt", "srt", "vtt", "verbose_json")
FORMAT_EXTENSIONS = {"json": "json", "text": "txt", "txt": "txt", "srt": "srt", "vtt": "vtt",
                     "verbose_json": "json"}


@dataclass
class Segment:
    """One timed piece of a transcript; times in seconds from the start of the clip.

    tokens: the generated token ids (filled by `transcribe`, reported in verbose_json; may stay empty).
    """

    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)


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


def transcription_prompt(task: str = "transcribe", language: str | None = None, prompt: str | None = None) -> str:
    """The full prompt in the model card's speech format, e.g.

        <|user|><|audio_1|>Transcribe the audio clip into text.<|end|><|assistant|>
        <|user|><|audio_1|>Translate the audio to French.<|end|><|assistant|>

    task: "transcribe" (language is a validated hint only: the card's recognition prompt names none) or
    "translate" (language = the target, English by default). prompt: OpenAI's context / spelling hint, appended
    as a sentence after the instruction; it may not contain special tokens such as <|end|>.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported; use one of {', '.join(TASKS)}")
    lang = language_name(language)
    text = ASR_PROMPT if task == "transcribe" else AST_PROMPT.format(lang=lang or "English")
    if prompt is not None and prompt.strip():
        if _SPECIAL.search(prompt):
            raise ValueError(f"the prompt {prompt[:60]!r} contains a special token like <|end|>; send plain text")
        text += f" Context (use it for names and spelling): {' '.join(prompt.split())}"
    return f"<|user|><|audio_1|>{text}<|end|><|assistant|>"


def split_audio(wav16k: np.ndarray, max_seconds: float = 30.0) -> list[tuple[float, float, np.ndarray]]:
    """Cut a 16 kHz mono waveform (n,) into (start_s, end_s, samples) pieces of at most `max_seconds`.

    Pieces tile the clip exactly (each start is the previous end; sample-exact, no overlap). A cut is placed
    at the centre of the lowest-energy 100 ms window among those ending within the last
    min(5 s, max_seconds / 2) before the limit; among equally quiet windows the middle one is taken (so a
    pause is cut in its middle). The final piece is never shorter than min(1 s, a quarter of max_seconds).
    Deterministic: it depends only on the samples.
    """
    wav = np.asarray(wav16k)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(f"split_audio needs a non-empty 1-D 16 kHz waveform; got shape {wav.shape}")
    if not max_seconds >= MIN_MAX_SECONDS:
        raise ValueError(f"max_seconds={max_seconds} is too short; use at least {MIN_MAX_SECONDS} s")
    n = wav.size
    max_n = int(max_seconds * SAMPLE_RATE)
    search_n = int(min(SPLIT_SEARCH_SECONDS, max_seconds / 2) * SAMPLE_RATE)
    min_tail = int(min(SPLIT_MIN_TAIL_SECONDS, max_seconds / 4) * SAMPLE_RATE)  # <= search_n / 2
    cuts, pos = [0], 0
    while n - pos > max_n:
        lo, hi = pos + max_n - search_n, min(pos + max_n, n - min_tail)  # the cut lies in [lo, hi]
        cuts.append(pos := _quietest_cut(wav, lo, hi))
    cuts.append(n)
    return [(a / SAMPLE_RATE, b / SAMPLE_RATE, wav[a:b]) for a, b in itertools.pairwise(cuts)]


def _quietest_cut(wav: np.ndarray, lo: int, hi: int) -> int:
    """The centre sample of the quietest 100 ms window whose centre lies in [lo, hi]."""
    start = max(lo - SPLIT_WINDOW // 2, 0)
    n_hops = (hi + SPLIT_WINDOW // 2 - start) // SPLIT_HOP
    seg = wav[start:start + n_hops * SPLIT_HOP].astype(np.float64)
    hop_energy = (seg.reshape(n_hops, SPLIT_HOP) ** 2).sum(1)  # (n_hops,): exact zeros stay zero
    per = SPLIT_WINDOW // SPLIT_HOP
    win = np.convolve(hop_energy, np.ones(per), "valid")  # (n_hops - per + 1,) energy of each 100 ms window
    centres = start + np.arange(win.size) * SPLIT_HOP + SPLIT_WINDOW // 2
    ok = (centres >= lo) & (centres <= hi)
    win, centres = win[ok], centres[ok]
    quiet = np.flatnonzero(win <= win.min() * (1 + 1e-6))  # ties (e.g. digital silence): take the middle
    return int(centres[quiet[len(quiet) // 2]])


# --- running --------------------------------------------------------------------------------------------------
def transcription_requests(audio: Any, task: str = "transcribe", language: str | None = None,
                           prompt: str | None = None, max_seconds: float = 30.0, max_tokens: int = 448
                           ) -> list[tuple[float, float, dict]]:
    """(start_s, end_s, Engine.add_request kwargs) for every piece of `audio` (anything load_audio takes).

    For callers that drive the engine themselves (the server, the CLI batching several files)."""
    text = transcription_prompt(task, language, prompt)
    params = SamplingParams(max_tokens=max_tokens).validate()  # greedy
    wav = load_audio(audio)
    return [(a, b, {"prompt": text, "audios": [(piece, SAMPLE_RATE)], "params": params})
            for a, b, piece in split_audio(wav, max_seconds)]


def transcribe(engine, audio: Any, task: str = "transcribe", language: str | None = None,
               prompt: str | None = None, max_seconds: float = 30.0, max_tokens: int = 448) -> list[Segment]:
    """Transcribe (or translate) any audio input through an `Engine`; returns the pieces in time order.

    All pieces are queued at once and decode as one batch. Uses `engine.generate`, so do not call it while
    another thread is stepping the same engine.
    """
    reqs = transcription_requests(audio, task, language, prompt, max_seconds, max_tokens)
    results = engine.generate([r for _, _, r in reqs])
    out = []
    for (a, b, _), res in zip(reqs, results):
        if res["finish_reason"] == "error":
            raise RuntimeError(f"the piece {a:.2f}-{b:.2f} s failed: {res.get('error')}")
        out.append(Segment(a, b, res["text"].strip(), list(res["token_ids"])))
    return out


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
    "segments"}. Statistics we do not measure get neutral values: temperature 0.0 (greedy decoding),
    avg_logprob 0.0 and no_speech_prob 0.0 (not computed), seek = start in 10 ms frames as Whisper counts;
    compression_ratio is computed from the text as Whisper does. language: the name given (lower case,
    Whisper style) or "unknown" (we do not detect it; translation defaults to "english"). duration: given, or
    the end of the last segment.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    text = " ".join(s.text.strip() for s in segments if s.text.strip())
    if fmt == "json":
        return {"text": text}
    if fmt in ("text", "txt"):
        return text + "\n"
    if fmt in ("srt", "vtt"):
        sep = "," if fmt == "srt" else "."
        cues = [s for s in segments if _cue_text(s.text)]
        blocks = [f"{_timestamp(s.start, sep)} --> {_timestamp(s.end, sep)}\n{_cue_text(s.text)}\n" for s in cues]
        if fmt == "srt":
            return "\n".join(f"{i}\n{b}" for i, b in enumerate(blocks, 1))
        return "WEBVTT\n\n" + "\n".join(blocks)
    name = language_name(language) or ("English" if task == "translate" else "unknown")
    return {
        "task": task,
        "language": name.lower(),
        "duration": round(float(duration if duration is not None else (segments[-1].end if segments else 0.0)), 3),
        "text": text,
        "segments": [{"id": i, "seek": round(s.start * 100), "start": round(s.start, 3),
                      "end": round(s.end, 3), "text": s.text.strip(), "tokens": list(s.tokens),
                      "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": round(_compression_ratio(s.text), 4),
                      "no_speech_prob": 0.0} for i, s in enumerate(segments)],
    }


def render(segments: list[Segment], fmt: str, **kw: Any) -> str:
    """format_segments as file contents: JSON formats serialised (UTF-8, indented), the others as they are."""
    out = format_segments(segments, fmt, **kw)
    return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, indent=2) + "\n"
