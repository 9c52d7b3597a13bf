"""Load a LoRA adapter folder (PEFT layout) into a loaded network, beside its other adapters."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from phi4mm.config import LoraConfig
from phi4mm.model.lora import LoraLinear
from phi4mm.model.weights import LORA_PARAM, PEFT_RULE, rename_key


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
    wanted = {rename_key(n, [PEFT_RULE]): n for n in params if re.fullmatch(LORA_PARAM.format(re.escape(name)), n)}
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
