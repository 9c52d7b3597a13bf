"""Media files for the tests, written with PyAV: audio in the containers phones and browsers record, and mp4
videos with frames and an audio track."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# container suffix -> (PyAV format, audio codec, encoder rate): what MediaRecorder / phones produce
AUDIO_KINDS = {
    "m4a": ("mp4", "aac", 44100),
    "webm": ("webm", "libopus", 48000),
    "opus": ("ogg", "libopus", 48000),
    "mp4": ("mp4", "aac", 48000),
    "amr": ("amr", "amr_nb", 8000) if "amr_nb" in av.codecs_available else ("amr", "amrnb", 8000),
    "wma": ("asf", "wmav2", 44100),
}
VIDEO_AUDIO_RATE = 44100  # the mp4's AAC track


def write_audio(path: Path, wav: np.ndarray, rate: int, kind: str | None = None) -> Path:
    """Encode float32 mono samples (n,) at `rate` into `path` (container from its suffix, see AUDIO_KINDS)."""
    fmt, codec, enc_rate = AUDIO_KINDS[kind or path.suffix.lstrip(".")]
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=enc_rate)
        stream.layout = "mono"
        _encode_mono(out, stream, wav, rate, enc_rate)
    return path


def _encode_mono(out: av.container.OutputContainer, stream: av.audio.stream.AudioStream, wav: np.ndarray,
                 rate: int, enc_rate: int) -> None:
    """Resample float32 mono `wav` at `rate` to the encoder's format at `enc_rate`, encode it into `stream`
    and flush the encoder."""
    resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=enc_rate)
    frame = av.AudioFrame.from_ndarray(wav.astype(np.float32).reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = rate
    for f in resampler.resample(frame) + resampler.resample(None):
        for packet in stream.encode(f):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


def write_video(path: Path, seconds: float = 3.0, fps: int = 10, size: tuple[int, int] = (320, 240),
                audio: np.ndarray | None = None, audio_rate: int = 16000) -> Path:
    """An mp4 (h264 or mpeg4) whose frame k is a solid colour that changes every second, with an optional AAC
    track of `audio` (float32 mono at audio_rate)."""
    with av.open(str(path), "w") as out:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = size[0], size[1], "yuv420p"
        streams = [vs]
        if audio is not None:
            aus = out.add_stream("aac", rate=VIDEO_AUDIO_RATE)
            aus.layout = "mono"
            streams.append(aus)
        for k in range(int(seconds * fps)):
            img = np.zeros((size[1], size[0], 3), np.uint8)
            img[..., k // fps % 3] = 200
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, fps)
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode(None):
            out.mux(packet)
        if audio is not None:
            _encode_mono(out, aus, audio, audio_rate, VIDEO_AUDIO_RATE)
    return path
