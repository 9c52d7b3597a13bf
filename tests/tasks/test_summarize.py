"""Map-reduce summaries of recordings longer than one prompt (tiny checkpoint: the texts are noise, the plumbing
is what is checked: chunking by speech, one map prompt per chunk, reduce over the parts, question prompts)."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from phi4mm.inputs.audio import SAMPLE_RATE
from phi4mm.tasks import summarize as S
from tests.inputs.long_audio import write_long_recording

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def engine(tiny_official):
    import phi4mm
    from phi4mm.engine.engine import Engine
    return Engine(phi4mm.load(tiny_official), num_blocks=512)


def test_chunks_hold_speech_only_and_at_most_the_limit(tmp_path):
    path = tmp_path / "talk.wav"
    spans = write_long_recording(path, minutes=2, speech_every_s=30)
    chunks = list(S.speech_chunks(str(path), chunk_minutes=0.1))  # 6 s of speech per chunk
    assert len(chunks) >= 3
    assert all(c.size <= 0.1 * 60 * SAMPLE_RATE + 15 * SAMPLE_RATE for _, _, c in chunks)  # + at most one cue
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(chunks))
    speech = sum(b - a for a, b in spans)
    assert sum(c.size for _, _, c in chunks) / SAMPLE_RATE < speech + 2 * len(spans)  # the silence is left out


def test_map_reduce(engine, tmp_path, monkeypatch):
    path = tmp_path / "talk.wav"
    write_long_recording(path, minutes=1, speech_every_s=30)
    prompts = []
    real = S.run_requests

    def spy(eng, jobs, max_in_flight=2):
        jobs = list(jobs)
        prompts.extend(r["prompt"] for _, r in jobs)
        return real(eng, jobs, max_in_flight)

    monkeypatch.setattr(S, "run_requests", spy)
    monkeypatch.setattr(S, "REDUCE_FAN_IN", 2)  # several parts: a two-level reduce
    s = S.summarize(engine, str(path), chunk_minutes=0.1, max_tokens=2)
    n = len(s.parts)
    assert n >= 3 and s.duration == pytest.approx(60.0)
    maps = [p for p in prompts if "<|audio_1|>" in p]
    reduces = [p for p in prompts if "<|audio_1|>" not in p]
    assert len(maps) == n and all(S.MAP_SUMMARY in p for p in maps)
    assert len(reduces) >= 2 and "Part 1:" in reduces[0] and "Write one summary" in reduces[-1]
    assert isinstance(s.text, str)
    prompts.clear()
    q = S.summarize(engine, str(path), question="Who is speaking?", chunk_minutes=10, max_tokens=2)
    assert len(q.parts) == 1 and prompts == [S._prompt("Who is speaking?", True)]  # one chunk: no reduce


def test_silent_and_bad_input(engine, tmp_path):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(5 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="is silent: there is nothing to summarize"):
        S.summarize(engine, str(silent))
    with pytest.raises(ValueError, match="chunk_minutes"):
        S.summarize(engine, str(silent), chunk_minutes=0)
    with pytest.raises(ValueError, match="special tokens"):
        S.summarize(engine, str(DATA / "espeak_weather.flac"), question="<|end|>")
