"""Where the engine's time goes on a GPU: time to first token and decode steps, split into GPU and host.

usage: python bench/engine_profile.py [--ckpt DIR] [--out DIR]
Full-size random checkpoint (made under --work if missing), bf16. For each case it prints and writes
(out/engine_profile.json):
  - ttft: wall time of add_request + the steps up to the first token, for a 512-token text prompt, and the
    top CUDA kernels and CPU ops of one profiled first-token step;
  - decode (DECODE_PROFILE_CASES: rows x adapters): wall time per engine step (mean, p50/p90/max), and the GPU time of replaying the step's CUDA graph alone
    (the difference is host work: scheduling, sampling, streaming text);
  - the top CUDA kernels of a profiled decode step;
  - with --image: an 896x896 image's first token split into its parts (preprocessing, media key, towers,
    prompt embeddings, the prefill step), then one profiled request (top CUDA kernels and CPU ops, GPU busy time).
    The engine encodes images at the next step, so `first_step` holds the towers, the
    embeddings and the prefill, and `add_request` the checks and the media key;
  - with --asr --merge-adapter speech: the ASR case (key asr_b64) again on a fresh engine with the speech adapter
    merged into the weights (key asr_b64_merged_speech, with the bytes the merge added), then unmerged once more
    (asr_b64_again: the spread of the two unmerged runs is the noise);
  - with --image-batch: 16 new 896x896 image requests at once (one token each) with their SigLIP forwards
    batched across requests and one image per forward (image_batch);
  - with --asr --only --peer: transformers on the same ASR case in the same process afterwards (peer_asr_b64),
    and each of our ASR rows' real-time factor as a ratio to the peer's.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


CUDA = torch.cuda.is_available()
DECODE_PROFILE_CASES = [(1, "none"), (1, "speech"), (64, "none"), (64, "mixed"), (256, "none")]


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _release_gpu() -> None:
    """Hand freed GPU memory back to the driver (after dropping an engine or a model)."""
    if CUDA:
        torch.cuda.empty_cache()


def top_kernels(prof, n: int = 15, key: str = "self_device_time_total" if CUDA else "self_cpu_time_total"
                ) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:n]
    return [{"name": e.key[:90], "count": e.count, "ms": round(getattr(e, key, 0) / 1e3, 3)} for e in rows]


def asr_profile(m, eng) -> dict:
    """64 clips of 30 s, 100 tokens each: wall time of admission (towers), prefill and decode, and the
    host functions that take the time (cProfile, cumulative)."""
    import contextlib
    import cProfile
    import io
    import pstats

    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from phi4mm.sampling import SamplingParams
    wav = (0.1 * np.random.default_rng(0).standard_normal(16000 * 30)).astype(np.float32)
    prompt = "<|user|><|audio_1|>Transcribe the audio to text.<|end|><|assistant|>"
    t0 = time.perf_counter()
    # Distinct clips for every timed pass: a repeated clip would hit the encoder cache and the prefix cache.
    preps = [m.prepare(prompt, audios=[(wav + 1e-4 * i, 16000)]) for i in range(66 + 2 * 64)]
    prep_s = time.perf_counter() - t0
    p = SamplingParams(max_tokens=100, ignore_eos=True)
    eng.generate([dict(prompt=x, params=p) for x in preps[64:]])  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    sync()
    t0 = time.perf_counter()
    for x in preps[:64]:
        eng.add_request(x, params=p)
    sync()
    t1 = time.perf_counter()
    while any(not s.generated for s in eng.running) or eng.waiting:
        eng.step()
    sync()
    t2 = time.perf_counter()
    while eng.has_work():
        eng.step()
    sync()
    t3 = time.perf_counter()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
    row = {"prepare_s_194": round(prep_s, 3), "add_request_s": round(t1 - t0, 3), "prefill_s": round(t2 - t1, 3),
           "decode_s": round(t3 - t2, 3), "rtfx": round(64 * 30 / (t3 - t0), 1),
           "host_profile": buf.getvalue()[-6000:]}
    # The same 64 clips again, without cProfile's overhead, then once more under the CUDA profiler: how much
    # of the wall time the GPU is busy, and with what.
    walls = {}
    for name in ("plain", "profiled"):
        ctx = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if (CUDA and name == "profiled") \
            else contextlib.nullcontext()
        with ctx as prof:
            sync()
            t0 = time.perf_counter()
            first = 66 + 64 * (name == "profiled")
            outs = eng.generate([dict(prompt=x, params=p) for x in preps[first:first + 64]])
            bad = [o for o in outs if o["finish_reason"] not in ("length", "stop")]
            if bad:
                walls[f"{name}_failed"] = f"{len(bad)}: {bad[0].get('error', '')[:200]}"
            sync()
        walls[name] = round(time.perf_counter() - t0, 3)
    row["wall_s"] = walls
    row["rtfx_plain"] = round(64 * 30 / walls["plain"], 1)
    if CUDA:
        row["gpu_busy_s"] = round(sum(e.self_device_time_total for e in prof.key_averages()) / 1e6, 3)
        row["kernels"] = top_kernels(prof, 25)
    print(json.dumps({k: v for k, v in row.items() if k not in ("host_profile", "kernels")}), flush=True)
    print(json.dumps(row.get("kernels"), indent=0), flush=True)
    print(row["host_profile"], flush=True)
    return row


def image_profile(m, eng) -> dict:
    """An 896x896 image's time to first token, part by part (median of 5 new images), and one profiled."""
    from torch.profiler import ProfilerActivity, profile

    from phi4mm.engine.runner import media_key
    from phi4mm.model.encode import encode_media
    from phi4mm.sampling import SamplingParams
    from tests.conftest import scene
    prompt = "<|user|><|image_1|>Describe.<|end|><|assistant|>"
    p = SamplingParams(max_tokens=1, ignore_eos=True)
    for k in range(3):  # graph buckets, kernel variants
        eng.generate([dict(prompt=m.prepare(prompt, images=[scene(896, 896, 50 + k)]), params=p)])
    parts: dict[str, list[float]] = {k: [] for k in ("prepare", "media_key", "towers", "embed", "add_request",
                                                     "first_step", "whole")}

    def lap(t: float) -> float:
        sync()
        return time.perf_counter() - t

    for k in range(5):
        img = scene(896, 896, 60 + k)
        sync()
        t0 = time.perf_counter()
        prep = m.prepare(prompt, images=[img])
        parts["prepare"].append(lap(t0))
        t = time.perf_counter()
        key = media_key(prep)
        parts["media_key"].append(lap(t))
        t = time.perf_counter()
        media = encode_media(eng.net, prep, eng.device, eng.dtype)  # the towers alone (not cached: timing only)
        parts["towers"].append(lap(t))
        t = time.perf_counter()
        eng.runner.prompt_embeds(prep, key + b"x", media)
        parts["embed"].append(lap(t))
        t = time.perf_counter()
        eng.add_request(prep, params=p)  # the real path: checks and the media key (towers deferred to the step)
        parts["add_request"].append(lap(t))
        t = time.perf_counter()
        while eng.has_work():
            eng.step()  # towers (batched with other waiting images), embeddings, the prefill
        parts["first_step"].append(lap(t))
        parts["whole"].append(parts["prepare"][-1] + parts["add_request"][-1] + parts["first_step"][-1])
    row = {k: round(sorted(v)[2] * 1e3, 2) for k, v in parts.items()}
    row["media_tokens"] = prep.num_tokens
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    prep = m.prepare(prompt, images=[scene(896, 896, 70)])
    with profile(activities=acts) as prof:
        eng.add_request(prep, params=p)
        while eng.has_work():
            eng.step()
        sync()
    if CUDA:
        row["gpu_busy_ms"] = round(sum(e.self_device_time_total for e in prof.key_averages()) / 1e3, 2)
        row["kernels"] = top_kernels(prof, 20)
    row["cpu_ops"] = top_kernels(prof, 15, "self_cpu_time_total")
    print(json.dumps(row, indent=1), flush=True)
    return row


