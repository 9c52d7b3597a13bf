"""Training: stages freeze what the original freezes, tiny runs overfit, outputs reload (phi4mm and transformers +
peft), resume is exact, bad data fails before training with the file and line named.

The tiny random checkpoints tie a 0.02-scale embedding to the output: logits then span about +-1.5 whatever
the hidden state, so no adapter could push the loss below ~10 nats. The training bases here scale the
embedding by 50 (still random) so that overfitting can show.
"""
from __future__ import annotations

import functools
import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import phi4mm
from phi4mm.config import ModelConfig
from phi4mm.model.adapters import load_adapter
from phi4mm.model.network import Phi4MM
from phi4mm.model.weights import load_weights, lora_configs_from_folders
from phi4mm.train.data import IGNORE, assistant_labels, make_batches
from phi4mm.train.stages import STAGES, setup_stage, trainable_names
from phi4mm.train.trainer import train

DATA = Path(__file__).parents[1] / "data"
EMBED = "model.embed_tokens.weight"
TEXT = (("Say hi.", "Hi there."), ("Name a colour.", "Blue."), ("Two plus two?", "Four."),
        ("Capital of France?", "Paris."))
ASR = [("espeak_weather.flac", "the weather is fine"), ("flite_quick_brown_fox.flac", "the quick brown fox")]
IMAGES = [("astronaut_192.jpg", "An astronaut."), ("coffee_300x200.jpg", "A cup of coffee.")]


