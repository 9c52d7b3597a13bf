"""Offline speech synthesis for the micro model's data: flite / espeak-ng voices plus deterministic augmentation.

`speak(text, path, rng, tmp)` synthesises `text` with a training voice drawn from `rng` (`micro.voices` holds
the split), perturbs it and writes 16 kHz mono 16-bit FLAC. All randomness comes from the `random.Random`
passed in, so the same item gives the same bytes in any worker process; the engines themselves are
deterministic (the same binary gives the same waveform for the same text and settings).

Augmentations (`Conditions`, drawn by `draw_conditions`): speaking rate 120-200 words a minute (asked of the
engine), pitch (a tape-speed shift in numpy, the engine's rate compensated so the rate stays as drawn),
loudness (RMS level), mild white or pink noise, and room reverb (a synthetic exponentially decaying impulse
response). `AUGMENT_P` gives each its probability, so a probe can switch one off and see what it paid.
"""
from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from phi4mm.micro.voices import (  # noqa: F401 (re-exported: the micro speech API)
    INSTALL_HINT,
    MissingTool,
    check_binaries,
    draw_voice,
    find_binary,
)

SAMPLE_RATE = 16000  # what the audio encoder expects; everything is written at this rate
RATE_WPM = (120, 200)  # speaking rate, words per minute (the range the held-out goals name)
SCORING_WPM = 150  # the rate of the held-out per-voice sets
# flite has no words-a-minute knob, only a duration factor; its voices speak ~160 espeak-ng words a minute
# (a 9-word sentence: 2.9-3.5 s against espeak-ng's 3.3 s at 150), so stretch = FLITE_WPM / wanted rate.
FLITE_WPM = 160
ESPEAK_PITCH = (20, 80)  # espeak-ng -p (0..99): the intonation's base pitch
PITCH_SEMITONES = (-3.0, 3.0)  # the tape shift on top (moves formants too: a different-sized speaker)
LEVEL_DBFS = (-35.0, -12.0)  # speech RMS level; a peak over -0.5 dBFS is scaled down (no clipping)
SNR_DB = (10.0, 40.0)  # added white or pink noise, against the speech's power
RT60_S = (0.15, 0.7)  # reverb decay time of a small-to-medium room
DRR_DB = (0.0, 12.0)  # direct-to-reverberant ratio: the direct sound stays louder than the room
PAD_S = (0.0, 0.3)  # random silence before and after the speech
# Probability of each augmentation in training; speed and level are always drawn (they have no "off").
AUGMENT_P = {"pitch": 0.7, "noise": 0.6, "reverb": 0.4}
MIN_S, MAX_S = 0.5, 10.0  # clip length bounds: shorter is padded, longer is an error (the text is too long)


@dataclass(frozen=True)
class Conditions:
    """How one utterance is spoken and recorded. None / 0 means that augmentation is off."""
    wpm: float = SCORING_WPM
    espeak_pitch: int = 50  # espeak-ng's default
    semitones: float = 0.0
    level_dbfs: float = -20.0
    snr_db: float | None = None
    pink: bool = False
    rt60_s: float | None = None
    drr_db: float = 6.0
    pad_s: tuple[float, float] = (0.1, 0.1)


def draw_conditions(rng: random.Random) -> Conditions:
    """Training conditions: every augmentation drawn from its range (AUGMENT_P: how often each is on)."""
    wpm = rng.uniform(*RATE_WPM)
    pitch = rng.randint(*ESPEAK_PITCH)
    semis = rng.uniform(*PITCH_SEMITONES) if rng.random() < AUGMENT_P["pitch"] else 0.0
    level = rng.uniform(*LEVEL_DBFS)
    snr = rng.uniform(*SNR_DB) if rng.random() < AUGMENT_P["noise"] else None
    pink = rng.random() < 0.5
    rt60 = rng.uniform(*RT60_S) if rng.random() < AUGMENT_P["reverb"] else None
    drr = rng.uniform(*DRR_DB)
    pad = (rng.uniform(*PAD_S), rng.uniform(*PAD_S))
    return Conditions(wpm, pitch, semis, level, snr, pink, rt60, drr, pad)


