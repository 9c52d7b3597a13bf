"""Training outputs: a complete checkpoint directory in the base's layout, and loading a PEFT adapter folder."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from phi4mm.inputs.prepare import TEXT_ADAPTER
from phi4mm.model.checkpoint import PEFT_TARGET, write_adapter_folder
from phi4mm.model.weights import MAIN, PEFT_RULE, name_table, rename_key

# ---- output: a complete checkpoint directory -----------------------------------------------------------------


def export(model, base: Path, out: Path, names: list[str], values: dict | None = None) -> None:
    """Write `out` as a checkpoint of the base's layout with the trained tensors in place (see module doc).
    values: the trained tensors by name when the model's own are shards (FSDP gathers them first)."""
    net, cfg = model.net, model.config
    table = name_table(net, cfg.layout)
    params = values if values is not None else dict(net.named_parameters())
    adapters = sorted({n.rsplit(".", 1)[1] for n in names if ".lora_" in n})
    declared = set(cfg.loras) - {TEXT_ADAPTER} if cfg.layout == "phi4mm" else set()
    for item in base.iterdir():  # config, tokenizer, processor files and untouched adapter folders
        if item.suffix == ".safetensors" or item.name == "model.safetensors.index.json" \
                or item.name.startswith("checkpoint-") or item.name == "log.jsonl" \
                or item.name in {f"{a}-lora" for a in adapters}:
            continue
        dst = out / item.name
        if item.is_dir():
            shutil.copytree(item, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst)
    # Shards: the trained tensors stored in them (towers; LoRA of the official layout) replace the old ones.
    replace = {table[n][1]: params[n].detach().cpu().contiguous() for n in names
               if table[n][0] == MAIN and not (".lora_" in n and n.rsplit(".", 1)[1] not in declared)}
    index = base / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    if index.is_file():
        shutil.copy2(index, out / index.name)
    for shard in shards:
        with safe_open(str(base / shard), framework="pt") as f:
            hit = [k for k in f.keys() if k in replace]  # noqa: SIM118 (safe_open is not iterable)
            if hit:
                tensors = {k: replace[k] if k in replace else f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
                meta = f.metadata()
        dst = out / shard
        if dst.exists():
            dst.unlink()
        if hit:
            save_file(tensors, str(dst), metadata=meta or {"format": "pt"})
        else:
            try:
                os.link(base / shard, dst)  # unchanged shard: no second copy on disk
            except OSError:
                shutil.copy2(base / shard, dst)
    for a in adapters:  # PEFT folders, the format transformers + peft and the official code read
        tensors = {rename_key(n, [PEFT_RULE]): params[n].detach().cpu().contiguous() for n in names
                   if n.endswith((".lora_A." + a, ".lora_B." + a))}
        write_adapter_folder(out, a, cfg.loras[a], tensors, PEFT_TARGET)
    if cfg.layout == "phi4mm" and adapters:  # the official config.json declares the adapter shapes
        conf = json.loads((out / "config.json").read_text())
        for a in adapters:
            if a in declared:
                lc = cfg.loras[a]
                conf[f"{a}_lora"].update(r=lc.r, lora_alpha=lc.lora_alpha, dp=lc.dropout)
        (out / "config.json").write_text(json.dumps(conf, indent=2))