def _trainable_base(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    shard = dst / index[EMBED]
    tensors = load_file(str(shard))
    tensors[EMBED] = tensors[EMBED] * 50
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def base(tiny_official, tmp_path_factory):
    return _trainable_base(tiny_official, tmp_path_factory.mktemp("train") / "base")


@pytest.fixture(scope="module")
def base_hf(tiny_hf, tmp_path_factory):
    return _trainable_base(tiny_hf, tmp_path_factory.mktemp("train_hf") / "base")


def _write(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _chat(question, answer, media=None):
    content = [media, {"type": "text", "text": question}] if media else question
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def _media_dir(tmp: Path, names: list[str]) -> Path:
    (tmp / "media").mkdir(exist_ok=True)
    for n in names:
        shutil.copy(DATA / n, tmp / "media" / n)
    return tmp


def _asr_data(tmp: Path) -> Path:
    _media_dir(tmp, [f for f, _ in ASR])
    return _write(tmp / "asr.jsonl", [_chat("Transcribe the audio.", text, {"type": "audio", "path": f"media/{f}"})
                                      for f, text in ASR])


def _state(path: Path) -> dict[str, torch.Tensor]:
    """Every weight as phi4mm loads it (the production loader, without the slow tokenizer build)."""
    cfg = ModelConfig.from_dir(path)
    if cfg.layout == "phi4_multimodal":
        cfg.loras = lora_configs_from_folders(path)
    with torch.device("meta"):
        net = Phi4MM(cfg)
    load_weights(net, path, cfg.layout, "cpu", torch.float32)
    return net.state_dict()


def _assert_only_trained_changed(before: dict, after: dict, trained: list[str]) -> None:
    assert before.keys() == after.keys()
    for k in before:
        if k in trained:
            assert not torch.equal(before[k], after[k]), f"{k} did not train"
        else:
            assert torch.equal(before[k], after[k]), f"{k} changed but stage freezes it"


# ---- stages ------------------------------------------------------------------------------------------------


def test_stage_parameter_sets(base):
    model = phi4mm.load(base, dtype=torch.float32)
    net = model.net
    all_names = [n for n, _ in net.named_parameters()]
    vision = {n for n in all_names if n.startswith("vision.")}
    audio = {n for n in all_names if n.startswith("audio.")}
    lora = {a: {n for n in all_names if ".lora_" in n and n.endswith("." + a)} for a in ("vision", "speech")}
    speech_proj = {f"audio.{p}_proj_for_speech.{w}" for p in ("up", "down") for w in ("weight", "bias")}
    assert len(lora["vision"]) == 2 * 4 * 2  # layers x linears x (A, B)
    got = {s: set(trainable_names(net, s)) for s in STAGES if s != "text"}
    assert got["vision-projector"] == {f"vision.img_projection_{p}.{w}" for p in ("up", "down")
                                       for w in ("weight", "bias")} | {"vision.global_img_feature_extensor",
                                                                       "vision.sub_img_feature_extensor"}
    assert got["vision-encoder"] == vision
    assert got["vision-lora"] == lora["vision"]
    assert got["speech-encoder"] == {n for n in audio if "vision_speech" not in n}
    assert got["speech-lora"] == speech_proj | lora["speech"]
    assert got["vision-speech"] == vision | lora["vision"]  # audio encoder and both audio projectors frozen
    assert got["speech-ctc"] == {n for n in audio if n.startswith("audio.encoder.")}
    names = setup_stage(model, "text", lora_rank=4)
    assert set(names) == {n for n, _ in net.named_parameters() if ".lora_" in n and n.endswith(".text")}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == set(names)
    assert net.layers[0].mlp.down_proj.lora_B["text"].abs().sum() == 0  # a new adapter starts as a no-op


def test_labels_cover_assistant_replies_with_end():
    A, E, X = 1, 2, 3
    ids = [9, A, 5, 6, E, 7, A, 8, E, X]
    assert assistant_labels(ids, A, E, X) == [IGNORE, IGNORE, 5, 6, E, IGNORE, IGNORE, 8, E, X]


def test_batches_respect_the_token_budget():
    lengths = [5, 50, 7, 48, 6, 100, 49, 300]
    batches = make_batches(lengths, 150, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 150
    assert make_batches(lengths, 150, 1, 0) == batches != make_batches(lengths, 150, 1, 1)


# ---- training runs --------------------------------------------------------------------------------------------


def test_text_stage_overfits_and_reloads(base, tmp_path):
    data = _write(tmp_path / "text.jsonl", [_chat(q, a) for q, a in TEXT])
    out = tmp_path / "out"
    s = train(base, data, "text", out, max_steps=20, lr=3e-2, lora_rank=8, batch_tokens=4096, progress=False)
    assert s["losses"][0] > 5 and s["losses"][-1] < 0.1, s["losses"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 20
    _assert_only_trained_changed(_state(base), _state(out), [])  # the text adapter lives in text-lora/ only
    model = phi4mm.load(out, dtype=torch.float32)  # text-lora/ loads with the checkpoint ...
    for q, a in TEXT[:2]:
        prep = model.prepare([{"role": "user", "content": q}])
        assert prep.adapter == "text"  # ... and text-only prompts run through it
        assert model.generate(prep, max_new_tokens=8) == a
    plain = phi4mm.load(out, dtype=torch.float32, adapters=False)
    assert "text" not in plain.config.loras and plain.prepare(TEXT[0][0]).adapter is None
    again = phi4mm.load(base, dtype=torch.float32)  # the base has no text-lora/: text runs with no adapter
    load_adapter(again, out / "text-lora", "text")
    prep = again.prepare([{"role": "user", "content": TEXT[0][0]}])
    assert prep.adapter == "text" and again.generate(prep, max_new_tokens=8) == TEXT[0][1]

    from phi4mm.tasks.evaluate import evaluate
    r = evaluate(out, data, "exact", text_adapter="text", max_tokens=8)
    assert r["n"] == 4 and r["score"] == 1.0, r["predictions"]


def test_a_broken_text_lora_beside_a_checkpoint_fails_the_load_by_name(base, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base, ckpt)
    lora = ckpt / "text-lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    with pytest.raises(ValueError, match=r"text-lora is not a PEFT adapter folder"):
        phi4mm.load(ckpt)
    save_file({"base_model.model.bogus.lora_A.weight": torch.zeros(4, 4)}, str(lora / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"text-lora/adapter_model\.safetensors does not fit this model"):
        phi4mm.load(ckpt)
    assert phi4mm.load(ckpt, adapters=False).prepare("hi").adapter is None  # the way around it still works


def test_speech_lora_overfits_and_matches_transformers(base_hf, tmp_path):
    out = tmp_path / "out"
    s = train(base_hf, _asr_data(tmp_path), "speech-lora", out, max_steps=12, lr=2e-2, progress=False)
    assert s["losses"][-1] < 0.1 * s["losses"][0] and s["losses"][-1] < 0.5, s["losses"]
    _assert_only_trained_changed(_state(base_hf), _state(out), s["trainable"])

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.Phi4MultimodalForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                     attn_implementation="eager")
        ref.load_adapter(str(out / "speech-lora"), adapter_name="speech")
    ours = phi4mm.load(out, dtype=torch.float32)
    msgs = [{"role": "user", "content": [{"type": "audio", "path": str(DATA / ASR[0][0])},
                                         {"type": "text", "text": "Transcribe the audio."}]}]
    prep = ours.prepare(msgs)
    assert prep.adapter == "speech"
    ref.set_adapter("speech")
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([prep.input_ids]), audio_input_features=prep.audios.features,
                   audio_embed_sizes=torch.tensor(prep.audios.num_tokens)).logits[0]
    got = ours.logits(msgs)
    assert (got - want).abs().max() / want.abs().max() < 1e-4


def test_vision_lora_overfits_official_layout(base, tmp_path):
    _media_dir(tmp_path, [f for f, _ in IMAGES])
    data = _write(tmp_path / "img.jsonl", [_chat("Describe.", a, {"type": "image_url", "image_url": {"url": f"media/{f}"}})
                                           for f, a in IMAGES])
    out = tmp_path / "out"
    s = train(base, data, "vision-lora", out, max_steps=12, lr=2e-2, progress=False)
    assert s["losses"][-1] < 0.1 * s["losses"][0] and s["losses"][-1] < 0.5, s["losses"]
    _assert_only_trained_changed(_state(base), _state(out), s["trainable"])
    model = phi4mm.load(out, dtype=torch.float32)
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(DATA / IMAGES[0][0])}},
                                         {"type": "text", "text": "Describe."}]}]
    assert model.generate(msgs, max_new_tokens=8) == IMAGES[0][1]


