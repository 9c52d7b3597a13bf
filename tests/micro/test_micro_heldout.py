"""The micro model's held-out split and augmentation: voices and fonts split by name, each augmentation doing what
it says and deterministic by seed, and held-out sets that `phi4mm eval` scores."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import soundfile as sf

from phi4mm.cli.main import main
from phi4mm.micro import data as md
from phi4mm.micro import render, speech, voices
from phi4mm.micro.stages import GOALS
from phi4mm.tasks.evaluate import METRICS

try:
    speech.check_binaries()
    NO_SPEECH = None
except speech.MissingTool as e:
    NO_SPEECH = str(e)
needs_speech = pytest.mark.skipif(bool(NO_SPEECH), reason=f"speech synthesis unavailable: {NO_SPEECH}")
try:
    render.fonts("test")
    NO_HELDOUT_FONTS = None
except speech.MissingTool as e:
    NO_HELDOUT_FONTS = str(e)
# The held-out fonts are a Debian package (.ci/run installs it), like the speech engines above.
needs_heldout_fonts = pytest.mark.skipif(bool(NO_HELDOUT_FONTS), reason=f"held-out fonts missing: {NO_HELDOUT_FONTS}")
SR = speech.SAMPLE_RATE


def _disjoint_cover(*groups: tuple[str, ...]) -> set[str]:
    seen: set[str] = set()
    for g in groups:
        assert len(set(g)) == len(g), g
        assert not seen & set(g), seen & set(g)
        seen |= set(g)
    return seen


def test_voice_split_is_disjoint_by_name():
    _disjoint_cover(voices.ESPEAK_ACCENTS_TRAIN, voices.ESPEAK_ACCENTS_HELDOUT, voices.ESPEAK_ACCENTS_EXCLUDED)
    _disjoint_cover(voices.ESPEAK_VARIANTS_TRAIN, voices.ESPEAK_VARIANTS_HELDOUT, voices.ESPEAK_VARIANTS_EXCLUDED)
    _disjoint_cover(voices.FLITE_TRAIN, voices.FLITE_HELDOUT, voices.FLITE_EXCLUDED)
    assert voices.SCORING_ACCENT in voices.ESPEAK_ACCENTS_TRAIN  # a held-out variant is the only new thing
    # Training draws never reach a held-out accent, variant or flite voice.
    rng = random.Random(0)
    drawn = {voices.draw_voice(rng, heldout=False) for _ in range(3000)}
    for engine, name in drawn:
        if engine == "flite":
            assert name in voices.FLITE_TRAIN
        else:
            accent, _, variant = name.partition("+")
            assert accent in voices.ESPEAK_ACCENTS_TRAIN and (not variant or variant in voices.ESPEAK_VARIANTS_TRAIN)
    assert not drawn & set(voices.heldout_voices())
    assert {voices.draw_voice(rng, heldout=True) for _ in range(500)} == set(voices.heldout_voices())
    # Every numbered variant (+m1.., +f1..) has a set of its own, held out or trained.
    names = {n for _, n in voices.heldout_voices() + voices.trained_voices()}
    numbered = [v for v in voices.ESPEAK_VARIANTS_TRAIN + voices.ESPEAK_VARIANTS_HELDOUT if re.fullmatch(r"[mf]\d", v)]
    assert {f"{voices.SCORING_ACCENT}+{v}" for v in numbered} <= names


@needs_speech
def test_voice_split_covers_every_installed_english_voice():
    assert _disjoint_cover(voices.ESPEAK_ACCENTS_TRAIN, voices.ESPEAK_ACCENTS_HELDOUT,
                           voices.ESPEAK_ACCENTS_EXCLUDED) >= set(voices.installed_espeak_accents())
    assert _disjoint_cover(voices.ESPEAK_VARIANTS_TRAIN, voices.ESPEAK_VARIANTS_HELDOUT,
                           voices.ESPEAK_VARIANTS_EXCLUDED) >= set(voices.installed_espeak_variants())
    assert _disjoint_cover(voices.FLITE_TRAIN, voices.FLITE_HELDOUT,
                           voices.FLITE_EXCLUDED) >= set(voices.installed_flite_voices())
    assert {"m1", "m7", "f1", "f5"} <= set(voices.installed_espeak_variants())  # the parser found the variants


def _tone(f0: float = 200.0, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * f0 * t)).astype(np.float32)


def _peak_hz(y: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    return float(np.argmax(spec) * SR / y.size)


def _rms_db(y: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.asarray(y, np.float64) ** 2)))


def test_pitch_shift_moves_the_frequency_by_semitones():
    clean = speech.Conditions(pad_s=(0.0, 0.0))
    up = speech.apply_conditions(_tone(), SR, speech.Conditions(semitones=3.0, pad_s=(0, 0)), np.random.default_rng(0))
    down = speech.apply_conditions(_tone(), SR, speech.Conditions(semitones=-3.0, pad_s=(0, 0)),
                                   np.random.default_rng(0))
    same = speech.apply_conditions(_tone(), SR, clean, np.random.default_rng(0))
    assert abs(_peak_hz(same) - 200) < 3
    assert abs(_peak_hz(up) - 200 * 2 ** (3 / 12)) < 3 and abs(_peak_hz(down) - 200 * 2 ** (-3 / 12)) < 3
    assert up.size < same.size < down.size  # the tape shift alone changes the length; speak() compensates the rate


def test_level_noise_and_reverb_do_what_they_say():
    x = _tone()
    for level in (-35.0, -20.0, -12.0):
        y = speech.apply_conditions(x, SR, speech.Conditions(level_dbfs=level, pad_s=(0, 0)), np.random.default_rng(0))
        assert abs(_rms_db(y) - level) < 0.1
    clean = speech.apply_conditions(x, SR, speech.Conditions(pad_s=(0, 0)), np.random.default_rng(0))
    for pink in (False, True):
        noisy = speech.apply_conditions(x, SR, speech.Conditions(snr_db=15.0, pink=pink, pad_s=(0, 0)),
                                        np.random.default_rng(0))
        # Both are scaled to the same level; the noise is what no longer correlates with the clean tone.
        gain = np.dot(noisy, clean) / np.dot(clean, clean)
        snr = _rms_db(gain * clean) - _rms_db(noisy - gain * clean)
        assert 14.0 < snr < 16.0, snr
    # Reverb: the padded silence after the speech fills with a decaying tail; without it, it stays silent.
    pad = speech.Conditions(pad_s=(0.0, 0.5))
    dry = speech.apply_conditions(x, SR, pad, np.random.default_rng(0))
    wet = speech.apply_conditions(x, SR, speech.Conditions(pad_s=(0.0, 0.5), rt60_s=0.5, drr_db=3.0),
                                  np.random.default_rng(0))
    after = slice(SR + 160, SR + 1760)  # 10-110 ms after the tone ends
    assert np.abs(dry[after]).max() == 0
    assert _rms_db(wet[after]) > -60 and _rms_db(wet[SR + 6400:]) < _rms_db(wet[after]) - 20
    rir = speech.room_response(0.5, 3.0, np.random.default_rng(1))
    assert rir[0] == 1.0 and abs(10 * np.log10(1 / np.sum(rir[1:] ** 2)) - 3.0) < 1e-6


def test_training_conditions_cover_the_ranges_and_repeat_by_seed():
    draws = [speech.draw_conditions(random.Random(f"c-{i}")) for i in range(400)]
    assert draws == [speech.draw_conditions(random.Random(f"c-{i}")) for i in range(400)]
    wpm = [c.wpm for c in draws]
    assert speech.RATE_WPM[0] <= min(wpm) < 130 and 190 < max(wpm) <= speech.RATE_WPM[1]
    for key, share in (("snr_db", speech.AUGMENT_P["noise"]), ("rt60_s", speech.AUGMENT_P["reverb"])):
        on = sum(getattr(c, key) is not None for c in draws) / len(draws)
        assert abs(on - share) < 0.1, (key, on)
    assert abs(sum(c.semitones != 0 for c in draws) / len(draws) - speech.AUGMENT_P["pitch"]) < 0.1
    a = speech.apply_conditions(_tone(), SR, draws[0], np.random.default_rng(5))
    assert np.array_equal(a, speech.apply_conditions(_tone(), SR, draws[0], np.random.default_rng(5)))


@needs_speech
def test_speaking_rate_and_determinism_through_the_engines(tmp_path):
    text = "three red dogs ran to the old house"
    for engine, voice in (("espeak-ng", "en-us+m3"), ("flite", "slt")):
        secs = {}
        for wpm in speech.RATE_WPM:
            path = tmp_path / f"{engine}-{wpm}.flac"
            c = speech.Conditions(wpm=wpm, semitones=2.0, pad_s=(0, 0))
            speech.speak_as(text, path, engine, voice, c, random.Random(0), tmp_path)
            secs[wpm] = sf.info(path).duration
        ratio = secs[120] / secs[200]  # 200 / 120 = 1.67 if the pitch shift kept the rate as asked
        assert 1.35 < ratio < 2.0, (engine, secs)
    a, b, c = (tmp_path / f"{k}.flac" for k in "abc")
    speech.speak(text, a, random.Random("x"), tmp_path)
    speech.speak(text, b, random.Random("x"), tmp_path)
    speech.speak(text, c, random.Random("y"), tmp_path)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()


def _family(name: str) -> str:
    return re.sub(r"(-.*|Bold.*|Oblique|Italic)$", "", name)


def test_ocr_fonts_and_sizes_split_disjoint():
    _disjoint_cover(render.TRAIN_FONTS, render.HELDOUT_FONTS)
    assert not {_family(n) for n in render.TRAIN_FONTS} & {_family(n) for n in render.HELDOUT_FONTS}
    for sizes in (render.OCR_FONT_SIZES, render.LINE_FONT_SIZES):
        assert not set(sizes["train"]) & set(sizes["test"])


@needs_heldout_fonts
def test_installed_fonts_fall_on_their_side_of_the_split():
    train, test = render.fonts("train"), render.fonts("test")
    assert train and test and not set(train) & set(test)
    img = render.render_text(random.Random(0), "garden party", "test", render.LINE_FONT_SIZES["test"])
    assert img.size == render.OCR_SIZE and np.asarray(img).min() < 100  # ink was drawn


def test_every_scored_set_is_written_by_the_test_split():
    assert {t for t, *_ in GOALS} <= set(md.TEST_COUNTS)
    assert all(m in METRICS for _, m, *_ in GOALS)
    assert {voices.set_name(e, v) for e, v in voices.heldout_voices()} <= set(md.TEST_COUNTS)


@needs_speech
@needs_heldout_fonts
def test_heldout_sets_are_read_and_scored_by_phi4mm_eval(tmp_path, capsys):
    sets = ("asr@en-us+f3", "asr@flite-rms", "asr_reverb", "ocr_line", "count", "vsqa_heldout_voice")
    out = md.generate(tmp_path, "test", 1000, scale=0.001, workers=1, progress=False, tasks=sets)
    for t in sets:
        for line in out[t].read_text().splitlines():
            rec = json.loads(line)
            if t.startswith("asr"):
                assert md.is_heldout(rec["messages"][-1]["content"])  # held-out sentences as well as voices
    # Every voice set speaks the same sentences, so voices compare on equal text.
    assert [json.loads(x)["messages"][-1] for x in out["asr@en-us+f3"].read_text().splitlines()] == \
        [json.loads(x)["messages"][-1] for x in out["asr@flite-rms"].read_text().splitlines()]
    # One command reads every kind (speech, image, image + audio); the recipe scores each with GOALS' metric.
    assert main(["eval", *(str(out[t]) for t in sets if t != "asr@flite-rms"), "--metric", "exact",
                 "--device", "cpu", "--max-tokens", "4", "--json"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    scores = {k: v for x in lines for k, v in json.loads(x).items()}
    assert len(scores) == 5 and all(v["n"] == 2 for v in scores.values()), scores
