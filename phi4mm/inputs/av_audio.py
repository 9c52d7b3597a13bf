"""Audio containers libsndfile cannot read (m4a/AAC, mp4/mov tracks, webm/opus, amr, wma, ...) through PyAV,
streaming decode of files of any length, stdin, and one-sentence diagnoses of files that are not audio.

    decode_av(f, name, max_seconds)      -> (float32 mono samples (n,), native rate): a whole file via FFmpeg
    stream_audio(src, block_seconds)     -> iterator of float32 mono 16 kHz blocks: memory flat in the length
    diagnose(head, size, name)           -> why a file could not be decoded, in one sentence

libsndfile stays the first choice for what it reads (wav, flac, ogg, mp3, aiff): it is exact and fast. FFmpeg
(through PyAV, a core dependency) reads what phones and browsers record: MediaRecorder writes webm/opus,
ogg/opus or mp4/AAC; phones write m4a.
"""
from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000  # the encoder's rate; equal to audio.SAMPLE_RATE (audio.py imports this module)
BLOCK_SECONDS = 30.0  # streaming block: 30 s of 16 kHz float32 = 1.9 MB, whatever the file's length
SPOOL_BYTES = 8 << 20  # stdin is held in memory up to 8 MiB, then spooled to a temporary file
STDIN = "-"

# The first bytes of containers FFmpeg or libsndfile read: a file that starts like one of these but does not
# decode is damaged or cut short, anything else is not audio at all.
_MAGIC = {
    b"RIFF": "WAV", b"fLaC": "FLAC", b"OggS": "Ogg", b"ID3": "MP3", b"\xff\xfb": "MP3", b"\xff\xf3": "MP3",
    b"\xff\xf2": "MP3", b"\x1a\x45\xdf\xa3": "WebM/Matroska", b"#!AMR": "AMR", b"FORM": "AIFF",
    b"\x30\x26\xb2\x75": "WMA/ASF", b"\xff\xf1": "AAC (ADTS)", b"\xff\xf9": "AAC (ADTS)", b"caff": "CAF",
}


class DecodeError(ValueError):
    """A file that is not decodable audio; the message is one sentence naming the file and the cause."""


def container_guess(head: bytes) -> str | None:
    """The container a file's first bytes announce, or None."""
    if head[4:8] == b"ftyp":
        return "MP4/M4A"
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    return None


def diagnose(head: bytes, size: int, name: str, detail: str = "") -> str:
    """One sentence: why `name` (whose first bytes are `head`, `size` bytes in all) did not decode."""
    if size == 0:
        return f"{name} is empty (0 bytes): nothing was recorded or the copy failed; send the audio file again"
    kind = container_guess(head)
    if kind is not None:
        return (f"{name} looks like a {kind} file but ends early or is damaged ({detail or 'no decodable audio'}): "
                "it was probably cut short while recording or copying; export or download it again")
    text = head[:64]
    what = "text" if text and all(32 <= b < 127 or b in (9, 10, 13) for b in text) else "unknown binary data"
    return (f"{name} is not an audio or video file (it starts with {what}, {text[:12]!r}); send wav, flac, mp3, "
            "ogg, m4a, mp4, webm or another format FFmpeg reads")


def _open_av(f, name: str):
    import av
    try:
        return av.open(f, mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError, OSError, EOFError) as e:
        raise DecodeError(diagnose(_head(f), _size(f), name, _why(e))) from None


def _why(e: Exception) -> str:
    """FFmpeg's reason without its errno and file name: 'Invalid data found when processing input'."""
    return getattr(e, "strerror", None) or str(e)


def _head(f) -> bytes:
    if isinstance(f, (str, os.PathLike)):
        with open(f, "rb") as fh:
            return fh.read(64)
    pos = f.tell()
    f.seek(0)
    head = f.read(64)
    f.seek(pos)
    return head


def _size(f) -> int:
    if isinstance(f, (str, os.PathLike)):
        return os.path.getsize(f)
    pos = f.tell()
    size = f.seek(0, io.SEEK_END)
    f.seek(pos)
    return size


def _track_seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration else None