def test_vision_projector_freezes_all_else(base, tmp_path):
    _media_dir(tmp_path, [IMAGES[1][0]])
    data = _write(tmp_path / "img.jsonl", [_chat("Describe.", IMAGES[1][1], {"type": "image", "path": f"media/{IMAGES[1][0]}"})])
    out = tmp_path / "out"
    s = train(base, data, "vision-projector", out, max_steps=2, lr=1e-3, progress=False)
    assert len(s["trainable"]) == 6
    _assert_only_trained_changed(_state(base), _state(out), s["trainable"])


def test_resume_reproduces_the_uninterrupted_run(base, tmp_path):
    data = _asr_data(tmp_path)  # speech LoRA has dropout 0.01: the RNG state must come back too
    kw = {"max_steps": 4, "lr": 5e-3, "batch_tokens": 64, "progress": False}  # one sample per batch: 2 per epoch
    full = train(base, data, "speech-lora", tmp_path / "a", save_every=2, **kw)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = train(base, data, "speech-lora", tmp_path / "b", resume=True, **kw)
    assert resumed["losses"] == full["losses"]
    a, b = (load_file(str(tmp_path / d / "speech-lora" / "adapter_model.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_speech_ctc_trains_the_encoder_alone_and_resumes_with_its_head(base, tmp_path):
    data = _asr_data(tmp_path)
    kw = {"max_steps": 24, "lr": 3e-3, "batch_tokens": 64, "progress": False}  # one clip per batch
    full = train(base, data, "speech-ctc", tmp_path / "a", save_every=12, **kw)
    assert full["trainable"] and all(n.startswith("audio.encoder.") for n in full["trainable"])
    first, last = sum(full["losses"][:4]) / 4, sum(full["losses"][-4:]) / 4
    assert last < 0.5 * first, full["losses"]  # two clips: CTC learns their transcripts
    _assert_only_trained_changed(_state(base), _state(tmp_path / "a"), full["trainable"])
    heard = full["ctc_heard"]  # the first micro-batch's clips (one here) as the head decodes them
    assert heard and {h["reference"] for h in heard} <= {t for _, t in ASR}
    assert all(isinstance(h["heard"], str) for h in full["ctc_heard"])
    head = load_file(str(tmp_path / "a" / "checkpoint-12" / "trainable.safetensors"))
    assert {"ctc_head.weight", "ctc_head.bias"} < set(head)  # resumable, but never exported
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-12", tmp_path / "b" / "checkpoint-12")
    resumed = train(base, data, "speech-ctc", tmp_path / "b", resume=True, **kw)
    assert resumed["losses"] == full["losses"]


def _ocr_data(tmp: Path, words=("cab", "dig")) -> Path:
    from PIL import Image, ImageDraw, ImageFont
    (tmp / "media").mkdir(exist_ok=True)
    font = ImageFont.load_default(size=60)
    for w in words:
        img = Image.new("RGB", (448, 112), "white")
        ImageDraw.Draw(img).text((20, 20), w, font=font, fill="black")
        img.save(tmp / "media" / f"{w}.png")
    return _write(tmp / "ocr.jsonl", [_chat("What word is written in the image?", w,
                                            {"type": "image", "path": f"media/{w}.png"}) for w in words])


def test_vision_ctc_trains_siglip_alone_to_read_its_images_columns(base, tmp_path):
    data = _ocr_data(tmp_path)
    kw = {"max_steps": 150, "lr": 3e-3, "batch_tokens": 64, "progress": False, "warmup_steps": 5}  # one per batch
    r = train(base, data, "vision-ctc", tmp_path / "a", **kw)
    assert r["trainable"] and all(n.startswith("vision.img_processor.") for n in r["trainable"])
    first, last = sum(r["losses"][:4]) / 4, sorted(r["losses"][-10:])[5]  # the median: CTC's loss spikes
    assert last < 0.3 * first, r["losses"]  # two words: CTC learns their letters (from the blank plateau)
    _assert_only_trained_changed(_state(base), _state(tmp_path / "a"), r["trainable"])
    assert {h["reference"] for h in r["ctc_heard"]} <= {"cab", "dig"}
    units = json.loads((tmp_path / "a" / "ctc-units.json").read_text())["model"]["vocab"]
    assert set(units) == set("cabdig") | {"\u2581"}  # single letters (+ the word-start mark): no merges


def test_vision_ctc_refuses_images_of_several_crops_and_audio_before_training(base, tmp_path):
    from PIL import Image
    data = _ocr_data(tmp_path)
    Image.new("RGB", (1400, 300), "white").save(tmp_path / "media" / "wide.png")
    wide = _write(tmp_path / "wide.jsonl", [data.read_text().splitlines()[0],
                                            _chat("What word?", "x", {"type": "image", "path": "media/wide.png"})])
    with pytest.raises(ValueError, match=r"wide\.jsonl:2: stage vision-ctc reads one 448-px crop, but this "
                                         r"1400x300 image takes"):
        train(base, wide, "vision-ctc", tmp_path / "o", max_steps=1, progress=False)
    mixed = _write(tmp_path / "mixed.jsonl", [data.read_text().splitlines()[0],
                                              _asr_data(tmp_path).read_text().splitlines()[0]])
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: stage vision-ctc takes samples with exactly one image"):
        train(base, mixed, "vision-ctc", tmp_path / "o2", max_steps=1, progress=False)


def test_speech_ctc_needs_one_audio_per_sample(base, tmp_path):
    data = _asr_data(tmp_path)
    mixed = _write(tmp_path / "mixed.jsonl", [json.loads(data.read_text().splitlines()[0]), _chat("Hi", "Hi")])
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: stage speech-ctc takes samples with exactly one audio"):
        train(base, mixed, "speech-ctc", tmp_path / "o")
    assert not (tmp_path / "o").exists()


RANK_THREADS = 1  # each CPU rank computes on one thread: 2 ranks on a 2-core machine


@contextmanager
def _rank_threads():
    """The one-process reference runs on the ranks' thread count. CPU matrix products split their sums over
    threads, so another thread count rounds the forward differently: with the machine's default the first
    step's loss already differed from the ranks', and Adam turned those rounding differences in near-zero
    gradients into weight differences up to 3.4e-5. On the same thread count both sides do the same
    arithmetic."""
    saved = torch.get_num_threads()
    torch.set_num_threads(RANK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _ddp_worker(rank: int, world: int, port: int, args: tuple, kw: dict) -> None:
    import os

    from phi4mm.train.distributed import finish_distributed
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(RANK_THREADS)
    train(*args, **kw)  # a rank that raises exits at once and mp.spawn stops the other
    finish_distributed()


def _two_ranks(args: tuple, kw: dict) -> list[dict]:
    """train(*args, **kw) as 2 torchrun-like CPU processes (gloo); the run's log rows."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, args, kw), nprocs=2)
    return [json.loads(line) for line in (Path(args[3]) / "log.jsonl").read_text().splitlines()]


@functools.cache
def _longest(base: Path, pairs: tuple[tuple[str, str], ...]) -> int:
    m = phi4mm.load(base)
    return max(len(m.prepare([{"role": "user", "content": q}, {"role": "assistant", "content": a}]).input_ids)
               for q, a in pairs)


@pytest.mark.slow  # two spawned ranks, each importing torch and loading the model
def test_two_process_ddp_gives_the_single_process_losses(base, tmp_path):
    """torchrun's path on CPU (gloo): 2 ranks x 1 micro-batch == 1 process x grad_accum 2, step for step."""
    data = _write(tmp_path / "text.jsonl", [_chat(q, a) for q, a in TEXT])
    # One conversation per micro-batch (2 never fit): 4 per epoch, so both ranks get 2, nothing is trimmed.
    kw = {"max_steps": 4, "lr": 1e-2, "lora_rank": 4, "batch_tokens": _longest(base, TEXT) + 8, "progress": False}
    with _rank_threads():
        one = train(base, data, "text", tmp_path / "one", grad_accum=2, **kw)
    ddp = _two_ranks((base, data, "text", tmp_path / "ddp"), kw)
    assert [r["loss"] for r in ddp] == pytest.approx(one["losses"], rel=1e-5)
    assert all(r["sharded_over"] == 1 for r in ddp)
    a, b = (load_file(str(tmp_path / d / "text-lora" / "adapter_model.safetensors")) for d in ("one", "ddp"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow  # two spawned ranks, each importing torch and loading the model
def test_two_process_fsdp_gives_the_single_process_losses_and_weights(base, tmp_path):
    """FSDP2 (fully_shard) on CPU (gloo), stage decoder (the decoder's own weights train, sharded over 2 ranks):
    the losses and the exported weights equal one process with grad_accum 2."""
    data = _write(tmp_path / "text.jsonl", [_chat(q, a) for q, a in TEXT])
    # No clipping (an infinite max norm scales by exactly 1): the clip factor is where the two sides' arithmetic
    # differs (FSDP adds the shards' squared norms, one process each whole tensor's), and a last-bit difference
    # there grows through the following steps' gradients. The norms themselves are compared below.
    kw = {"max_steps": 3, "lr": 1e-3, "batch_tokens": _longest(base, TEXT) + 8, "progress": False, "save_every": 0,
          "max_grad_norm": float("inf")}
    with _rank_threads():
        one = train(base, data, "decoder", tmp_path / "one", grad_accum=2, **kw)
    rows = _two_ranks((base, data, "decoder", tmp_path / "fsdp"), dict(kw, fsdp=True))
    assert all(r["sharded_over"] == 2 for r in rows)  # the FSDP path ran, not DDP
    assert [r["loss"] for r in rows] == pytest.approx(one["losses"], rel=1e-6)
    single = [json.loads(line)["grad_norm"] for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] for r in rows] == pytest.approx(single, rel=1e-5)  # the sharded norm is the whole one
    assert one["losses"][-1] < one["losses"][0]  # it trained
    shards = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "fsdp").glob("*.safetensors"))
    # The forward, backward and gradient sums are the same arithmetic on both sides (the reduce-scatter of 2
    # ranks adds the same two fp32 terms the accumulation adds), so the weights should agree to the bit; the
    # bound leaves one ulp of the weight (eps * |w|) and a few of the update (4 eps * lr) a step for a fused
    # multiply-add the two sides' kernels may place differently.
    steps, lr = kw["max_steps"], kw["lr"]
    for name in shards:
        a, b = (load_file(str(tmp_path / d / name)) for d in ("one", "fsdp"))
        assert a.keys() == b.keys(), name
        for k in a:
            eps = torch.finfo(a[k].dtype).eps  # the trained fp32 weights; frozen ones keep the base's dtype
            x, y = a[k].double(), b[k].double()
            bound = steps * (eps * torch.maximum(x.abs(), y.abs()) + 4 * eps * lr)
            excess = ((x - y).abs() - bound).max().item()
            assert excess <= 0, f"{name} {k}: {excess:.2e} past the rounding bound"


@pytest.mark.slow  # two spawned ranks, each importing torch and loading the model
def test_fsdp_with_bf16_frozen_weights_and_fp32_lora_masters(base, tmp_path):
    """A LoRA stage at dtype bfloat16 under FSDP: each layer's group holds bf16 frozen weights and fp32 LoRA
    masters, which FSDP2 gathers in bf16 (its mixed-precision policy); losses and adapter equal one process."""
    data = _write(tmp_path / "text.jsonl", [_chat(q, a) for q, a in TEXT])
    kw = {"max_steps": 3, "lr": 1e-2, "lora_rank": 4, "batch_tokens": _longest(base, TEXT) + 8, "progress": False,
          "save_every": 0, "dtype": "bfloat16"}
    with _rank_threads():
        one = train(base, data, "text", tmp_path / "one", grad_accum=2, **kw)
    rows = _two_ranks((base, data, "text", tmp_path / "fsdp"), dict(kw, fsdp=True))
    assert all(r["sharded_over"] == 2 for r in rows)
    assert [r["loss"] for r in rows] == pytest.approx(one["losses"], rel=1e-3)
    a, b = (load_file(str(tmp_path / d / "text-lora" / "adapter_model.safetensors")) for d in ("one", "fsdp"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


@pytest.mark.slow  # two spawned ranks, each importing torch and loading the model
def test_fsdp_checkpoints_resume_the_uninterrupted_run(base, tmp_path):
    """Each rank writes its shards (torch.distributed.checkpoint); a resumed 2-rank run reproduces the losses and
    weights of the uninterrupted one. A process without FSDP refuses such a checkpoint, naming the flag."""
    data = _write(tmp_path / "text.jsonl", [_chat(q, a) for q, a in TEXT])
    kw = {"max_steps": 4, "lr": 1e-3, "batch_tokens": _longest(base, TEXT) + 8, "progress": False, "fsdp": True}
    full = _two_ranks((base, data, "decoder", tmp_path / "a"), dict(kw, save_every=2))
    assert (tmp_path / "a" / "checkpoint-2" / "sharded").is_dir()
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = _two_ranks((base, data, "decoder", tmp_path / "b"), dict(kw, save_every=0, resume=True))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]  # the resumed log starts at step 3
    for f in sorted(p.name for p in (tmp_path / "a").glob("*.safetensors")):
        a, b = (load_file(str(tmp_path / d / f)) for d in "ab")
        assert all(torch.equal(a[k], b[k]) for k in a), f
    with pytest.raises(ValueError, match="written by an FSDP run; resume it with --fsdp"):
        train(base, data, "decoder", tmp_path / "c", resume=tmp_path / "a" / "checkpoint-2", max_steps=4,
              progress=False)


def test_checkpointing_and_autocast_paths(base, tmp_path):
    data = _write(tmp_path / "text.jsonl", [_chat(q, a) for q, a in TEXT])
    kw = {"max_steps": 2, "lr": 1e-2, "lora_rank": 4, "progress": False}
    plain = train(base, data, "text", tmp_path / "a", **kw)
    ckpt = train(base, data, "text", tmp_path / "b", grad_checkpointing=True, **kw)
    amp = train(base, data, "text", tmp_path / "c", amp=True, **kw)
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert amp["losses"] == pytest.approx(plain["losses"], rel=5e-2)


# ---- bad input ------------------------------------------------------------------------------------------------


def test_bad_input_fails_before_training(base, tmp_path):
    good = _chat("Say hi.", "Hi.")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*--skip-bad"):
        train(base, _write(tmp_path / "bad.jsonl", [good, "{not json"]), "text", tmp_path / "o1", max_steps=1)
    s = train(base, tmp_path / "bad.jsonl", "text", tmp_path / "o2", max_steps=1, skip_bad=True, progress=False)
    assert len(s["skipped"]) == 1 and s["steps"] == 1
    missing = _chat("Hi", "Hi", {"type": "image_url", "image_url": {"url": "pics/nope.jpg"}})
    with pytest.raises(ValueError, match=r"missing\.jsonl:1: .*nope\.jpg"):
        train(base, _write(tmp_path / "missing.jsonl", [missing]), "vision-lora", tmp_path / "o3")
    with pytest.raises(ValueError, match="no usable conversations"):
        train(base, _write(tmp_path / "empty.jsonl", []), "text", tmp_path / "o4")
    with pytest.raises(ValueError, match="none of the 1 samples"):
        train(base, _write(tmp_path / "t.jsonl", [good]), "speech-lora", tmp_path / "o5")
    with pytest.raises(ValueError, match="stage 'speech' is not known"):
        train(base, tmp_path / "t.jsonl", "speech", tmp_path / "o6")
    no_audio = tmp_path / "no_audio"
    no_audio.mkdir()
    conf = json.loads((base / "config.json").read_text())
    del conf["audio_processor"]
    (no_audio / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="no audio tower"):
        train(no_audio, tmp_path / "t.jsonl", "speech-lora", tmp_path / "o7")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 3, 4, 5, 6, 7))


def test_metrics():
    from phi4mm.tasks.evaluate import normalize, score, wer
    assert normalize("Hello, World!  It's 3 o'clock.") == "hello world its 3 oclock"
    assert wer(["the cat sat"], ["The cat, sat!"]) == 0
    assert wer(["a b c d"], ["a x c"]) == 0.5
    assert score("vqa", [["two"] * 2 + ["2"] * 8], ["Two."]) == pytest.approx(2 / 3)
    assert score("exact", [["Paris"], ["Rome"]], ["paris.", "Milan"]) == 0.5
    try:
        import sacrebleu  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install sacrebleu"):
            score("bleu", [["a b c"]], ["a b c"])


def test_batched_towers_equal_per_sample(base, tmp_path):
    """One tower call per batch (images padded to the longest crop count, audio to the longest clip, each
    audio projector its own call) gives the loss of running every sample alone."""
    from phi4mm.inputs.records import read_jsonl
    from phi4mm.train.data import collate, encode, with_media
    from phi4mm.train.loss import LossModule
    model = phi4mm.load(base)
    model.net.requires_grad_(False)
    from tests.conftest import scene
    tall = tmp_path / "tall.png"
    scene(160, 900).save(tall)  # a 1x3 crop grid next to the 1x1 of the small images
    astronaut = {"type": "image_url", "image_url": {"url": str(DATA / IMAGES[0][0])}}
    rows = [_chat("What is it?", "An astronaut.", astronaut),
            _chat("Transcribe the audio clip into text.", ASR[0][1],
                  {"type": "audio_url", "audio_url": {"url": str(DATA / ASR[0][0])}}),
            _chat("What is it?", "A cup.", {"type": "image_url", "image_url": {"url": str(tall)}}),
            {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": str(DATA / IMAGES[1][0])}},
                {"type": "audio_url", "audio_url": {"url": str(DATA / ASR[1][0])}}]},
                {"role": "assistant", "content": "the quick brown fox"}]},
            _chat("Say hi.", "Hi there.")]
    recs = read_jsonl(_write(tmp_path / "mix.jsonl", rows))[0]
    lazy = [encode(model, r, keep_media=False) for r in recs]
    assert [e.has_image for e in lazy] == [True, False, True, True, False]
    assert all(e.prep.images is None and e.prep.audios is None for e in lazy)
    full = [with_media(model, e) for e in lazy]
    pad = model.config.text.pad_token_id
    loss = LossModule(model)
    with torch.no_grad():
        together = float(loss(collate(full, pad)))
        alone = sum(float(loss(collate([e], pad))) for e in full)
    assert together == pytest.approx(alone, rel=1e-4)
    assert encode(model, recs[2]).prep.images.pixel_values.shape[1] != full[0].prep.images.pixel_values.shape[1]


