"""Offline speech synthesis for the micro model's data: flite / espeak-ng voices plus deterministic augmentation.

`speak(text, path, rng, tmp)` synthesises `text` with a voice drawn from `rng`, perturbs it (speed, volume,
noise, padding) and writes 16 kHz mono 16-bit FLAC. All randomness comes from the `random.Random` passed in,
so the same item gives the same bytes in any worker process. The engines themselves are deterministic: the
same binary gives the same waveform for the same text and settings.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000  # what the audio encoder expects; everything is written at this rate
FLITE_VOICES = ("kal16", "awb", "rms", "slt", "kal")
ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
HELDOUT_VOICE = "en-gb-x-rp"  # espeak-ng voice never used for training: the held-out-speaker ASR test
FLITE_SHARE = 0.6  # share of training utterances spoken by flite; the rest by espeak-ng
ESPEAK_SPEED = (130, 190)  # words per minute (espeak-ng -s)
ESPEAK_PITCH = (30, 70)  # 0..99 (espeak-ng -p)
SPEED = (0.9, 1.1)  # tempo factor applied by resampling (pitch moves with it, like a tape)
PEAK = (0.3, 1.0)  # output peak amplitude
SNR_DB = (15.0, 40.0)  # added white or pink noise
PAD_S = (0.0, 0.3)  # random silence before and after the speech
MIN_S, MAX_S = 0.5, 10.0  # clip length bounds: shorter is padded, longer is an error (the text is too long)
INSTALL_HINT = "install it (Debian/Ubuntu: apt-get install flite espeak-ng)"


class MissingTool(OSError):
    """A program, font or package the micro data needs is not installed; the message says what to install.
    An OSError, so the CLI reports it in one sentence with exit code 2."""


def find_binary(name: str) -> str:
    """Path of `flite` or `espeak-ng`; env PHI4MM_FLITE / PHI4MM_ESPEAK override the PATH lookup."""
    env = {"flite": "PHI4MM_FLITE", "espeak-ng": "PHI4MM_ESPEAK"}[name]
    path = os.environ.get(env) or shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        where = f"${env}={os.environ[env]!r} is not an executable" if os.environ.get(env) else f"{name} is not on PATH"
        raise MissingTool(f"speech synthesis needs {name}, but {where}; {INSTALL_HINT}, or set ${env} to its path")
    return path


def check_binaries() -> None:
    """Fail early (before any worker starts) when a synthesiser is missing."""
    find_binary("flite")
    find_binary("espeak-ng")


def pick_voice(rng: random.Random, heldout: bool = False) -> tuple[str, str, int, int]:
    """(engine, voice, espeak speed, espeak pitch): 60% flite / 40% espeak-ng, or the held-out espeak voice."""
    if heldout:
        return "espeak-ng", HELDOUT_VOICE, rng.randint(*ESPEAK_SPEED), rng.randint(*ESPEAK_PITCH)
    if rng.random() < FLITE_SHARE:
        return "flite", rng.choice(FLITE_VOICES), 0, 0
    return "espeak-ng", rng.choice(ESPEAK_VOICES), rng.randint(*ESPEAK_SPEED), rng.randint(*ESPEAK_PITCH)


def synthesize(text: str, voice: tuple[str, str, int, int], tmp: Path) -> tuple[np.ndarray, int]:
    """Run the engine into a temp WAV in `tmp`; returns (float32 mono samples, sample rate)."""
    engine, name, speed, pitch = voice
    wav = tmp / f"tts-{os.getpid()}.wav"
    if engine == "flite":
        cmd = [find_binary("flite"), "-voice", name, "-t", text, "-o", str(wav)]
    else:
        # "--" keeps a text that starts with "-" from being read as an option.
        cmd = [find_binary("espeak-ng"), "-v", name, "-s", str(speed), "-p", str(pitch), "-w", str(wav), "--", text]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)  # the error below says more
    if res.returncode != 0 or not wav.is_file():
        raise RuntimeError(f"{' '.join(cmd[:-1])} {text!r} failed (exit {res.returncode}): {res.stderr.strip()[:300]}; "
                           f"check that the voice {name!r} is installed ({INSTALL_HINT})")
    try:
        x, sr = sf.read(wav, dtype="float32", always_2d=True)
    finally:
        wav.unlink(missing_ok=True)
    return x.mean(axis=1), sr


def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS 1/f noise: white noise shaped by 1/sqrt(f) in the frequency domain."""
    spec = np.fft.rfft(rng.standard_normal(n))
    spec[1:] /= np.sqrt(np.arange(1, spec.size))
    spec[0] = 0
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def augment(x: np.ndarray, sr: int, rng: random.Random) -> np.ndarray:
    """Speed, padding, noise and volume; returns float32 samples at SAMPLE_RATE."""
    nrng = np.random.default_rng(rng.getrandbits(63))
    # Reading the clip as if it were recorded at sr*speed and resampling to 16 kHz plays it `speed` times faster.
    speed = rng.uniform(*SPEED)
    y = soxr.resample(x.astype(np.float32), sr * speed, SAMPLE_RATE).astype(np.float64)
    power = np.mean(y ** 2) + 1e-12  # speech power, measured before the padding dilutes it
    lead, trail = (int(rng.uniform(*PAD_S) * SAMPLE_RATE) for _ in range(2))
    short = max(0, int(MIN_S * SAMPLE_RATE) - (y.size + lead + trail))
    y = np.concatenate([np.zeros(lead + short // 2), y, np.zeros(trail + short - short // 2)])
    noise = _pink(y.size, nrng) if rng.random() < 0.5 else nrng.standard_normal(y.size)
    noise *= np.sqrt(power / 10 ** (rng.uniform(*SNR_DB) / 10) / (np.mean(noise ** 2) + 1e-12))
    y = y + noise
    y *= rng.uniform(*PEAK) / (np.abs(y).max() + 1e-12)
    return y.astype(np.float32)


def speak(text: str, path: str | Path, rng: random.Random, tmp: str | Path, heldout_voice: bool = False) -> str:
    """Synthesise `text` into a FLAC at `path` with a voice from `rng`; returns the voice name used."""
    voice = pick_voice(rng, heldout_voice)
    x, sr = synthesize(text, voice, Path(tmp))
    y = augment(x, sr, rng)
    if y.size > MAX_S * SAMPLE_RATE:
        raise RuntimeError(f"{text!r} spoken by {voice[1]} lasts {y.size / SAMPLE_RATE:.1f} s, over the {MAX_S} s "
                           "limit; use a shorter text")
    sf.write(path, y, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return voice[1]
