"""Checkpoint loading through one declarative name table.

`RENAMES[layout]` maps each of *our* parameter names (regex, first match wins) to the tensor name in that
layout's files; `DROPPED` lists stored tensors we skip on purpose. From these, `name_table()` enumerates the
exact key set a checkpoint must hold, so loading is strict: every stored tensor is consumed or dropped on
purpose, every parameter is filled, every shape is checked, and the first mismatch is named.

The model is built on the meta device and each tensor is read from the memory-mapped safetensors file
straight into its final device and dtype: there is never a second copy of the weights in memory.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from phi4mm.config import ConfigError, ModelConfig
from phi4mm.model.lora import LoraLinear
from phi4mm.model.network import Phi4MM
from phi4mm.model.quant import (
    HEAD_MODULE,
    LoadTimeQuantizer,
    Plan,
    QuantizationError,
    convert,
)
from phi4mm.model.quant_format import read_plan

MAIN = "main"  # the shards; an adapter name ("vision"/"speech") means that adapter's PEFT folder

_DEC = r"(self_attn\.(?:qkv|o)_proj|mlp\.(?:gate_up|down)_proj)"
# A decoder linear's base tensors: `weight`, or a quantized one's (compressed-tensors names, quant_format.py).
_BASE = r"\.(weight|weight_packed|weight_scale|weight_shape)"
QUANT_DTYPES = (torch.float8_e4m3fn, torch.int32, torch.int64)  # stored as they are, never cast
IMAGE_PREFIX = "model.embed_tokens_extend.image_embed."
AUDIO_PREFIX = "model.embed_tokens_extend.audio_embed."
_TEXT_COMMON = [
    (r"embed_tokens" + _BASE, r"model.embed_tokens.\1"),  # dense, or quantized with the head
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", r"model.layers.\1.\2.weight"),
]
_HF_TOWERS = [(r"vision\.(.+)", IMAGE_PREFIX + r"\1"), (r"audio\.(.+)", AUDIO_PREFIX + r"\1")]
# PEFT adapter folders (both layouts): no adapter name in the key; either prefix occurs in the wild.
PEFT_RULE = (r"layers\.(\d+)\." + _DEC + r"\.lora_([AB])\.\w+", r"base_model.model.model.layers.\1.\2.lora_\3.weight")

RENAMES: dict[str, list[tuple[str, str]]] = {
    # Official directory: PEFT injected in place (base_layer, lora_A.vision...), original tower names.
    "phi4mm": _TEXT_COMMON + [
        (r"layers\.(\d+)\." + _DEC + _BASE, r"model.layers.\1.\2.base_layer.\3"),
        (r"layers\.(\d+)\." + _DEC + r"\.lora_([AB])\.(\w+)", r"model.layers.\1.\2.lora_\3.\4.weight"),
        (r"vision\.img_projection_up\.(\w+)", IMAGE_PREFIX + r"img_projection.0.\1"),
        (r"vision\.img_projection_down\.(\w+)", IMAGE_PREFIX + r"img_projection.2.\1"),
        (r"vision\.global_img_feature_extensor", IMAGE_PREFIX + "glb_GN"),
        (r"vision\.sub_img_feature_extensor", IMAGE_PREFIX + "sub_GN"),
        (r"audio\.(encoder\.encoders\.\d+\.feed_forward_(?:in|out))\.gate_up_proj\.(\w+)", AUDIO_PREFIX + r"\1.net.0.linear.\2"),
        (r"audio\.(encoder\.encoders\.\d+\.feed_forward_(?:in|out))\.down_proj\.(\w+)", AUDIO_PREFIX + r"\1.net.2.\2"),
        (r"audio\.(encoder\.encoders\.\d+\.self_attn)\.([qkv])_proj\.(\w+)", AUDIO_PREFIX + r"\1.linear_\2.\3"),
        (r"audio\.(encoder\.encoders\.\d+\.self_attn)\.o_proj\.(\w+)", AUDIO_PREFIX + r"\1.linear_out.\2"),
        (r"audio\.up_proj_for_speech\.(\w+)", AUDIO_PREFIX + r"audio_projection.speech.0.\1"),
        (r"audio\.down_proj_for_speech\.(\w+)", AUDIO_PREFIX + r"audio_projection.speech.2.\1"),
        (r"audio\.up_proj_for_vision_speech\.(\w+)", AUDIO_PREFIX + r"audio_projection.vision.0.\1"),
        (r"audio\.down_proj_for_vision_speech\.(\w+)", AUDIO_PREFIX + r"audio_projection.vision.2.\1"),
    ] + _HF_TOWERS,
    # transformers-native: plain linears in the shards, adapters only in the PEFT folders.
    "phi4_multimodal": _TEXT_COMMON + [
        (r"layers\.(\d+)\." + _DEC + _BASE, r"model.layers.\1.\2.\3"),
    ] + _HF_TOWERS,
    "phi3": _TEXT_COMMON + [(r"layers\.(\d+)\." + _DEC + _BASE, r"model.layers.\1.\2.\3")],
}


def dropped(cfg: ModelConfig) -> list[str]:
    """Regexes of stored tensors skipped on purpose (stored but unused by the original too)."""
    out = []
    if cfg.vision is not None:
        last = cfg.vision.num_hidden_layers - 1  # features come from layer -2: the last layer never runs
        out += [re.escape(IMAGE_PREFIX) + rf"img_processor\.encoder\.layers\.{last}\..+",
                re.escape(IMAGE_PREFIX) + r"img_processor\.(post_layernorm|head)\..+"]
    if cfg.text.tie_word_embeddings:
        out.append(r"lm_head\.weight")  # a tied copy, if the writer stored one
    return out


class CheckpointError(ValueError):
    """The checkpoint does not match its config; the message names the file and tensor and what to do."""


def rename_key(ours: str, rules: list[tuple[str, str]]) -> str:
    for pat, repl in rules:
        m = re.fullmatch(pat, ours)
        if m:
            return m.expand(repl)
    raise CheckpointError(f"no name-table rule for parameter {ours!r}")  # a bug in phi4mm, not in the files


def name_table(model: Phi4MM, layout: str) -> dict[str, tuple[str, str]]:
    """our name -> (source, stored name). source is MAIN or an adapter folder name."""
    rules = RENAMES[layout]
    table = {}
    for ours in model.state_dict():
        lora = re.fullmatch(r"layers\.\d+\.\S+\.lora_[AB]\.(\w+)", ours)
        if lora and layout != "phi4mm":
            table[ours] = (lora.group(1), rename_key(ours, [PEFT_RULE]))
        else:
            table[ours] = (MAIN, rename_key(ours, rules))
    return table


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map); re-copy it") from None
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path} has no model.safetensors and no model.safetensors.index.json: "
                              "it is not a checkpoint directory (or the download is incomplete)")
    out = []
    for f in files:
        p = path / f
        if not p.is_file():
            raise CheckpointError(f"shard {p} named by the index is missing: re-download it")
        out.append(p)
    return out


def _adapter_file(path: Path, name: str) -> Path:
    folder = path / f"{name}-lora"
    f = folder / "adapter_model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"adapter folder {folder} (with adapter_model.safetensors) is missing; copy the "
                              f"checkpoint's {name}-lora/ folder, or load with adapters=False for text only")
    return f


def _open(p: Path, device: str):
    try:
        return safe_open(str(p), framework="pt", device=device)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{p} cannot be read as safetensors ({e}); the file is truncated or corrupt: "
                              "re-download it") from None


def load_weights(model: Phi4MM, path: Path, layout: str, device: str, dtype: torch.dtype,
                 skip_lora: bool = False, quantizer: LoadTimeQuantizer | None = None) -> None:
    """Fill every parameter of the meta-built `model` from the checkpoint at `path`, strictly.

    skip_lora: the model was built without adapters; stored LoRA tensors are dropped on purpose.
    quantizer: quantize these dense decoder weights as they are read (`quantization=` at load); a checkpoint
    that is already quantized needs none: `prequantized_plan` + `quant.convert` give the model its layout.
    """
    table = name_table(model, layout)
    expected = model.state_dict()
    drop = [re.compile(p) for p in dropped(model.cfg)]
    sources: dict[str, list[Path]] = {MAIN: shard_files(path)}
    for src in sorted({s for s, _ in table.values()} - {MAIN}):
        sources[src] = [_adapter_file(path, src)]
    # stored name -> our name, per source; PEFT prefixes vary, so adapter keys are matched without prefix.
    wanted = {src: {} for src in sources}
    for ours, (src, stored) in table.items():
        key = _strip_peft(stored) if src != MAIN else stored
        wanted[src][key] = ours
    state: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for src, files in sources.items():
        for p in files:
            with _open(p, device) as f:
                for stored in f.keys():
                    key = _strip_peft(stored) if src != MAIN else stored
                    ours = wanted[src].get(key)
                    if ours is None:
                        if src == MAIN and any(d.fullmatch(stored) for d in drop):
                            continue
                        if skip_lora and re.search(r"\.lora_[AB]\.", stored):
                            continue
                        if src == MAIN and re.search(r"\.lora_[AB]\.", stored) and layout == "phi4mm":
                            raise CheckpointError(f"{p.name}: tensor {stored!r} belongs to an adapter that "
                                                  "config.json does not declare (vision_lora/speech_lora)")
                        if re.search(r"\.weight_(packed|scale|shape|zero_point)$|\.input_scale$", stored):
                            raise CheckpointError(f"{p}: quantized tensor {stored!r} is not a decoder linear "
                                                  "(or the embedding) that config.json's quantization_config "
                                                  "targets; phi4mm quantizes only the decoder's linears (qkv, "
                                                  "o, gate_up, down) and, with --quantize-head, the tied "
                                                  "embedding, symmetric, without static activation scales")
                        raise CheckpointError(f"{p}: unexpected tensor {stored!r}: this file does not match a "
                                              f"{layout!r} checkpoint with this config.json")
                    want = expected[ours]
                    shape = tuple(f.get_slice(stored).get_shape())
                    if shape != tuple(want.shape):
                        raise CheckpointError(f"{p.name}: tensor {stored!r} has shape {shape}, but config.json "
                                              f"implies {tuple(want.shape)}; the config and weights disagree")
                    t = f.get_tensor(stored)
                    seen.add(ours)
                    if want.dtype in QUANT_DTYPES:
                        _check_quantized(model, p, stored, ours, t, want.dtype)
                        state[ours] = t
                    elif quantizer is not None and quantizer.wants(ours):
                        state.update(quantizer.take(ours, t.to(dtype), dtype))  # the dense copy is dropped here
                    else:
                        state[ours] = t.to(dtype) if t.is_floating_point() else t
    missing = [ours for ours in table if ours not in seen]
    if missing:
        src, stored = table[missing[0]]
        where = "the shards" if src == MAIN else f"{src}-lora/adapter_model.safetensors"
        raise CheckpointError(f"tensor {stored!r} is missing from {where} ({len(missing)} missing in all); "
                              "the checkpoint is incomplete or a shard is truncated: re-download it")
    if quantizer is not None:
        convert(model, quantizer.plan)  # meta modules take the quantized layout the state now has
    model.load_state_dict(state, strict=True, assign=True)


def _check_quantized(model: Phi4MM, p: Path, stored: str, ours: str, t: torch.Tensor, want: torch.dtype) -> None:
    """A stored quantized tensor has the dtype its format fixes, and `weight_shape` the layer's shape."""
    if t.dtype != want:
        raise CheckpointError(f"{p.name}: tensor {stored!r} is {t.dtype}, but config.json's quantization_config "
                              f"makes it {want}; the config and weights disagree")
    if ours.endswith(".weight_shape"):
        layer = model.get_submodule(ours.rpartition(".")[0])
        if t.tolist() != [layer.out_features, layer.in_features]:
            raise CheckpointError(f"{p.name}: tensor {stored!r} says the weight is {t.tolist()}, but config.json "
                                  f"implies {[layer.out_features, layer.in_features]}; the config and weights "
                                  "disagree")


