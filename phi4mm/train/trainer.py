"""`phi4mm train`: fine-tune one stage of Phi-4-multimodal (RECIPE.md) on JSONL conversations.

    summary = train("Phi-4-multimodal-instruct", "asr.jsonl", "speech-lora", "out/", max_steps=1000, lr=1e-4)

Each stage trains exactly the parts its recipe stage trains; everything else is frozen and stays bit-identical:

| stage            | trains                                                   | adapter samples run through |
|------------------|----------------------------------------------------------|-----------------------------|
| vision-projector | image projector (up/down) + the two learned separators   | model rule                  |
| vision-encoder   | SigLIP + image projector + separators                    | model rule                  |
| vision-lora      | LoRA "vision" on all decoder linears                     | model rule                  |
| speech-encoder   | Conformer audio encoder + speech projector               | model rule                  |
| speech-lora      | speech projector + LoRA "speech"                         | model rule                  |
| vision-speech    | LoRA "vision" + SigLIP + image projector (audio frozen)  | model rule                  |
| text             | a new decoder LoRA "text"                                | text-only samples -> "text" |
| decoder          | the decoder's own weights (pre-training; micro model)    | text-only samples, no LoRA  |
| speech-ctc       | Conformer audio encoder, through a CTC head (micro)      | audio samples, no decoder   |
| vision-ctc       | SigLIP, through CTC and caption-label heads (micro)      | one-crop images, no decoder |

The output directory is a complete checkpoint in the base's layout (config and tokenizer copied, shards with
the trained tensors rewritten under their stored names, `<adapter>-lora/` PEFT folders), so `phi4mm.load(out)`
and transformers (`from_pretrained(out)` + `load_adapter(out/"vision-lora")`, for a transformers-native base)
read it. A new "text" adapter lives only in `out/text-lora/`; `load_adapter` adds it to a loaded model.
`out/checkpoint-STEP/` holds what an exact resume needs; `out/log.jsonl` one line per optimizer step.
Under torchrun every process trains on its share of each global batch: with DDP (the default) each holds the
whole model; with fsdp=True (FSDP2) the weights, gradients and optimizer state are sharded over them, and
checkpoints are written in shards (torch.distributed.checkpoint).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from phi4mm.config import LoraConfig, ModelConfig
from phi4mm.inputs.prepare import TEXT_ADAPTER
from phi4mm.inputs.records import DataError, read_jsonl
from phi4mm.model import fused as fused_train
from phi4mm.model.adapters import load_adapter  # noqa: F401 (public: train.load_adapter)
from phi4mm.model.lora import AdapterPlan, LoraLinear
from phi4mm.model.weights import LORA_PARAM
from phi4mm.train.ctc import (
    CTC_UNITS,
    CTCLossModule,
    caption_labels,
    check_ctc,
    ctc_units,
    transcript,
)
from phi4mm.train.data import (
    IGNORE,
    Batch,
    Example,
    audio_batch,
    batch_loader,
    encode_all,
    make_batches,
    progress_interval,
)
from phi4mm.train.export import export

_VISION_PROJ = r"vision\.(img_projection_(up|down)\.\w+|(global|sub)_img_feature_extensor)"
_VISION_ENC = r"vision\.img_processor\..+"
_AUDIO_ENC = r"audio\.encoder\..+"
_SPEECH_PROJ = r"audio\.(up|down)_proj_for_speech\.\w+"
_DECODER = r"embed_tokens\.weight|norm\.weight|layers\.\d+\.(\w+_layernorm|(self_attn|mlp)\.\w+)\.weight"
DEFAULT_TEXT_RANK = 16  # new adapters get lora_alpha = 2 * r, the published ratio (256/512, 320/640)


@dataclass(frozen=True)
class Stage:
    towers: tuple[str, ...]  # towers the checkpoint must have ("vision", "audio")
    patterns: tuple[str, ...]  # regexes over our parameter names: exactly these train
    adapter: str | None  # the LoRA this stage trains (created when missing or when lora_rank is given)
    uses: Callable[[Example], bool]  # does a sample reach a trained parameter?


def _has_image(e: Example) -> bool:
    return e.has_image


STAGES = {
    "vision-projector": Stage(("vision",), (_VISION_PROJ,), None, _has_image),
    "vision-encoder": Stage(("vision",), (_VISION_PROJ, _VISION_ENC), None, _has_image),
    "vision-lora": Stage(("vision",), (LORA_PARAM.format("vision"),), "vision", lambda e: e.adapter == "vision"),
    "speech-encoder": Stage(("audio",), (_AUDIO_ENC, _SPEECH_PROJ), None, lambda e: e.has_audio),
    "speech-lora": Stage(("audio",), (_SPEECH_PROJ, LORA_PARAM.format("speech")), "speech",
                         lambda e: e.adapter == "speech"),
    "vision-speech": Stage(("vision", "audio"), (LORA_PARAM.format("vision"), _VISION_ENC, _VISION_PROJ), "vision",
                           _has_image),
    "text": Stage((), (LORA_PARAM.format(TEXT_ADAPTER),), TEXT_ADAPTER, lambda e: e.adapter == TEXT_ADAPTER),
    # Pre-training the decoder itself (the micro model's first stage; Phi-4-mini arrives pre-trained).
    "decoder": Stage((), (_DECODER,), None, lambda e: not e.has_image and not e.has_audio),
    # Pre-training an encoder alone as a CTC recogniser of the sample's answer (ctc_units): the audio encoder
    # (the micro model's stand-in for RECIPE.md's encoder "initialised from an attention encoder-decoder ASR
    # model"), or SigLIP reading a rendered word. The head is thrown away afterwards: only the encoder is exported.
    "speech-ctc": Stage(("audio",), (_AUDIO_ENC,), None, lambda e: e.has_audio),
    "vision-ctc": Stage(("vision",), (_VISION_ENC,), None, _has_image),
}
CTC_STAGES = ("speech-ctc", "vision-ctc")


# The LoRA an encoder/projector stage may train alongside (`with_lora=True`): its modality's adapter.
STAGE_LORA = {"vision-projector": "vision", "vision-encoder": "vision", "speech-encoder": "speech"}


def stage_spec(stage: str, with_lora: bool = False) -> Stage:
    """STAGES[stage], plus its modality's LoRA when with_lora (the micro model's encoder stages: a frozen
    4-layer decoder that only ever saw text does not learn to read a new tower's tokens; measured flat at
    ~2 nats over 1,100 vision-encoder steps on the H100)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not known; use one of {', '.join(STAGES)}")
    st = STAGES[stage]
    if not with_lora:
        return st
    if stage not in STAGE_LORA:
        raise ValueError(f"with_lora applies to the encoder/projector stages ({', '.join(STAGE_LORA)}), not "
                         f"{stage!r}, which trains {'its adapter' if st.adapter else 'no adapter'} already")
    name = STAGE_LORA[stage]
    return Stage(st.towers, st.patterns + (LORA_PARAM.format(name),), name, st.uses)


