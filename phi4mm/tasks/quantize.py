"""`phi4mm quantize IN OUT --method fp8|int4`: a pre-quantized copy of a checkpoint, in compressed-tensors'
format (quant_format.py), that phi4mm loads directly and vLLM / transformers can read.

Every decoder linear (qkv, o, gate_up, down) is quantized exactly as `phi4mm.load(..., quantization=)` does at
load time, so loading OUT gives the same tensors as quantizing IN while loading; with head=True
(`--quantize-head`) the tied embedding/head is too, and config.json's quantization_config targets it by name,
so OUT loads with its head quantized without the flag. Everything else (towers, norms, the embedding unless
asked, the LoRA adapter folders, tokenizer and processor files) is copied unchanged. The shards are
processed one at a time: memory holds one shard, not the model.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from phi4mm.config import ConfigError
from phi4mm.model.quant import (
    QuantizationError,
    check_method,
    int4_group,
    quantize_weight,
)
from phi4mm.model.quant_format import STORED_HEAD, STORED_WEIGHT, quantization_config
from phi4mm.model.weights import CheckpointError, shard_files

INDEX = "model.safetensors.index.json"


def _targets(layout_names: set[str]) -> list[str]:
    """One `re:` target per projection kind present (exact names would list 128 modules for the full model)."""
    base = any(n.endswith(".base_layer") for n in layout_names)
    kinds = sorted({n.split(".")[-2 if base else -1] for n in layout_names})
    tail = r"\.base_layer$" if base else "$"
    return [r"re:.*layers\.\d+\.(self_attn|mlp)\." + k + tail for k in kinds]


def quantize_checkpoint(src: str | Path, out: str | Path, method: str, device: str = "cpu",
                        head: bool = False) -> dict:
    """Write the quantized copy of checkpoint `src` to `out` -> a summary (tensors quantized, bytes before
    and after, seconds, whether the head was). `device`: where the arithmetic runs (cuda: seconds for the
    full model); head: also the tied embedding/head (a model with a separate lm_head is refused)."""
    src, out = Path(src), Path(out)
    check_method(method)
    cfg_path = src / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_path} cannot be read as JSON ({e}); IN must be a checkpoint directory") from None
    if "quantization_config" in config:
        raise CheckpointError(f"{src} is already quantized ({config['quantization_config'].get('format')}); "
                              "quantize the unquantized (bf16) checkpoint instead")
    if head and not config.get("tie_word_embeddings", True):  # transformers' default is tied
        raise QuantizationError(f"--quantize-head quantizes the tied embedding/head, but {cfg_path} has "
                                "tie_word_embeddings false (a separate lm_head); quantize without --quantize-head")
    if out.resolve() == src.resolve():
        raise CheckpointError("OUT must be a new directory, not IN itself")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; pick a new directory")
    shards = shard_files(src)
    t0 = time.perf_counter()
    # Everything but the shards and their index, as is (adapter folders, tokenizer, processor configs).
    shutil.copytree(src, out, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if Path(d) == src and
                                             (n.endswith(".safetensors") or n == INDEX)])
    weight_map, groups, before, after, n_quant = {}, {}, 0, 0, 0
    head_group: list[int | None] = []  # the head's int4 group (None for fp8), once it is written
    for p in shards:
        tensors = {}
        with safe_open(str(p), framework="pt", device=device) as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                t = f.get_tensor(name)
                before += t.numel() * t.element_size()
                m = STORED_WEIGHT.fullmatch(name)
                is_head = head and name == f"{STORED_HEAD}.weight"
                if m is None and not is_head:
                    tensors[name] = t
                    continue
                module = STORED_HEAD if is_head else m.group(1)
                group = int4_group(t.shape[1]) if method == "int4" else None
                if is_head:
                    head_group.append(group)
                else:
                    groups.setdefault(group, set()).add(module)
                # Scales are stored in bf16 (compressed-tensors' choice for bf16 models): quantize_weight
                # already rounds them there, so this cast is exact.
                for leaf, q in quantize_weight(method, t, torch.bfloat16, group).items():
                    tensors[f"{module}.{leaf}"] = q
                n_quant += 1
        for name, t in tensors.items():
            after += t.numel() * t.element_size()
            weight_map[name] = p.name
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / p.name), metadata={"format": "pt"})
        del tensors
    if n_quant == 0:
        shutil.rmtree(out)
        raise CheckpointError(f"{src} holds no decoder linear weights (model.layers.N.<proj>.weight) to quantize")
    if head and not head_group:
        shutil.rmtree(out)
        raise CheckpointError(f"{src} holds no {STORED_HEAD}.weight to quantize with --quantize-head")
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": after}, "weight_map": weight_map}, indent=2))
    try:
        import compressed_tensors
        version = compressed_tensors.__version__
    except ImportError:  # the format needs no library; the version is informative
        version = None
    targets = {g: _targets(names) for g, names in groups.items()}
    for g in head_group:  # its exact name: what says, in the checkpoint itself, that the head is quantized
        targets.setdefault(g, []).append(STORED_HEAD)
    config["quantization_config"] = quantization_config(method, targets, version)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return {"out": str(out), "method": method, "quantized": n_quant, "head": bool(head_group),
            "bytes_before": before, "bytes_after": after, "seconds": time.perf_counter() - t0}
