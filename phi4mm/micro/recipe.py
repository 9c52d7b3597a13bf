"""The embedded micro model: Phi-4-multimodal's architecture at ~12 M parameters, trained by phi4mm itself.

    phi4mm train --recipe micro --out micro-run --device cuda     # data, tokenizer, 9 stages, eval (~17 min, 2 H200)

`run_recipe` generates the training and held-out data offline (`micro.data`), trains a byte-level BPE on the
training text with Phi's special tokens (looked up by name everywhere, never by id), writes a fresh checkpoint
in the official layout (`micro.init`), then runs `phi4mm.train.trainer` through the recipe's stages
(`micro.stages`) in the original order: the decoder on text, the vision projector -> encoder -> LoRA, the speech
encoder -> LoRA, then the vision-speech stage. Each stage's output is a complete checkpoint that the next stage
starts from; a finished stage is skipped on a re-run, so an interrupted recipe resumes at the stage it was in.
The last checkpoint is cast to bf16 and sharded (no file over 15 MB) into `out/model` (`micro.finish`), then
scored on the held-out sets (the "eval" entry of `out/recipe.json`).

The shipped copy lives in `phi4mm/micro/model/`; `default_model_dir()` finds it, and the CLI uses it when no
`--model` is given.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from phi4mm.micro.finish import evaluate_micro, finalize, merge_branches
from phi4mm.micro.init import init_checkpoint
from phi4mm.micro.stages import (
    RECIPE,
    MicroStage,
    phase_budgets,
    planned_seconds,
    recipe_phases,
)

MICRO_DIR = Path(__file__).parent / "model"


def default_model_dir() -> Path:
    """The shipped micro checkpoint (used when no --model is given)."""
    if not (MICRO_DIR / "config.json").is_file():
        raise FileNotFoundError(f"no --model given and the embedded micro model is missing from this install "
                                f"({MICRO_DIR}); reinstall phi4mm with its package data, or pass --model DIR, a "
                                "checkpoint directory (`phi4mm make-checkpoint DIR` writes a random tiny one)")
    return MICRO_DIR


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
    scale: data set size factor (1.0: ~50k training samples); epochs_scale: epochs factor (CPU smoke runs use
    tiny values of both). max_minutes: a wall-clock budget for data + training, shared between the stages
    by planned seconds (a stage ends early when its share runs out); stop_after: stop after this stage's
    phase (re-run without it to continue).
    """
    names = [st.name for st in RECIPE]
    if stop_after is not None and stop_after not in names:
        raise ValueError(f"stop_after {stop_after!r} is not a micro stage; use one of {', '.join(names)}")
    import os
    t0 = time.perf_counter()
    out = Path(out)
    workers = (os.cpu_count() or 1) if workers is None else workers
    summary_file = out / "recipe.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"stages": {}}
    summary.update(seed=seed, scale=scale, epochs_scale=epochs_scale, device=device)
    data = _generate_data(out, seed, scale, workers, progress, summary)
    base = out / "stages" / "00-init"
    if not (base / "done").is_file():
        init_checkpoint(base, data["train"], seed)
        (base / "done").write_text("")
    phases = recipe_phases()
    # The last phase this call runs: a budget is shared among these only (a split run budgets each part).
    last = len(phases) - 1 if stop_after is None else \
        next(k for k, ph in enumerate(phases) if any(names.index(stop_after) in c for c in ph))
    planned = [planned_seconds(data["train"], st) for st in RECIPE]
    summary["planned_seconds"] = {st.name: round(p * epochs_scale, 2) for st, p in zip(RECIPE, planned)}
    for k, phase in enumerate(phases):
        left = None if max_minutes is None else max_minutes * 60 - (time.perf_counter() - t0)
        budgets = phase_budgets(phases[k:last + 1], planned, left)
        run_parallel = len(phase) > 1 and (device.startswith("cuda") if parallel is None else parallel)
        ends = _run_phase(out, phase, base, data["train"], seed, device, workers, budgets, epochs_scale, progress,
                          run_parallel)
        for chain in phase:
            for n in chain:
                f = out / "stages" / f"{n + 1:02d}-{RECIPE[n].name}" / "summary.json"
                summary["stages"][RECIPE[n].name] = json.loads(f.read_text())
        summary_file.write_text(json.dumps(summary, indent=1))
        base = _merge_phase(out, k, base, ends)
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


def _generate_data(out: Path, seed: int, scale: float, workers: int, progress: bool,
                   summary: dict[str, Any]) -> dict[str, Path]:
    """The training and held-out data under out/data (kept when already generated); their seconds -> summary."""
    from phi4mm.micro import data as micro_data
    data = {}
    for split, split_seed in (("train", seed), ("test", seed + 1_000)):  # test seeds are never used in training
        d = out / "data" / split
        if not (d / "done").is_file():
            t = time.perf_counter()
            micro_data.generate(d, split, split_seed, scale=scale, workers=workers, progress=progress)
            (d / "done").write_text("")
            summary[f"data_{split}_seconds"] = round(time.perf_counter() - t, 1)
        data[split] = d
    return data


def _run_phase(out: Path, phase: list[list[int]], base: Path, data_dir: Path, seed: int, device: str, workers: int,
               budgets: dict[int, float | None], epochs_scale: float, progress: bool, parallel: bool) -> list[Path]:
    """Every branch (chain of stages) of a phase from base, one process per branch when parallel; returns
    the last stage folder of each branch."""
    if not parallel:
        return [_run_chain(out, chain, base, data_dir, seed, device, workers, budgets, epochs_scale, progress)
                for chain in phase]
    import multiprocessing as mp
    ctx = mp.get_context("spawn")  # fresh CUDA contexts; this process may hold one already
    per = max(1, workers // len(phase))
    procs = [ctx.Process(target=_run_chain, args=(out, chain, base, data_dir, seed,
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
    return [out / "stages" / f"{chain[-1] + 1:02d}-{RECIPE[chain[-1]].name}" for chain in phase]


def _merge_phase(out: Path, k: int, base: Path, ends: list[Path]) -> Path:
    """The checkpoint the next phase starts from: the one branch's end, or the branches merged (once)."""
    if len(ends) == 1:
        return ends[0]
    merged = out / "stages" / f"phase{k}-merged"
    if not (merged / "done").is_file():
        merge_branches(base, ends, merged)
        (merged / "done").write_text("")
    return merged