def synthesize(text: str, engine: str, voice: str, wpm: float, espeak_pitch: int, tmp: Path,
               ) -> tuple[np.ndarray, int]:
    """Run the engine into a temp WAV in `tmp` at `wpm` words a minute; returns (float32 mono, sample rate)."""
    wav = tmp / f"tts-{os.getpid()}.wav"
    if engine == "flite":
        cmd = [find_binary("flite"), "-voice", voice, "--setf", f"duration_stretch={FLITE_WPM / wpm:.4f}",
               "-t", text, "-o", str(wav)]
    else:
        # "--" keeps a text that starts with "-" from being read as an option.
        cmd = [find_binary("espeak-ng"), "-v", voice, "-s", str(round(wpm)), "-p", str(espeak_pitch),
               "-w", str(wav), "--", text]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)  # the error below says more
    if res.returncode != 0 or not wav.is_file():
        raise RuntimeError(f"{' '.join(cmd[:-1])} {text!r} failed (exit {res.returncode}): {res.stderr.strip()[:300]}; "
                           f"check that the voice {voice!r} is installed ({INSTALL_HINT})")
    try:
        x, sr = sf.read(wav, dtype="float32", always_2d=True)
    finally:
        wav.unlink(missing_ok=True)
    return x.mean(axis=1), sr


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS 1/f noise: white noise shaped by 1/sqrt(f) in the frequency domain."""
    spec = np.fft.rfft(rng.standard_normal(n))
    spec[1:] /= np.sqrt(np.arange(1, spec.size))
    spec[0] = 0
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def room_response(rt60_s: float, drr_db: float, rng: np.random.Generator, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A synthetic room impulse response: a unit direct path, then noise decaying 60 dB over rt60_s (low-passed
    a little as real rooms absorb highs), scaled so the direct sound is drr_db above the tail's energy."""
    n = int(rt60_s * sr)
    t = np.arange(n) / sr
    tail = rng.standard_normal(n) * 10 ** (-3 * t / rt60_s)  # -60 dB at rt60: amplitude 10^(-3 t / rt60)
    tail = np.convolve(tail, np.ones(4) / 4, mode="same")  # a gentle low-pass
    tail[: int(0.002 * sr)] = 0  # the first reflection arrives ~2 ms after the direct sound
    tail *= np.sqrt(10 ** (-drr_db / 10) / (np.sum(tail ** 2) + 1e-12))
    tail[0] = 1.0
    return tail


def apply_conditions(x: np.ndarray, sr: int, c: Conditions, rng: np.random.Generator) -> np.ndarray:
    """Pitch shift, padding, reverb, noise and level; returns float32 samples at SAMPLE_RATE."""
    # Reading the clip as if recorded at sr*f and resampling to 16 kHz plays it f times faster and higher; the
    # engine spoke at wpm / f (`speak`), so the rate comes out as drawn.
    f = 2 ** (c.semitones / 12)
    y = soxr.resample(x.astype(np.float32), sr * f, SAMPLE_RATE).astype(np.float64)
    lead, trail = (int(p * SAMPLE_RATE) for p in c.pad_s)
    short = max(0, int(MIN_S * SAMPLE_RATE) - (y.size + lead + trail))
    speech = slice(lead + short // 2, lead + short // 2 + y.size)
    y = np.concatenate([np.zeros(lead + short // 2), y, np.zeros(trail + short - short // 2)])
    if c.rt60_s:
        # Imported here: every command imports this module to find the embedded model, and scipy comes with
        # the micro extra only. A reverb tail is up to 11k taps: through the FFT.
        from scipy.signal import fftconvolve
        y = fftconvolve(y, room_response(c.rt60_s, c.drr_db, rng))[: y.size]  # the tail past the end is cut
    power = np.mean(y[speech] ** 2) + 1e-12  # speech power, measured without the padding that would dilute it
    if c.snr_db is not None:
        noise = pink_noise(y.size, rng) if c.pink else rng.standard_normal(y.size)
        y = y + noise * np.sqrt(power / 10 ** (c.snr_db / 10) / (np.mean(noise ** 2) + 1e-12))
        power = np.mean(y[speech] ** 2) + 1e-12
    y *= 10 ** (c.level_dbfs / 20) / np.sqrt(power)
    peak = np.abs(y).max()
    if peak > 10 ** (-0.5 / 20):
        y *= 10 ** (-0.5 / 20) / peak
    return y.astype(np.float32)


def speak_as(text: str, path: str | Path, engine: str, voice: str, c: Conditions, rng: random.Random,
             tmp: str | Path) -> None:
    """Synthesise `text` with this voice under conditions `c` into a FLAC at `path` (rng: the noise and room)."""
    f = 2 ** (c.semitones / 12)
    x, sr = synthesize(text, engine, voice, c.wpm / f, c.espeak_pitch, Path(tmp))
    y = apply_conditions(x, sr, c, np.random.default_rng(rng.getrandbits(63)))
    if y.size > MAX_S * SAMPLE_RATE:
        raise RuntimeError(f"{text!r} spoken by {voice} lasts {y.size / SAMPLE_RATE:.1f} s, over the {MAX_S} s "
                           "limit; use a shorter text")
    sf.write(path, y, SAMPLE_RATE, format="FLAC", subtype="PCM_16")


def speak(text: str, path: str | Path, rng: random.Random, tmp: str | Path, heldout_voice: bool = False) -> str:
    """Synthesise `text` into a FLAC at `path` with a voice and conditions from `rng`: a training voice, or
    (heldout_voice) one of the held-out ones (`micro.voices`). Returns the voice name used."""
    engine, voice = draw_voice(rng, heldout_voice)
    speak_as(text, path, engine, voice, draw_conditions(rng), rng, tmp)
    return voice
