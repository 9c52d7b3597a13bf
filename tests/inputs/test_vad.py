"""Voice-activity cues: found where the speech is, bounded in length, in order, within the file; a long recording
streams through in bounded memory."""
from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest

from phi4mm.inputs.audio import SAMPLE_RATE, load_audio
from phi4mm.inputs.av_audio import stream_audio
from phi4mm.inputs.vad import CueCutter, cut_cues
from tests.inputs.long_audio import CLIPS, DATA, write_long_recording


def _blocks(wav: np.ndarray, seconds: float = 5.0):
    step = int(seconds * SAMPLE_RATE)
    return [wav[i:i + step] for i in range(0, wav.size, step)]


def test_cues_cover_the_speech_and_skip_the_silence():
    clips = [load_audio(DATA / c) for c in CLIPS]
    z = np.zeros(3 * SAMPLE_RATE, np.float32)
    wav = np.concatenate([z, clips[0], z, clips[1], z, clips[2], z])
    starts = np.cumsum([0, 3 * SAMPLE_RATE + clips[0].size, 3 * SAMPLE_RATE + clips[1].size])
    starts = [(3 * SAMPLE_RATE + s) / SAMPLE_RATE for s in starts]
    cues = list(cut_cues(_blocks(wav, 1.3)))  # block size does not matter
    assert len(cues) == 3
    for cue, start, clip in zip(cues, starts, clips):
        end = start + clip.size / SAMPLE_RATE
        assert start - 0.25 <= cue.start < start + 0.5 and end - 0.5 < cue.end <= end + 0.45
        assert cue.samples.size == round((cue.end - cue.start) * SAMPLE_RATE)
        assert 0.0 <= cue.no_speech_prob < 0.3
    assert [c.start for c in cut_cues(_blocks(wav, 7.0))] == [c.start for c in cues]


def test_long_speech_is_cut_within_the_limit():
    clips = [load_audio(DATA / c) for c in CLIPS]
    wav = np.concatenate(clips * 5)  # ~40 s of speech without a long pause
    cues = list(cut_cues(_blocks(wav), max_cue_seconds=6.0))
    assert len(cues) >= 7
    assert all(c.end - c.start <= 6.0 + 1e-9 for c in cues)
    assert all(a.end <= b.start for a, b in itertools.pairwise(cues))
    assert cues[-1].end <= wav.size / SAMPLE_RATE


def test_silence_gives_no_cue():
    cutter = CueCutter()
    assert list(cut_cues([np.zeros(10 * SAMPLE_RATE, np.float32)], cutter=cutter)) == []
    assert cutter.duration == 10.0 and cutter.peak == 0.0
    with pytest.raises(ValueError, match="too short"):
        CueCutter(max_cue_seconds=1.0)


def test_long_recording_streams_in_bounded_memory(tmp_path):
    """12 minutes (a 23 MB wav; 46 MB as float32 at once): decoded, resampled and cut in 10 s blocks."""
    path = tmp_path / "long.wav"
    spans = write_long_recording(path, minutes=12, speech_every_s=120)
    duration = 12 * 60
    tracemalloc.start()
    try:
        cues = list(cut_cues(stream_audio(path), max_cue_seconds=15.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20, f"peak {peak / 2**20:.1f} MiB"  # a few blocks, not the file
    assert len(cues) >= len(spans) // 2  # clips 0.8 s apart may share a cue
    assert all(0 <= c.start < c.end <= duration for c in cues)
    assert all(a.end <= b.start for a, b in itertools.pairwise(cues))
    assert all(c.end - c.start <= 15.0 for c in cues)
    # Every clip lies inside a cue.
    for a, b in spans:
        assert any(c.start <= a + 0.3 and b - 0.3 <= c.end for c in cues), (a, b)
