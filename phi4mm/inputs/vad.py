"""Voice-activity detection and cue cutting: a stream of 16 kHz audio -> sentence-sized speech cues.

    for cue in cut_cues(stream_audio("talk.m4a")):   # Cue(start, end, samples, speech_prob), in time order
        ...

The detector is Silero VAD (its ~2 MB model ships inside the `silero-vad` pip package; it runs on torch, no
download): a speech probability for every 32 ms frame. Frames are grouped into cues:

  * speech starts when a frame's probability reaches SPEECH_THRESHOLD (0.5) and goes on while frames stay above
    END_THRESHOLD (0.35), the hysteresis Silero's own segmenter uses;
  * a pause of at least `pause_seconds` (0.5 s, about a sentence break) ends a cue;
  * a cue reaching `max_cue_seconds` (15 s) is cut at the least speech-like frame of its last few seconds (a
    breath between words), and the next cue starts exactly there;
  * cues keep PAD_SECONDS of audio either side of their speech (never overlapping a neighbour), and bursts of
    speech shorter than MIN_SPEECH_SECONDS (clicks, coughs) are dropped.

Timestamps are the cut points, in seconds from the start of the stream. A cue's `speech_prob` is the mean frame
probability over its speech; `1 - speech_prob` is reported as Whisper's `no_speech_prob`. Memory is bounded by
one input block plus one cue, whatever the stream's length. Digital silence (every sample under -80 dBFS) is
scored 0 without running the network, which keeps long silent stretches cheap.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

SAMPLE_RATE = 16000
FRAME = 512  # samples = 32 ms: Silero's frame at 16 kHz
FRAME_SECONDS = FRAME / SAMPLE_RATE
SPEECH_THRESHOLD = 0.5  # a frame at or above this starts speech
END_THRESHOLD = 0.35  # speech continues while frames stay at or above this (Silero's threshold - 0.15)
SILENCE_PEAK = 1e-4  # -80 dBFS: a frame this quiet is digital silence, scored 0 without the network
MIN_SPEECH_SECONDS = 0.25  # shorter bursts are clicks or coughs
PAD_SECONDS = 0.2  # audio kept before and after the speech of a cue: the model hears whole words
PAUSE_SECONDS = 0.5  # a pause this long ends a cue (sentence break)
MAX_CUE_SECONDS = 15.0  # the default longest cue: a two-line subtitle
SPLIT_SEARCH_SECONDS = 4.0  # a forced cut looks for the least speech-like frame in this last stretch
MIN_CUE_SECONDS = 2.0  # max_cue_seconds below this leaves no room to search for a cut

_local = threading.local()  # the network keeps recurrent state: one instance per thread


def _model():
    if getattr(_local, "model", None) is None:
        try:
            from silero_vad import load_silero_vad
        except ImportError:
            raise ValueError("voice-activity detection needs the silero-vad package: `pip install silero-vad`"
                             ) from None
        with warnings.catch_warnings():  # its loader uses torch.jit.load, which torch now flags as deprecated
            warnings.simplefilter("ignore", FutureWarning)
            _local.model = load_silero_vad()
    return _local.model


def is_silent(samples: np.ndarray) -> bool:
    """Whether every sample is below -80 dBFS (digital silence)."""
    return samples.size == 0 or float(np.abs(samples).max()) < SILENCE_PEAK


class FrameScorer:
    """Speech probability of consecutive 32 ms frames; the network's state carries across calls."""

    def __init__(self) -> None:
        self.model = _model()
        self.model.reset_states()
        self.fresh = True  # state already reset (after silence): nothing to carry

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """frames: float32 (k, 512) -> probabilities (k,)."""
        peaks = np.abs(frames).max(axis=1) if len(frames) else np.zeros(0)  # (k,)
        out = np.zeros(len(frames), dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))  # (k, 512)
        for i in np.flatnonzero(peaks >= SILENCE_PEAK):
            if i > 0 and peaks[i - 1] < SILENCE_PEAK and not self.fresh:
                self.model.reset_states()  # after digital silence the context is silence anyway
            out[i] = float(self.model(x[i], SAMPLE_RATE))
            self.fresh = False
        return out


@dataclass
class Cue:
    """A stretch of speech: times in seconds, its 16 kHz samples (n,), the mean speech probability of its frames."""

    start: float
    end: float
    samples: np.ndarray
    speech_prob: float

    @property
    def no_speech_prob(self) -> float:
        return round(1.0 - self.speech_prob, 4)


