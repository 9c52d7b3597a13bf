"""The micro model's own parts: its tokenizer, config and from-scratch checkpoint (the recipe's first steps)."""
from __future__ import annotations

import json

import pytest
import torch

import phi4mm
from phi4mm.config import ModelConfig
from phi4mm.inputs.tokenizer import ADDED_TOKENS
from phi4mm.micro import finish
from phi4mm.micro import init as micro_init
from phi4mm.micro import recipe as micro
from phi4mm.micro import stages as micro_stages

CORPUS = ["<|user|>Transcribe the audio clip into text.<|end|><|assistant|>the red dog runs<|end|><|endoftext|>",
          "<|system|>You are helpful.<|tool|>[]<|/tool|><|end|><|user|>hello<|end|><|assistant|>hi there<|end|>"] * 50


@pytest.fixture(scope="module")
def micro_tok(tmp_path_factory):
    return micro_init.train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_tokenizer_has_every_phi_special_token_by_name(micro_tok):
    for _, name, special, _ in ADDED_TOKENS:
        tid = micro_tok.token_id(name)
        assert tid < 400
        assert micro_tok.encode(f"a{name}b").count(tid) == 1  # never split
        assert (tid in micro_tok.special_ids()) == special
    # New ids: the code must look these up by name (the published ones are 200010/200011/200020).
    assert micro_tok.image_token_id != 200010 and micro_tok.audio_token_id != 200011
    assert micro_tok.eos_token_ids == [micro_tok.token_id("<|end|>"), micro_tok.token_id("<|endoftext|>")]
    text = "the red dog runs"
    assert micro_tok.decode(micro_tok.encode(text)) == text


def test_micro_config_reads_as_the_official_layout(micro_tok):
    d = micro_init.micro_config(micro_tok)
    cfg = ModelConfig.from_hf(d)
    assert cfg.layout == "phi4mm" and cfg.text.hidden_size == micro_init.TEXT["hidden_size"]
    assert cfg.text.vocab_size % 64 == 0 and cfg.text.vocab_size >= micro_tok.vocab_size
    assert cfg.text.eos_token_id == [micro_tok.token_id("<|end|>"), micro_tok.token_id("<|endoftext|>")]
    assert cfg.vision.hidden_size == micro_init.VISION["hidden_size"]
    assert cfg.audio.hidden_size == micro_init.AUDIO["attention_dim"]
    assert {k: (v.r, v.lora_alpha) for k, v in cfg.loras.items()} == micro_init.LORA


@pytest.fixture(scope="module")
def fresh(micro_tok, tmp_path_factory):
    """A from-scratch micro checkpoint with a 400-token BPE (its embedding table padded to 448 rows)."""
    from phi4mm.tasks.make_checkpoint import make_checkpoint
    tmp = tmp_path_factory.mktemp("fresh")
    micro_init.train_tokenizer(CORPUS, tmp / "tok", vocab_size=400)
    init = micro_init.initializer(torch.zeros(80), torch.ones(80), seed=0)
    return make_checkpoint(tmp / "ck", config=micro_init.micro_config(micro_tok), init=init, tokenizer_dir=tmp / "tok",
                           dtype=torch.float32)


def test_fresh_checkpoint_loads_and_places_media_by_name(micro_tok, fresh):
    ck = fresh
    rows = json.loads((ck / "config.json").read_text())["vocab_size"]
    assert rows % 64 == 0 and micro_tok.vocab_size <= rows < micro_tok.vocab_size + 64
    m = phi4mm.load(ck)
    assert m.config.image_token_id == m.tokenizer.token_id("<|endoftext10|>")
    assert m.config.audio_token_id == m.tokenizer.token_id("<|endoftext11|>")
    # LoRA B starts at zero: both adapters leave the fresh decoder unchanged.
    lin = m.net.layers[0].self_attn.qkv_proj
    assert all(float(p.detach().abs().max()) == 0 for n, p in lin.named_parameters() if "lora_B" in n)
    wav = torch.randn(16000).numpy() * 0.1
    prep = m.prepare("<|user|><|audio_1|>Transcribe the audio clip into text.<|end|><|assistant|>",
                     audios=[(wav, 16000)])
    assert prep.input_ids.count(m.config.audio_token_id) == prep.audios.num_tokens[0]
    # Greedy generation runs end to end: 1-4 ids that the tokenizer can decode (no padding row), and the text
    # reply is their decoding without special tokens.
    prompt = "<|user|>hello<|end|><|assistant|>"
    ids = m.generate_ids(prompt, max_new_tokens=4)
    assert 1 <= len(ids) <= 4 and all(0 <= i < m.decodable for i in ids)
    assert len(ids) == 4 or ids[-1] in m.tokenizer.eos_token_ids
    assert m.generate(prompt, max_new_tokens=4) == m.tokenizer.decode(ids, skip_special_tokens=True)


