"""Training outputs: a complete checkpoint directory in the base's layout, and loading a PEFT adapter folder."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpoint import PEFT_TARGET, _adapter_folder
from .config import LoraConfig
from .lora import LoraLinear
from .processor import TEXT_ADAPTER
from .weights import _PEFT, MAIN, _rename, name_table

_LORA = r"layers\.\d+\.(self_attn|mlp)\.\w+\.lora_[AB]\.{}"


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
        tensors = {_rename(n, [_PEFT]): params[n].detach().cpu().contiguous() for n in names
                   if n.endswith((".lora_A." + a, ".lora_B." + a))}
        _adapter_folder(out, a, cfg.loras[a], tensors, PEFT_TARGET)
    if cfg.layout == "phi4mm" and adapters:  # the official config.json declares the adapter shapes
        conf = json.loads((out / "config.json").read_text())
        for a in adapters:
            if a in declared:
                lc = cfg.loras[a]
                conf[f"{a}_lora"].update(r=lc.r, lora_alpha=lc.lora_alpha, dp=lc.dropout)
        (out / "config.json").write_text(json.dumps(conf, indent=2))


def load_adapter(model, folder: str | Path, name: str) -> None:
    """Add a PEFT LoRA folder (e.g. out/text-lora) to a loaded model as adapter `name`, strictly."""
    folder = Path(folder)
    conf_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not conf_file.is_file() or not weights.is_file():
        raise ValueError(f"{folder} is not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    d = json.loads(conf_file.read_text())
    lc = LoraConfig(r=int(d["r"]), lora_alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout", 0.0)))
    net = model.net
    for m in net.modules():
        if isinstance(m, LoraLinear):
            m.add_adapter(name, lc)
    stored = load_file(str(weights))
    params = dict(net.named_parameters())
    wanted = {_rename(n, [_PEFT]): n for n in params if re.fullmatch(_LORA.format(re.escape(name)), n)}
    if set(stored) != set(wanted):
        diff = sorted(set(stored) ^ set(wanted))
        raise ValueError(f"{weights} does not fit this model: {len(diff)} mismatched tensors, first {diff[0]!r}")
    with torch.no_grad():
        for key, n in wanted.items():
            if stored[key].shape != params[n].shape:
                raise ValueError(f"{weights}: {key!r} has shape {tuple(stored[key].shape)}, the model needs "
                                 f"{tuple(params[n].shape)}")
            params[n].copy_(stored[key])
    model.config.loras[name] = lc
