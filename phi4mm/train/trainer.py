"""`phi4mm train`: fine-tune one stage of Phi-4-multimodal (docs/architecture.md) on JSONL conversations.

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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from phi4mm.config import ModelConfig
from phi4mm.inputs.prepare import TEXT_ADAPTER
from phi4mm.inputs.records import DataError, Record, read_jsonl
from phi4mm.model.adapters import load_adapter  # noqa: F401 (public: train.load_adapter)
from phi4mm.train.ctc import (
    CTC_UNITS,
    CropCache,
    CTCLossModule,
    caption_labels,
    check_ctc,
    ctc_units,
    transcript,
)
from phi4mm.train.data import (
    Batch,
    Example,
    batch_loader,
    encode_all,
    make_batches,
    progress_interval,
)
from phi4mm.train.distributed import all_sum, init_distributed, shard
from phi4mm.train.export import export
from phi4mm.train.loss import LossModule
from phi4mm.train.resume import latest_checkpoint, load_state, save_state
from phi4mm.train.stages import CTC_STAGES, Stage, check_stage, setup_stage


@dataclass
class _Run:
    """What the optimizer loop works with: set up once by `train`, its position advanced by every step."""
    model: object  # the loaded phi4mm model
    loss_mod: nn.Module
    runner: nn.Module  # loss_mod, or its DDP wrapper
    trainables: dict[str, nn.Parameter]  # everything the optimizer steps, by name
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    stage: str
    out: Path
    rank: int
    world: int
    fsdp: bool
    amp: bool
    total: int  # optimizer steps planned
    step: int = 0
    epoch: int = 0
    pos: int = 0  # the next batch of `epoch`
    losses: list[float] = field(default_factory=list)
    waited: float = 0.0  # seconds blocked on the data loader

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.trainables.values())


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
    rank, world = init_distributed()
    fsdp = fsdp and world > 1  # one process: nothing to shard
    device = _process_device(device, rank, world)
    amp = amp or api._dtype(dtype, torch.device(device)) != torch.float32

    torch.manual_seed(seed)
    model = api.load(model_dir, device, dtype)
    names = setup_stage(model, stage, lora_rank, with_lora)
    examples = _usable_examples(model, records, data, stage, st, bad, skip_bad=skip_bad, workers=workers,
                                progress=progress and rank == 0, fsdp=fsdp)
    ctc = stage in CTC_STAGES
    crops = check_ctc(examples, Path(data), stage, cfg.dynamic_hd, model.device, workers or 1) if ctc else None
    per_epoch = len(epoch_batches([e.length for e in examples], batch_tokens, seed, 0, rank, world))
    total = max_steps or math.ceil(epochs * per_epoch / grad_accum)
    model.net.train()
    loss_mod = _ctc_loss(model, stage, examples, crops, out, resume) if ctc else \
        LossModule(model, grad_checkpointing)
    if fsdp:  # before the optimizer: sharding replaces the parameters with their shards
        shard(loss_mod, model, world)
    trainables = _trainables(model, names, loss_mod if ctc else None)
    opt = torch.optim.AdamW(list(trainables.values()), lr=lr, weight_decay=weight_decay,
                            fused=model.device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(warmup_steps, total))
    run = _Run(model, loss_mod, loss_mod, trainables, opt, sched, stage, out, rank, world, fsdp, amp, total)
    if resume:
        _resume(run, resume)
    if world > 1 and not fsdp:  # one process per GPU (or CPU process, gloo) under torchrun
        run.runner = nn.parallel.DistributedDataParallel(loss_mod, find_unused_parameters=True)

    out.mkdir(parents=True, exist_ok=True)
    stream = _micro_batches(examples, batch_tokens, seed, rank, world, run.epoch, run.pos)
    windows = [[next(stream) for _ in range(grad_accum)] for _ in range(total - run.step)]
    # Text-only data has nothing to preprocess: forked workers would only add their start-up (~9 s measured).
    # vision-ctc reads its crop cache, so its batches need no media either.
    media = crops is None and any(e.has_image or e.has_audio for e in examples)
    loader = batch_loader(model, examples, [[idx for _, _, idx in w] for w in windows], cfg.text.pad_token_id,
                          workers, media)
    _loop(run, windows, loader, lr=lr, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
          max_seconds=max_seconds, save_every=save_every, progress=progress)
    # A few transcripts as the head hears them (a loss hides a blank plateau); not under FSDP, where the encoder
    # would have to run on every rank.
    heard = _ctc_heard(run, examples, crops, windows[0][0][2], cfg.text.pad_token_id) \
        if ctc and rank == 0 and windows and not fsdp else []
    # FSDP: every rank takes part in gathering the trained tensors; rank 0 writes them.
    values = {n: p.full_tensor() for n, p in run.trainables.items() if n in names} if fsdp else None
    if rank == 0:
        export(model, model_dir, out, names, values)
    return {"stage": stage, "steps": run.step, "losses": run.losses,
            "final_loss": run.losses[-1] if run.losses else None, "trainable": names,
            "trainable_params": sum(p.numel() for p in run.params), "samples": len(examples), "skipped": bad,
            "out": str(out), "seconds": time.perf_counter() - t_start, "data_wait_seconds": run.waited,
            "ctc_heard": heard}


# ---- set-up steps -------------------------------------------------------------------------------------------


def _process_device(device: str, rank: int, world: int) -> str:
    """One GPU per process under torchrun: "cuda" becomes this process's cuda:LOCAL_RANK."""
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    return device


