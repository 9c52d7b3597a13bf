"""The embedded micro model: Phi-4-multimodal's architecture at ~12 M parameters, trained by phi4mm itself.

    phi4mm train --recipe micro --out micro-run --device cuda     # data, tokenizer, 9 stages, eval (~17 min, 2 H200)

`run_recipe` generates the training and held-out data offline (`micro.data`), trains a byte-level BPE on the
training text with Phi's special tokens (looked up by name everywhere, never by id), writes a fresh checkpoint
in the official layout, then runs `phi4mm.train.trainer` through the recipe's stages in the original order: the decoder
on text, the vision projector -> encoder -> LoRA, the speech encoder -> LoRA, then the vision-speech stage.
Each stage's output is a complete checkpoint that the next stage starts from; a finished stage is skipped on a
re-run, so an interrupted recipe resumes at the stage it was in. The last checkpoint is cast to bf16 and
sharded (no file over 15 MB) into `out/model`, then scored on the held-out sets (the "eval" entry of
`out/recipe.json`).

The shipped copy lives in `phi4mm/micro/model/`; `default_model_dir()` finds it, and the CLI uses it when no
`--model` is given.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from phi4mm.inputs.tokenizer import ADDED_TOKENS, CHAT_TEMPLATE, EOS_TOKEN, Tokenizer
from phi4mm.model.checkpoint import official_config, write_adapter_folder, write_shards

MICRO_DIR = Path(__file__).parent / "model"
BPE_VOCAB = 2048  # the corpus has a few hundred distinct words: whole words become single tokens
MAX_FILE_BYTES = 15 * 2**20  # no shipped file over 15 MB
# Sizes: the published structure (fused qkv/gate_up, GQA 2:1, partial rotary 0.75, SigLIP NaViT with the
# feature layer -2, a conv-subsampled conformer with T5 bias), scaled to ~12 M parameters (~24 MB bf16).
TEXT = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 4}  # head_dim 32 -> rotary 24 -> 12 LongRoPE factors
VISION = {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4}
AUDIO = {"attention_dim": 192, "attention_heads": 4, "linear_units": 512, "num_blocks": 4,
         "nemo_conv_settings": {"conv_channels": 192}, "ext_pw_out_channel": 192,
         "depthwise_seperable_out_channel": 192}
LORA = {"vision": (32, 64), "speech": (32, 64)}  # (r, alpha): alpha = 2r, the published ratio
INIT_STD = 0.02  # GPT-style initialisation of the decoder's matrices; LoRA B starts at zero (the adapter is a no-op)
# SigLIP's learned position table: 0.02 would be ~2% of a patch embedding's scale (~1 for [-1, 1] pixels and
# 1/sqrt(fan_in) weights), so the tower would start out blind to where a patch is; OCR needs letter order.
VISION_POS_STD = 0.2
# The last matrix of every residual branch in the towers starts at zero, so each block starts as the identity
# (the usual "zero the branch output" init of deep residual nets). With 1/sqrt(fan_in) there too, the branch
# outputs of the conformer were near-constant over time (ReLU/swish means feeding the next projection) and
# drowned the subsampled speech: the encoder output varied 0.2% frame to frame, and neither the LM loss nor
# CTC moved it in 2,000 GPU steps (weights stayed at their initial norms).
ZERO_INIT = (".feed_forward_in.down_proj.weight", ".feed_forward_out.down_proj.weight", ".self_attn.o_proj.weight",
             ".conv.ext_pw_conv_1d.weight", ".self_attn.out_proj.weight", ".mlp.fc2.weight")
MEL_STATS_CLIPS = 256  # training clips that set the encoder's input normalisation (global mean / invstd)


@dataclass(frozen=True)
class MicroStage:
    name: str  # output folder and report label
    stage: str  # the `phi4mm train` stage
    tasks: tuple[str, ...]  # micro.data task files mixed into this stage's data
    epochs: float
    lr: float
    batch_tokens: int = 16384
    phase: int = 0  # phases run in order; within one, stages of different branches run at once on a GPU
    branch: str = ""  # stages of one branch run in order; branches train disjoint tensors (merged exactly)
    with_lora: bool = False  # an encoder stage also trains its modality's LoRA (train.STAGE_LORA says why)
    warmup: int = 20
    keep_plan: bool = False  # never cut by a --max-minutes budget (a phase of only such stages is unbudgeted)
    max_seconds: float | None = None  # a fixed time cap on GPU runs (its cosine schedule spans it), else epochs


# "scene" names every shape of a scene: the shapes questions alone left circle, square and triangle nearly
# untold apart (0.61), one question naming one shape per image.
IMAGE_TASKS = ("ocr", "shapes", "scene", "caption")
SPEECH_TASKS = ("asr", "ast", "sqa")
RECIPE = (
    # Every later stage builds on this decoder, and it is cheap (~45 s on an H200): a budget never cuts it. Cut
    # to 345 of its 720 steps by a 6.8-minute budget, the model scored 0.0 on tool calls (0.99 uncut).
    MicroStage("text", "decoder", ("text", "tools"), 12, 1e-3, 8192, phase=0, keep_plan=True),
    # SigLIP learns letters and shapes first, beside the text stage on the other GPU (they train disjoint
    # tensors): the LM-loss stages never taught the encoder to read (held-out OCR 0.00 in three recipe runs) nor to
    # tell circle, square and triangle apart. Words by CTC on character units (what fixed speech; alone it read
    # 30% of held-out words in 2,500 probe steps); scenes and photos by their caption labels, words and
    # colour-shape pairs (train.ctc.LabelHead; probe: held-out scenes' exact label sets 0.76 in 1,650 steps,
    # where raster-read CTC scene lists reached 0.14 and stopped OCR learning). Capped at 150 s on a GPU.
    MicroStage("vision-ctc", "vision-ctc", ("ocr", "scene", "caption"), 30, 1e-3, phase=0, branch="vision",
               keep_plan=True, warmup=100, max_seconds=150.0),
    MicroStage("vision-projector", "vision-projector", IMAGE_TASKS, 1, 1e-3, phase=1, branch="vision"),
    MicroStage("vision-encoder", "vision-encoder", IMAGE_TASKS, 12, 5e-4, phase=1, branch="vision",
               with_lora=True, warmup=100),
    # The original's audio encoder starts from an ASR model; the micro one learns to recognise speech first (CTC
    # on the transcripts, in character-BPE units: train.ctc.ctc_units). Without it the encoder's output stayed nearly
    # constant over time after 1,136 LM-loss steps and the model transcribed from its language prior (WER 1.04);
    # with whole-word targets CTC sat on its plateau (loss ~3.0 per word after 2,640 GPU steps); with the units
    # a probe reached held-out WER 0.25 in 385 steps (scripts/micro_ctc_probe.py, docs/micro-model.md).
    MicroStage("speech-ctc", "speech-ctc", ("asr",), 16, 1e-3, 2048, phase=1, branch="speech", warmup=100),
    MicroStage("speech-encoder", "speech-encoder", SPEECH_TASKS, 8, 1e-3, 4096, phase=1, branch="speech",
               with_lora=True, warmup=100),
    MicroStage("vision-lora", "vision-lora", IMAGE_TASKS, 4, 3e-4, phase=2, branch="vision"),
    MicroStage("speech-lora", "speech-lora", SPEECH_TASKS, 5, 3e-4, 4096, phase=2, branch="speech"),
    # Image tasks stay in the mix so the jointly trained encoder and LoRA_V keep reading (the original mixes
    # vision post-training data into this stage too).
    MicroStage("vision-speech", "vision-speech", ("vsqa",) + IMAGE_TASKS, 4, 3e-4, phase=3),
    # The decoder side reads the shapes last. The encoder before it binds each shape to its colour in its merged
    # tokens (one attention query per colour answers "what shape is red" at 0.97-1.00), yet the model answered
    # 26/50. A probe (scripts/micro_lm_probe.py, 240 s from the shipped model) took shapes from 0.665 to 0.845
    # and "what shape is <colour>" to 49/50 with projector + LoRA_V at lr 1e-3 on scenes alone; more of the
    # recipe's own mix (OCR is half of it and still unread) gave 0.68. The towers stay frozen. Typed questions
    # only: spoken questions about scenes (vsqa, same LoRA_V) fell from 0.29 to 0.01 when vsqa was in.
    MicroStage("vision-focus", "vision-projector", ("shapes", "scene"), 14, 1e-3, phase=4, branch="vision",
               with_lora=True, warmup=50, max_seconds=400.0),
)
# Seconds per sample pass on one H200 of a 2-GPU recipe run (docs/micro-model.md#training-time: each
# stage's seconds over its samples x epochs, rounded per kind), used to plan a --max-minutes budget. The old
# H100 profile (GPU step time only) underestimated image stages ~1.9x and speech ~1.3x: loading and start-up.
_COST = {"text": 0.5e-3, "tools": 0.75e-3, "ocr": 3.0e-3, "shapes": 3.0e-3, "scene": 3.0e-3,
         "caption": 3.0e-3, "vsqa": 3.4e-3,
         "asr": 1.45e-3, "ast": 1.45e-3, "sqa": 1.45e-3}
# Held-out sets: (file, metric, goal, higher is better); the goals are the bar the shipped model is held to.
GOALS = (
    ("asr", "wer", 0.10, False), ("asr_heldout_voice", "wer", 0.25, False), ("ast", "bleu", 60.0, True),
    ("ocr", "exact", 0.90, True), ("shapes", "exact", 0.90, True), ("tools", "tool", 0.95, True),
    ("sqa", "exact", None, True), ("vsqa", "exact", None, True), ("text", "exact", None, True),
)


def default_model_dir() -> Path:
    """The shipped micro checkpoint (used when no --model is given)."""
    if not (MICRO_DIR / "config.json").is_file():
        raise FileNotFoundError(f"no --model given and the embedded micro model is missing from this install "
                                f"({MICRO_DIR}); reinstall phi4mm with its package data, or pass --model DIR, a "
                                "checkpoint directory (`phi4mm make-checkpoint DIR` writes a random tiny one)")
    return MICRO_DIR


# ---- tokenizer and configuration ------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], out: str | Path, vocab_size: int = BPE_VOCAB) -> Tokenizer:
    """A byte-level BPE on `texts` with Phi's added tokens (same names and flags, new ids); files -> out."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = [content for _, content, _, _ in ADDED_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=names, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    # Re-add with the published flags (special / rstrip); each name keeps the id the trainer gave it.
    tok.add_tokens([AddedToken(c, special=sp, rstrip=rs, lstrip=False, normalized=False, single_word=False)
                    for _, c, sp, rs in ADDED_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(c)): {"content": c, "lstrip": False, "normalized": False, "rstrip": rs,
                                       "single_word": False, "special": sp} for _, c, sp, rs in ADDED_TOKENS}
    conf = {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added, "bos_token": EOS_TOKEN,
            "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": EOS_TOKEN,
            "model_max_length": 131072, "pad_token": EOS_TOKEN, "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": EOS_TOKEN}
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: EOS_TOKEN for k in ("bos_token", "eos_token", "pad_token", "unk_token")}, indent=2) + "\n")
    return Tokenizer.from_dir(out)


