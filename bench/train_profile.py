"""Where a training step's time goes: data loader alone, GPU step alone, and the two together.

usage: python bench/train_profile.py --out /tmp/prof [--scale 0.2] [--stages vision-encoder,speech-encoder]
       [--model DIR --data FILE.jsonl]   (default: the micro recipe's data and fresh micro weights)

For each stage it prints and writes (out/profile.json):
  - count: samples/s of `encode_all` (tokenising and counting media in forked workers);
  - loader: windows/s and samples/s of the DataLoader alone (media preprocessed in workers, no GPU);
  - gpu: seconds per optimizer step on batches already in memory (forward, backward, AdamW), and the top
    CUDA kernels of three profiled steps;
  - train: `phi4mm.train.trainer` for --steps steps with the workers, steps/s and the time it waited on the loader.
The step is data-bound when `train` is near `loader`, compute-bound when it is near `gpu`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_stage(model_dir: Path, data: Path, stage: str, out: Path, device: str, workers: int, steps: int,
                  batch_tokens: int) -> dict:
    from phi4mm import api
    from phi4mm.inputs.records import read_jsonl
    from phi4mm.train.data import batch_loader, encode_all
    from phi4mm.train.loss import LossModule
    from phi4mm.train.stages import setup_stage
    from phi4mm.train.trainer import epoch_batches, train
    res: dict = {"stage": stage}
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model = api.load(model_dir, device, dtype)
    names = setup_stage(model, stage, None)
    records, _ = read_jsonl(data)
    t = time.perf_counter()
    examples = [e for e in encode_all(model, records, None, workers) if not isinstance(e, Exception)]
    dt = time.perf_counter() - t
    res["count"] = {"samples": len(examples), "seconds": round(dt, 2), "samples_per_s": round(len(examples) / dt, 1)}
    batches = epoch_batches([e.length for e in examples], batch_tokens, 0, 0, 0, 1)
    windows = [[b] for b in batches][: max(steps, 8)]
    per_window = sum(len(w[0]) for w in windows) / len(windows)

    t = time.perf_counter()
    got = list(batch_loader(model, examples, windows, model.config.text.pad_token_id, workers))
    dt = time.perf_counter() - t
    res["loader"] = {"windows": len(got), "seconds": round(dt, 2), "windows_per_s": round(len(got) / dt, 2),
                     "samples_per_s": round(len(got) * per_window / dt, 1), "samples_per_window": round(per_window, 1)}

    loss_mod = LossModule(model)
    params = [p for n, p in model.net.named_parameters() if n in names]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=model.device.type == "cuda")
    amp = dtype != "float32"

    def step(b):
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_mod(b)
        (loss / max(1, b.num_targets)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cached = [w[0] for w in got[:4]]
    for b in cached:  # warm-up (kernels, allocator)
        step(b)
    _sync()
    n = min(steps, 20)
    t = time.perf_counter()
    for i in range(n):
        step(cached[i % len(cached)])
    _sync()
    dt = (time.perf_counter() - t) / n
    res["gpu"] = {"seconds_per_step": round(dt, 4), "steps_per_s": round(1 / dt, 2),
                  "samples_per_s": round(per_window / dt, 1)}
    if device.startswith("cuda"):
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                step(cached[i % len(cached)])
            _sync()
        ev = prof.key_averages()
        cuda_total = sum(e.self_device_time_total for e in ev) / 3 / 1e6
        res["gpu"]["kernel_seconds_per_step"] = round(cuda_total, 4)
        res["gpu"]["ops_per_step"] = sum(e.count for e in ev) // 3
        top = sorted(ev, key=lambda e: -e.self_device_time_total)[:12]
        res["gpu"]["top_kernels"] = [(e.key[:70], round(e.self_device_time_total / 3 / 1e3, 2), e.count // 3)
                                     for e in top]
        top_cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:8]
        res["gpu"]["top_cpu"] = [(e.key[:70], round(e.self_cpu_time_total / 3 / 1e3, 2), e.count // 3)
                                 for e in top_cpu]

    t = time.perf_counter()
    summ = train(model_dir, data, stage, out / f"train-{stage}", max_steps=steps, lr=1e-4,
                 batch_tokens=batch_tokens, device=device, dtype=dtype, workers=workers, save_every=0,
                 progress=False)
    res["train"] = {"steps": summ["steps"], "seconds_total": round(time.perf_counter() - t, 2),
                    "data_wait_seconds": round(summ["data_wait_seconds"], 2)}
    log = [json.loads(x) for x in (out / f"train-{stage}" / "log.jsonl").read_text().splitlines()]
    res["train"]["tokens_per_s"] = round(log[-1]["tokens_per_s"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", default="vision-projector,vision-encoder,speech-encoder")
    ap.add_argument("--scale", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--batch-tokens", type=int, help="default: the micro recipe stage's, else 16384")
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "workers": a.workers, "stages": []}
    if a.model:
        model_dir, data_for = Path(a.model), (lambda st: Path(a.data))
        tokens_for = lambda st: a.batch_tokens or 16384
    else:
        from phi4mm.micro import data as micro_data
        from phi4mm.micro import init as micro_init
        from phi4mm.micro import recipe as micro
        from phi4mm.micro import stages as micro_stages
        d = out / "data"
        if not (d / "done").is_file():
            t = time.perf_counter()
            micro_data.generate(d, "train", 0, scale=a.scale, workers=a.workers, progress=False)
            (d / "done").write_text("")
            results["data_seconds"] = round(time.perf_counter() - t, 1)
        model_dir = out / "init"
        if not (model_dir / "config.json").is_file():
            micro_init.init_checkpoint(model_dir, d)
        stages = {st.stage: st for st in micro_stages.RECIPE}
        data_for = lambda st: micro._stage_data(d, stages[st])
        tokens_for = lambda st: a.batch_tokens or stages[st].batch_tokens
    for st in a.stages.split(","):
        r = profile_stage(model_dir, data_for(st), st, out, a.device, a.workers, a.steps, tokens_for(st))
        print(json.dumps(r, indent=1), flush=True)
        results["stages"].append(r)
        (out / "profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