def test_vision_frames_read_lines_by_columns_and_other_images_in_raster_order():
    from phi4mm.train.ctc import ctc_log_probs, vision_frames
    side, c = 4, 3
    f = torch.arange(2 * side * side * c, dtype=torch.float32).view(2, side * side, c)  # (N, patches, C)
    mask = torch.zeros(2, side, side, dtype=torch.bool)
    mask[0, :2] = True  # a line: 2 valid rows of 4 columns
    mask[1, :3, :3] = True  # a 3x3 picture: read row by row
    frames, lengths, line = vision_frames(f, mask)
    assert lengths.tolist() == [4, 3 * side] and line.tolist() == [True, False]  # columns; the valid rows, each whole (padding is right/below)
    grid = f.view(2, side, side, c)
    assert torch.equal(frames[0, :4], grid[0, :2].mean(0))  # each column's mean over its valid rows
    assert torch.equal(frames[1, :12], grid[1, :3].reshape(12, c))  # row-major patches
    assert frames.shape[1] == 12  # trimmed to the longest image
    logits = torch.randn(2, 12, 2 * 5)  # two frames of 5 classes per input frame
    logp, n = ctc_log_probs(logits, lengths, 2)
    assert logp.shape == (2, 24, 5) and n.tolist() == [8, 24]
    assert torch.allclose(logp[0, 1], torch.log_softmax(logits[0, 0, 5:], -1))  # input frame 0's second output
    # The line takes both outputs of each column; the raster image one per patch.
    logp, n = ctc_log_probs(logits, lengths, 2, line)
    assert logp.shape == (2, 24, 5) and n.tolist() == [8, 12]
    assert torch.allclose(logp[0, 1], torch.log_softmax(logits[0, 0, 5:], -1))
    assert torch.allclose(logp[1, :12], torch.log_softmax(logits[1, :, :5], -1))


