"""One training step per recipe stage at full size: phi4mm against transformers + peft, same shapes, same run.

usage: python bench/bench_train.py [--size full|tiny] [--steps 5] [--stages a,b] [--out bench/results/train.json]
Writes one random-weight transformers-native checkpoint (speed and memory do not depend on weight values), then
runs each side in a fresh process, so peak GPU memory is its own. Both sides train the same tensors of each
stage (train.STAGES, mapped to transformers' names by phi4mm's name table) with the same precision policy: frozen
weights bf16, trained ones fp32 masters, bf16 autocast, fused AdamW. The batch of a stage is the same
conversations, tokenised and preprocessed by phi4mm's trainer (`encode` + `collate`), handed to each side.
Tokens/s counts every position of the padded batch (text, image and audio tokens).
--size tiny runs the same code on CPU in fp32 on a tiny checkpoint (a smoke test; its timings mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STAGES = ("vision-projector", "vision-encoder", "vision-lora", "speech-encoder", "speech-lora", "vision-speech",
          "text")
PROFILE = os.environ.get("PHI4MM_BENCH_PROFILE") == "1"  # --profile, passed to the side processes
TEXT_RANK = 16  # the new text adapter's rank on both sides
# (samples, image side px, audio seconds, answer words) per batch; the answer is what the loss counts.
SHAPES = {"full": {"vision": (8, 896, 0, 100), "speech": (8, 0, 30, 100), "vision-speech": (8, 448, 10, 50),
                   "text": (8, 0, 0, 700)},
          "tiny": {"vision": (2, 224, 0, 8), "speech": (2, 0, 3, 8), "vision-speech": (2, 224, 2, 8),
                   "text": (2, 0, 0, 30)}}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "red", "birds", "sing",
         "near", "an", "old", "stone", "bridge"]


def _kind(stage: str) -> str:
    return "vision-speech" if stage == "vision-speech" else stage.split("-")[0]


def make_data(work: Path, stage: str, size: str) -> Path:
    """The stage's batch as a JSONL of conversations with media files (the trainer's own input format)."""
    import soundfile as sf
    from PIL import Image
    n, px, secs, words = SHAPES[size][_kind(stage)]
    rng = np.random.default_rng(0)
    d = work / f"data-{stage}"
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        content = []
        if px:
            Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(d / f"{i}.png")
            content.append({"type": "image", "path": f"{i}.png"})
        if secs:
            t = np.arange(int(secs * 16000)) / 16000
            sf.write(d / f"{i}.wav", (0.3 * np.sin(2 * np.pi * 220 * (1 + i) * t) + 0.05 * rng.standard_normal(
                t.size)).astype(np.float32), 16000)
            content.append({"type": "audio", "path": f"{i}.wav"})
        content.append({"type": "text", "text": "Describe the input in detail."})
        answer = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))
        rows.append({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]})
    path = d / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def batch_for(model, data: Path, stage: str):
    from phi4mm.inputs.prepare import TEXT_ADAPTER
    from phi4mm.inputs.records import read_jsonl
    from phi4mm.train.data import collate, encode
    recs = read_jsonl(data)[0]
    ex = [encode(model, r, TEXT_ADAPTER if stage == "text" else None) for r in recs]
    return collate(ex, model.config.text.pad_token_id)


def _timed(step, steps: int, dev: str) -> tuple[float, float | None]:
    """Mean seconds per step after two warm-up steps, and the peak GPU memory (GiB) over them."""
    for _ in range(2):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / steps
    return sec, (torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None)


def _profiled(step, dev: str) -> dict | None:
    """The top CUDA kernels and CPU ops of two profiled steps (where a step's time goes), on CUDA only."""
    if dev != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    from bench.engine_profile import top_kernels
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages()) / 2e3
    return {"gpu_ms_per_step": round(total, 1), "kernels": top_kernels(prof, 25),
            "cpu_ops": top_kernels(prof, 12, "self_cpu_time_total")}


