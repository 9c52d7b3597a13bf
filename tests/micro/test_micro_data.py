"""The micro model's synthetic data: deterministic, held-out-clean, and readable by the trainer."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from phi4mm.inputs.chat import render_prompt
from phi4mm.inputs.records import read_jsonl
from phi4mm.inputs.tools import parse_tool_calls
from phi4mm.micro import data as md
from phi4mm.micro.speech import MissingTool, check_binaries

SCALE = 0.003  # 2-18 items per task

try:
    check_binaries()
    NO_SPEECH = None
except MissingTool as e:
    NO_SPEECH = str(e)


def _fake_speak(text, path, rng, tmp, heldout_voice=False):
    """Stands in for the synthesisers when they are missing, so the image / text / tool tests still run."""
    sf.write(path, 0.1 * np.sin(np.arange(16000) * 0.05), 16000, format="FLAC", subtype="PCM_16")
    return "fake"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    with pytest.MonkeyPatch.context() as mp:
        workers = 2
        if NO_SPEECH:  # patches do not reach spawned workers: generate in this process
            mp.setattr(md, "speak", _fake_speak)
            mp.setattr(md, "check_binaries", lambda: None)
            workers = 1
        train = md.generate(root / "train", "train", 0, scale=SCALE, workers=workers, progress=False)
        test = md.generate(root / "test", "test", 0, scale=SCALE, workers=workers, progress=False)
        # Determinism, and independence from the worker count: the same split again with one worker.
        again = md.generate(root / "again", "train", 0, scale=SCALE, workers=1, progress=False)
    return {"train": train, "test": test, "again": again}


def _answers(path: Path) -> list[tuple[dict, str]]:
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        out.append((d, d["messages"][-1]["content"]))
    return out


def test_vellish_is_a_bijection_on_the_vocabulary():
    words = [md.to_vellish(w) for w in md.VOCAB]
    assert len(set(words)) == len(md.VOCAB)
    assert not set(words) & set(md.VOCAB)  # never an English vocabulary word
    assert all(w.isalpha() and w.islower() for w in words)
    assert md.to_vellish("the red dog zzz") == " ".join([md.to_vellish("the"), md.to_vellish("red"),
                                                         md.to_vellish("dog"), "zzz"])


def test_sentences_use_the_vocabulary_and_hold_out_a_tenth():
    rng = random.Random(0)
    sents = [md.sentence(rng) for _ in range(3000)]
    assert all(4 <= len(s.split()) <= 9 and set(s.split()) <= set(md.VOCAB) for s in sents)
    assert 0.07 < sum(map(md.is_heldout, sents)) / len(sents) < 0.13
    assert md.sentence(random.Random("x")) == md.sentence(random.Random("x"))


def test_tasks_and_files_parse(data):
    assert set(data["train"]) == set(md.TRAIN_COUNTS)
    assert set(data["test"]) == set(md.TEST_COUNTS)
    for split in ("train", "test"):
        for task, path in data[split].items():
            records, bad = read_jsonl(path)
            assert not bad and len(records) >= 2, (task, bad)
            for r in records:
                render_prompt(r.messages, r.tools, add_generation_prompt=False)
            for d, _ in _answers(path):  # media parts come before the text part
                content = d["messages"][-2]["content"]
                if isinstance(content, list):
                    kinds = [p["type"] for p in content]
                    assert "text" not in kinds[:-1], kinds


def test_deterministic(data):
    for task, path in data["train"].items():
        assert path.read_bytes() == data["again"][task].read_bytes(), task
    media_a = sorted((data["train"]["asr"].parent / "media").glob("*"))
    media_b = sorted((data["again"]["asr"].parent / "media").glob("*"))
    assert [p.name for p in media_a] == [p.name for p in media_b] and media_a
    for a, b in zip(media_a, media_b):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_heldout_sentences_only_in_test(data):
    train = {a for _, a in _answers(data["train"]["asr"])}
    test = {a for t in ("asr", "asr_heldout_voice") for _, a in _answers(data["test"][t])}
    assert not train & test
    assert all(md.is_heldout(s) for s in test) and not any(md.is_heldout(s) for s in train)
    for d, a in _answers(data["test"]["text"]):
        q = d["messages"][-2]["content"]
        if q.startswith("Repeat after me: "):
            assert md.is_heldout(a)


def test_translation_matches_transcript(data):
    for split in ("train", "test"):
        asr = {d["messages"][0]["content"][0]["audio_url"]["url"]: a for d, a in _answers(data[split]["asr"])}
        for d, a in _answers(data[split]["ast"]):
            assert a == md.to_vellish(asr[d["messages"][0]["content"][0]["audio_url"]["url"]])


@pytest.mark.skipif(bool(NO_SPEECH), reason=f"speech synthesis unavailable: {NO_SPEECH}")
def test_audio_files(data):
    files = [f for s in ("train", "test") for f in sorted((data[s]["asr"].parent / "media").glob("*.flac"))]
    assert files
    for f in files:
        info = sf.info(f)
        assert info.samplerate == 16000 and info.channels == 1, f.name
        assert 0.5 <= info.duration <= 10.0, (f.name, info.duration)


def test_images(data):
    media = [data[s]["asr"].parent / "media" for s in ("train", "test")]
    files = [f for m in media for f in sorted(m.glob("*.png")) + sorted(m.glob("*.jpg"))]
    assert files
    for f in files:
        with Image.open(f) as im:
            im.load()
            assert max(im.size) <= 448, (f.name, im.size)
            if "_ocr_" in f.name:
                assert im.size == md.OCR_SIZE
            if "_shapes_" in f.name or "_vsqa_" in f.name:
                assert im.size == (448, 448)


def test_tool_answers_parse(data):
    for split in ("train", "test"):
        for d, answer in _answers(data[split]["tools"]):
            assert d["messages"][0]["role"] == "system" and 2 <= len(d["tools"]) <= 5
            offered = {t["function"]["name"] for t in d["tools"]}
            content, calls = parse_tool_calls(answer)
            if answer.startswith("<|tool_call|>"):
                assert content == "" and len(calls) == 1 and calls[0].name in offered
                required = md.tool_spec(calls[0].name)["function"]["parameters"]["required"]
                assert list(json.loads(calls[0].arguments)) == required
            else:
                assert not calls and content == answer


def test_tool_samples_cover_both_cases():
    md._init({"seed": 0, "split": "train"})
    answers = [md._tools("tools", i)["messages"][-1]["content"] for i in range(300)]
    share = sum(not a.startswith("<|tool_call|>") for a in answers) / len(answers)
    assert 0.08 < share < 0.25


def test_scene_lists_every_shape_in_the_order_a_patch_raster_meets_it(data):
    # Tops in the same 14-px patch row go left to right, whatever their exact heights.
    items = [("circle", "red"), ("square", "blue"), ("triangle", "green")]
    tops = [(100.0, 300.0), (103.0, 20.0), (50.0, 200.0)]
    assert md.scene_description(items, tops) == "green triangle, blue square, red circle"
    # Every generated scene answer names 1-5 known (colour, shape) pairs, and is the same scene as drawn: the
    # shapes question of the same seed sees the same items.
    for rec, answer in _answers(data["train"]["scene"]):
        parts = [p.split(" ") for p in answer.split(", ")]
        assert 1 <= len(parts) <= 5 and all(c in md.SHAPE_COLOURS and s in md.SHAPES for c, s in parts), answer
        assert rec["messages"][0]["content"][-1]["text"] == md.PROMPTS["scene"]
    for seed in range(20):
        img, items, tops = md._scene(random.Random(f"scene-check-{seed}"))
        pix = np.asarray(img).astype(int)
        for (y, x), (shape, colour) in zip(tops, items):  # the topmost point is on the shape's edge, drawn in colour
            y0, x0 = int(round(y)), int(round(x))
            near = pix[max(0, y0 - 1):y0 + 4, max(0, x0 - 3):x0 + 4].reshape(-1, 3)
            assert np.abs(near - np.array(md.SHAPE_COLOURS[colour])).sum(1).min() < 60, (shape, colour, y, x)
            above = pix[max(0, y0 - 8):max(0, y0 - 2), max(0, x0 - 1):x0 + 2].reshape(-1, 3)  # shapes keep 10 px apart
            assert above.size == 0 or np.abs(above - np.array(md.SHAPE_COLOURS[colour])).sum(1).min() > 45


def test_ocr_trains_on_many_sizes_but_never_the_test_ones():
    train, test = md.OCR_FONT_SIZES["train"], md.OCR_FONT_SIZES["test"]
    assert not set(train) & set(test) and len(train) > 30


def test_generate_can_limit_the_tasks_and_keeps_their_items(data, tmp_path):
    out = md.generate(tmp_path, "train", 0, scale=SCALE, workers=1, progress=False, tasks=("ocr", "scene"))
    assert set(out) == {"ocr", "scene"}
    for t in out:
        assert out[t].read_text() == data["train"][t].read_text()  # item i is the same as in a full run
    with pytest.raises(ValueError, match="unknown micro tasks"):
        md.generate(tmp_path, "train", 0, tasks=("ocr", "poems"))