def test_padded_embedding_rows_are_never_sampled(fresh):
    """Make a padding row of the table (past the tokenizer's last id) the best-scoring token of a greedy step:
    the reference loop and the engine still answer with ids that decode (a recipe smoke run's undertrained
    model once sampled such a row, and the stream decoder raised)."""
    from phi4mm.engine.engine import Engine
    from phi4mm.sampling import SamplingParams
    m = phi4mm.load(fresh)
    table = m.net.embed_tokens.weight  # tied: the same rows score the output
    assert m.decodable < table.shape[0]
    prompt = "<|user|>hello<|end|><|assistant|>"
    want = m.generate_ids(prompt, max_new_tokens=4)
    with torch.no_grad():
        table[-1] = 50 * table[want[0]]  # it would win every argmax the first token wins
    assert m.generate_ids(prompt, max_new_tokens=4) == want
    out = Engine(m, static_decode=False).generate([dict(prompt=prompt, params=SamplingParams(max_tokens=4))])
    assert out[0]["token_ids"] == want
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=0)
    out = Engine(m, static_decode=False).generate([dict(prompt=prompt, params=params)])
    assert max(out[0]["token_ids"]) < m.decodable


@pytest.mark.parametrize("argv, words", [
    (["train", "data.jsonl", "out"], ["--model"]),
    (["train", "--recipe", "micro"], ["RUN_DIR"]),
    (["train", "--recipe", "micro", "a", "b"], ["one folder"]),
    (["train", "--recipe", "micro", "run", "--stop-after", "nope"], ["not a micro stage"]),
])
def test_recipe_cli_mistakes_exit_2_with_one_sentence(argv, words, capsys, tmp_path, monkeypatch):
    from phi4mm.cli.main import main
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_recipe_without_a_synthesiser_is_one_sentence(capsys, tmp_path, monkeypatch):
    from phi4mm.cli.main import main
    monkeypatch.setenv("PHI4MM_FLITE", str(tmp_path / "no-flite"))
    assert main(["train", "--recipe", "micro", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "flite" in err and "apt-get install" in err, err


def test_recipe_phases_run_vision_and_speech_as_branches():
    phases = micro_stages.recipe_phases()
    names = [[[micro_stages.RECIPE[n].name for n in chain] for chain in ph] for ph in phases]
    assert names == [[["text"], ["vision-ctc"]], [["vision-projector", "vision-encoder"], ["speech-ctc", "speech-encoder"]],
                     [["vision-lora"], ["speech-lora"]], [["vision-speech"]], [["vision-focus"]]]
    # The original recipe's order is kept inside each branch, and the stages' folders sort in that order.
    assert [st.phase for st in micro_stages.RECIPE] == sorted(st.phase for st in micro_stages.RECIPE)


def test_branches_take_their_own_gpu_when_there_are_enough(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [micro._branch_device("cuda", i, 2) for i in range(2)] == ["cuda:0", "cuda:1"]
    assert micro._branch_device("cuda:1", 0, 2) == "cuda:1"  # a device the user named is kept
    assert micro._branch_device("cpu", 1, 2) == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert micro._branch_device("cuda", 1, 2) == "cuda"  # one GPU: both branches share it


def test_a_budget_never_cuts_the_text_stage_and_shares_the_rest_by_plan():
    phases = micro_stages.recipe_phases()
    planned = [40.0, 40.0, 30.0, 300.0, 150.0, 100.0, 120.0, 90.0, 150.0, 100.0]  # seconds, RECIPE order
    assert len(planned) == len(micro_stages.RECIPE)
    # 60 s left for a recipe planned at ~750 s: the decoder's text stage (and the vision CTC beside it, capped
    # by its own max_seconds) still gets its whole plan.
    assert set(micro_stages.phase_budgets(phases, planned, 60.0).values()) == {None}
    assert set(micro_stages.phase_budgets(phases[1:], planned, None).values()) == {None}  # no budget at all
    # Phase 1 lasts 330 s (its longer branch) of the 330 + 120 + 150 + 100 s left planned: 47% of 300 s.
    b = micro_stages.phase_budgets(phases[1:], planned, 300.0)
    vision, speech = phases[1]
    assert sum(b[n] for n in vision) == pytest.approx(300.0 * 330 / 700)
    assert b[vision[1]] == pytest.approx(10 * b[vision[0]])  # each stage in proportion to its plan
    # The other branch runs at once on its own GPU: it may use the whole share, so its 250 s plan is cut to
    # 141 s, not by the longer branch's factor (to 107 s).
    assert sum(b[n] for n in speech) == pytest.approx(300.0 * 330 / 700)
    assert b[speech[0]] == pytest.approx(1.5 * b[speech[1]])
    b = micro_stages.phase_budgets(phases[1:], planned, 600.0)  # 283 s for phase 1: the speech branch's whole plan
    assert [b[n] for n in speech] == pytest.approx([150.0, 100.0])

def test_fresh_towers_start_as_identity_blocks_that_pass_the_input_on(micro_tok, tmp_path):
    from pathlib import Path

    from phi4mm.inputs.audio import load_audio, log_mel
    from phi4mm.tasks.make_checkpoint import make_checkpoint
    speech = torch.from_numpy(log_mel(load_audio(Path(__file__).parents[1] / "data" / "flite_quick_brown_fox.flac")))
    tok_dir = tmp_path / "tok"
    micro_init.train_tokenizer(CORPUS, tok_dir, vocab_size=400)
    init = micro_init.initializer(speech.mean(0), 1 / speech.std(0), seed=0)  # the clip's own input normalisation
    ck = make_checkpoint(tmp_path / "ck", config=micro_init.micro_config(micro_tok), init=init, tokenizer_dir=tok_dir,
                         dtype=torch.float32)
    net = phi4mm.load(ck).net
    params = {n: p.detach() for n, p in net.named_parameters()}
    zero = [n for n in params if n.startswith(("vision.", "audio.")) and n.endswith(micro_init.ZERO_INIT)]
    siglip = len(net.vision.img_processor.encoder.layers)  # the layers up to the feature layer (-2)
    assert len(zero) == 4 * 4 + 2 * siglip  # conformer: 4 branch outputs x 4 blocks; SigLIP: 2 per layer
    assert all(float(params[n].abs().max()) == 0 for n in zero)
    assert 0.15 < float(params["vision.img_processor.embeddings.position_embedding.weight"].std()) < 0.25
    # Real speech in: the audio embeddings must change from frame to frame (measured 0.68 mean cosine between
    # neighbours; the init without zeroed branch outputs gave 0.96, and 0.998 after training on it).
    with torch.no_grad():
        emb = net.audio(speech[None].float())[0]  # (frames / 8, text hidden)
    cos = torch.cosine_similarity(emb[1:], emb[:-1], dim=-1).mean()
    assert cos < 0.85, float(cos)


def test_packed_run_holds_markers_and_a_bf16_base_only(tiny_official, tmp_path):
    import shutil
    run = tmp_path / "run"
    (run / "stages" / "00-init").mkdir(parents=True)
    (run / "stages" / "00-init" / "done").write_text("")
    shutil.copytree(tiny_official, run / "stages" / "01-text")
    for f in ("done", "log.jsonl"):
        (run / "stages" / "01-text" / f).write_text("")
    (run / "stages" / "01-text" / "summary.json").write_text("{}")
    shutil.copytree(tiny_official, run / "stages" / "02-vision-projector")  # unfinished: no done
    shutil.copytree(tiny_official, run / "stages" / "phase1-merged")
    (run / "stages" / "phase1-merged" / "done").write_text("")
    (run / "recipe.json").write_text(json.dumps({"stages": {}}))
    with pytest.raises(ValueError, match="stopped part-way"):
        finish.pack_resume(run, tmp_path / "pack")
    (run / "recipe.json").write_text(json.dumps({"stages": {}, "resume_base": "stages/phase1-merged"}))
    pack = finish.pack_resume(run, tmp_path / "pack")
    assert sorted(p.name for p in (pack / "stages").iterdir()) == ["00-init", "01-text", "phase1-merged"]
    assert sorted(p.name for p in (pack / "stages" / "01-text").iterdir()) == ["done", "log.jsonl", "summary.json"]
    base = pack / "stages" / "phase1-merged"
    assert (base / "done").is_file()
    a, b = phi4mm.load(tiny_official).net.state_dict(), phi4mm.load(base).net.state_dict()
    for k in a:  # the base comes back at bf16 precision (the normalisation statistics stay fp32)
        want = a[k] if k.endswith(("global_mean", "global_invstd")) else a[k].to(torch.bfloat16).float()
        assert torch.equal(b[k].float(), want.float()), k


def test_extend_run_marks_the_recorded_stages_done_and_starts_from_the_model(tiny_official, tmp_path):
    recorded = [st.name for st in micro_stages.RECIPE if st.phase <= 3]
    assert len(recorded) < len(micro_stages.RECIPE)  # the recipe has stages a finished run of phases 0-3 lacks
    summary = {"stages": {n: {"steps": i + 1} for i, n in enumerate(recorded)}, "seed": 0, "eval": {"x": 1}}
    (tmp_path / "recipe.json").write_text(json.dumps(summary))
    run = finish.extend_run(tiny_official, tmp_path / "recipe.json", tmp_path / "run")
    stages = run / "stages"
    for i, n in enumerate(recorded):
        folder = stages / f"{i + 1:02d}-{n}"
        assert (folder / "done").is_file() and json.loads((folder / "summary.json").read_text()) == {"steps": i + 1}
    last = stages / f"{len(recorded):02d}-{recorded[-1]}"
    assert (last / "config.json").is_file()  # run_recipe's next phase starts from the model
    a, b = phi4mm.load(tiny_official).net.state_dict(), phi4mm.load(last).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all((stages / f"phase{k}-merged" / "done").is_file() for k in range(3))  # the two-branch phases
    assert not (stages / f"{len(recorded) + 1:02d}-{micro_stages.RECIPE[len(recorded)].name}").exists()
    assert (stages / "00-init" / "done").is_file()
    assert "eval" not in json.loads((run / "recipe.json").read_text())  # scores of the old model only
    # A run of other stages, or the whole recipe already, cannot be extended.
    (tmp_path / "recipe.json").write_text(json.dumps({"stages": {"text": {}, "vision-lora": {}}}))
    with pytest.raises(ValueError, match="first part"):
        finish.extend_run(tiny_official, tmp_path / "recipe.json", tmp_path / "run2")
    (tmp_path / "recipe.json").write_text(json.dumps({"stages": {st.name: {} for st in micro_stages.RECIPE}}))
    with pytest.raises(ValueError, match="first part"):
        finish.extend_run(tiny_official, tmp_path / "recipe.json", tmp_path / "run2")
    # Stopping inside a phase (vision-lora ran, speech-lora beside it did not) cannot be extended either.
    part = [st.name for st in micro_stages.RECIPE][:7]
    (tmp_path / "recipe.json").write_text(json.dumps({"stages": {n: {} for n in part}}))
    with pytest.raises(ValueError):
        finish.extend_run(tiny_official, tmp_path / "recipe.json", tmp_path / "run2")


def test_encoder_stage_with_lora_also_trains_its_adapter(tiny_official):
    from phi4mm.train.stages import setup_stage, stage_spec
    m = phi4mm.load(tiny_official)
    plain = set(setup_stage(m, "vision-encoder", None))
    joint = set(setup_stage(phi4mm.load(tiny_official), "vision-encoder", None, with_lora=True))
    extra = joint - plain
    assert plain < joint and extra and all(".lora_" in n and n.endswith(".vision") for n in extra)
    speech = setup_stage(phi4mm.load(tiny_official), "speech-encoder", None, with_lora=True)
    assert any(n.endswith(".speech") for n in speech) and not any(n.endswith(".vision") for n in speech)
    with pytest.raises(ValueError, match="with_lora applies"):
        stage_spec("vision-lora", with_lora=True)


def _branch(base, out, pick):
    """A copy of base with one tensor per safetensors file (chosen by `pick`) changed."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(base, out)
    changed = []
    for f in sorted(out.rglob("*.safetensors")):
        t = load_file(str(f))
        k = pick(sorted(t))
        if k is not None:
            t[k] = t[k] + 1
            changed.append((str(f.relative_to(out)), k))
            save_file(t, str(f), metadata={"format": "pt"})
    return changed


def test_merge_takes_each_tensor_from_the_branch_that_trained_it(tiny_official, tmp_path):
    from safetensors.torch import load_file
    a = _branch(tiny_official, tmp_path / "a", lambda ks: next((k for k in ks if "vision" in k or "lora" in k), None))
    b = _branch(tiny_official, tmp_path / "b", lambda ks: next((k for k in ks if "audio" in k), None))
    assert a and b
    merged = finish.merge_branches(tiny_official, [tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    for rel, k in a + b:
        src = tmp_path / ("a" if (rel, k) in a else "b")
        assert torch.equal(load_file(str(merged / rel))[k], load_file(str(src / rel))[k])
    untouched = {(rel, k) for rel, k in a + b}
    for f in tiny_official.rglob("*.safetensors"):
        rel = str(f.relative_to(tiny_official))
        for k, t in load_file(str(f)).items():
            if (rel, k) not in untouched:
                assert torch.equal(load_file(str(merged / rel))[k], t)
    phi4mm.load(merged)  # still a loadable checkpoint
    _branch(tiny_official, tmp_path / "c", lambda ks: a[0][1] if a[0][1] in ks else None)
    with pytest.raises(ValueError, match="trained by both"):
        finish.merge_branches(tiny_official, [tmp_path / "a", tmp_path / "c"], tmp_path / "m2")