def _masters(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()


def _frozen(params: list[torch.nn.Parameter], dt: torch.dtype) -> None:
    """Back to frozen weights in the load dtype, for the next stage."""
    for p in params:
        p.requires_grad_(False)
        p.data = p.data.to(dt)


def side_ours(ckpt: str, work: str, stages: list[str], steps: int, size: str) -> dict:
    import phi4mm
    from phi4mm.train.loss import LossModule
    from phi4mm.train.stages import setup_stage
    dev, dt = ("cuda", torch.bfloat16) if size == "full" else ("cpu", torch.float32)
    model = phi4mm.load(ckpt, dev, dt)
    out = {}
    for stage in stages:
        names = setup_stage(model, stage, TEXT_RANK if stage == "text" else None)
        params = [p for n, p in model.net.named_parameters() if n in names]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=dev == "cuda")
        loss_mod = LossModule(model).train()
        batch = batch_for(model, make_data(Path(work), stage, size), stage)
        out[stage] = _measure("phi4mm", stage, lambda b=batch, m=loss_mod: m(b) / b.num_targets, opt, batch, params,
                              steps, dev)
        _frozen(params, dt)
        opt = loss_mod = None  # the next stage starts without this one's optimizer state
    return out


def _hf_names(m, stage: str) -> tuple[list[str], str | None]:
    """transformers' parameter names for what phi4mm's stage trains (base weights by the name table); m is a
    phi4mm model of the same checkpoint."""
    from phi4mm.inputs.prepare import TEXT_ADAPTER
    from phi4mm.model.weights import name_table
    from phi4mm.train.stages import STAGES, trainable_names
    table = name_table(m.net, m.config.layout)
    ours = trainable_names(m.net, stage)
    base = [table[n][1] for n in ours if ".lora_" not in n]
    return base, STAGES[stage].adapter or (TEXT_ADAPTER if stage == "text" else None)


def side_hf(ckpt: str, work: str, stages: list[str], steps: int, size: str) -> dict:
    import warnings

    import transformers
    from peft import LoraConfig
    warnings.simplefilter("ignore")
    dev, dt = ("cuda", torch.bfloat16) if size == "full" else ("cpu", torch.float32)
    ref = transformers.Phi4MultimodalForCausalLM.from_pretrained(ckpt, dtype=dt, device_map=dev,
                                                                 attn_implementation="sdpa")
    for name in ("vision", "speech"):
        ref.load_adapter(os.path.join(ckpt, f"{name}-lora"), adapter_name=name, is_trainable=True)
    text_targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    ref.add_adapter(LoraConfig(r=TEXT_RANK, lora_alpha=2 * TEXT_RANK, target_modules=text_targets,
                               exclude_modules=r".*(vision|audio|embed_tokens_extend).*"), adapter_name="text")
    import phi4mm
    ours = phi4mm.load(ckpt, "cpu", torch.float32)  # loaded once: the same batches and the stages' names
    out = {}
    for stage in stages:
        base, adapter = _hf_names(ours, stage)
        named = dict(ref.named_parameters())
        missing = [n for n in base if n not in named]
        if missing:
            raise KeyError(f"{stage}: transformers has no parameter {missing[0]}")
        for p in ref.parameters():
            p.requires_grad_(False)
        ref.set_adapter(adapter or "vision")
        if adapter is None:
            ref.disable_adapters()
        else:
            ref.enable_adapters()
        lora = [n for n in named if re.search(rf"\.lora_[AB]\.{adapter}\.", n)] if adapter else []
        params = [named[n] for n in base + lora]
        _masters(params)
        opt = torch.optim.AdamW(params, lr=1e-5, fused=dev == "cuda")
        b = batch_for(ours, make_data(Path(work), stage, size), stage)
        kw = {"input_ids": b.input_ids.to(dev), "labels": b.labels.to(dev)}
        if b.key_mask is not None:
            kw["attention_mask"] = b.key_mask.to(dev).long()
        ims = [e.prep.images for e in b.examples if e.prep.images is not None]
        if ims:
            kw.update(image_pixel_values=torch.cat([i.pixel_values for i in ims]).to(dev, dt),
                      image_sizes=torch.cat([i.image_sizes for i in ims]).to(dev),
                      image_attention_mask=torch.cat([i.attention_mask for i in ims]).to(dev))
        auds = [e.prep.audios for e in b.examples if e.prep.audios is not None]
        if auds:
            kw.update(audio_input_features=torch.cat([a.features for a in auds]).to(dev, dt),
                      audio_embed_sizes=torch.tensor([n for a in auds for n in a.num_tokens], device=dev))
        ref.train()
        out[stage] = _measure("transformers", stage, lambda kw=kw: ref(**kw).loss, opt, b, params, steps, dev)
        _frozen(params, dt)
        opt = None
    return out


