"""Can the micro SigLIP tell circle, square and triangle apart when told directly? (a probe; runs on a CPU)

    python scripts/micro_shape_probe.py CHECKPOINT [--lr 1e-3] [--steps 150] [--device cpu] [--frozen | --binding]

When the model answers shape questions badly, is the vision encoder the limit or the training signal
(docs/micro-model.md)? This probe tells them apart. SigLIP
trains from the checkpoint's weights with a linear head on its mean-pooled patches, on one-shape scenes drawn
by micro.data's own scene code (400 for training, 90 held out), 8 images a step. It prints held-out accuracy
every 25 steps. CHECKPOINT: a micro init (e.g. the `init` folder scripts/micro_vision_probe.py makes), or a
trained model with --frozen (only the head trains: do its features already tell the shapes apart?).

With --binding the question is "what shape is red?" on scenes of 2-5 shapes (the asked colour appears once):
the tower stays frozen, and a head of one learned query per colour attends over its merged tokens (the ones
the projector feeds the decoder) and names the shape it finds. Do the tokens bind a colour to its shape where
the decoder can read it?
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from phi4mm import api  # noqa: E402
from phi4mm.micro import data as md  # noqa: E402


def one_shape_scenes(tag: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n scenes of exactly one shape as uint8 (n, 3, 448, 448), and each shape's index in md.SHAPES."""
    pix, labels, i = [], [], 0
    while len(pix) < n:
        img, items, _ = md._scene(random.Random(f"shape-probe-{tag}-{i}"))
        i += 1
        if len(items) == 1:
            pix.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
            labels.append(md.SHAPES.index(items[0][0]))
    return torch.stack(pix), torch.tensor(labels)


def binding_scenes(tag: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n scenes of 2-5 shapes as uint8 (n, 3, 448, 448), a colour that appears once in each (index in
    md.SHAPE_COLOURS), and the shape of that colour (index in md.SHAPES)."""
    colours = list(md.SHAPE_COLOURS)
    pix, asked, labels, i = [], [], [], 0
    while len(pix) < n:
        rng = random.Random(f"binding-probe-{tag}-{i}")
        img, items, _ = md._scene(rng)
        i += 1
        once = [c for c in colours if sum(c == b for _, b in items) == 1]
        if len(items) >= 2 and once:
            c = rng.choice(once)
            pix.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
            asked.append(colours.index(c))
            labels.append(md.SHAPES.index(next(a for a, b in items if b == c)))
    return torch.stack(pix), torch.tensor(asked), torch.tensor(labels)


def binding(a: argparse.Namespace) -> None:
    """--binding: a colour-query attention head over frozen merged tokens answers "what shape is <colour>"."""
    torch.manual_seed(0)
    vis = api.load(a.init, a.device, "float32").net.vision
    vis.eval()
    side = vis.patches_per_side
    mask = torch.ones(1, side, side, dtype=torch.bool, device=a.device)

    @torch.no_grad()
    def tokens(x: torch.Tensor) -> torch.Tensor:  # uint8 (N, 3, 448, 448) -> merged tokens (N, 256, C)
        out = []
        for k in range(0, len(x), 16):
            b = (x[k:k + 16].to(a.device).float() - 127.5) / 127.5
            out.append(vis.pool(vis.encode_crops(b, mask.expand(len(b), side, side))))
        return torch.cat(out)

    t0 = time.time()
    (xtr, ctr, ytr), (xte, cte, yte) = binding_scenes("train", a.train), binding_scenes("test", 150)
    ftr, fte = tokens(xtr), tokens(xte)
    print(f"{len(ftr)} + {len(fte)} scenes encoded ({time.time() - t0:.0f} s)", flush=True)
    width, d = ftr.shape[-1], 64
    query = torch.nn.Parameter(torch.randn(len(md.SHAPE_COLOURS), d) * 0.1)  # one per colour
    key, value = torch.nn.Linear(width, d), torch.nn.Linear(width, d)
    out = torch.nn.Linear(d, len(md.SHAPES))
    params = [query, *key.parameters(), *value.parameters(), *out.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)

    def logits(f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        att = torch.einsum("nd,ntd->nt", query[c], key(f)).div(d ** 0.5).softmax(-1)  # (N, 256)
        return out(torch.einsum("nt,ntd->nd", att, value(f)))  # (N, 3)

    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(ftr), (32,))
        loss = F.cross_entropy(logits(ftr[idx], ctr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % (a.steps // 6) == 0:
            with torch.no_grad():
                acc = (logits(fte, cte).argmax(-1) == yte).float().mean()
            print(f"step {step}: train loss {loss.item():.3f}, held-out accuracy {acc:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("init")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frozen", action="store_true", help="train the linear head only")
    ap.add_argument("--binding", action="store_true", help="'what shape is <colour>' on frozen merged tokens")
    ap.add_argument("--train", type=int, default=1200, help="--binding: training scenes")
    a = ap.parse_args()
    if a.binding:
        binding(a)
        return
    torch.manual_seed(0)
    xtr, ytr = one_shape_scenes("train", 400)
    xte, yte = one_shape_scenes("test", 90)
    vis = api.load(a.init, a.device, "float32").net.vision
    vis.train()
    head = torch.nn.Linear(vis.cfg.hidden_size, len(md.SHAPES), device=a.device)
    params = list(head.parameters()) + ([] if a.frozen else list(vis.img_processor.parameters()))
    vis.requires_grad_(not a.frozen)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    side = vis.patches_per_side
    mask = torch.ones(1, side, side, dtype=torch.bool, device=a.device)

    def logits(x: torch.Tensor) -> torch.Tensor:
        x = (x.to(a.device).float() - 127.5) / 127.5  # (N, 3, 448, 448), as the processor normalises
        return head(vis.encode_crops(x, mask.expand(len(x), side, side)).mean(1))  # (N, 1024, C) -> (N, 3)

    t0 = time.time()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(xtr), (8,))
        loss = F.cross_entropy(logits(xtr[idx]), ytr[idx].to(a.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            vis.eval()
            with torch.no_grad():
                pred = torch.cat([logits(xte[i:i + 30]).argmax(-1).cpu() for i in range(0, len(xte), 30)])
            vis.train()
            print(f"step {step}: train loss {loss.item():.3f}, held-out accuracy {(pred == yte).float().mean():.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