def prequantized_plan(model: Phi4MM, path: Path, layout: str) -> Plan | None:
    """What config.json's quantization_config quantizes (None: nothing), checked against what phi4mm runs."""
    f = path / "config.json"
    try:
        config = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f} cannot be read as JSON ({e})") from None
    stored = {n: rename_key(f"{n}.weight", RENAMES[layout]).rpartition(".")[0]
              for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    if model.lm_head is None:  # tied: the embedding may be stored quantized (`phi4mm quantize --quantize-head`)
        stored[HEAD_MODULE] = rename_key(f"{HEAD_MODULE}.weight", RENAMES[layout]).rpartition(".")[0]
    try:
        return read_plan(config, stored, str(f))
    except QuantizationError as e:
        raise CheckpointError(str(e)) from None


def _strip_peft(key: str) -> str:
    """PEFT folders write `base_model.model.model.layers...` (official) or `model.layers...` (converter)."""
    return re.sub(r"^(base_model\.model\.)?(model\.)?", "", key)


def lora_configs_from_folders(path: Path, names: tuple[str, ...] = ("vision", "speech")) -> dict:
    """Read r / lora_alpha / dropout from `<name>-lora/adapter_config.json` (transformers-native layout)."""
    from phi4mm.config import LoraConfig
    out = {}
    for name in names:
        f = path / f"{name}-lora" / "adapter_config.json"
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
            out[name] = LoraConfig(r=int(d["r"]), lora_alpha=float(d["lora_alpha"]),
                                   dropout=float(d.get("lora_dropout", 0.0)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ConfigError(f"{f} is not a valid PEFT adapter_config.json (needs r and lora_alpha)") from None
    return out


LORA_PARAM = r"layers\.\d+\.(self_attn|mlp)\.\w+\.lora_[AB]\.{}"