def _usable_examples(model, records: list[Record], data: str | Path, stage: str, st: Stage, bad: list[str], *,
                     skip_bad: bool, workers: int, progress: bool, fsdp: bool) -> list[Example]:
    """The records encoded, keeping those with target tokens; a bad one raises, or joins `bad` when skip_bad."""
    text_adapter = TEXT_ADAPTER if stage == "text" else None
    examples = []
    for rec, e in zip(records, encode_all(model, records, text_adapter, workers, progress)):
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
    return examples


def _ctc_loss(model, stage: str, examples: list[Example], crops: CropCache | None, out: Path,
              resume: bool | str | Path) -> CTCLossModule:
    """The CTC stages' loss. Its units (and vision's labels) are saved with the run, so a resumed one uses the
    very same."""
    labels = None
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
    return CTCLossModule(model, units, crops, labels)


def _trainables(model, names: list[str], ctc_loss: CTCLossModule | None) -> dict[str, nn.Parameter]:
    """Everything the optimizer steps, by name: the stage's model parameters (+ the CTC heads, never exported)."""
    trainables = {n: p for n, p in model.net.named_parameters() if n in names}
    if ctc_loss is not None:
        trainables.update(ctc_loss.head.named_parameters(prefix="ctc_head"))
        if ctc_loss.label_head is not None:
            trainables.update(ctc_loss.label_head.named_parameters(prefix="label_head"))
    return trainables


def _resume(run: _Run, resume: bool | str | Path) -> None:
    """Restore the run from out's latest checkpoint (resume=True; none yet: start afresh) or the one named."""
    ckpt = latest_checkpoint(run.out) if resume is True else Path(resume)
    if ckpt is not None:
        run.step, run.epoch, run.pos, run.losses = load_state(ckpt, run.trainables, run.opt, run.sched, run.stage,
                                                              run.loss_mod if run.fsdp else None)


# ---- the loop -----------------------------------------------------------------------------------------------