def _av_frames(f, name: str, rate: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """(float32 mono samples (n,), rate) per decoded frame of the first audio track; rate None = the track's."""
    import av
    container = _open_av(f, name)
    with container:
        if not container.streams.audio:
            if container_guess(_head(f)) is None:  # FFmpeg probes anything; a known container is a real video
                raise DecodeError(diagnose(_head(f), _size(f), name))
            raise DecodeError(f"{name} has no audio track (only {', '.join(s.type for s in container.streams)})")
        stream = container.streams.audio[0]
        out_rate = rate or stream.rate or SAMPLE_RATE
        resampler = av.AudioResampler(format="flt", layout="mono", rate=out_rate)
        got = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    got += out.samples
                    yield out.to_ndarray().reshape(-1), out_rate  # packed flt mono: (1, n) -> (n,)
            for out in resampler.resample(None):  # flush the resampler's delay line
                yield out.to_ndarray().reshape(-1), out_rate
        except av.error.FFmpegError as e:
            raise DecodeError(diagnose(_head(f), _size(f), name, f"decoding stopped after {got / out_rate:.1f} s: "
                                       f"{_why(e)}")) from None
        if got == 0:
            raise DecodeError(diagnose(_head(f), _size(f), name, "its audio track has no decodable samples"))


def decode_av(f: BinaryIO | str, name: str, max_seconds: float) -> tuple[np.ndarray, int]:
    """A whole file through FFmpeg: (float32 mono (n,), the track's rate). Refuses tracks over max_seconds early."""
    try:
        import av  # noqa: F401
    except ImportError:
        raise DecodeError(f"{name}: libsndfile cannot read it and PyAV is missing; `pip install av`") from None
    parts, total, rate = [], 0, SAMPLE_RATE
    for block, rate in _av_frames(f, name, None):
        parts.append(block)
        total += block.size
        if total > max_seconds * rate:
            raise DecodeError(f"{name}: longer than the {max_seconds:.0f} s limit; split it, or use "
                              "`phi4mm transcribe` / `phi4mm summarize`, which stream audio of any length")
    return np.concatenate(parts), rate


def spool_stdin(stream: BinaryIO | None = None) -> BinaryIO:
    """stdin's bytes in a seekable file (memory up to SPOOL_BYTES, then a temporary file): containers need seeks."""
    src = stream if stream is not None else sys.stdin.buffer
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (returned open: the caller's)
    shutil.copyfileobj(src, spool, 1 << 20)
    spool.seek(0)
    return spool


def _sf_blocks(f, block: int) -> Iterator[tuple[np.ndarray, int]] | None:
    try:
        snd = sf.SoundFile(f)
    except (RuntimeError, TypeError, ValueError, EOFError):  # sf.LibsndfileError is a RuntimeError
        if not isinstance(f, (str, os.PathLike)):
            f.seek(0)
        return None

    def gen():
        with snd:
            rate = int(snd.samplerate)
            for data in snd.blocks(blocksize=max(1, int(block * rate / SAMPLE_RATE)), dtype="float32",
                                   always_2d=True):  # (n, ch)
                yield data.mean(axis=1, dtype=np.float32), rate
    return gen()


def stream_audio(src: str | os.PathLike | BinaryIO, name: str | None = None,
                 block_seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """16 kHz float32 mono blocks (n,) of any audio file, one block of ~block_seconds at a time.

    src: a path, "-" for stdin, or a binary file object. Memory stays flat in the file's length: one decoded
    block and the resampler's state. libsndfile reads what it can; everything else goes through FFmpeg.
    """
    if isinstance(src, (str, os.PathLike)) and os.fspath(src) == STDIN:
        src, name = spool_stdin(), name or "audio from stdin"
    name = name or (f"audio file {os.fspath(src)!r}" if isinstance(src, (str, os.PathLike)) else "audio")
    if isinstance(src, (str, os.PathLike)):
        if os.path.isdir(src):
            raise DecodeError(f"{name} is a folder, not an audio file")
        if not os.path.exists(src):
            raise DecodeError(f"{name} does not exist; check the path")
    if _size(src) == 0:
        raise DecodeError(diagnose(b"", 0, name))
    block = int(block_seconds * SAMPLE_RATE)
    frames = _sf_blocks(src, block) or _av_frames(src, name, None)
    resampler, rate, pending, filled = None, None, [], 0
    for chunk, r in frames:
        if resampler is None:
            rate = r
            if not 8000 <= rate <= 192000:
                raise DecodeError(f"{name}: sampling rate {rate} Hz is outside 8000..192000 Hz; resample it first")
            resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="VHQ")
        out = chunk if rate == SAMPLE_RATE else resampler.resample_chunk(chunk)
        if not np.isfinite(out).all():
            raise DecodeError(f"{name} holds NaN/inf samples; clean the signal first")
        pending.append(out)
        filled += out.size
        if filled >= block:
            yield np.concatenate(pending)
            pending, filled = [], 0
    if resampler is not None and rate != SAMPLE_RATE:
        pending.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    if pending and sum(p.size for p in pending):
        yield np.concatenate(pending)


__all__ = ["BLOCK_SECONDS", "STDIN", "DecodeError", "container_guess", "decode_av", "diagnose", "spool_stdin",
           "stream_audio"]
