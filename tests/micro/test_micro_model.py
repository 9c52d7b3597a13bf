"""The shipped micro model (phi4mm/micro/model/): the official layout within the size limits, loads, transcribes
and translates held-out speech, and is what the CLI uses when no --model is given.

Its held-out scores and what it does not do yet are in docs/micro-model.md: it does not read rendered words (no
test claims OCR). It answers typed questions about shape scenes (tested on 32 held-out ones). The held-out samples are the first items of the test split (`micro_data.generate(DIR, "test",
1000)`): their
sentences are held out from training by hash, and the last four are spoken by an espeak-ng voice never trained on.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import phi4mm
from phi4mm.cli.main import main
from phi4mm.micro.finish import MAX_FILE_BYTES
from phi4mm.micro.recipe import default_model_dir
from phi4mm.tasks.evaluate import evaluate

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def micro():
    return phi4mm.load(default_model_dir(), "cpu")


def test_shipped_files_follow_the_official_layout_within_the_limits():
    d = default_model_dir()
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "vision-lora/adapter_model.safetensors",
                 "vision-lora/adapter_config.json", "speech-lora/adapter_model.safetensors"):
        assert (d / name).is_file(), name
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert all((d / shard).is_file() for shard in set(index.values()))
    files = [f for f in d.rglob("*") if f.is_file()]
    assert max(f.stat().st_size for f in files) <= MAX_FILE_BYTES
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20


def test_loads_with_both_adapters_and_special_tokens_by_name(micro):
    assert set(micro.config.loras) == {"vision", "speech"}
    tok = micro.tokenizer
    assert tok.vocab_size < 4096  # its own small BPE, not o200k
    for name in ("<|user|>", "<|assistant|>", "<|end|>", "<|tool_call|>", "<|/tool_call|>"):
        assert tok.decode([tok.token_id(name)]) == name


def test_answers_held_out_tool_requests_with_the_right_call(micro):
    r = evaluate(default_model_dir(), DATA / "micro_heldout_tools.jsonl", "tool", max_tokens=64, model=micro)
    assert r["n"] == 12 and r["score"] >= 0.9, r["predictions"]  # 12 of 12 (0.99 on 100 held-out requests)


def test_transcribes_held_out_sentences_and_an_unseen_voice(micro):
    r = evaluate(default_model_dir(), DATA / "micro_heldout_asr.jsonl", "wer", max_tokens=32, model=micro)
    assert r["n"] == 8 and r["score"] <= 0.1, r["predictions"]  # 0.0 here; 0.011 and 0.039 on 100 each
    exact = [p for p in r["predictions"] if p["prediction"] == p["references"][0]]
    assert len(exact) >= 6, r["predictions"]
    assert any(p["line"] > 4 for p in exact), r["predictions"]  # the held-out voice too


def test_translates_held_out_speech_into_the_synthetic_language(micro):
    r = evaluate(default_model_dir(), DATA / "micro_heldout_ast.jsonl", "bleu", max_tokens=32, model=micro)
    assert r["n"] == 4 and r["score"] >= 60, r["predictions"]  # 100 here (4 sentences: noisy); 96.5 on 100


def test_answers_held_out_shape_questions(micro):
    # 8 held-out scenes of each kind (the test split's first): "what shape is <colour>", "what colour is the
    # <shape>", "how many shapes", "how many <colour> shapes". 29 of 32 here, every miss a count; the
    # model before the vision-focus stage scored 23 and missed 4 of the 16 shape/colour questions.
    r = evaluate(default_model_dir(), DATA / "micro_heldout_shapes.jsonl", "exact", max_tokens=8, model=micro)
    assert r["n"] == 32 and r["score"] >= 0.84, r["predictions"]
    lines = (DATA / "micro_heldout_shapes.jsonl").read_text().splitlines()
    binding = [p for p in r["predictions"] if "What shape" in lines[p["line"] - 1] or "What color" in lines[p["line"] - 1]]
    right = [p for p in binding if p["prediction"] == p["references"][0]]
    assert len(binding) == 16 and len(right) >= 15, binding


def test_cli_uses_it_without_model(capsys, tmp_path):
    assert main(["chat", "Hello, how are you?", "--max-tokens", "16"]) == 0
    assert capsys.readouterr().out.strip()
    spoken = Path(__file__).parents[2] / "examples" / "spoken.flac"  # the README's first command
    assert main(["transcribe", str(spoken)]) == 0
    assert capsys.readouterr().out.strip() == "the red horse played again"
    assert main(["translate", str(spoken), "--language", "vellish"]) == 0  # its synthetic language, by name
    assert capsys.readouterr().out.strip() == "kigir niven zadabin zunetin feruki"  # to_vellish("the red horse ...")
    assert main(["transcribe", str(DATA / "flite_quick_brown_fox.flac"), "-o", str(tmp_path)]) == 0
    assert (tmp_path / "flite_quick_brown_fox.txt").read_text().strip()


def test_cli_chat_calls_a_tool_and_refuses_a_bad_tools_file(capsys, tmp_path):
    tools = Path(__file__).parents[2] / "examples" / "tools.json"
    assert main(["chat", "I want to listen to Coldplay.", "--tools", str(tools), "--max-tokens", "64"]) == 0
    calls = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the parsed calls, as JSON
    assert calls == [{"name": "play_music", "arguments": {"artist": "Coldplay"}}]
    bad = tmp_path / "tools.json"
    bad.write_text('{"name": "f"}')
    assert main(["chat", "hi", "--tools", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "JSON list" in err
