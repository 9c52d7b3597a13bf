"""Can the micro SigLIP learn to read words and name shapes? CTC variants side by side on one GPU (a probe).

    python scripts/micro_vision_probe.py WORK OUT_JSON [--seconds 180] [--variants a,b] [--device cuda]
                                         [--trainer-steps 60]

The LM loss alone does not teach the micro SigLIP to read words (OCR 0.00) or to tell circle, square and
triangle apart well, even on its training images. Speech gets its features from a CTC stage
(scripts/micro_ctc_probe.py); this probe tries the same for vision with the very
frames the trainer's `vision-ctc` stage uses (`phi4mm.train.ctc.vision_frames`): a rendered word is read by patch
columns, a scene of shapes in raster order against its description ("red circle, blue square", top to bottom).
Each variant trains SigLIP from the micro init plus a CTC head over characters in its own process, for the
same wall time, and scores held-out words (unseen font sizes) and scenes (test seed) by greedy exact match.

With --trainer-steps N it first times N steps of the real trainer's vision-ctc stage on the same data and prints
a profile of them. (The stage reads a crop cache on the training device, so it has no loader to wait on;
a loader's prefetch would hide its cost in a run this short.)
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from micro_ctc_probe import probe_args, run_variants  # noqa: E402  (scripts/ is not a package)

# name: (lr, tasks, images per batch, head outputs per frame, SigLIP config changes from micro.VISION)
VARIANTS = {"ocr": (1e-3, ("ocr",), 32, 1, {}), "scene": (1e-3, ("scene",), 32, 1, {}),
            "mix": (1e-3, ("ocr", "scene"), 32, 1, {}), "ocr-r2": (1e-3, ("ocr",), 32, 2, {}),
            "ocr-r3": (1e-3, ("ocr",), 32, 3, {}), "scene-r2": (1e-3, ("scene",), 32, 2, {}),
            "mix-r2": (1e-3, ("ocr", "scene"), 32, 2, {}),
            # A stronger reader within the 30 MB (feature layer -2: 6 stored run 5).
            "ocr-r2-l6": (1e-3, ("ocr",), 32, 2, {"num_hidden_layers": 6}),
            "ocr-r2-w256": (1e-3, ("ocr",), 32, 2, {"hidden_size": 256, "intermediate_size": 1024}),
            "ocr-r2-2e3": (2e-3, ("ocr",), 32, 2, {}),
            # Caption labels (train.ctc.LabelHead), with CTC on the lines or alone.
            "ocr-ctc-lab": (1e-3, ("ocr",), 32, 2, {}), "ocr-lab": (1e-3, ("ocr",), 32, 2, {}),
            "mix-ctc-lab": (1e-3, ("ocr", "scene"), 32, 2, {}), "mix-lab": (1e-3, ("ocr", "scene"), 32, 2, {}),
            "mix-ctc-lab-2e3": (2e-3, ("ocr", "scene"), 32, 2, {}),
            "mix-ctc-lab-l6": (1e-3, ("ocr", "scene"), 32, 2, {"num_hidden_layers": 6})}
TASKS = ("ocr", "scene")


def _losses(name: str) -> tuple[bool, bool]:
    """(CTC, labels) of a variant: "-lab" adds the label head; "-ctc-lab" keeps CTC for the lines."""
    return ("-lab" not in name or "-ctc-lab" in name), "-lab" in name


def prepare(work: Path, scale: float) -> Path:
    """The OCR and scene data of both splits (the recipe's seeds) and the micro init checkpoint."""
    from phi4mm.micro import data as micro_data
    for split, seed in (("train", 0), ("test", 1000)):
        if not (work / split / "done").is_file():
            micro_data.generate(work / split, split, seed, scale=scale, progress=False, tasks=TASKS)
            (work / split / "done").write_text("")
    return init_checkpoint(work, {})


def init_checkpoint(work: Path, vision: dict) -> Path:
    """The micro init with SigLIP's config changed by `vision` (one folder per change)."""
    from phi4mm.inputs.tokenizer import Tokenizer
    from phi4mm.micro import init as micro_init
    from phi4mm.micro import recipe as micro
    from phi4mm.tasks.make_checkpoint import make_checkpoint
    ckpt = work / ("init" + "".join(f"-{k}{v}" for k, v in sorted(vision.items())))
    if not (ckpt / "config.json").is_file():
        cfg = micro_init.micro_config(Tokenizer.from_dir(micro.MICRO_DIR))
        cfg["vision_config"].update(vision)
        # Mel statistics do not matter to the vision tower.
        make_checkpoint(ckpt, config=cfg, init=micro_init.initializer(torch.zeros(80), torch.ones(80), 0),
                        tokenizer_dir=micro.MICRO_DIR, dtype=torch.float32)
    return ckpt


def _load(split_dir: Path, task: str) -> tuple[torch.Tensor, list[str]]:
    """A task's images as uint8 (N, 3, H, 448) and their answers."""
    import numpy as np
    from PIL import Image
    recs = [json.loads(line) for line in open(split_dir / f"{task}.jsonl")]
    pix = [np.asarray(Image.open(split_dir / r["messages"][0]["content"][0]["image_url"]["url"]).convert("RGB"))
           for r in recs]
    return torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2).contiguous(), [r["messages"][1]["content"]
                                                                          for r in recs]


