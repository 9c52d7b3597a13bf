"""After the recipe's stages: merging two branches' checkpoints, the bf16 shipping copy, scoring it on the
held-out sets, and moving or extending a run (a part-way run packed for another machine, a finished run
continued with the stages the recipe gained since)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from phi4mm.micro.stages import GOALS, RECIPE, recipe_phases
from phi4mm.model.checkpoint import write_adapter_folder, write_shards

MAX_FILE_BYTES = 15 * 2**20  # no shipped file over 15 MB


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
    phases = recipe_phases()
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