class CueCutter:
    """Feed 16 kHz mono blocks of any size; get back the cues they complete (see the module docstring)."""

    def __init__(self, max_cue_seconds: float = MAX_CUE_SECONDS, pause_seconds: float = PAUSE_SECONDS) -> None:
        if not max_cue_seconds >= MIN_CUE_SECONDS:
            raise ValueError(f"max_cue_seconds={max_cue_seconds} is too short; use at least {MIN_CUE_SECONDS} s")
        self.scorer = FrameScorer()
        self.pad = int(PAD_SECONDS * SAMPLE_RATE)
        self.max_frames = int((max_cue_seconds * SAMPLE_RATE - 2 * self.pad) // FRAME)  # speech frames per cue
        self.pause_frames = max(1, round(pause_seconds / FRAME_SECONDS))
        self.search_frames = min(round(SPLIT_SEARCH_SECONDS / FRAME_SECONDS), self.max_frames // 3)
        self.min_speech = max(1, round(MIN_SPEECH_SECONDS / FRAME_SECONDS))
        self.buf = np.zeros(0, np.float32)  # samples [buf_start, buf_start + len)
        self.buf_start = 0
        self.leftover = np.zeros(0, np.float32)  # < one frame, not yet scored
        self.frame = 0  # frames scored so far
        self.cue_start: int | None = None  # first speech frame of the open cue
        self.last_speech = 0  # last frame above END_THRESHOLD in the open cue
        self.probs: list[float] = []  # probabilities of the open cue's frames
        self.prev_end = 0  # sample where the previous cue ended: the next may not start before it
        self.total = 0  # samples fed
        self.peak = 0.0

    @property
    def duration(self) -> float:
        return self.total / SAMPLE_RATE

    def feed(self, block: np.ndarray) -> list[Cue]:
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        self.total += block.size
        if block.size:
            self.peak = max(self.peak, float(np.abs(block).max()))
        self.buf = np.concatenate([self.buf, block])
        data = np.concatenate([self.leftover, block])
        k = data.size // FRAME
        self.leftover = data[k * FRAME:]
        probs = self.scorer(data[:k * FRAME].reshape(k, FRAME))  # (k,)
        cues = [c for p in probs if (c := self._step(float(p))) is not None]
        self._trim()
        return cues

    def finish(self) -> list[Cue]:
        """Score the partial last frame and close the open cue at the end of the stream."""
        cues = []
        if self.leftover.size:
            tail = np.zeros((1, FRAME), np.float32)
            tail[0, :self.leftover.size] = self.leftover
            self.leftover = np.zeros(0, np.float32)
            if (c := self._step(float(self.scorer(tail)[0]))) is not None:
                cues.append(c)
        if self.cue_start is not None and (c := self._close(self.last_speech + 1, pad_end=True)) is not None:
            cues.append(c)
        return cues

    # ---- the state machine, one frame at a time --------------------------------------------------------------
    def _step(self, p: float) -> Cue | None:
        f = self.frame
        self.frame += 1
        if self.cue_start is None:
            if p >= SPEECH_THRESHOLD:
                self.cue_start, self.last_speech, self.probs = f, f, [p]
            return None
        self.probs.append(p)
        if p >= END_THRESHOLD:
            self.last_speech = f
        if f - self.last_speech >= self.pause_frames:
            return self._close(self.last_speech + 1, pad_end=True)
        if f + 1 - self.cue_start >= self.max_frames:
            return self._force_cut()
        return None

    def _force_cut(self) -> Cue | None:
        """The open cue is as long as a cue may be: cut at its least speech-like recent frame, keep the rest open."""
        probs = np.asarray(self.probs)
        lo = len(probs) - self.search_frames
        smooth = np.convolve(probs, np.ones(3) / 3, "same")[lo:]  # one-frame dips are noise
        rel = lo + int(np.flatnonzero(smooth <= smooth.min() + 1e-6)[-1])  # the latest quietest frame
        cut = self.cue_start + rel
        cue = self._close(cut, pad_end=False)
        rest = self.probs[rel:]
        self.cue_start, self.probs = cut, rest
        self.last_speech = max(self.last_speech, cut)
        return cue

    def _close(self, end_frame: int, pad_end: bool) -> Cue | None:
        probs = np.asarray(self.probs[:end_frame - self.cue_start])
        start = max(self.cue_start * FRAME - self.pad, self.prev_end, 0)
        end = min(end_frame * FRAME + (self.pad if pad_end else 0), self.total)
        self.cue_start, self.probs = None, []
        speech = probs[probs >= END_THRESHOLD]
        if speech.size < self.min_speech or end <= start:
            return None
        self.prev_end = end
        samples = self.buf[start - self.buf_start:end - self.buf_start].copy()
        return Cue(start / SAMPLE_RATE, end / SAMPLE_RATE, samples, float(speech.mean()))

    def _trim(self) -> None:
        """Drop samples no cue can still need: before the open cue's padded start, or before the last pad."""
        keep_from = (self.cue_start * FRAME if self.cue_start is not None else self.frame * FRAME) - self.pad
        keep_from = max(keep_from, self.buf_start)
        self.buf = self.buf[keep_from - self.buf_start:]
        self.buf_start = keep_from


def cut_cues(blocks: Iterable[np.ndarray], max_cue_seconds: float = MAX_CUE_SECONDS,
             pause_seconds: float = PAUSE_SECONDS, cutter: CueCutter | None = None) -> Iterator[Cue]:
    """Cues of a stream of 16 kHz blocks (e.g. av_audio.stream_audio), in time order, as soon as each closes.

    Pass your own `cutter` to read its `duration` and `peak` afterwards."""
    cutter = cutter or CueCutter(max_cue_seconds, pause_seconds)
    for block in blocks:
        yield from cutter.feed(block)
    yield from cutter.finish()


__all__ = ["MAX_CUE_SECONDS", "Cue", "CueCutter", "FrameScorer", "cut_cues", "is_silent"]