def micro_config(tok: Tokenizer) -> dict[str, Any]:
    """The official-layout config.json of the micro model, ids taken from its tokenizer by name."""
    d = official_config("tiny")
    d.update(TEXT)
    half = TEXT["hidden_size"] // TEXT["num_attention_heads"] * 3 // 8  # rotary_dim / 2 = 12
    long = official_config("full")["rope_scaling"]["long_factor"]
    d["rope_scaling"] = {"type": "longrope", "short_factor": [1.0] * half,
                         "long_factor": long[:: len(long) // half][:half]}
    d["vocab_size"] = math.ceil(tok.vocab_size / 64) * 64  # embedding rows padded like the published 200064
    eot = tok.token_id(EOS_TOKEN)
    d.update(bos_token_id=eot, pad_token_id=eot, eos_token_id=[tok.token_id("<|end|>"), eot])
    d["vision_config"] = dict(VISION)
    d["audio_processor"]["config"].update(json.loads(json.dumps(AUDIO)))
    for name, (r, alpha) in LORA.items():
        d[f"{name}_lora"].update(r=r, lora_alpha=alpha)
    return d


def _init(mel_mean: torch.Tensor, mel_invstd: torch.Tensor, seed: int):
    """name, shape -> a from-scratch initial value (deterministic per name)."""
    import zlib

    def init(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("global_mean"):
            return mel_mean.clone()
        if name.endswith("global_invstd"):
            return mel_invstd.clone()
        leaf = name.rsplit(".", 1)[-1]
        if ".lora_B." in name or leaf in ("bias", "b1", "b2") or \
                (name.startswith(("vision.", "audio.")) and name.endswith(ZERO_INIT)):
            return torch.zeros(shape)
        if len(shape) == 1:  # norm gains
            return torch.ones(shape)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        std = VISION_POS_STD if name.startswith("vision.") and name.endswith("position_embedding.weight") \
            else INIT_STD
        if name.startswith(("vision.", "audio.")) and len(shape) >= 2 and "lora_" not in name \
                and not name.endswith(("position_embedding.weight", "_extensor")) and "attention_bias" not in name:
            # Tower matrices and convs: 1/sqrt(fan_in) keeps the signal's scale layer to layer. A flat 0.02
            # shrank it ~1e-6 through the conformer's five small-fan-in subsampling convs (depthwise 3x3:
            # fan-in 9), so its output did not depend on the audio and speech training could not start.
            std = math.prod(shape[1:]) ** -0.5
        return std * torch.randn(shape, generator=g)
    return init


def _corpus(data_dir: Path) -> Iterable[str]:
    """Every training conversation rendered with the chat template (the BPE learns the prompt format too)."""
    from phi4mm.inputs.chat import render_prompt
    from phi4mm.inputs.records import read_jsonl
    for f in sorted(data_dir.glob("*.jsonl")):
        if f.name.startswith("stage-"):
            continue
        for rec in read_jsonl(f)[0]:
            yield render_prompt(rec.messages, rec.tools, add_generation_prompt=False)


def _mel_stats(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin mean and 1/std of the log-mel over the first training clips (the encoder's input norm)."""
    from phi4mm.inputs.audio import load_audio, log_mel
    from phi4mm.inputs.records import read_jsonl
    recs = read_jsonl(data_dir / "asr.jsonl")[0][:MEL_STATS_CLIPS]
    feats = torch.cat([torch.from_numpy(log_mel(load_audio(r.audios[0]))) for r in recs])  # (frames, 80)
    return feats.mean(0).float(), (1.0 / feats.std(0).clamp_min(1e-3)).float()


def init_checkpoint(out: str | Path, data_dir: str | Path, seed: int = 0) -> Path:
    """Tokenizer trained on the training data + a from-scratch checkpoint in the official layout."""
    from phi4mm.tasks.make_checkpoint import make_checkpoint
    out, data_dir = Path(out), Path(data_dir)
    tok_dir = out.parent / (out.name + "-tokenizer")
    tok = train_tokenizer(_corpus(data_dir), tok_dir)
    mean, invstd = _mel_stats(data_dir)
    make_checkpoint(out, config=micro_config(tok), init=_init(mean, invstd, seed), tokenizer_dir=tok_dir,
                    dtype=torch.float32)
    shutil.rmtree(tok_dir)
    return out


# ---- the recipe -----------------------------------------------------------------------------------------------


def _stage_data(data_dir: Path, st: MicroStage) -> Path:
    """The stage's tasks in one JSONL beside them (media paths stay relative to the same folder)."""
    path = data_dir / f"stage-{st.name}.jsonl"
    with path.open("w") as f:
        for task in st.tasks:
            f.write((data_dir / f"{task}.jsonl").read_text())
    return path


def _share_projector(ckpt: Path) -> None:
    """The vision-speech audio projector starts as the trained speech projector.

    No recipe stage trains it before the vision-speech stage (which keeps the audio side frozen); the
    published model arrives with it trained, the micro model needs a meaningful start.
    """
    from safetensors.torch import load_file, save_file
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    src = {k: k.replace("_for_vision_speech", "_for_speech") for k in index if "_for_vision_speech" in k}
    shards = {index[k] for k in src} | {index[v] for v in src.values()}
    tensors = {s: load_file(str(ckpt / s)) for s in shards}
    for dst, s in src.items():
        tensors[index[dst]][dst] = tensors[index[s]][s].clone()
    for s, t in tensors.items():
        save_file(t, str(ckpt / s), metadata={"format": "pt"})


def _planned_seconds(data_dir: Path, st: MicroStage) -> float:
    """The stage's expected training seconds on the H100 (samples x epochs x per-sample cost)."""
    lines = {t: sum(1 for _ in (data_dir / f"{t}.jsonl").open()) for t in st.tasks}
    plan = st.epochs * sum(n * _COST.get(t, 3.0e-3) for t, n in lines.items())
    return plan if st.max_seconds is None else min(plan, st.max_seconds)


def _phases() -> list[list[list[int]]]:
    """RECIPE indices as phases run in order; a phase is a list of branches, each a chain of stages.

    [[[0], [1]], [[2, 3], [4, 5]], [[6], [7]], [[8]]]: text with vision CTC; (vision projector -> encoder)
    with (speech CTC -> encoder); vision LoRA with speech LoRA; vision-speech.
    """
    phases: dict[int, dict[str, list[int]]] = {}
    for i, st in enumerate(RECIPE):
        phases.setdefault(st.phase, {}).setdefault(st.branch, []).append(i)
    return [list(phases[k].values()) for k in sorted(phases)]


def merge_branches(base: str | Path, branches: list[str | Path], out: str | Path) -> Path:
    """One checkpoint from branches that each started at `base` and trained disjoint tensors.

    Every tensor (shards and adapter folders) comes from the branch that changed it, else from base; a tensor
    two branches changed is an error (they were not independent). Exact: no averaging happens.
    """
    from safetensors.torch import load_file, save_file
    base, out = Path(base), Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("done", "log.jsonl", "summary.json"))
    for f in sorted(base.rglob("*.safetensors")):
        rel = f.relative_to(base)
        orig = load_file(str(f))
        merged, changed_by = dict(orig), {}
        for br in map(Path, branches):
            for k, t in load_file(str(br / rel)).items():
                if k not in orig or t.shape != orig[k].shape:
                    raise ValueError(f"{br / rel} does not match the base checkpoint at {k}; merge branches of "
                                     "one base only")
                if torch.equal(t, orig[k]):
                    continue
                if k in changed_by:
                    raise ValueError(f"{k} was trained by both {changed_by[k]} and {br}; branches must train "
                                     "disjoint tensors")
                merged[k], changed_by[k] = t, br
        save_file(merged, str(out / rel), metadata={"format": "pt"})
    return out


def _run_chain(out: Path, chain: list[int], base: Path, data_dir: Path, seed: int, device: str, workers: int,
               budgets: dict[int, float | None], epochs_scale: float, progress: bool) -> Path:
    """Train RECIPE[chain] in order from base; each finished stage leaves done + summary.json."""
    from phi4mm.train.trainer import train
    cuda = device.startswith("cuda")
    if cuda and ":" in device:  # a branch on its own GPU: allocations that name no device go there too
        import torch
        torch.cuda.set_device(device)
    for n in chain:
        st = RECIPE[n]
        stage_out = out / "stages" / f"{n + 1:02d}-{st.name}"
        if (stage_out / "done").is_file():
            base = stage_out
            continue
        if st.stage == "vision-speech":
            _share_projector(base)
        if stage_out.exists():
            shutil.rmtree(stage_out)
        budget = budgets[n]
        if st.max_seconds is not None and cuda:  # CPU smoke runs go by their (scaled) epochs
            budget = st.max_seconds if budget is None else min(budget, st.max_seconds)
        res = train(base, _stage_data(data_dir, st), st.stage, stage_out, epochs=st.epochs * epochs_scale,
                    lr=st.lr, batch_tokens=st.batch_tokens, seed=seed, device=device,
                    dtype="bfloat16" if cuda else "float32", warmup_steps=st.warmup, weight_decay=0.01,
                    save_every=0, workers=workers if cuda else 0, progress=progress, max_seconds=budget,
                    with_lora=st.with_lora)
        summary = {"stage": st.stage, "with_lora": st.with_lora, "steps": res["steps"],
                   "final_loss": res["final_loss"], "planned_epochs": st.epochs * epochs_scale,
                   "budget_seconds": budget, "trainable_params": res["trainable_params"],
                   "samples": res["samples"], "seconds": round(res["seconds"], 1),
                   "data_wait_seconds": round(res["data_wait_seconds"], 1)}
        if res["ctc_heard"]:
            summary["ctc_heard"] = res["ctc_heard"]
        (stage_out / "summary.json").write_text(json.dumps(summary, indent=1))
        (stage_out / "done").write_text("")
        base = stage_out
    return base


def pack_resume(out: str | Path, dst: str | Path) -> Path:
    """What a later run needs to continue a recipe stopped by stop_after, small enough to move between
    machines (~27 MB): recipe.json, every finished stage's markers, summary and log, and the next phase's
    base checkpoint in bf16. The data is not packed: it regenerates identically from its seed.

    The base's trained tensors restart from their bf16 values (the next stages hold fp32 masters again).
    """
    out, dst = Path(out), Path(dst)
    summary = json.loads((out / "recipe.json").read_text())
    if "resume_base" not in summary:
        raise ValueError(f"{out} is not a recipe stopped part-way (run it with stop_after first)")
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "stages").mkdir(parents=True)
    shutil.copy2(out / "recipe.json", dst / "recipe.json")
    for stage in sorted((out / "stages").iterdir()):
        if not (stage / "done").is_file():
            continue
        (dst / "stages" / stage.name).mkdir()
        for f in ("done", "summary.json", "log.jsonl"):
            if (stage / f).is_file():
                shutil.copy2(stage / f, dst / "stages" / stage.name / f)
    base = dst / summary["resume_base"]
    finalize(out / summary["resume_base"], base, check_size=False)
    (base / "done").write_text("")
    return dst


def extend_run(model_dir: str | Path, recipe_json: str | Path, out: str | Path) -> Path:
    """A run folder that continues a finished recipe run with the stages RECIPE has gained since.

    `recipe_json` is the finished run's recipe.json and `model_dir` its model (bf16, as shipped): every stage
    it names is marked done with its summary, and its last stage's folder holds the model, so `run_recipe(out)`
    trains only the newer stages (whole phases after the recorded ones) and finalizes. Like `pack_resume`'s,
    the base's trained tensors restart from their bf16 values.
    """
    summary = json.loads(Path(recipe_json).read_text())
    done = list(summary["stages"])
    names = [st.name for st in RECIPE]
    if names[:len(done)] != done or len(done) == len(names):
        raise ValueError(f"{recipe_json} ran {done}; it must be a first part of the recipe's stages {names}")
    phases = _phases()
    last = next(k for k, ph in enumerate(phases) if any(len(done) - 1 in c for c in ph))
    if any(n >= len(done) for ph in phases[:last + 1] for c in ph for n in c):
        raise ValueError(f"the recipe added stages to a phase {recipe_json} ran; run the whole recipe again")
    if len(phases[last]) > 1:  # its model is the merge of two branches' folders, which a model dir cannot fill
        raise ValueError("the run's last phase has two branches; extend a run that ends in one")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    (out / "stages" / "00-init").mkdir(parents=True)
    (out / "stages" / "00-init" / "done").write_text("")
    for n, name in enumerate(done):
        folder = out / "stages" / f"{n + 1:02d}-{name}"
        if n == len(done) - 1:
            shutil.copytree(model_dir, folder)
        else:
            folder.mkdir()
        (folder / "summary.json").write_text(json.dumps(summary["stages"][name], indent=1))
        (folder / "done").write_text("")
    for k, ph in enumerate(phases[:last + 1]):
        if len(ph) > 1:  # its merge is done too (nothing later reads it: the last phase is one branch)
            (out / "stages" / f"phase{k}-merged").mkdir()
            (out / "stages" / f"phase{k}-merged" / "done").write_text("")
    summary.pop("eval", None)
    (out / "recipe.json").write_text(json.dumps(summary, indent=1))
    return out


def finalize(src: str | Path, out: str | Path, check_size: bool = True) -> Path:
    """bf16 copy of a trained checkpoint for shipping: shards and adapters re-written, no file over 15 MB
    (check_size: fail when one is; the tokenizer of a full-vocabulary base is bigger)."""
    from safetensors.torch import load_file
    src, out = Path(src), Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    main: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        for k, t in load_file(str(src / shard)).items():
            keep = k.endswith(("global_mean", "global_invstd"))  # published as float32
            main[k] = t.float() if keep else t.to(torch.bfloat16)
    total = sum(t.numel() * t.element_size() for t in main.values())
    write_shards(main, out, max(1, math.ceil(total / (MAX_FILE_BYTES * 0.9))))
    from phi4mm.config import LoraConfig
    for folder in sorted(src.glob("*-lora")):
        conf = json.loads((folder / "adapter_config.json").read_text())
        tensors = {k: t.to(torch.bfloat16) for k, t in load_file(str(folder / "adapter_model.safetensors")).items()}
        lc = LoraConfig(r=conf["r"], lora_alpha=conf["lora_alpha"], dropout=conf.get("lora_dropout", 0.0))
        write_adapter_folder(out, folder.name[: -len("-lora")], lc, tensors, conf["target_modules"])
    for f in src.iterdir():
        if f.is_file() and f.suffix == ".json" and f.name not in ("model.safetensors.index.json", "summary.json"):
            shutil.copy2(f, out / f.name)
    big = [f for f in out.rglob("*") if f.is_file() and f.stat().st_size > MAX_FILE_BYTES]
    if big and check_size:
        raise RuntimeError(f"{big[0]} is over 15 MB; lower MAX_FILE_BYTES' share or the micro sizes")
    return out


def _phase_budgets(phases: list[list[list[int]]], planned: list[float], left: float | None,
                   ) -> dict[int, float | None]:
    """Seconds each stage of phases[0] may train (None: its whole plan), given `left` seconds for all of
    `phases`: the first phase's share of them by planned wall seconds (a phase lasts as long as its longest
    branch). Every branch may use the whole share (the branches run at once), so a branch is cut only by what
    its own plan exceeds the share, each of its stages in proportion to its plan. A phase of keep_plan stages
    is never cut."""
    phase = phases[0]
    budgets: dict[int, float | None] = {n: None for chain in phase for n in chain}
    if left is None or all(RECIPE[n].keep_plan for chain in phase for n in chain):
        return budgets
    wall = [max(sum(planned[n] for n in chain) for chain in ph) for ph in phases]
    share = max(10.0, left * wall[0] / sum(wall))
    for chain in phase:
        # Cutting a shorter branch as much as the longest one left a GPU idle: a 2-GPU run that did so
        # gave the speech chain 30% of the phase, and its encoder stage made 164 of 1,136 planned steps.
        factor = min(1.0, share / sum(planned[n] for n in chain))
        for n in chain:
            budgets[n] = max(10.0, planned[n] * factor)
    return budgets


def _branch_device(device: str, i: int, n: int) -> str:
    """Branch i of n: its own GPU when a bare "cuda" was asked for and there are enough, else the one asked."""
    if device != "cuda":
        return device
    import torch
    return f"cuda:{i}" if torch.cuda.device_count() >= n else device


def run_recipe(out: str | Path, device: str = "cuda", seed: int = 0, scale: float = 1.0,
               workers: int | None = None, epochs_scale: float = 1.0, max_minutes: float | None = None,
               evaluate: bool = True, progress: bool = True, stop_after: str | None = None,
               parallel: bool | None = None) -> dict[str, Any]:
    """Data -> tokenizer + init -> every RECIPE stage -> out/model (bf16) -> scores, all summarised in
    out/recipe.json (also returned). Resumable by stage.

    The vision and speech chains train disjoint tensors from the same text checkpoint, so on a GPU they run
    at once in two processes (the 12 M-parameter model leaves most of an H100 idle) and `merge_branches`
    joins them exactly; on a CPU they run one after the other (parallel: force either way).
    scale: data set size factor (1.0: 29k training samples); epochs_scale: epochs factor (CPU smoke runs use
    tiny values of both). max_minutes: a wall-clock budget for data + training, shared between the stages
    by planned seconds (a stage ends early when its share runs out); stop_after: stop after this stage's
    phase (re-run without it to continue).
    """
    names = [st.name for st in RECIPE]
    if stop_after is not None and stop_after not in names:
        raise ValueError(f"stop_after {stop_after!r} is not a micro stage; use one of {', '.join(names)}")
    import os

    from phi4mm.micro import data as micro_data
    t0 = time.perf_counter()
    out = Path(out)
    workers = (os.cpu_count() or 1) if workers is None else workers
    summary_file = out / "recipe.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"stages": {}}
    summary.update(seed=seed, scale=scale, epochs_scale=epochs_scale, device=device)
    data = {}
    for split, split_seed in (("train", seed), ("test", seed + 1_000)):  # test seeds are never used in training
        d = out / "data" / split
        if not (d / "done").is_file():
            t = time.perf_counter()
            micro_data.generate(d, split, split_seed, scale=scale, workers=workers, progress=progress)
            (d / "done").write_text("")
            summary[f"data_{split}_seconds"] = round(time.perf_counter() - t, 1)
        data[split] = d
    base = out / "stages" / "00-init"
    if not (base / "done").is_file():
        init_checkpoint(base, data["train"], seed)
        (base / "done").write_text("")
    cuda = device.startswith("cuda")
    phases = _phases()
    # The last phase this call runs: a budget is shared among these only (a split run budgets each part).
    last = len(phases) - 1 if stop_after is None else \
        next(k for k, ph in enumerate(phases) if any(names.index(stop_after) in c for c in ph))
    planned = [_planned_seconds(data["train"], st) for st in RECIPE]
    summary["planned_seconds"] = {st.name: round(p * epochs_scale, 2) for st, p in zip(RECIPE, planned)}
    for k, phase in enumerate(phases):
        left = None if max_minutes is None else max_minutes * 60 - (time.perf_counter() - t0)
        budgets = _phase_budgets(phases[k:last + 1], planned, left)
        if len(phase) > 1 and (cuda if parallel is None else parallel):
            import multiprocessing as mp
            ctx = mp.get_context("spawn")  # fresh CUDA contexts; this process may hold one already
            per = max(1, workers // len(phase))
            procs = [ctx.Process(target=_run_chain, args=(out, chain, base, data["train"], seed,
                                                            _branch_device(device, i, len(phase)), per,
                                                            budgets, epochs_scale, progress))
                     for i, chain in enumerate(phase)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            failed = [RECIPE[chain[0]].branch or RECIPE[chain[0]].name for p, chain in zip(procs, phase) if p.exitcode != 0]
            if failed:
                raise RuntimeError(f"the {', '.join(failed)} branch failed (its error is printed above); re-run "
                                   "the same command to resume from the last finished stage")
            ends = [out / "stages" / f"{chain[-1] + 1:02d}-{RECIPE[chain[-1]].name}" for chain in phase]
        else:
            ends = [_run_chain(out, chain, base, data["train"], seed, device, workers, budgets, epochs_scale,
                               progress) for chain in phase]
        for chain in phase:
            for n in chain:
                f = out / "stages" / f"{n + 1:02d}-{RECIPE[n].name}" / "summary.json"
                summary["stages"][RECIPE[n].name] = json.loads(f.read_text())
        summary_file.write_text(json.dumps(summary, indent=1))
        if len(ends) > 1:
            merged = out / "stages" / f"phase{k}-merged"
            if not (merged / "done").is_file():
                merge_branches(base, ends, merged)
                (merged / "done").write_text("")
            base = merged
        else:
            base = ends[0]
        if k == last < len(phases) - 1:
            summary["stopped_before"] = RECIPE[phases[k + 1][0][0]].name
            summary["resume_base"] = str(base.relative_to(out))
            summary_file.write_text(json.dumps(summary, indent=1))
            return summary
    summary.pop("stopped_before", None)
    summary.pop("resume_base", None)
    model_dir = finalize(base, out / "model")
    summary["train_seconds"] = round(time.perf_counter() - t0, 1)
    if evaluate:
        t = time.perf_counter()
        summary["eval"] = evaluate_micro(model_dir, data["test"], device)
        summary["eval_seconds"] = round(time.perf_counter() - t, 1)
    summary_file.write_text(json.dumps(summary, indent=1))
    return summary


def evaluate_micro(model_dir: str | Path, test_dir: str | Path, device: str = "cpu",
                   limit: int | None = None) -> dict[str, Any]:
    """Score every held-out set that exists in test_dir; each result says its goal and whether it is met."""
    from phi4mm import api
    from phi4mm.tasks.evaluate import evaluate
    model = api.load(model_dir, device)
    results = {}
    for task, metric, goal, higher in GOALS:
        f = Path(test_dir) / f"{task}.jsonl"
        if not f.is_file():
            continue
        r = evaluate(model_dir, f, metric, max_tokens=96, model=model, limit=limit)
        met = None if goal is None else (r["score"] >= goal if higher else r["score"] <= goal)
        results[task] = {"metric": metric, "score": r["score"], "goal": goal, "met": met, "n": r["n"],
                         "examples": r["predictions"][:3]}
    return results
