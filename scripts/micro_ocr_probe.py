"""Can the micro SigLIP learn to read? CTC over its patch columns, variants side by side on one GPU (a probe).

    python scripts/micro_ocr_probe.py WORK OUT_JSON [--seconds 240] [--variants a,b] [--device cuda]

As in speech (scripts/micro_ctc_probe.py), whole-word targets make an encoder learn every word as an
unrelated class, and units shared across words work better. The micro model's OCR answer is one whole-word
token, which the LM-loss vision stages do not teach (held-out OCR 0.00). This probe trains the
vision encoder of the micro init through a CTC head that reads the word's letters left to right: the rendered
word (448x112, one 448-px crop with 8 valid patch rows) goes through SigLIP, the valid rows of each of the 32
patch columns are averaged into one frame (optionally repeated to give CTC 64 frames), and a linear head maps
frames to letters + blank. Held-out words (test split: unseen font sizes) are scored by greedy exact match.
Uses WORK's micro data and init checkpoint when present (micro_ctc_probe.py makes the same ones).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from micro_ctc_probe import prepare_probe, probe_args, run_variants  # noqa: E402  (scripts/ is not a package)

# name: (lr, frames per patch column, clips per batch)
VARIANTS = {"cols-1e3": (1e-3, 1, 32), "cols-1e3-x2": (1e-3, 2, 32), "cols-3e3-x2": (3e-3, 2, 32)}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _images(data: Path) -> tuple[torch.Tensor, list[str]]:
    """OCR samples as uint8 (N, 3, 112, 448) and their words."""
    import numpy as np
    from PIL import Image
    recs = [json.loads(line) for line in open(data / "ocr.jsonl")]
    pix = [np.asarray(Image.open(data / r["messages"][0]["content"][0]["image_url"]["url"]).convert("RGB"))
           for r in recs]
    return torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2).contiguous(), [r["messages"][1]["content"]
                                                                          for r in recs]


def _variant(name: str, ckpt: str, data_file: str, device: str, seconds: float, out: str,
             batch: int | None = None) -> None:
    from phi4mm import api
    lr, rep, bsz = VARIANTS[name]
    bsz = batch or bsz
    torch.manual_seed(0)
    d = torch.load(data_file)
    m = api.load(ckpt, device, "float32")
    vis = m.net.vision
    vis.train()
    side, crop = vis.patches_per_side, vis.crop_px  # 32 patches of 14 px
    rows = -(-d["train"].shape[2] // (crop // side))  # patch rows the word image fills: 8
    head = torch.nn.Linear(vis.cfg.hidden_size, len(LETTERS) + 1, device=device)
    blank = len(LETTERS)
    params = list(vis.img_processor.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=device.startswith("cuda"))
    mask = torch.zeros(side, side, dtype=torch.bool, device=device)
    mask[:rows] = True  # (32, 32): the processor's mask for a 448x112 image on its 448x448 crop

    def run(pix: torch.Tensor, words: list[str]):
        n = pix.shape[0]
        x = torch.full((n, 3, crop, crop), 255, dtype=torch.uint8, device=device)
        x[:, :, :pix.shape[2]] = pix.to(device)  # white padding below the word, as the processor pads
        x = (x.float() - 127.5) / 127.5  # (N, 3, 448, 448)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
            f = vis.encode_crops(x, mask.expand(n, side, side))  # (N, 1024, C)
            cols = f.view(n, side, side, -1)[:, :rows].mean(1)  # (N, 32, C): one frame per patch column
            cols = cols.repeat_interleave(rep, dim=1)  # (N, 32*rep, C)
            logp = F.log_softmax(head(cols).float(), -1)  # (N, T, 27)
        tgt = [[LETTERS.index(c) for c in w] for w in words]
        flat = torch.tensor([t for ts in tgt for t in ts], device=device)
        tl = torch.tensor([len(ts) for ts in tgt], device=device)
        frames = torch.full((n,), logp.shape[1], device=device)
        loss = F.ctc_loss(logp.transpose(0, 1), flat, frames, tl, blank=blank, reduction="sum", zero_infinity=True)
        return loss / tl.sum(), logp

    def evaluate() -> float:
        vis.eval()
        right = 0
        with torch.no_grad():
            for i in range(0, len(d["test_words"]), 100):
                words = d["test_words"][i:i + 100]
                _, logp = run(d["test"][i:i + 100], words)
                for row, w in zip(logp.argmax(-1).tolist(), words):
                    hyp = "".join(LETTERS[t] for j, t in enumerate(row) if t != blank and (j == 0 or t != row[j - 1]))
                    right += hyp == w
        vis.train()
        return right / len(d["test_words"])

    gen = torch.Generator().manual_seed(0)
    curve, hist, step, t0 = [], [], 0, time.time()
    while time.time() - t0 < seconds:
        idx = torch.randint(0, d["train"].shape[0], (bsz,), generator=gen)
        loss, _ = run(d["train"][idx], [d["train_words"][i] for i in idx.tolist()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100)
        opt.step()
        hist.append(loss.item())
        step += 1
        if step % 250 == 0:
            curve.append({"step": step, "s": round(time.time() - t0, 1), "train": round(sum(hist[-250:]) / 250, 3),
                          "exact": round(evaluate(), 3)})
            print(name, curve[-1], flush=True)
    res = {"variant": name, "steps": step, "final_exact": round(evaluate(), 3), "curve": curve}
    Path(out).write_text(json.dumps(res))


def main() -> None:
    ap = probe_args(VARIANTS)
    ap.add_argument("--batch", type=int, help="images per step for every variant (default: the variant's)")
    a = ap.parse_args()
    work = Path(a.work)
    ckpt, data_file = prepare_probe(work, a.scale, "ocr.pt", _images, "words")
    results = run_variants(_variant, a.variants.split(","), work / "ocr-probe",
                           lambda n, out: (n, str(ckpt), str(data_file), a.device, a.seconds, out, a.batch))
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"{'variant':14} {'steps':>6} {'held-out exact':>15}")
    for r in results:
        print(f"{r['variant']:14} {r['steps']:6d} {r['final_exact']:15.3f}")


if __name__ == "__main__":
    main()