def trainable_names(net: nn.Module, stage: str | Stage) -> list[str]:
    """Our parameter names that `stage` trains (after its adapter exists)."""
    st = STAGES[stage] if isinstance(stage, str) else stage
    pats = [re.compile(p) for p in st.patterns]
    return [n for n, _ in net.named_parameters() if any(p.fullmatch(n) for p in pats)]


def check_stage(cfg: ModelConfig, stage: str, model_dir: Path, with_lora: bool = False) -> Stage:
    st = stage_spec(stage, with_lora)
    for tower in st.towers:
        if getattr(cfg, tower) is None:
            raise ValueError(f"stage {stage!r} trains the {tower} side, but the checkpoint at {model_dir} has no "
                             f"{tower} tower (a text-only Phi-4-mini?); use stage 'text' or a multimodal checkpoint")
    return st


def setup_stage(model, stage: str, lora_rank: int | None, with_lora: bool = False) -> list[str]:
    """Create/re-initialise the stage's adapter, freeze everything else; returns the trainable names."""
    st = stage_spec(stage, with_lora)
    net = model.net
    name = st.adapter
    if name is not None and (lora_rank is not None or name not in model.config.loras):
        if lora_rank is None and name != TEXT_ADAPTER:
            raise ValueError(f"the checkpoint has no {name!r} adapter to train; pass lora_rank=R to create one")
        old = model.config.loras.get(name)
        r = lora_rank or DEFAULT_TEXT_RANK
        cfg = LoraConfig(r=r, lora_alpha=2.0 * r, dropout=old.dropout if old else 0.0)
        for m in net.modules():
            if isinstance(m, LoraLinear):
                m.add_adapter(name, cfg)  # B = 0: the model is unchanged until it trains
        model.config.loras[name] = cfg
    names = trainable_names(net, st)
    for n, p in net.named_parameters():
        p.requires_grad_(n in names)
        if n in names and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master copies of what trains; frozen weights keep the load dtype
    return names