def _measure(side: str, stage: str, loss_fn, opt, batch, params: list, steps: int, dev: str) -> dict:
    """Time `steps` optimizer steps on loss_fn() (bf16 autocast on CUDA), print and return the stage's row."""
    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sec, peak = _timed(step, steps, dev)
    row = _row(batch, sec, peak, len(params), sum(p.numel() for p in params))
    if PROFILE:
        row["profile"] = _profiled(step, dev)
    print(json.dumps({"side": side, "stage": stage, **row}), flush=True)
    return row


def _row(batch, sec: float, peak: float | None, n_tensors: int, n_params: int) -> dict:
    tokens = int(batch.input_ids.numel())
    return {"samples": len(batch.examples), "padded_tokens": tokens, "target_tokens": int(batch.num_targets),
            "step_s": round(sec, 4), "tokens_per_s": round(tokens / sec, 1),
            "peak_gib": None if peak is None else round(peak, 2), "trained_tensors": n_tensors,
            "trained_params": n_params}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full", choices=["full", "tiny"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--work", default="/tmp/phi4mm_bench_train")
    ap.add_argument("--out", default=str(ROOT / "bench/results/train.json"))
    ap.add_argument("--profile", action="store_true", help="also record each step's top kernels and CPU ops")
    ap.add_argument("--skip-peer", action="store_true", help="run phi4mm's side only")
    ap.add_argument("--side")
    ap.add_argument("--ckpt")
    a = ap.parse_args()
    stages = a.stages.split(",")
    if a.profile:
        os.environ["PHI4MM_BENCH_PROFILE"] = "1"
        global PROFILE
        PROFILE = True
    if a.side:
        fn = side_ours if a.side == "ours" else side_hf
        res = fn(a.ckpt, a.work, stages, a.steps, a.size)
        Path(a.work, f"{a.side}.json").write_text(json.dumps(res))
        return
    from phi4mm.tasks.make_checkpoint import make_checkpoint
    work = Path(a.work)
    ckpt = work / f"ckpt-{a.size}"
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt, a.size, layout="hf", device="cuda" if a.size == "full" else "cpu")
    res = {"device": torch.cuda.get_device_name() if a.size == "full" else "cpu", "size": a.size,
           "steps": a.steps, "torch": torch.__version__}
    for side in ("ours",) if a.skip_peer else ("ours", "hf"):
        r = subprocess.run([sys.executable, __file__, "--side", side, "--ckpt", str(ckpt), "--work", str(work),
                            "--size", a.size, "--steps", str(a.steps), "--stages", a.stages], check=False, cwd=ROOT)
        if r.returncode != 0:
            res[side] = {"error": f"exit {r.returncode}"}
            continue
        res[side] = json.loads((work / f"{side}.json").read_text())
    import transformers
    res["transformers"] = transformers.__version__
    print(f"{'stage':18} {'phi4mm tok/s':>13} {'hf tok/s':>10} {'ratio':>6} {'phi4mm GiB':>11} {'hf GiB':>7}")
    for st in stages:
        o, h = res.get("ours", {}).get(st), res.get("hf", {}).get(st)
        if o and h:
            print(f"{st:18} {o['tokens_per_s']:13.0f} {h['tokens_per_s']:10.0f} "
                  f"{o['tokens_per_s'] / h['tokens_per_s']:6.2f} {o['peak_gib'] or 0:11.2f} {h['peak_gib'] or 0:7.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