def test_vision_ctc_crop_cache_equals_the_processors_crop(base, tmp_path):
    """vision-ctc decodes each image once into a uint8 cache; the normalised crop it serves is the processor's."""
    from PIL import Image

    from phi4mm.inputs.records import read_jsonl
    from phi4mm.train.ctc import check_ctc
    from phi4mm.train.data import encode
    from tests.conftest import scene
    model = phi4mm.load(base)
    (tmp_path / "media").mkdir()
    sizes = [(448, 112), (448, 448), (300, 120), (120, 400), (57, 33)]
    for k, (w, h) in enumerate(sizes):
        scene(w, h, k).save(tmp_path / "media" / f"{k}.png")
    data = _write(tmp_path / "d.jsonl", [_chat("Read it.", "word", {"type": "image", "path": f"media/{k}.png"})
                                         for k in range(len(sizes))])
    examples = [encode(model, r) for r in read_jsonl(data)[0]]
    cache = check_ctc(examples, data, "vision-ctc", model.config.dynamic_hd, model.device, workers=2)
    pv, mask = cache.batch(examples[::-1], torch.float32)  # any order: looked up by data line
    for i, e in enumerate(examples[::-1]):
        assert torch.equal(pv[i], e.prep.images.pixel_values[0, 1])
        assert torch.equal(mask[i], e.prep.images.attention_mask[0, 1].bool())
    assert Image.open(tmp_path / "media" / "0.png").size == (448, 112)


