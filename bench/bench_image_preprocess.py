"""Time phi4mm.preprocess_images against transformers' Phi4MultimodalImageProcessor in one run.

    python bench/bench_image_preprocess.py [--repeats 15] [--threads N]

Both get the same PIL RGB image and return float32 [1, crops, 3, 448, 448] tensors (checked equal here).
Runs alternate ours/peer so background load hits both alike; the table shows medians (and best) in ms.
Writes bench/results/image_preprocess.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi4mm.inputs.image import preprocess_images  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "image_preprocess.json"


def _photo(width: int, height: int) -> Image.Image:
    """Photo-like content: a real photo from tests/data upscaled, plus mild noise so it is not smooth."""
    base = Image.open(ROOT / "tests" / "data" / "coffee_300x200.jpg").convert("RGB")
    big = np.asarray(base.resize((width, height), Image.BICUBIC)).astype(np.int16)
    noise = np.random.default_rng(0).integers(-8, 9, big.shape, dtype=np.int16)
    return Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8))


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import torchvision
    import transformers
    from transformers import Phi4MultimodalImageProcessor

    peer = Phi4MultimodalImageProcessor()
    cases = {"896x896": _photo(896, 896), "4000x3000": _photo(4000, 3000)}
    rows = []
    for name, image in cases.items():
        ours_fn = lambda: preprocess_images([image])                              # noqa: E731
        peer_fn = lambda: peer(images=[image], return_tensors="pt")               # noqa: E731
        # Correctness first (also warms up both).
        ours_out, peer_out = ours_fn(), peer_fn()
        max_diff = (ours_out.pixel_values - peer_out["image_pixel_values"]).abs().max().item()
        ours_t, peer_t = [], []
        for _ in range(args.repeats):                  # interleaved so load spikes hit both
            ours_t.append(_seconds(ours_fn))
            peer_t.append(_seconds(peer_fn))
        row = {
            "image": name,
            "crops": int(ours_out.pixel_values.shape[1]),
            "ours_ms": statistics.median(ours_t) * 1e3,
            "peer_ms": statistics.median(peer_t) * 1e3,
            "ours_best_ms": min(ours_t) * 1e3,
            "peer_best_ms": min(peer_t) * 1e3,
            "max_abs_pixel_diff": max_diff,
        }
        row["speedup"] = row["peer_ms"] / row["ours_ms"]
        rows.append(row)

    print(f"{'image':>10} {'crops':>5} {'ours ms':>9} {'peer ms':>9} {'ratio':>6}  (best: ours / peer)  max|diff|")
    for r in rows:
        print(f"{r['image']:>10} {r['crops']:>5} {r['ours_ms']:9.1f} {r['peer_ms']:9.1f} {r['speedup']:5.2f}x"
              f"  ({r['ours_best_ms']:.1f} / {r['peer_best_ms']:.1f})  {r['max_abs_pixel_diff']:.1e}")

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result = {
        "benchmark": "image_preprocess",
        "peer": "transformers.Phi4MultimodalImageProcessor (torchvision backend)",
        "repeats": args.repeats,
        "statistic": "median wall time of interleaved single calls, ms",
        "rows": rows,
        "env": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_at_end": load,
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "transformers": transformers.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
