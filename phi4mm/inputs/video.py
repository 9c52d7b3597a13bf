"""Video input: a clip becomes frames (images) sampled by time, sized to a token budget, and optionally its audio.

Phi-4-multimodal has no video tower: the model card's video examples pass frames as consecutive images. So a
video is expanded, before anything else, into `<|image_k|>` placeholders, one per frame (and an `<|audio_k|>`
after them when its sound is wanted):

    clip = load_video("clip.mp4", fps=1.0, max_frames=32, max_image_tokens=16384)
    clip.frames, clip.times, clip.audio     # PIL images, their times in seconds, 16 kHz mono or None

A video travels through chat messages and `prepare` as a small dict, so it survives JSON (batch lines):

    {"video": <path | bytes | data: URL>, "fps": 1.0, "max_frames": 32, "max_image_tokens": 16384,
     "use_audio": False}

Sampling: one frame every 1/fps seconds (the first frame at t = 0); a clip longer than max_frames / fps is
sampled at max_frames times spread evenly over its whole length instead. Sizing: each frame costs
`num_image_tokens(w, h)` = 256 per 448-pixel crop + a 272-token global view + separators, so the frames are
shrunk, all alike, to the largest size whose crop grid keeps frames x tokens within max_image_tokens (frames
are never enlarged); when even the one-crop size does not fit, fewer frames are kept (evenly spread).
Decoding is PyAV's (FFmpeg): any container and codec FFmpeg reads.
"""
from __future__ import annotations

import base64
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from phi4mm.inputs.audio import SAMPLE_RATE, AudioError, load_audio
from phi4mm.inputs.av_audio import DecodeError, decode_av, diagnose
from phi4mm.inputs.image import CROP_SIZE, DEFAULT_DYNAMIC_HD, num_image_tokens

DEFAULT_FPS = 1.0
DEFAULT_MAX_FRAMES = 32
DEFAULT_MAX_IMAGE_TOKENS = 16384  # all frames together: 38 one-crop 16:9 frames, or 18 two-by-two ones
MAX_FRAMES_LIMIT = 512  # a bound on what one request may ask for
MAX_VIDEO_AUDIO_SECONDS = 1800.0  # the chat limit for one audio clip
OPTION_KEYS = ("fps", "max_frames", "max_image_tokens", "use_audio")
SIZE_STEPS = 24  # candidate frame sizes tried between one crop and full size


class VideoError(ValueError):
    """A video that cannot become frames; the message names the video, the cause and the fix."""


def is_video(item: Any) -> bool:
    """Whether an `images` entry is a video reference (a dict with a "video" key) rather than an image."""
    return isinstance(item, dict) and "video" in item


def video_ref(source: Any, **options: Any) -> dict:
    """The dict form of a video for `images` lists and chat parts; unknown options are refused."""
    bad = set(options) - set(OPTION_KEYS)
    if bad:
        raise VideoError(f"unknown video option(s) {sorted(bad)}; use {', '.join(OPTION_KEYS)}")
    return {"video": source, **{k: v for k, v in options.items() if v is not None}}


@dataclass
class Clip:
    """Decoded frames (RGB PIL, all one size), their times in seconds, the 16 kHz mono audio or None, duration."""

    frames: list[Image.Image]
    times: list[float]
    audio: np.ndarray | None
    duration: float


