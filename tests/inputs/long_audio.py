"""A long recording for tests and benches: real speech clips (tests/data) between long stretches of silence,
written block by block so that making it takes no more memory than one clip."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from phi4mm.inputs.audio import SAMPLE_RATE, load_audio

DATA = Path(__file__).parents[1] / "data"
CLIPS = ("espeak_weather.flac", "flite_quick_brown_fox.flac", "librivox_ill_disposed.flac")


def write_long_recording(path: Path, minutes: float, speech_every_s: float = 60.0, gap_s: float = 0.8,
                         noise: float = 0.0) -> list[tuple[float, float]]:
    """Write `minutes` of 16 kHz 16-bit WAV: every `speech_every_s` seconds the three clips, `gap_s` apart, then
    silence (digital zeros, or white noise of RMS `noise`). Returns the (start, end) seconds of each clip."""
    clips = [load_audio(DATA / c) for c in CLIPS]
    total = int(minutes * 60 * SAMPLE_RATE)
    period = int(speech_every_s * SAMPLE_RATE)
    gap = int(gap_s * SAMPLE_RATE)
    rng = np.random.default_rng(0)
    spans: list[tuple[float, float]] = []
    with sf.SoundFile(path, "w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16") as out:
        pos = 0
        while pos < total:
            n = min(period, total - pos)
            block = (noise * rng.standard_normal(n)).astype(np.float32)  # (n,)
            at = gap
            for c in clips:
                if at + c.size + gap > n:
                    break
                block[at:at + c.size] += c
                spans.append(((pos + at) / SAMPLE_RATE, (pos + at + c.size) / SAMPLE_RATE))
                at += c.size + gap
            out.write(block)
            pos += n
    return spans
