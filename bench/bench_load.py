"""Full-size load time, peak GPU memory and bf16 logit agreement: phi4mm against transformers, same run.

usage: python bench/bench_load.py [--size full|tiny] [--out bench/results/load.json]
Writes random-weight checkpoints (official layout for phi4mm, transformers-native for the peer, same seed,
so the same weights), then runs each side in a fresh process so peak memory is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPTS = {
    "text": ("<|system|>You are a helpful assistant.<|end|><|user|>Write a haiku about the sea.<|end|><|assistant|>",
             0, 0),
    "image": ("<|user|><|image_1|>Describe this picture in detail.<|end|><|assistant|>", 1, 0),
    "audio": ("<|user|><|audio_1|>Transcribe the audio to text.<|end|><|assistant|>", 0, 1),
    "image+audio": ("<|user|><|image_1|><|audio_1|><|end|><|assistant|>", 1, 1),
}


def media():
    from tests.conftest import scene, tone
    return [scene(896, 896)], [tone(20.0)]


def side_ours(ckpt: str, work: str) -> dict:
    import phi4mm
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    m = phi4mm.load(ckpt, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    peak_load = torch.cuda.max_memory_allocated() / 2**30
    images, audios = media()
    saved = {}
    for name, (prompt, ni, na) in PROMPTS.items():
        prep = m.prepare(prompt, images[:ni], audios[:na])
        logits = m.logits(prompt, images[:ni], audios[:na])
        saved[name] = {"prep": prep, "logits": logits.cpu()}
    result = {}
    # The plain reference loop's speed (the fast engine is separate work), for the record.
    p = PROMPTS["text"][0]
    m.generate_ids(p, max_new_tokens=4)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = len(m.generate_ids(p, max_new_tokens=64))
    torch.cuda.synchronize()
    loop_tok_s = n / (time.perf_counter() - t0)
    peak_inf = torch.cuda.max_memory_allocated() / 2**30
    del m
    torch.cuda.empty_cache()
    m32 = phi4mm.load(ckpt, device="cuda", dtype=torch.float32)  # the fp32 yardstick for bf16 differences
    for name, (prompt, ni, na) in PROMPTS.items():
        saved[name]["logits32"] = m32.logits(prompt, images[:ni], audios[:na]).cpu()
    torch.save(saved, os.path.join(work, "ours.pt"))
    return {"load_s": round(load_s, 2), "peak_gib_after_load": round(peak_load, 2),
            "peak_gib_with_inference": round(peak_inf, 2),
            "adapters": ["speech", "vision"], "reference_loop_tok_s": round(loop_tok_s, 1)}


def side_hf(ckpt: str, work: str) -> dict:
    import warnings

    import transformers
    warnings.simplefilter("ignore")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ref = transformers.Phi4MultimodalForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map="cuda",
                                                                 attn_implementation="eager").eval()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    peak_no_adapters = torch.cuda.max_memory_allocated() / 2**30
    ref.load_adapter(os.path.join(ckpt, "speech-lora"), adapter_name="speech")
    ref.load_adapter(os.path.join(ckpt, "vision-lora"), adapter_name="vision")
    peak_adapters = torch.cuda.max_memory_allocated() / 2**30
    saved = torch.load(os.path.join(work, "ours.pt"), weights_only=False)
    hf16 = _hf_logits(ref, saved, torch.bfloat16)
    del ref
    torch.cuda.empty_cache()
    ref = transformers.Phi4MultimodalForCausalLM.from_pretrained(ckpt, dtype=torch.float32, device_map="cuda",
                                                                 attn_implementation="eager").eval()
    ref.load_adapter(os.path.join(ckpt, "speech-lora"), adapter_name="speech")
    ref.load_adapter(os.path.join(ckpt, "vision-lora"), adapter_name="vision")
    hf32 = _hf_logits(ref, saved, torch.float32)
    agree = {}
    for name, d in saved.items():
        agree[name] = {"tokens": len(d["prep"].input_ids), "adapter": d["prep"].adapter,
                       "ours_fp32_vs_hf_fp32": _cmp(d["logits32"], hf32[name]),
                       "ours_bf16_vs_hf_bf16": _cmp(d["logits"], hf16[name]),
                       "ours_bf16_vs_fp32": _cmp(d["logits"], hf32[name]),
                       "hf_bf16_vs_fp32": _cmp(hf16[name], hf32[name])}
    return {"load_s": round(load_s, 2), "peak_gib_no_adapters": round(peak_no_adapters, 2),
            "peak_gib_with_adapters": round(peak_adapters, 2), "agreement": agree}


def _cmp(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    diff = (a - b).abs()
    return {"rel_max": round((diff.max() / b.abs().max()).item(), 6),
            "cosine_min": round(torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item(), 6),
            "top1_agree": round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4)}


def _hf_logits(ref, saved: dict, dtype: torch.dtype) -> dict:
    out = {}
    for name, d in saved.items():
        prep = d["prep"]
        kw = {"input_ids": torch.tensor([prep.input_ids], device="cuda")}
        if prep.images is not None:
            kw.update(image_pixel_values=prep.images.pixel_values.cuda().to(dtype),
                      image_sizes=prep.images.image_sizes.cuda(), image_attention_mask=prep.images.attention_mask.cuda())
        if prep.audios is not None:
            kw.update(audio_input_features=prep.audios.features.cuda().to(dtype),
                      audio_embed_sizes=torch.tensor(prep.audios.num_tokens, device="cuda"))
        if prep.adapter is None:
            ref.disable_adapters()
        else:
            ref.enable_adapters()
            ref.set_adapter(prep.adapter)
        with torch.no_grad():
            out[name] = ref(**kw).logits[0].float().cpu()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full")
    ap.add_argument("--work", default="/tmp/phi4mm_bench")
    ap.add_argument("--out", default=str(ROOT / "bench/results/load.json"))
    ap.add_argument("--side")
    args = ap.parse_args()
    work = Path(args.work)
    if args.side:  # child process
        # fp32 is the yardstick: no TF32 shortcuts in matmuls or convolutions on either side.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        fn = side_ours if args.side == "ours" else side_hf
        ckpt = work / ("official" if args.side == "ours" else "hf")
        print("RESULT " + json.dumps(fn(str(ckpt), str(work))), flush=True)
        return
    from phi4mm.tasks.make_checkpoint import make_checkpoint
    work.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size}
    for layout, sub in (("official", "official"), ("hf", "hf")):
        if not (work / sub / "config.json").exists():
            t0 = time.perf_counter()
            make_checkpoint(work / sub, args.size, layout, seed=0, device=dev)
            res[f"make_{layout}_s"] = round(time.perf_counter() - t0, 1)
    import transformers
    res["transformers"] = transformers.__version__
    for side in ("ours", "hf"):
        out = subprocess.run([sys.executable, __file__, "--side", side, "--work", str(work), "--size", args.size],
                             capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        res[side] = json.loads(line[-1][7:]) if line else {"error": (out.stderr or out.stdout)[-2000:]}
        print(side, json.dumps(res[side], indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    o, h = res.get("ours", {}), res.get("hf", {})
    if "load_s" in o and "load_s" in h:
        print(f"\n| | phi4mm | transformers | ratio |\n|---|---|---|---|\n"
              f"| load s | {o['load_s']} | {h['load_s']} | {h['load_s'] / o['load_s']:.2f}x |\n"
              f"| peak GiB after load | {o['peak_gib_after_load']} (both adapters) | {h['peak_gib_no_adapters']} "
              f"(no adapters), {h['peak_gib_with_adapters']} (with) | |")
        for k, v in h["agreement"].items():
            print(k, v)


if __name__ == "__main__":
    main()
