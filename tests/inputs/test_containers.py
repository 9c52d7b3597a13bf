"""Audio in every container people record (PyAV-written m4a, webm/opus, ogg/opus, mp4), stdin, streaming, and one
sentence for each kind of bad file: empty, truncated, not media, no audio track."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phi4mm.inputs.audio import SAMPLE_RATE, AudioError, load_audio
from phi4mm.inputs.av_audio import DecodeError, container_guess, stream_audio
from tests.inputs.media_files import write_audio, write_video

ROOT = Path(__file__).parents[2]
SPOKEN = ROOT / "examples" / "spoken.flac"


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_audio(SPOKEN)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, speech) -> dict[str, Path]:
    """The clip as each browser / phone container: MediaRecorder's webm/opus, ogg/opus, mp4/aac; phones' m4a."""
    d = tmp_path_factory.mktemp("containers")
    return {kind: write_audio(d / f"spoken.{kind}", speech, SAMPLE_RATE) for kind in ("m4a", "webm", "opus", "mp4")}


def _similar(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of a with b at b's best delay (codecs add up to ~0.2 s): 1.0 when equal."""
    n = min(a.size, b.size) - 4000
    x = a[:n]
    shift = int(np.argmax(np.correlate(b[:n + 3200], x, "valid")))
    y = b[shift:shift + n]
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-9))


@pytest.mark.parametrize("kind", ["m4a", "webm", "opus", "mp4"])
def test_browser_and_phone_containers_decode(recorded, speech, kind):
    wav = load_audio(recorded[kind])
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.size - speech.size) < 0.1 * SAMPLE_RATE  # the same length, give or take codec padding
    assert _similar(speech, wav) > 0.9  # and the same sound (lossy codecs, so not bit-exact)
    assert np.array_equal(load_audio(recorded[kind].read_bytes()), wav)  # bytes decode like the file


def test_video_sound_track_is_audio(tmp_path, speech):
    clip = write_video(tmp_path / "talk.mp4", seconds=2, audio=speech)
    wav = load_audio(clip)
    assert _similar(speech, wav) > 0.9


def test_stream_audio_blocks_equal_a_whole_decode(recorded, speech):
    blocks = list(stream_audio(recorded["webm"], block_seconds=0.5))
    assert len(blocks) >= 3 and all(b.dtype == np.float32 for b in blocks)
    assert _similar(speech, np.concatenate(blocks)) > 0.9
    flac = np.concatenate(list(stream_audio(SPOKEN, block_seconds=0.25)))  # libsndfile path, resampled in blocks
    assert flac.size == pytest.approx(speech.size, abs=2) and np.abs(flac[:speech.size - 2] -
                                                                      speech[:speech.size - 2]).max() < 1e-3


def test_stdin(speech):
    code = ("import sys, numpy as np; from phi4mm.inputs.audio import load_audio; "
            "w = load_audio('-'); print(w.size)")
    p = subprocess.run([sys.executable, "-c", code], input=SPOKEN.read_bytes(), capture_output=True, cwd=ROOT,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stderr.decode()
    assert int(p.stdout) == speech.size


def _one_sentence(msg: str) -> None:
    assert "\n" not in msg and "Traceback" not in msg and msg.count(". ") == 0 and len(msg) < 300


def test_bad_files_each_say_what_is_wrong(tmp_path, recorded):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.m4a"
    cut.write_bytes(recorded["m4a"].read_bytes()[:3000])  # the index (moov) is lost with the end
    cut_flac = tmp_path / "cut.flac"
    cut_flac.write_bytes(SPOKEN.read_bytes()[:4000])
    text = tmp_path / "notes.wav"
    text.write_text("these are my meeting notes, not a recording\n")
    silent_video = write_video(tmp_path / "frames_only.mp4", seconds=1)
    cases = [(empty, "is empty (0 bytes)"), (cut, "looks like a MP4/M4A file but ends early or is damaged"),
             (cut_flac, "looks like a FLAC file but ends early or is damaged"),
             (text, "is not an audio or video file (it starts with text"),
             (silent_video, "has no audio track")]
    for path, words in cases:
        with pytest.raises(AudioError) as e:
            load_audio(path)
        assert words in str(e.value) and path.name in str(e.value)
        _one_sentence(str(e.value))
        with pytest.raises(DecodeError, match=words.split(" (")[0].replace("(", r"\(")):
            list(stream_audio(path))
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")


def test_container_guess():
    assert container_guess(b"\x00\x00\x00\x20ftypM4A ") == "MP4/M4A"
    assert container_guess(b"\x1a\x45\xdf\xa3....") == "WebM/Matroska"
    assert container_guess(b"OggS\x00") == "Ogg" and container_guess(b"hello") is None


def test_silence_is_valid_audio_but_known_silent():
    from phi4mm.inputs.vad import is_silent
    wav = load_audio((np.zeros(16000, np.float32), SAMPLE_RATE))
    assert is_silent(wav) and not is_silent(wav + 0.01)


def test_in_memory_file_objects_stream(recorded, speech):
    blocks = list(stream_audio(io.BytesIO(recorded["opus"].read_bytes())))
    assert _similar(speech, np.concatenate(blocks)) > 0.9