class LossModule(nn.Module):
    """(batch) -> summed cross-entropy over its target tokens. One module so DDP can wrap the whole step."""

    def __init__(self, model, grad_checkpointing: bool = False):
        super().__init__()
        self.net = model.net
        self.device, self.dtype = model.device, model.dtype
        self.grad_checkpointing = grad_checkpointing
        towers = [m for m in (self.net.vision, self.net.audio) if m is not None]
        self.towers_train = any(p.requires_grad for m in towers for p in m.parameters())

    def forward(self, batch: Batch) -> torch.Tensor:
        net, dev = self.net, self.device
        # Frozen towers keep no activations for backward (LoRA stages: the decoder alone needs them).
        with torch.set_grad_enabled(self.towers_train and torch.is_grad_enabled()):
            imgs, auds = self._towers([e.prep for e in batch.examples])
        ids = batch.input_ids.to(dev)
        x = net.embed(ids, imgs, auds)  # (B, T, hidden)
        B, T = ids.shape
        positions = torch.arange(T, device=dev)[None].expand(B, T)  # (B, T): right padding, every row from 0
        long = (batch.lengths.to(dev) > net.cfg.text.original_max_position_embeddings)[:, None].expand(B, T)
        # No key mask: batches are right-padded, so under the causal mask a real token never sees a pad, and
        # the loss reads real positions only. Without a mask SDPA can take its causal (flash) kernel.
        plan = AdapterPlan.build([e.adapter for e in batch.examples], dev)
        x = net.hidden(x, positions, plan=plan, key_mask=None, long_rope=long,
                       checkpoint=self.grad_checkpointing and self.training)  # (B, T, hidden)
        # Only target positions reach the vocabulary projection: (N, vocab) instead of (B, T, vocab).
        targets = batch.labels[:, 1:].to(dev)  # (B, T-1): position t predicts token t+1
        keep = targets != IGNORE
        logits = F.linear(net.norm(x[:, :-1][keep]), net.output_weight)  # (N, vocab)
        if fused_train.enabled(logits):
            return fused_train.cross_entropy_sum(logits, targets[keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")

    def _towers(self, preps: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Every image of the batch through SigLIP in one call, every audio per projector in one call;
        the embeddings come back in batch-then-prompt order, the order `embed` fills placeholders in."""
        net, dev, dt = self.net, self.device, self.dtype
        img = aud = None
        ims = [p.images for p in preps if p.images is not None]
        if ims:
            crops = max(i.pixel_values.shape[1] for i in ims)
            # On the device first: padding and concatenating ~40 images of 2 x 3 x 448 x 448 on the host
            # costs two extra copies of ~170 MB a step. Padded crops are zeros with an all-ones mask, exactly
            # how the processor batches several images of one prompt.
            pv = torch.cat([F.pad(i.pixel_values.to(dev, dt, non_blocking=True),
                                  (0, 0, 0, 0, 0, 0, 0, crops - i.pixel_values.shape[1]))
                            for i in ims])  # (N, crops, 3, 448, 448)
            am = torch.cat([F.pad(i.attention_mask.to(dev, non_blocking=True),
                                  (0, 0, 0, 0, 0, crops - i.attention_mask.shape[1]), value=1)
                            for i in ims])  # (N, crops, 32, 32)
            sizes = torch.cat([i.image_sizes for i in ims]).to(dev)  # (N, 2)
            img = torch.cat(net.vision(pv, am, sizes))
        feats: list[tuple[int, list[torch.Tensor]]] = []
        for proj in ("speech", "vision"):  # vision-speech prompts use the other audio projector
            group = [(k, p.audios) for k, p in enumerate(preps) if p.audios is not None and p.audio_projector == proj]
            if not group:
                continue
            f, lens = audio_batch([a for _, a in group], dev, dt)
            out = iter(net.audio(f, lens, projector=proj))
            for k, a in group:
                feats.append((k, [next(out) for _ in range(len(a.num_tokens))]))
        if feats:
            aud = torch.cat([t for _, ts in sorted(feats, key=lambda x: x[0]) for t in ts])
        return img, aud


# ---- the loop -----------------------------------------------------------------------------------------------


def train(model_dir: str | Path, data: str | Path, stage: str, out: str | Path, *, epochs: int = 1,
          max_steps: int | None = None, lr: float = 1e-4, batch_tokens: int = 16384, grad_accum: int = 1,
          seed: int = 0, lora_rank: int | None = None, device: str = "cpu", dtype: str = "float32",
          amp: bool = False, grad_checkpointing: bool = False, warmup_steps: int = 0, weight_decay: float = 0.0,
          max_grad_norm: float = 1.0, save_every: int = 500, resume: bool | str | Path = False,
          skip_bad: bool = False, progress: bool = True, workers: int = 0,
          max_seconds: float | None = None, with_lora: bool = False, fsdp: bool = False) -> dict:
    """Train `stage` on the JSONL conversations in `data`; write the result to `out`. Returns a summary dict.

    lr: peak AdamW learning rate (linear warmup over warmup_steps, cosine decay to 0 at the last step).
    batch_tokens: padded tokens per micro-batch (length bucketing); grad_accum micro-batches per step.
    dtype: the frozen weights' dtype; trained parameters are always fp32 masters. amp: bf16 autocast
    (forced on when dtype is not float32). resume: True (latest out/checkpoint-*) or a checkpoint path.
    with_lora: an encoder/projector stage also trains its modality's LoRA (STAGE_LORA).
    Raises ValueError before any training for a bad stage, checkpoint, data line or media file.
    """
    from phi4mm import api
    t_start = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    cfg = ModelConfig.from_dir(model_dir)
    st = check_stage(cfg, stage, model_dir, with_lora)
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"out {out} is the base checkpoint itself; write to a new directory")
    records, bad = read_jsonl(data, skip_bad)
    rank, world = _distributed()
    fsdp = fsdp and world > 1  # one process: nothing to shard
    if world > 1 and device == "cuda":  # one GPU per process under torchrun
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    amp = amp or api._dtype(dtype, torch.device(device)) != torch.float32

    torch.manual_seed(seed)
    model = api.load(model_dir, device, dtype)
    names = setup_stage(model, stage, lora_rank, with_lora)
    text_adapter = TEXT_ADAPTER if stage == "text" else None
    examples = []
    for rec, e in zip(records, encode_all(model, records, text_adapter, workers, progress and rank == 0)):
        if isinstance(e, Example):
            examples.append(e)
        elif not skip_bad:
            raise DataError(f"{data}:{rec.line}: {e}; fix the sample, or skip bad ones with --skip-bad") from None
        else:
            bad.append(f"{data}:{rec.line}: {e}")
    examples = [e for e in examples if e.num_targets > 0]
    if fsdp:  # every rank must run backward every step (FSDP's collectives), so every sample must reach a
        examples = [e for e in examples if st.uses(e)]  # trained parameter; the others add no gradient
    if not any(st.uses(e) for e in examples):
        raise DataError(f"none of the {len(examples)} samples in {data} reaches what stage {stage!r} trains "
                        "(e.g. speech stages need audio samples, vision stages image samples)")

    ctc = stage in CTC_STAGES
    crops = check_ctc(examples, Path(data), stage, cfg.dynamic_hd, model.device, workers or 1) if ctc else None
    per_epoch = len(epoch_batches([e.length for e in examples], batch_tokens, seed, 0, rank, world))
    total = max_steps or math.ceil(epochs * per_epoch / grad_accum)
    model.net.train()
    labels = None
    if ctc:  # the units (and vision's labels) are saved with the run, so a resumed one uses the very same
        units_file, labels_file = out / "ctc-units.json", out / "vision-labels.json"
        if resume and units_file.is_file():
            units = Tokenizer.from_file(str(units_file))
            labels = json.loads(labels_file.read_text()) if labels_file.is_file() else None
        else:
            texts = [transcript(model.tokenizer, e) for e in examples]
            # Speech: character-BPE units; reading: single characters (a word is a few patch columns wide).
            units = ctc_units(texts, CTC_UNITS if stage == "speech-ctc" else 1)
            out.mkdir(parents=True, exist_ok=True)
            units.save(str(units_file))
            if stage == "vision-ctc":  # the label head learns the images that are not lines of text
                labels = sorted({x for t, e in zip(texts, examples) if not crops.is_line(e)
                                 for x in caption_labels(t)})
                labels_file.write_text(json.dumps(labels))
    loss_mod = CTCLossModule(model, units, crops, labels) if ctc else LossModule(model, grad_checkpointing)
    if fsdp:  # before the optimizer: sharding replaces the parameters with their shards
        _shard(loss_mod, model, world)
    # Everything the optimizer steps, by name: the stage's model parameters (+ the CTC head, never exported).
    trainables = {n: p for n, p in model.net.named_parameters() if n in names}
    if ctc:
        trainables.update(loss_mod.head.named_parameters(prefix="ctc_head"))
        if loss_mod.label_head is not None:
            trainables.update(loss_mod.label_head.named_parameters(prefix="label_head"))
    params = list(trainables.values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=model.device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(warmup_steps, total))
    step, epoch, pos, losses = 0, 0, 0, []
    if resume:
        ckpt = _latest(out) if resume is True else Path(resume)
        if ckpt is not None:
            step, epoch, pos, losses = _load_state(ckpt, trainables, opt, sched, stage, loss_mod if fsdp else None)
    runner = loss_mod
    if world > 1 and not fsdp:  # one process per GPU (or CPU process, gloo) under torchrun
        runner = nn.parallel.DistributedDataParallel(loss_mod, find_unused_parameters=True)

    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.jsonl").open("a") if rank == 0 else None
    bar = _bar(total, step, progress and rank == 0)
    stream = _micro_batches(examples, batch_tokens, seed, rank, world, epoch, pos)
    windows = [[next(stream) for _ in range(grad_accum)] for _ in range(total - step)]
    # Text-only data has nothing to preprocess: forked workers would only add their start-up (~9 s measured).
    # vision-ctc reads its crop cache, so its batches need no media either.
    media = crops is None and any(e.has_image or e.has_audio for e in examples)
    loader = batch_loader(model, examples, [[idx for _, _, idx in w] for w in windows], cfg.text.pad_token_id,
                          workers, media)
    tokens_seen, t0, waited = 0, time.perf_counter(), 0.0
    for window in windows:
        t_wait = time.perf_counter()  # time blocked on the data loader: high means the GPU waits on workers
        batches = next(loader)
        waited += time.perf_counter() - t_wait
        # The step's loss is the mean over every rank's targets: DDP averages gradients over ranks, so each rank
        # scales its summed loss by world / (all ranks' targets). Same losses as one process with the same
        # global batch (grad_accum x world micro-batches), whatever each rank's share of targets.
        n_targets = int(_all_sum(sum(b.num_targets for b in batches), world, model.device))
        loss_sum = 0.0
        for b in batches:
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=amp):
                loss = runner(b)
            if not loss.requires_grad:  # no sample of this window reached a trained parameter
                loss = loss + sum(p.sum() * 0.0 for p in params)
            (loss * (world / n_targets)).backward()
            loss_sum += float(loss.detach())
        loss_sum = _all_sum(loss_sum, world, model.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if max_seconds is not None:  # a time budget: the cosine decays over time, ending at 0 on the deadline
            frac = max(step / total, (time.perf_counter() - t0) / max_seconds)
            cos = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
            for g in opt.param_groups:
                g["lr"] = lr * min(cos, (step + 1) / warmup_steps if step < warmup_steps else 1.0)
        epoch, pos = window[-1][0], window[-1][1] + 1
        losses.append(loss_sum / n_targets)
        tokens_seen += sum(int(b.lengths.sum()) for b in batches)
        rate = tokens_seen / (time.perf_counter() - t0)
        if log is not None:
            log.write(json.dumps({"step": step, "loss": losses[-1], "lr": opt.param_groups[0]["lr"], "epoch": epoch,
                                  "grad_norm": grad_norm, "targets": n_targets, "tokens_per_s": rate,
                                  "data_wait_s": round(waited, 3), "sharded_over": world if fsdp else 1,
                                  "elapsed_s": round(time.perf_counter() - t0, 4)}) + "\n")
            log.flush()
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{rate:.0f}", refresh=False)
        bar.update(1)
        if (rank == 0 or fsdp) and save_every and step % save_every == 0 and step < total:  # FSDP: every rank
            _save_state(out / f"checkpoint-{step}", trainables, opt, sched, stage, step, epoch, pos, losses,
                        loss_mod if fsdp else None, rank)
        if max_seconds is not None and _all_sum(time.perf_counter() - t0 > max_seconds, world, model.device):
            break  # every rank stops at the same step (any rank's clock decides)
    bar.close()
    if log is not None:
        log.close()
    heard = []
    # A few transcripts as the head hears them (a loss hides a blank plateau); not under FSDP, where the encoder
    # would have to run on every rank.
    if ctc and rank == 0 and windows and not fsdp:
        picks = windows[0][0][2][:4]
        if loss_mod.label_head is not None:  # CTC reads only the lines of text there: show what it reads
            picks = [i for i, e in enumerate(examples) if crops.is_line(e)][:4] or picks
        b = next(iter(batch_loader(model, examples, [[picks]], cfg.text.pad_token_id, 0, crops is None)))[0]
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=amp):
            hyps = loss_mod.greedy(b)
        heard = [{"reference": loss_mod.text(e), "heard": loss_mod.units.decode(h)} for e, h in zip(b.examples, hyps)]
    # FSDP: every rank takes part in gathering the trained tensors; rank 0 writes them.
    values = {n: p.full_tensor() for n, p in trainables.items() if n in names} if fsdp else None
    if rank == 0:
        export(model, model_dir, out, names, values)
    return {"stage": stage, "steps": step, "losses": losses, "final_loss": losses[-1] if losses else None,
            "trainable": names, "trainable_params": sum(p.numel() for p in params), "samples": len(examples),
            "skipped": bad, "out": str(out), "seconds": time.perf_counter() - t_start, "data_wait_seconds": waited,
            "ctc_heard": heard}


def _shard(loss_mod: nn.Module, model, world: int) -> None:
    """FSDP2 (`fully_shard`): each decoder layer, SigLIP layer and conformer block is a group of its own (its
    weights are gathered just before it runs and freed after), the rest (embeddings, norms, projectors, a CTC
    head) the root's. bf16 runs gather in bf16 and reduce gradients in fp32 (the trained fp32 masters and the
    frozen bf16 weights share groups)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(model.device.type, (world,))
    policy = MixedPrecisionPolicy() if model.dtype == torch.float32 else \
        MixedPrecisionPolicy(param_dtype=model.dtype, reduce_dtype=torch.float32)
    net = model.net
    blocks = list(net.layers)
    if net.vision is not None:
        blocks += list(net.vision.img_processor.encoder.layers)
    if net.audio is not None:
        blocks += list(net.audio.encoder.encoders)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(loss_mod, mesh=mesh, mp_policy=policy)


def _distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun (WORLD_SIZE > 1) the process group is initialised here."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _all_sum(x: float, world: int, device: torch.device) -> float:
    """x summed over the ranks (x itself in one process)."""
    if world <= 1:
        return x
    import torch.distributed as dist
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(float(x), dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.item()


def epoch_batches(lengths: list[int], batch_tokens: int, seed: int, epoch: int, rank: int,
                   world: int) -> list[list[int]]:
    """This rank's share of an epoch's batches; every rank gets as many (DDP steps in lockstep)."""
    batches = make_batches(lengths, batch_tokens, seed, epoch)
    if world > 1 and len(batches) < world:
        raise DataError(f"{len(batches)} batches cannot feed {world} processes; lower batch_tokens or add data")
    return batches[: len(batches) // world * world][rank::world]


def _micro_batches(examples: list[Example], batch_tokens: int, seed: int, rank: int, world: int, epoch: int,
                   pos: int):
    """Endless (epoch, index, sample indices) stream, starting at a saved data position."""
    lengths = [e.length for e in examples]
    while True:
        batches = epoch_batches(lengths, batch_tokens, seed, epoch, rank, world)
        for i in range(pos, len(batches)):
            yield epoch, i, batches[i]
        epoch, pos = epoch + 1, 0


def _schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def _bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=progress_interval())


# ---- checkpoints (exact resume) -----------------------------------------------------------------------------


# FSDP checkpoints: every rank writes its shards of the trained tensors and their optimizer state through
# torch.distributed.checkpoint (frozen weights are not written: they come from the base again).
_SHARDED = "sharded"


def _sharded_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # strict=False: the frozen weights are absent by design; dcp.load itself fails on a missing trained tensor.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _save_state(path: Path, trainables: dict[str, nn.Parameter], opt, sched, stage: str, step: int, epoch: int,
                pos: int, losses: list[float], sharded: nn.Module | None = None, rank: int = 0) -> None:
    """A resumable checkpoint. sharded: the FSDP root (every rank calls; rank 0 also writes the rest)."""
    path.mkdir(parents=True, exist_ok=True)
    if sharded is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(sharded, opt, options=_sharded_options())
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / _SHARDED))
        if rank != 0:
            return
    else:
        save_file({n: p.detach().contiguous() for n, p in trainables.items()}, str(path / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict() if sharded is None else None, "scheduler": sched.state_dict()},
               path / "optimizer.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(rng, path / "rng.pt")
    (path / "state.json").write_text(json.dumps({"stage": stage, "step": step, "epoch": epoch, "position": pos,
                                                 "losses": losses, "fsdp": sharded is not None}, indent=1))


def _latest(out: Path) -> Path | None:
    found = [(int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(found)[1] if found else None


def _load_state(path: Path, trainables: dict[str, nn.Parameter], opt, sched, stage: str,
                sharded: nn.Module | None = None):
    if not (path / "state.json").is_file():
        raise ValueError(f"{path} is not a training checkpoint (no state.json); pass an out/checkpoint-STEP folder")
    state = json.loads((path / "state.json").read_text())
    if state["stage"] != stage:
        raise ValueError(f"{path} was written by stage {state['stage']!r}, not {stage!r}")
    written_sharded = bool(state.get("fsdp", False))
    if written_sharded != (sharded is not None):
        raise ValueError(f"{path} was written by {'an FSDP' if written_sharded else 'a non-FSDP'} run; resume it "
                         f"{'with' if written_sharded else 'without'} --fsdp")
    if sharded is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_state_dict,
            set_state_dict,
        )
        model_sd, optim_sd = get_state_dict(sharded, opt, options=_sharded_options())
        dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / _SHARDED))
        set_state_dict(sharded, opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=_sharded_options())
    else:
        saved = load_file(str(path / "trainable.safetensors"))
        if sorted(saved) != sorted(trainables):
            raise ValueError(f"{path} holds {len(saved)} trainable tensors, this run trains {len(trainables)}; "
                             "resume with the same stage and lora_rank")
        with torch.no_grad():
            for n, p in trainables.items():
                p.copy_(saved[n])
    o = torch.load(path / "optimizer.pt", weights_only=False)
    if sharded is None:
        opt.load_state_dict(o["optimizer"])
    sched.load_state_dict(o["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"], state["epoch"], state["position"], state["losses"]