def _variant(name: str, ckpt: str, work: str, device: str, seconds: float, out: str) -> None:
    from phi4mm import api
    from phi4mm.train.ctc import (
        LabelHead,
        caption_labels,
        ctc_log_probs,
        ctc_units,
        merged_tokens,
        vision_frames,
    )
    lr, tasks, bsz, per_frame, _ = VARIANTS[name]
    use_ctc, use_labels = _losses(name)
    torch.manual_seed(0)
    data = {(s, t): _load(Path(work) / s, t) for s in ("train", "test") for t in tasks}
    units = ctc_units([w for t in tasks for w in data["train", t][1]], 1)
    blank = units.get_vocab_size()
    m = api.load(ckpt, device, "float32")
    vis = m.net.vision
    params_m = sum(p.numel() for p in vis.img_processor.parameters()) / 1e6
    vis.train()
    side, crop = vis.patches_per_side, vis.crop_px  # 32 patches of 14 px
    head = torch.nn.Linear(vis.cfg.hidden_size, per_frame * (blank + 1), device=device)
    lab = LabelHead(vis.cfg.hidden_size, sorted({x for t in tasks for a in data["train", t][1]
                                                 for x in caption_labels(a)}), device) if use_labels else None
    params = list(vis.img_processor.parameters()) + list(head.parameters()) + (list(lab.parameters()) if lab else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=device.startswith("cuda"))
    gpu = {k: v[0].to(device) for k, v in data.items()}

    def run(pix: list[torch.Tensor], texts: list[str]):
        n = sum(p.shape[0] for p in pix)
        x = torch.full((n, 3, crop, crop), 255, dtype=torch.uint8, device=device)
        mask = torch.zeros(n, side, side, dtype=torch.bool, device=device)
        i = 0
        for p in pix:  # white padding below a word, as the processor pads; its mask marks the valid rows
            x[i:i + p.shape[0], :, :p.shape[2]] = p
            mask[i:i + p.shape[0], :-(-p.shape[2] // (crop // side))] = True
            i += p.shape[0]
        x = (x.float() - 127.5) / 127.5  # (N, 3, 448, 448)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
            f = vis.encode_crops(x, mask)
            frames, lengths, line = vision_frames(f, mask)
            # The variant's outputs per frame for every image (scene variants test raster reading with r > 1);
            # with labels, lines only (as the trainer's CTCLossModule).
            logp, lengths = ctc_log_probs(head(frames), lengths, per_frame, line if lab else None)  # (N, T*r, V+1)
            scores = lab(*merged_tokens(vis, f, mask)) if lab else None  # (N, labels)
        tgt = [units.encode(t).ids for t in texts]
        flat = torch.tensor([t for ts in tgt for t in ts], device=device)
        tl = torch.tensor([len(ts) for ts in tgt], device=device)
        ctc = F.ctc_loss(logp.transpose(0, 1), flat, lengths, tl, blank=blank, reduction="none", zero_infinity=True)
        loss = (ctc * line).sum() if lab else ctc.sum()
        if not use_ctc:
            loss = loss * 0.0
        if lab:
            loss = loss + F.binary_cross_entropy_with_logits(scores, lab.targets(texts, device), reduction="sum")
        return loss / tl.sum(), logp, lengths, scores

    def evaluate() -> dict[str, float]:
        vis.eval()
        res = {}
        with torch.no_grad():
            for t in tasks:
                right, texts = 0, data["test", t][1]
                lab_right = 0
                for i in range(0, len(texts), 50):
                    _, logp, lengths, scores = run([gpu["test", t][i:i + 50]], texts[i:i + 50])
                    for row, n, ref in zip(logp.argmax(-1).tolist(), lengths.tolist(), texts[i:i + 50]):
                        row = row[:n]
                        hyp = [u for j, u in enumerate(row) if u != blank and (j == 0 or u != row[j - 1])]
                        right += units.decode(hyp).strip() == ref
                    if scores is not None:  # a word: the top label; a scene: every label over 0.5, exactly
                        for sc, ref in zip(scores, texts[i:i + 50]):
                            got = ([lab.labels[int(sc.argmax())]] if t == "ocr"
                                   else [lab.labels[j] for j in (sc > 0).nonzero().flatten().tolist()])
                            lab_right += sorted(got) == caption_labels(ref)
                res[t] = round(right / len(texts), 3)
                if lab:
                    res[t + "_labels"] = round(lab_right / len(texts), 3)
        vis.train()
        return res

    gen = torch.Generator().manual_seed(0)
    curve, hist, step, t0 = [], [], 0, time.time()
    while time.time() - t0 < seconds:
        pix, texts = [], []
        for t in tasks:
            k = bsz // len(tasks)
            idx = torch.randint(0, gpu["train", t].shape[0], (k,), generator=gen)
            pix.append(gpu["train", t][idx.to(device)])
            texts += [data["train", t][1][i] for i in idx.tolist()]
        loss, _, _, _ = run(pix, texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        frac = min(1.0, (time.time() - t0) / seconds)  # the trainer's time-based cosine, after 100 warm-up steps
        for g in opt.param_groups:
            g["lr"] = lr * min(0.5 * (1 + math.cos(math.pi * frac)), (step + 1) / 100)
        opt.step()
        hist.append(loss.item())
        step += 1
        if step % 500 == 0:
            curve.append({"step": step, "s": round(time.time() - t0, 1), "train": round(sum(hist[-500:]) / 500, 3),
                          **evaluate()})
            print(name, curve[-1], flush=True)
    res = {"variant": name, "steps": step, "final": evaluate(), "siglip_params_m": round(params_m, 2), "curve": curve}
    Path(out).write_text(json.dumps(res))


def trainer_profile(ckpt: Path, work: Path, steps: int, device: str) -> dict:
    """`steps` steps of the trainer's vision-ctc stage on OCR + scene data: their rate, and a profile."""
    from torch.profiler import ProfilerActivity, profile

    from phi4mm.train.trainer import train
    lines = [line for t in TASKS for line in open(work / "train" / f"{t}.jsonl")][::7]  # ~2,400 samples
    data = work / "train" / "stage-probe.jsonl"
    data.write_text("".join(lines))
    res = {}
    for workers in (16,):
        out = work / f"trainer-{workers}"
        t = time.time()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            r = train(ckpt, data, "vision-ctc", out, max_steps=steps, lr=1e-3, device=device, dtype="bfloat16",
                      workers=workers, progress=False, warmup_steps=10)
        log = [json.loads(x) for x in open(out / "log.jsonl")]
        half = log[len(log) // 2]
        rate = (len(log) - len(log) // 2 - 1) / (log[-1]["elapsed_s"] - half["elapsed_s"])
        res[workers] = {"steps": r["steps"], "seconds": round(time.time() - t, 1), "steps_per_s_2nd_half": round(rate, 2),
                        "data_wait_s": round(r["data_wait_seconds"], 2),
                        "letters_per_step": round(sum(x["targets"] for x in log) / len(log), 1)}
        print("trainer", workers, res[workers], flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        if device.startswith("cuda"):
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15), flush=True)
    return res


def main() -> None:
    ap = probe_args(VARIANTS)
    ap.add_argument("--trainer-steps", type=int, default=0)
    a = ap.parse_args()
    work = Path(a.work)
    t = time.time()
    ckpt = prepare(work, a.scale)
    print(f"data + init: {time.time() - t:.0f} s", flush=True)
    report = {}
    if a.trainer_steps:
        report["trainer"] = trainer_profile(ckpt, work, a.trainer_steps, a.device)
    names = a.variants.split(",")
    inits = {n: init_checkpoint(work, VARIANTS[n][4]) for n in names}  # built here, not by 4 processes at once
    report["variants"] = run_variants(_variant, names, work / "vision-probe",
                                      lambda n, out: (n, str(inits[n]), str(work), a.device, a.seconds, out))
    Path(a.out).write_text(json.dumps(report, indent=1))
    for r in report["variants"]:
        print(f"{r['variant']:10} {r['steps']:6d} {r['final']}")


if __name__ == "__main__":
    main()