def test_caption_labels_are_words_and_the_pairs_within_each_phrase():
    from phi4mm.train.ctc import caption_labels
    assert caption_labels("Green triangle, blue square") == ["blue", "blue square", "green", "green triangle",
                                                             "square", "triangle"]  # no "triangle blue" across the comma
    assert caption_labels("cab") == ["cab"]


def test_label_head_scores_an_image_by_its_valid_tokens_only():
    import torch.nn.functional as F

    from phi4mm.train.ctc import LabelHead
    torch.manual_seed(0)
    head = LabelHead(3, ["a", "b"], torch.device("cpu"))
    tokens = torch.randn(2, 5, 3)  # (N, T, C)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = head(tokens, mask)
    per_token = head.proj(tokens[0, :2])  # (2, L): the first image's valid tokens
    assert torch.allclose(out[0], per_token.exp().mean(0).log())  # log-mean-exp over them
    tokens2 = tokens.clone()
    tokens2[0, 2:] = 1e4  # padding changes nothing
    assert torch.equal(head(tokens2, mask)[0], out[0])
    rows = torch.tensor([False, True])
    y = head.targets(["b", "a b"], torch.device("cpu"))
    assert y.tolist() == [[0.0, 1.0], [1.0, 1.0]]  # "a b" (a pair) is not a label of this head: ignored
    assert torch.allclose(head.loss(tokens, mask, ["b", "a b"], rows),
                          F.binary_cross_entropy_with_logits(out[1], y[1], reduction="sum"))


