"""Does the decoder side learn to read shapes with more focused training? LM-stage variants side by side (a probe).

    python scripts/micro_lm_probe.py WORK OUT_DIR [--seconds 240] [--variants a,b] [--gpus 2] [--workers 4]

The frozen-tower probe (scripts/micro_shape_probe.py --binding) found that the micro SigLIP binds each shape to
its colour in the merged tokens (one attention query per colour reads "what shape is red" at 0.97-1.00) where
the model before the vision-focus stage answered 26/50 of those questions: the loss was on the language-model
side (projector, LoRA_V, decoder). Each variant here continues a model with one `phi4mm train` stage on a
chosen image mix for the same wall time, in its own process (variants are spread over the GPUs), then scores the held-out shapes
questions (200, by kind) and scene lists (100) greedily on the engine. The starting model is scored the same way.

OUT_DIR gets results.json and log lines, and per variant `delta-<name>.safetensors`: the tensors the stage changed, keyed
"<file relative to the checkpoint>::<tensor name>", so a variant's model can be rebuilt on any machine with
`apply_delta(base_dir, delta_file, out_dir)` and scored on the other sets.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPE_TASKS = ("shapes", "scene")
ALL_IMAGE = ("ocr", "shapes", "scene", "caption")
# name: (stage, with_lora, tasks, lr)
VARIANTS = {
    "lora-ss-3e4": ("vision-lora", False, SHAPE_TASKS, 3e-4),  # the recipe's stage, shapes and scenes only
    "lora-ss-1e3": ("vision-lora", False, SHAPE_TASKS, 1e-3),
    "lora-s-1e3": ("vision-lora", False, ("shapes",), 1e-3),
    "enc-ss-5e4": ("vision-encoder", True, SHAPE_TASKS, 5e-4),  # tower + projector + LoRA_V
    "proj-ss-1e3": ("vision-projector", True, SHAPE_TASKS, 1e-3),  # projector + LoRA_V, tower frozen
    "proj-ss-2e3": ("vision-projector", True, SHAPE_TASKS, 2e-3),
    "enc-ss-1e3": ("vision-encoder", True, SHAPE_TASKS, 1e-3),
    "lora-all-3e4": ("vision-lora", False, ALL_IMAGE, 3e-4),  # control: more of the recipe's own mix
}


def _kind(question: str) -> str:
    q = question.strip().lower()
    if q.startswith("how many shapes"):
        return "how many shapes"
    if q.startswith("how many"):
        return "how many <colour>"
    if q.startswith("what colo"):
        return "what colour is <shape>"
    return "what shape is <colour>"


def score(model_dir: Path, test: Path, device: str) -> dict:
    """Held-out shapes (all 200, by kind) and scene lists (first 100), greedy."""
    from phi4mm import api
    from phi4mm.tasks.evaluate import evaluate
    m = api.load(model_dir, device, "bfloat16" if device.startswith("cuda") else "float32")
    out = {}
    r = evaluate(model_dir, test / "shapes.jsonl", "exact", max_tokens=16, model=m)
    lines = [json.loads(x) for x in (test / "shapes.jsonl").open()]
    right, total = Counter(), Counter()
    for p in r["predictions"]:
        k = _kind(_text(lines[p["line"] - 1]["messages"][0]))
        total[k] += 1
        right[k] += p["prediction"].strip() in p["references"]
    out["shapes"] = r["score"]
    out["shapes_by_kind"] = {k: f"{right[k]}/{total[k]}" for k in sorted(total)}
    r = evaluate(model_dir, test / "scene.jsonl", "exact", max_tokens=48, model=m, limit=100)
    out["scene"] = r["score"]
    out["scene_examples"] = r["predictions"][:3]
    return out


def _text(msg: dict) -> str:
    c = msg["content"]
    return " ".join(p.get("text", "") for p in c if isinstance(p, dict)) if isinstance(c, list) else str(c)


def _variant(name: str, base: str, data_dir: str, test: str, device: str, seconds: float, workers: int,
             out_dir: str) -> None:
    import torch

    from phi4mm.train.trainer import train
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    stage, with_lora, tasks, lr = VARIANTS[name]
    work = Path(data_dir).parent / "runs" / name  # beside the data, not under OUT_DIR (it holds what returns)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) / f"probe-{name}.jsonl"  # beside the task files: media paths stay relative
    data.write_text("".join((Path(data_dir) / f"{t}.jsonl").read_text() for t in tasks))
    t0 = time.time()
    res = train(base, data, stage, work / "model", epochs=1000, lr=lr, batch_tokens=16384, seed=0,
                device=device, dtype="bfloat16", warmup_steps=50, weight_decay=0.01, save_every=0,
                workers=workers, progress=False, max_seconds=seconds, with_lora=with_lora)
    result = {"variant": name, "stage": stage, "with_lora": with_lora, "tasks": list(tasks), "lr": lr,
              "steps": res["steps"], "final_loss": res["final_loss"], "train_seconds": round(res["seconds"], 1),
              "data_wait_seconds": round(res["data_wait_seconds"], 1), "samples": res["samples"]}
    result.update(score(work / "model", Path(test), device))
    result["wall_seconds"] = round(time.time() - t0, 1)
    save_delta(Path(base), work / "model", Path(out_dir) / f"delta-{name}.safetensors")
    (Path(data_dir).parent / f"result-{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("variant", "steps", "final_loss", "shapes", "scene")}), flush=True)


def save_delta(base: Path, trained: Path, dst: Path) -> None:
    """The tensors of `trained` that differ from `base`, in bf16, keyed "<relative file>::<name>"."""
    import torch
    from safetensors.torch import load_file, save_file
    delta = {}
    for f in sorted(base.rglob("*.safetensors")):
        rel = f.relative_to(base)
        orig = load_file(str(f))
        for k, t in load_file(str(trained / rel)).items():
            if not torch.equal(t.to(orig[k].dtype), orig[k]):
                delta[f"{rel}::{k}"] = t.to(torch.bfloat16).contiguous()
    save_file(delta, str(dst))


def apply_delta(base: str | Path, delta_file: str | Path, out: str | Path) -> Path:
    """A copy of `base` with a probe variant's changed tensors put back."""
    from safetensors.torch import load_file, save_file
    base, out = Path(base), Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out)
    by_file: dict[str, dict] = {}
    for key, t in load_file(str(delta_file)).items():
        rel, name = key.split("::", 1)
        by_file.setdefault(rel, {})[name] = t
    for rel, tensors in by_file.items():
        sd = load_file(str(out / rel))
        for k, t in tensors.items():
            sd[k] = t.to(sd[k].dtype)
        save_file(sd, str(out / rel), metadata={"format": "pt"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("out")
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--device", default="cuda", help="cuda (variants spread over --gpus) or cpu (a smoke run)")
    ap.add_argument("--scale", type=float, default=1.0, help="data scale (a smoke run: 0.01)")
    ap.add_argument("--no-baseline", action="store_true", help="do not score the base model")
    ap.add_argument("--base", default=None, help="checkpoint to continue (default: the shipped micro model)")
    a = ap.parse_args()
    from phi4mm.micro import data as micro_data
    from phi4mm.micro import recipe as micro
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(a.base) if a.base else micro.MICRO_DIR
    t0 = time.time()
    for split, seed in (("train", 0), ("test", 1000)):
        if not (work / split / "done").is_file():
            micro_data.generate(work / split, split, seed, scale=a.scale, progress=False, tasks=ALL_IMAGE)
            (work / split / "done").write_text("")
    print(f"data in {time.time() - t0:.0f} s", flush=True)
    names = a.variants.split(",")
    def dev(i: int) -> str:
        return f"cuda:{i % a.gpus}" if a.device == "cuda" else a.device
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_variant, args=(n, str(base), str(work / "train"), str(work / "test"),
                                                  dev(i), a.seconds, a.workers, str(out)))
             for i, n in enumerate(names)]
    for p in procs:
        p.start()
    results = []
    if not a.no_baseline:
        baseline = score(base, work / "test", dev(0))  # the base model on the same engine, meanwhile
        print(json.dumps({"variant": "base", **{k: baseline[k] for k in ("shapes", "scene")}}), flush=True)
        results.append({"variant": "base", **baseline})
    for p in procs:
        p.join()
    results += [json.loads((work / f"result-{n}.json").read_text()) for n in names
                if (work / f"result-{n}.json").is_file()]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for r in results:
        print(f"{r['variant']:14} steps {r.get('steps', 0):5d} loss {r.get('final_loss') or 0:.3f} "
              f"shapes {r['shapes']:.3f} scene {r['scene']:.2f} {r['shapes_by_kind']}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
