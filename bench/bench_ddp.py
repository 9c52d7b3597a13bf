"""DDP across GPUs: `torchrun --nproc-per-node N phi4mm train` against one GPU with the same global batch.

usage: python bench/bench_ddp.py [--size full|tiny] [--gpus 2] [--stage speech-lora] [--steps 12] [--fsdp]
                                 [--out bench/results/ddp.json]
One run on one GPU with --grad-accum N and one torchrun run on N GPUs with --grad-accum 1 train the same stage
from the same random-weight checkpoint on the same synthetic conversations (bench_train's batch shapes, N x
more of them). Both are `phi4mm train` processes as users start them. Reported: both runs' losses step by
step (equal but for bf16 reduction order), the mean step time after the first two steps, and the scaling
efficiency t_1 / (N t_N) (1.0: N GPUs take 1/N of the time for the same global batch).
--size tiny runs both on CPU processes (gloo) on a tiny checkpoint: a smoke test; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full", choices=["full", "tiny"])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--stage", default="speech-lora")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--fsdp", action="store_true", help="the N-GPU run shards with FSDP2 instead of DDP")
    ap.add_argument("--work", default="/tmp/phi4mm_bench_ddp")
    ap.add_argument("--out", default=str(ROOT / "bench/results/ddp.json"))
    a = ap.parse_args()
    import bench_train
    import torch

    from phi4mm.tasks.make_checkpoint import make_checkpoint
    work, n = Path(a.work), a.gpus
    ckpt = work / f"ckpt-{a.size}"
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt, a.size, device="cuda" if a.size == "full" else "cpu")
    # bench_train's batch of this stage, repeated so every step of every rank gets its own micro-batch.
    one = bench_train.make_data(work, a.stage, a.size)
    rows = one.read_text().splitlines()
    per_batch = len(rows)
    data = work / f"data-{a.stage}" / "ddp.jsonl"
    data.write_text("".join(r + "\n" for r in rows * (n * (a.steps + 1))))
    cli = ["-m", "phi4mm.cli.main", "train", "--model", str(ckpt), "--stage", a.stage,
           "--max-steps", str(a.steps), "--lr", "1e-4", "--seed", "0", "--save-every", "0"]
    if a.size == "full":
        cli += ["--device", "cuda", "--dtype", "bfloat16"]
    else:
        cli += ["--device", "cpu"]
    if a.stage == "text":
        cli += ["--lora-rank", str(bench_train.TEXT_RANK)]
    # One micro-batch holds exactly bench_train's batch: its padded token count (every sample is one shape).
    batch_tokens = per_batch * _longest(ckpt, one) + 8
    cli += ["--batch-tokens", str(batch_tokens)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", TOKENIZERS_PARALLELISM="false")
    runs = {}
    for name, cmd in (
        ("single", [sys.executable, *cli, "--grad-accum", str(n), str(data), str(work / "single")]),
        ("ddp", [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
                 f"--master-port={_free_port()}", *cli, "--grad-accum", "1", *(["--fsdp"] if a.fsdp else []),
                 str(data), str(work / "ddp")]),
    ):
        shutil.rmtree(work / name, ignore_errors=True)
        e = dict(env, CUDA_VISIBLE_DEVICES="0") if name == "single" and a.size == "full" else env
        r = subprocess.run(cmd, cwd=ROOT, env=e)
        if r.returncode != 0:
            raise SystemExit(f"the {name} run failed (exit {r.returncode}); its output is above")
        runs[name] = _log(work / name)
    # Mean step time after the first two steps (warm-up: allocator, autotuning, NCCL set-up).
    t = {k: (v[-1]["elapsed_s"] - v[1]["elapsed_s"]) / (len(v) - 2) for k, v in runs.items()}
    ls, ld = ([x["loss"] for x in runs[k]] for k in ("single", "ddp"))
    res = {"device": torch.cuda.get_device_name() if a.size == "full" else "cpu", "gpus": n, "stage": a.stage,
           "sharding": "fsdp" if a.fsdp else "ddp",
           "size": a.size, "steps": a.steps, "samples_per_micro_batch": per_batch, "batch_tokens": batch_tokens,
           "torch": torch.__version__, "losses_single": ls, "losses_ddp": ld,
           "max_rel_loss_diff": max(abs(x - y) / max(abs(x), 1e-9) for x, y in zip(ls, ld)),
           "step_s_single": round(t["single"], 4), "step_s_ddp": round(t["ddp"], 4),
           "data_wait_s": {k: v[-1]["data_wait_s"] for k, v in runs.items()},
           "scaling_efficiency": round(t["single"] / (n * t["ddp"]), 3)}
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("losses")}, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


def _longest(ckpt: Path, data: Path) -> int:
    """Longest conversation of `data` in tokens, through the processor alone (no weights loaded)."""
    from phi4mm.config import ModelConfig
    from phi4mm.inputs.chat import render_prompt
    from phi4mm.inputs.prepare import prepare
    from phi4mm.inputs.records import read_jsonl
    from phi4mm.inputs.tokenizer import Tokenizer
    cfg, tok = ModelConfig.from_dir(ckpt), Tokenizer.from_dir(ckpt)
    cfg.image_token_id, cfg.audio_token_id = tok.image_token_id, tok.audio_token_id
    return max(len(prepare(render_prompt(r.messages, r.tools, add_generation_prompt=False), tok, cfg, r.images,
                           r.audios).input_ids) for r in read_jsonl(data)[0])


if __name__ == "__main__":
    main()