def _loop(run: _Run, windows: list[list[tuple[int, int, list[int]]]], loader: Iterator[list[Batch]], *,
          lr: float, warmup_steps: int, max_grad_norm: float, max_seconds: float | None, save_every: int,
          progress: bool) -> None:
    """One optimizer step per window, logged to out/log.jsonl, a resumable checkpoint every save_every steps."""
    log = (run.out / "log.jsonl").open("a") if run.rank == 0 else None
    bar = _bar(run.total, run.step, progress and run.rank == 0)
    tokens_seen, t0 = 0, time.perf_counter()
    for window in windows:
        t_wait = time.perf_counter()  # time blocked on the data loader: high means the GPU waits on workers
        batches = next(loader)
        run.waited += time.perf_counter() - t_wait
        loss, grad_norm, n_targets = _optimizer_step(run, batches, max_grad_norm)
        run.step += 1
        if max_seconds is not None:
            _time_budget_lr(run, lr, warmup_steps, (time.perf_counter() - t0) / max_seconds)
        run.epoch, run.pos = window[-1][0], window[-1][1] + 1
        run.losses.append(loss)
        tokens_seen += sum(int(b.lengths.sum()) for b in batches)
        rate = tokens_seen / (time.perf_counter() - t0)
        if log is not None:
            log.write(json.dumps({"step": run.step, "loss": loss, "lr": run.opt.param_groups[0]["lr"],
                                  "epoch": run.epoch, "grad_norm": grad_norm, "targets": n_targets,
                                  "tokens_per_s": rate, "data_wait_s": round(run.waited, 3),
                                  "sharded_over": run.world if run.fsdp else 1,
                                  "elapsed_s": round(time.perf_counter() - t0, 4)}) + "\n")
            log.flush()
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}", refresh=False)
        bar.update(1)
        if (run.rank == 0 or run.fsdp) and save_every and run.step % save_every == 0 and run.step < run.total:
            save_state(run.out / f"checkpoint-{run.step}", run.trainables, run.opt, run.sched, run.stage, run.step,
                       run.epoch, run.pos, run.losses, run.loss_mod if run.fsdp else None, run.rank)  # FSDP: all
        if max_seconds is not None and all_sum(time.perf_counter() - t0 > max_seconds, run.world, run.model.device):
            break  # every rank stops at the same step (any rank's clock decides)
    bar.close()
    if log is not None:
        log.close()


def _optimizer_step(run: _Run, batches: list[Batch], max_grad_norm: float) -> tuple[float, float, int]:
    """One optimizer step over a window's micro-batches: (loss per target token, gradient norm, target tokens)."""
    dev = run.model.device
    # The step's loss is the mean over every rank's targets: DDP averages gradients over ranks, so each rank
    # scales its summed loss by world / (all ranks' targets). Same losses as one process with the same
    # global batch (grad_accum x world micro-batches), whatever each rank's share of targets.
    n_targets = int(all_sum(sum(b.num_targets for b in batches), run.world, dev))
    loss_sum = 0.0
    for b in batches:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run.amp):
            loss = run.runner(b)
        if not loss.requires_grad:  # no sample of this window reached a trained parameter
            loss = loss + sum(p.sum() * 0.0 for p in run.params)
        (loss * (run.world / n_targets)).backward()
        loss_sum += float(loss.detach())
    loss_sum = all_sum(loss_sum, run.world, dev)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_grad_norm)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    return loss_sum / n_targets, grad_norm, n_targets


def _time_budget_lr(run: _Run, lr: float, warmup_steps: int, time_frac: float) -> None:
    """Under a time budget the cosine decays over time too, ending at 0 on the deadline (time_frac 1)."""
    frac = max(run.step / run.total, time_frac)
    cos = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    for g in run.opt.param_groups:
        g["lr"] = lr * min(cos, (run.step + 1) / warmup_steps if run.step < warmup_steps else 1.0)


def _ctc_heard(run: _Run, examples: list[Example], crops: CropCache | None, picks: list[int],
               pad_id: int) -> list[dict[str, str]]:
    """What the CTC head hears on a few training samples (the first batch's, or lines of text for vision)."""
    loss_mod = run.loss_mod
    picks = picks[:4]
    if loss_mod.label_head is not None:  # CTC reads only the lines of text there: show what it reads
        picks = [i for i, e in enumerate(examples) if crops.is_line(e)][:4] or picks
    b = next(iter(batch_loader(run.model, examples, [[picks]], pad_id, 0, crops is None)))[0]
    with torch.autocast(run.model.device.type, dtype=torch.bfloat16, enabled=run.amp):
        hyps = loss_mod.greedy(b)
    return [{"reference": loss_mod.text(e), "heard": loss_mod.units.decode(h)} for e, h in zip(b.examples, hyps)]


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