def _lines_and_scenes(tmp_path: Path) -> Path:
    """Two rendered words (lines of text) and two one-shape scenes, in one JSONL."""
    from PIL import Image, ImageDraw
    data = _ocr_data(tmp_path)
    scenes = []
    for k, (colour, shape) in enumerate([("red", "circle"), ("blue", "square")]):
        img = Image.new("RGB", (448, 448), "white")
        box = [100 + 40 * k, 120, 300 + 40 * k, 320]
        getattr(ImageDraw.Draw(img), "ellipse" if shape == "circle" else "rectangle")(box, fill=colour)
        img.save(tmp_path / "media" / f"s{k}.png")
        scenes.append(_chat("List the shapes.", f"{colour} {shape}", {"type": "image", "path": f"media/s{k}.png"}))
    return _write(tmp_path / "mixed.jsonl", data.read_text().splitlines() + scenes)


def test_vision_ctc_reads_lines_by_ctc_and_learns_other_images_labels(base, tmp_path):
    """Lines of text train CTC only; other images (shapes, photos) their caption labels only."""
    mixed = _lines_and_scenes(tmp_path)
    kw = {"max_steps": 60, "lr": 3e-3, "batch_tokens": 64, "progress": False, "warmup_steps": 5}  # one per batch
    r = train(base, mixed, "vision-ctc", tmp_path / "a", **kw)
    labels = json.loads((tmp_path / "a" / "vision-labels.json").read_text())
    assert labels == ["blue", "blue square", "circle", "red", "red circle", "square"]  # not the words "cab", "dig"
    assert all(n.startswith("vision.img_processor.") for n in r["trainable"])  # the heads are never exported
    assert sorted(r["losses"][-20:])[10] < 0.5 * sorted(r["losses"][:6])[3], r["losses"]
    _assert_only_trained_changed(_state(base), _state(tmp_path / "a"), r["trainable"])
    assert {h["reference"] for h in r["ctc_heard"]} == {"cab", "dig"}  # the lines CTC reads, not the scenes