def image_batch_profile(m, eng, n: int = 16) -> dict:
    """`n` distinct 896x896 image requests at once, one token each: wall time with their towers batched across
    requests (runner.IMAGE_BATCH_CROPS) and with one image per SigLIP forward (per-request encoding, the
    baseline that batching is measured against), alternating, median of 3 each."""
    import phi4mm.engine.runner as engine_mod
    from phi4mm.sampling import SamplingParams
    from tests.conftest import scene
    prompt = "<|user|><|image_1|>Describe.<|end|><|assistant|>"
    p = SamplingParams(max_tokens=1, ignore_eos=True)
    batched = engine_mod.IMAGE_BATCH_CROPS
    seed = iter(range(1000, 100000))
    walls: dict[str, list[float]] = {"batched": [], "one_per_forward": []}
    for rep in range(4):  # the first round warms up both settings (graph buckets, kernels)
        for name, crops in (("batched", batched), ("one_per_forward", 1)):
            preps = [m.prepare(prompt, images=[scene(896, 896, next(seed))]) for _ in range(n)]  # no cache hit
            engine_mod.IMAGE_BATCH_CROPS = crops
            sync()
            t0 = time.perf_counter()
            outs = eng.generate([{"prompt": x, "params": p} for x in preps])
            sync()
            if rep:
                walls[name].append(time.perf_counter() - t0)
            assert all(o["finish_reason"] == "length" for o in outs), outs[0]
    engine_mod.IMAGE_BATCH_CROPS = batched
    row = {k: round(sorted(v)[1] * 1e3, 1) for k, v in walls.items()}
    row["requests"] = n
    row["speedup"] = round(row["one_per_forward"] / row["batched"], 2)
    print(json.dumps(row), flush=True)
    return row