def _source(src: Any, name: str) -> Any:
    """A path for PyAV, or a BytesIO of the bytes of bytes / data: URLs."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    if isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        if s.startswith("data:"):
            header, sep, payload = s.partition(",")
            if not sep or not header.endswith(";base64"):
                raise VideoError(f"{name}: a data URL must look like data:video/mp4;base64,...")
            try:
                return io.BytesIO(base64.b64decode(payload, validate=True))
            except ValueError:
                raise VideoError(f"{name}: the data URL's payload is not valid base64") from None
        s = s.removeprefix("file://")
        if not os.path.isfile(s):
            raise VideoError(f"{name}: no such file {s[:80]!r}")
        if os.path.getsize(s) == 0:
            raise VideoError(diagnose(b"", 0, name))
        return s
    raise VideoError(f"{name}: pass a path, bytes or a data: URL, not {type(src).__name__}")


def _targets(duration: float | None, fps: float, max_frames: int) -> list[float] | None:
    """Sample times: every 1/fps s, or max_frames spread evenly (centres of equal spans) when that is too many."""
    if not duration:
        return None
    n = max(1, math.floor(duration * fps + 1e-9))
    if n <= max_frames:
        return [k / fps for k in range(n)]
    return [(k + 0.5) * duration / max_frames for k in range(max_frames)]


def _decode_frames(f: Any, name: str, fps: float, max_frames: int) -> tuple[list[Image.Image], list[float], float]:
    import av
    try:
        container = av.open(f, metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError, OSError) as e:
        data = f.getvalue() if isinstance(f, io.BytesIO) else Path(f).read_bytes()[:64]
        head, size = data[:64], (len(data) if isinstance(f, io.BytesIO) else os.path.getsize(f))
        raise VideoError(diagnose(head, size, name, getattr(e, "strerror", None) or str(e))) from None
    frames: list[Image.Image] = []
    times: list[float] = []
    with container:
        if not container.streams.video:
            raise VideoError(f"{name} has no video track; send it as audio instead")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        duration = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                    else (container.duration or 0) / 1e6)
        targets = _targets(duration, fps, max_frames)
        interval, next_t = 1.0 / fps, 0.0  # unknown duration: sample by fps, thin out when over max_frames
        last_t = 0.0
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else last_t
                last_t = t
                if targets is not None:
                    if t + 1e-6 < targets[len(times)]:
                        continue
                    frames.append(frame.to_image().convert("RGB"))
                    times.append(t)
                    while len(times) < len(targets) and targets[len(times)] <= t + 1e-6:
                        targets.pop(len(times))  # several targets fell on this one frame: keep it once
                    if len(times) == len(targets):
                        break  # every sample time has its frame: the rest need not be decoded
                    continue
                if t + 1e-6 < next_t:
                    continue
                frames.append(frame.to_image().convert("RGB"))
                times.append(t)
                next_t = t + interval
                if len(frames) > 2 * max_frames:  # memory stays bounded: halve the rate
                    frames, times, interval = frames[::2], times[::2], interval * 2
        except av.error.FFmpegError as e:
            if not frames:
                raise VideoError(f"{name} could not be decoded ({getattr(e, 'strerror', None) or e}); it may be "
                                 "damaged or cut short") from None
    if not frames:
        raise VideoError(f"{name} has no decodable video frames")
    if len(frames) > max_frames:
        keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames, times = [frames[i] for i in keep], [times[i] for i in keep]
    return frames, times, duration or last_t


def fit_frames(frames: list[Image.Image], times: list[float], max_image_tokens: int,
               dynamic_hd: int = DEFAULT_DYNAMIC_HD) -> tuple[list[Image.Image], list[float]]:
    """Shrink every frame alike to the largest size whose tokens x frames fit max_image_tokens (module docstring)."""
    w, h = frames[0].size
    long_side = max(w, h)
    # Candidate long sides from one crop (448) up to the frame's own size, largest first.
    sizes = sorted({long_side, *np.linspace(CROP_SIZE, max(long_side, CROP_SIZE), SIZE_STEPS).astype(int)},
                   reverse=True)
    sizes = [s for s in sizes if s <= long_side] or [long_side]

    def dims(side: int) -> tuple[int, int]:
        scale = side / long_side
        return max(1, round(w * scale)), max(1, round(h * scale))

    for side in sizes:
        cost = num_image_tokens(*dims(side), dynamic_hd=dynamic_hd)
        if cost * len(frames) <= max_image_tokens:
            break
    keep = max(1, min(len(frames), max_image_tokens // cost))
    if keep < len(frames):  # even the smallest size is too many tokens: fewer frames, evenly spread
        idx = np.linspace(0, len(frames) - 1, keep).round().astype(int)
        frames, times = [frames[i] for i in idx], [times[i] for i in idx]
    size = dims(side)
    if size != (w, h):
        frames = [f.resize(size, Image.BICUBIC) for f in frames]
    return frames, times


def load_video(src: Any, fps: float = DEFAULT_FPS, max_frames: int = DEFAULT_MAX_FRAMES,
               max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS, use_audio: bool = False,
               dynamic_hd: int = DEFAULT_DYNAMIC_HD, name: str | None = None) -> Clip:
    """Frames sampled by time and sized to the token budget, plus the audio track as 16 kHz mono when use_audio."""
    name = name or (f"video {os.fspath(src)[:60]!r}" if isinstance(src, (str, os.PathLike))
                    and not os.fspath(src).startswith("data:") else "video")
    if not (isinstance(fps, (int, float)) and 0 < fps <= 60):
        raise VideoError(f"{name}: fps must be in (0, 60]; got {fps!r}")
    if not (isinstance(max_frames, int) and 1 <= max_frames <= MAX_FRAMES_LIMIT):
        raise VideoError(f"{name}: max_frames must be 1..{MAX_FRAMES_LIMIT}; got {max_frames!r}")
    if not (isinstance(max_image_tokens, int) and max_image_tokens > 0):
        raise VideoError(f"{name}: max_image_tokens must be a positive integer; got {max_image_tokens!r}")
    try:
        import av  # noqa: F401
    except ImportError:
        raise VideoError("reading video needs PyAV: `pip install av`") from None
    frames, times, duration = _decode_frames(_source(src, name), name, float(fps), max_frames)
    frames, times = fit_frames(frames, times, max_image_tokens, dynamic_hd)
    audio = None
    if use_audio:
        try:
            mono, rate = decode_av(_source(src, name), name, MAX_VIDEO_AUDIO_SECONDS)
            audio = load_audio((mono, rate), max_seconds=MAX_VIDEO_AUDIO_SECONDS)
        except (DecodeError, AudioError) as e:
            raise VideoError(f"{e} (use_audio asked for the video's sound; leave it off for frames only)") from None
    return Clip(frames, times, audio, duration)


def expand_videos(text: str, images: list[Any], audios: list[Any], dynamic_hd: int = DEFAULT_DYNAMIC_HD
                  ) -> tuple[str, list[Any], list[Any]]:
    """Replace each video in `images` by its frames: its `<|image_k|>` becomes one placeholder per frame (and
    `<|audio_m|>` for its sound with use_audio); the other images are renumbered to follow."""
    import re
    new_images: list[Any] = []
    expansion: dict[int, str] = {}  # old 1-based image number -> replacement placeholders
    audios = list(audios)
    for i, item in enumerate(images, 1):
        if not is_video(item):
            new_images.append(item)
            expansion[i] = f"<|image_{len(new_images)}|>"
            continue
        opts = {k: item[k] for k in OPTION_KEYS if k in item}
        bad = set(item) - set(OPTION_KEYS) - {"video", "type"}
        if bad:
            raise VideoError(f"video {i}: unknown option(s) {sorted(bad)}; use {', '.join(OPTION_KEYS)}")
        clip = load_video(item["video"], dynamic_hd=dynamic_hd, name=f"video {i}", **opts)
        first = len(new_images) + 1
        new_images += clip.frames
        refs = "".join(f"<|image_{k}|>" for k in range(first, len(new_images) + 1))
        if clip.audio is not None:
            audios.append((clip.audio, SAMPLE_RATE))
            refs += f"<|audio_{len(audios)}|>"
        expansion[i] = refs
    text = re.sub(r"<\|image_(\d+)\|>", lambda m: expansion.get(int(m.group(1)), m.group(0)), text)
    return text, new_images, audios


__all__ = ["DEFAULT_FPS", "DEFAULT_MAX_FRAMES", "DEFAULT_MAX_IMAGE_TOKENS", "Clip", "VideoError", "expand_videos",
           "fit_frames", "is_video", "load_video", "video_ref"]