def test_vision_ctc_loss_of_a_mixed_batch_is_the_sum_of_its_samples(base, tmp_path):
    """CTC runs over a batch's lines only and the label loss over the rest: the same as each sample alone."""
    from phi4mm.inputs.records import read_jsonl
    from phi4mm.train.ctc import (
        CTCLossModule,
        caption_labels,
        check_ctc,
        ctc_units,
        transcript,
    )
    from phi4mm.train.data import collate, encode
    model = phi4mm.load(base)
    mixed = _lines_and_scenes(tmp_path)
    examples = [encode(model, r) for r in read_jsonl(mixed)[0]]
    crops = check_ctc(examples, mixed, "vision-ctc", model.config.dynamic_hd, model.device, workers=2)
    assert [crops.is_line(e) for e in examples] == [True, True, False, False]
    texts = [transcript(model.tokenizer, e) for e in examples]
    labels = sorted({x for t, e in zip(texts, examples) if not crops.is_line(e) for x in caption_labels(t)})
    torch.manual_seed(0)
    loss = CTCLossModule(model, ctc_units(texts, 1), crops, labels)
    pad = model.config.text.pad_token_id
    with torch.no_grad():
        together = float(loss(collate(examples, pad)))
        alone = [float(loss(collate([e], pad))) for e in examples]
    assert together == pytest.approx(sum(alone), rel=1e-5)
    assert all(x > 0 for x in alone)  # each sample adds its own loss (CTC for the words, labels for the scenes)