AUDIO_TOKEN_ID = 200011  # the published checkpoint's <|endoftext11|>, the audio placeholder


def peer_asr(tiny: bool = False, batch: int = 64, seconds: int = 30, new: int = 100) -> dict:
    """The peer on the ASR case: transformers' Phi4MultimodalForCausalLM at the published shape (random bf16
    weights, SDPA; its base model without LoRA, the usual transformers baseline), `batch` distinct
    clips of `seconds` in one default `generate`, `new` tokens each (min_new_tokens forces the full length).
    Features are extracted before the timer starts, as our `prepare` is."""
    import numpy as np
    import transformers
    from transformers import (
        Phi4MultimodalConfig,
        Phi4MultimodalFeatureExtractor,
        Phi4MultimodalForCausalLM,
    )
    dev, dt = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0] * 48, "long_factor": [1.0] * 48, "original_max_position_embeddings": 4096}
    kw = {"num_attention_heads": 24, "num_key_value_heads": 8, "hidden_size": 3072, "intermediate_size": 8192,
          "num_hidden_layers": 2 if tiny else 32, "tie_word_embeddings": True, "rope_parameters": rope}
    extra = {"vision_config": {"num_hidden_layers": 2}, "audio_config": {"num_blocks": 2}} if tiny else {}
    cfg = Phi4MultimodalConfig(**kw, **extra)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = Phi4MultimodalForCausalLM(cfg).to(dt).eval()
    wav = (0.1 * np.random.default_rng(0).standard_normal(16000 * seconds)).astype(np.float32)
    fe = Phi4MultimodalFeatureExtractor()

    def inputs(first: int) -> dict:
        feats = fe([wav + 1e-4 * (first + i) for i in range(batch)], sampling_rate=16000, return_tensors="pt")
        n = int(feats["audio_embed_sizes"][0])
        text = torch.randint(1000, 190000, (batch, 16), device=dev)
        ids = torch.cat([torch.full((batch, n), AUDIO_TOKEN_ID, device=dev), text], 1)  # (batch, n + 16)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "audio_input_features": feats["audio_input_features"].to(dev, dt),
               "audio_embed_sizes": feats["audio_embed_sizes"].to(dev)}
        if "audio_attention_mask" in feats:
            out["audio_attention_mask"] = feats["audio_attention_mask"].to(dev)
        return out

    def timed(inp: dict, k: int) -> float:
        sync()
        t0 = time.perf_counter()
        model.generate(**inp, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        sync()
        return time.perf_counter() - t0

    timed(inputs(batch), 2)  # warm-up on other clips
    total = timed(inputs(0), new)
    row = {"transformers": transformers.__version__, "batch": batch, "seconds": seconds, "new": new,
           "total_s": round(total, 3), "rtfx": round(batch * seconds / total, 1)}
    if CUDA:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(row), flush=True)
    return row


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/phi4mm_bench")
    ap.add_argument("--out", default="/tmp/engine_profile")
    ap.add_argument("--size", default="full", help="tiny: a dry run of this script on CPU")
    ap.add_argument("--asr", action="store_true", help="also profile 64 x 30 s speech recognition (host side)")
    ap.add_argument("--image", action="store_true", help="also split an 896x896 image's first token into parts")
    ap.add_argument("--only", action="store_true", help="skip the text and decode cases")
    ap.add_argument("--max-batch", type=int, default=256, help="the largest decode batch profiled")
    ap.add_argument("--image-batch", action="store_true",
                    help="also time 16 image requests with towers batched across requests and one per forward")
    ap.add_argument("--merge-adapter", choices=["speech", "vision"], default=None,
                    help="with --asr: time the ASR case again with this adapter merged (Engine(merge_adapter=))")
    ap.add_argument("--peer", action="store_true",
                    help="with --asr --only: time transformers on the same ASR case afterwards, in this process")
    args = ap.parse_args()
    if args.peer and not (args.asr and args.only):
        ap.error("--peer times the ASR case against transformers: add --asr --only")
    if args.merge_adapter and not args.asr:
        ap.error("--merge-adapter times the ASR case: add --asr")
    from torch.profiler import ProfilerActivity, profile

    import phi4mm
    from phi4mm.engine.engine import Engine
    from phi4mm.inputs.prepare import Prepared
    from phi4mm.model.lora import unmerge_adapters
    from phi4mm.sampling import SamplingParams
    from phi4mm.tasks.make_checkpoint import make_checkpoint
    ckpt = Path(args.work) / "official"
    dev = "cuda" if CUDA else "cpu"
    if args.size != "full":
        ckpt = Path(args.work) / args.size
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, args.size, "official", seed=0, device=dev)
    m = phi4mm.load(ckpt, device=dev, dtype=torch.bfloat16 if CUDA else torch.float32)
    eng = Engine(m, max_batch=64, max_tokens_per_step=4096, static_decode=True)
    res: dict = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu"}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    gen = torch.Generator().manual_seed(0)

    def prep(n: int, adapter: str | None = None) -> Prepared:
        return Prepared(torch.randint(1000, 190000, (n,), generator=gen).tolist(), None, None, adapter, "speech")

    def fresh_engine(merge: str | None = None, max_batch: int = 64) -> Engine:
        """Drop the engine (its KV pool holds most of the GPU, its graphs captured one path) and any merged
        copy, then build a new one, merging `merge` before it sizes its pool from what is left."""
        nonlocal eng
        eng = None
        gc.collect()
        unmerge_adapters(m.net)
        _release_gpu()
        return Engine(m, max_batch=max_batch, max_tokens_per_step=4096, static_decode=True, merge_adapter=merge)

    def asr_cases() -> None:
        nonlocal eng
        res["asr_b64"] = asr_profile(m, eng)
        if args.merge_adapter:
            eng = fresh_engine(args.merge_adapter)
            print(f"merged {args.merge_adapter}: +{eng.merged_bytes / 2**20:.1f} MiB", flush=True)
            row = asr_profile(m, eng)
            row["merged_bytes"] = eng.merged_bytes
            res[f"asr_b64_merged_{args.merge_adapter}"] = row
            # Unmerged once more on a fresh engine: the spread between the two unmerged runs bounds the noise.
            eng = fresh_engine()
            res["asr_b64_again"] = asr_profile(m, eng)

    if args.image:
        res["image_ttft"] = image_profile(m, eng)
    if args.image_batch:
        res["image_batch"] = image_batch_profile(m, eng)
    if args.asr and args.only:
        asr_cases()
    if args.peer:
        eng = m = None  # free our model and KV pool before the peer loads
        gc.collect()
        _release_gpu()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        res["peer_asr_b64"] = peer = peer_asr(tiny=args.size != "full")
        for k in [k for k in res if k.startswith("asr_b64")]:
            res[k]["rtfx_vs_peer"] = round(res[k]["rtfx_plain"] / peer["rtfx"], 2)
            print(f"{k}: real-time factor {res[k]['rtfx_plain']} against the peer's {peer['rtfx']}: "
                  f"{res[k]['rtfx_vs_peer']}x", flush=True)
    if args.only:
        _write(args.out, res)
        return
    # Time to first token.
    p = SamplingParams(max_tokens=1, ignore_eos=True)
    for _ in range(3):
        eng.generate([dict(prompt=prep(512), params=p)])
    walls = []
    for _ in range(5):
        x = prep(512)
        sync()
        t0 = time.perf_counter()
        eng.add_request(x, params=p)
        while eng.has_work():
            eng.step()
        sync()
        walls.append(time.perf_counter() - t0)
    eng.add_request(prep(512), params=p)
    with profile(activities=acts) as prof:
        while eng.has_work():
            eng.step()
        sync()
    res["ttft_512"] = {"wall_ms": [round(w * 1e3, 2) for w in walls], "kernels": top_kernels(prof),
                       "cpu_ops": top_kernels(prof, 12, "self_cpu_time_total")}
    print(json.dumps(res["ttft_512"], indent=1), flush=True)

    # Decode steps: no adapter at 1, 64 and 256 rows; the speech adapter at 1 row; a third of the rows on each
    # adapter at 64.
    if args.max_batch > 64:
        eng = fresh_engine(max_batch=args.max_batch)
    for b, which in DECODE_PROFILE_CASES:
        if b > args.max_batch:
            continue
        p = SamplingParams(max_tokens=200, ignore_eos=True)
        cycle = {"none": [None], "speech": ["speech"], "mixed": [None, "speech", "vision"]}[which]
        for i in range(b):
            eng.add_request(prep(512, cycle[i % len(cycle)]), params=p)
        while any(s.prefilling or not s.generated for s in eng.running) or eng.waiting:
            eng.step()
        for _ in range(5):
            eng.step()  # captures this bucket
        sync()
        n = 40
        walls = []
        t0 = time.perf_counter()
        for _ in range(n):
            s0 = time.perf_counter()
            eng.step()
            walls.append(time.perf_counter() - s0)
        sync()
        step_ms = (time.perf_counter() - t0) / n * 1e3
        walls.sort()
        # The bucket this case used: the last one captured for the fewest rows >= b (rows, blocks, adapters,
        # uniform). None where the step did not run through the static path (a CPU dry run may not).
        fitting = [k for k in eng.graphs.graphs if k[0] >= b]
        g = [v for k, v in eng.graphs.graphs.items() if k[0] == min(k[0] for k in fitting)][-1] if fitting else None
        replay = None if g is None else g.graph.replay if g.graph is not None else (lambda: eng.graphs._forward(g))
        replay_ms = float("nan")
        prof = None
        if replay is not None:
            t0 = time.perf_counter()
            for _ in range(n):
                replay()
            sync()
            replay_ms = (time.perf_counter() - t0) / n * 1e3
            with profile(activities=acts) as prof:
                for _ in range(3):
                    replay()
                sync()
        row = {"step_ms": round(step_ms, 3), "graph_replay_ms": round(replay_ms, 3),
               "tok_s": round(b * 1e3 / step_ms, 1), "graph_only_tok_s": round(b * 1e3 / replay_ms, 1),
               "step_wall_ms_p50_p90_max": [round(walls[n // 2] * 1e3, 3), round(walls[n * 9 // 10] * 1e3, 3),
                                            round(walls[-1] * 1e3, 3)],
               "kernels": top_kernels(prof, 30) if prof is not None else []}
        res[f"decode_b{b}_{which}"] = row
        print(json.dumps(row, indent=1), flush=True)
        for s in list(eng.running):
            eng.cancel(s.id)
        while eng.has_work():
            eng.step()
    if args.asr:
        asr_cases()
    _write(args.out, res)


def _write(out: str, res: dict) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "engine_profile.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
