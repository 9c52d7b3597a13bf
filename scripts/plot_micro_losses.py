"""Loss curves of a micro recipe run (docs/micro-model.md): one panel per stage, per-target-token loss.

usage: python scripts/plot_micro_losses.py RUN_DIR OUT.png [TITLE]   (needs matplotlib)
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

run, out = Path(sys.argv[1]), Path(sys.argv[2])
logs = sorted(p for p in (run / "stages").glob("*/log.jsonl") if p.stat().st_size)
rows = 1 if len(logs) <= 2 else 2  # a run extended by a stage or two (micro.extend_run) logs only those
cols = -(-len(logs) // rows)
fig, axes = plt.subplots(rows, cols, figsize=(max(5.0, 3.2 * cols), 2.8 * rows + 0.4), squeeze=False)
for ax, log in zip(axes.flat, logs):
    rows = [json.loads(line) for line in log.open()]
    loss = [r["loss"] for r in rows]
    k = max(1, len(loss) // 50)  # moving average over ~2% of the steps
    smooth = [sum(loss[max(0, i - k + 1): i + 1]) / len(loss[max(0, i - k + 1): i + 1]) for i in range(len(loss))]
    ax.plot(loss, color="0.8", lw=0.5)
    ax.plot(smooth, color="C0", lw=1.2)
    ax.set_title(log.parent.name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylim(0, min(8, max(smooth) * 1.1))
    ax.tick_params(labelsize=7)
for ax in list(axes.flat)[len(logs):]:
    ax.axis("off")
fig.suptitle(sys.argv[3] if len(sys.argv) > 3 else str(run), fontsize=10)
fig.tight_layout()
fig.savefig(out, dpi=90)
print(out)
