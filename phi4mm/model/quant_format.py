"""compressed-tensors, the checkpoint format of quantized weights (what vLLM and transformers load).

config.json gains a `quantization_config` ({"quant_method": "compressed-tensors", "format": ...,
"config_groups": {name: {"targets": [...], "weights": {...}, "input_activations": ...}}, "ignore": [...]}) and
each quantized linear `<module>` stores, instead of `<module>.weight`:
- int4 ("pack-quantized"): `weight_packed` int32 (out, in/8), `weight_scale` (out, in/group), `weight_shape`;
- fp8 ("float-quantized"): `weight` float8_e4m3fn (out, in), `weight_scale` (out, 1).

With `--quantize-head` the tied embedding (`model.embed_tokens`) is stored the same way (its rows are the
output channels) and targeted by its exact name.

phi4mm writes symmetric int4 in groups and per-channel fp8 (declared with dynamic per-token activations, the
scheme vLLM runs on fp8 tensor cores), and reads exactly those; anything else in a config (zero points,
activation ordering, static activation scales, per-tensor scales, other bit widths) is refused by name rather
than loaded wrong. The constants are written out here so loading needs no compressed-tensors install.
"""
from __future__ import annotations

import re
from typing import Any

from phi4mm.model.quant import (
    HEAD_MODULE,
    INT4_GROUP,
    METHODS,
    MIN_GROUP,
    Plan,
    QuantizationError,
    Spec,
)

QUANT_METHOD = "compressed-tensors"
FORMATS = {"fp8": "float-quantized", "int4": "pack-quantized"}
READABLE_FORMATS = {"float-quantized": "fp8", "naive-quantized": "fp8", "pack-quantized": "int4"}
# Stored name of a decoder linear in every layout: `model.layers.N.<proj>[.base_layer]` (the official layout
# keeps PEFT's in-place wrapping, so its plain linear is `base_layer`).
DECODER_LINEAR = r"model\.layers\.\d+\.(?:self_attn\.(?:qkv|o)_proj|mlp\.(?:gate_up|down)_proj)"
STORED_WEIGHT = re.compile(rf"({DECODER_LINEAR}(?:\.base_layer)?)\.weight")
# The tied embedding/head, quantized only with `--quantize-head`: targeted by its exact name, so a
# checkpoint's config says by itself whether the head is quantized (loading needs no flag).
STORED_HEAD = "model.embed_tokens"


def _weights_args(method: str, group: int | None) -> dict[str, Any]:
    if method == "fp8":
        return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "channel",
                "dynamic": False, "actorder": None, "observer": "minmax"}
    return {"num_bits": 4, "type": "int", "symmetric": True, "group_size": group, "strategy": "group",
            "dynamic": False, "actorder": None, "observer": "minmax"}


def quantization_config(method: str, groups: dict[int | None, list[str]], version: str | None = None
                        ) -> dict[str, Any]:
    """The config.json entry for `method`; groups: int4 group size (None for fp8) -> module targets
    (exact names or `re:` patterns, compressed-tensors' matching)."""
    if method not in METHODS:
        raise QuantizationError(f"quantization {method!r} is not supported; use one of {', '.join(METHODS)}")
    acts = None
    if method == "fp8":  # dynamic per-token activations: the W8A8 scheme ("FP8_DYNAMIC" in llm-compressor)
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
                "dynamic": True, "actorder": None, "observer": None}
    config_groups = {f"group_{i}": {"targets": targets, "weights": _weights_args(method, g),
                                    "input_activations": acts, "output_activations": None,
                                    "format": FORMATS[method]}
                     for i, (g, targets) in enumerate(sorted(groups.items(), key=lambda kv: kv[0] or 0))}
    out = {"quant_method": QUANT_METHOD, "format": FORMATS[method], "quantization_status": "compressed",
           "config_groups": config_groups, "ignore": ["lm_head"], "kv_cache_scheme": None,
           "global_compression_ratio": None}
    if version:
        out["version"] = version
    return out


def _matches(target: str, name: str, kind: str) -> bool:
    """kind: the module's class as compressed-tensors names it ("Linear", "Embedding"); targets may name it."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, kind)


def _spec(where: str, group: dict[str, Any], default_format: str | None) -> Spec:
    """One config group -> Spec, or a QuantizationError naming what phi4mm cannot run."""
    fmt = group.get("format") or default_format
    w = group.get("weights") or {}
    method = READABLE_FORMATS.get(fmt)
    if method is None:
        raise QuantizationError(f"{where}: format {fmt!r} is not readable by phi4mm (it reads "
                                f"{', '.join(sorted(READABLE_FORMATS))})")
    acts = group.get("input_activations")
    if acts and not acts.get("dynamic", False):
        raise QuantizationError(f"{where}: static activation scales are not supported; quantize with dynamic "
                                "(per-token) activations or weight-only (phi4mm quantize does)")
    if not w.get("symmetric", True):
        raise QuantizationError(f"{where}: asymmetric weights (zero points) are not supported; use symmetric "
                                "quantization (phi4mm quantize writes it)")
    if w.get("actorder"):
        raise QuantizationError(f"{where}: activation-ordered groups (actorder={w['actorder']!r}, g_idx) are not "
                                "supported; quantize without actorder")
    if method == "fp8":
        if (w.get("num_bits"), w.get("type"), w.get("strategy")) != (8, "float", "channel"):
            raise QuantizationError(f"{where}: fp8 weights must be 8-bit float with per-channel scales "
                                    f"(strategy 'channel'); got {w}")
        return Spec("fp8")
    g = w.get("group_size")
    if (w.get("num_bits"), w.get("type"), w.get("strategy")) != (4, "int", "group") or not isinstance(g, int) \
            or g < MIN_GROUP or g & (g - 1):
        raise QuantizationError(f"{where}: int4 weights must be 4-bit int in groups of a power of two >= "
                                f"{MIN_GROUP} (phi4mm writes {INT4_GROUP}); got {w}")
    return Spec("int4", g)


def read_plan(config: dict[str, Any], stored_modules: dict[str, str], where: str) -> Plan | None:
    """The quantized modules a checkpoint declares: our module name -> Spec, or None if not quantized.

    stored_modules: our decoder-linear module name (and HEAD_MODULE for a tied embedding) -> its stored module
    name; where: the config's path."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise QuantizationError(f"{where}: quantization_config.quant_method {method!r} is not supported; phi4mm "
                                f"reads {QUANT_METHOD!r} checkpoints (write one with `phi4mm quantize`)")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise QuantizationError(f"{where}: quantization_status {qc.get('quantization_status')!r}: the weights "
                                "are not stored compressed; phi4mm reads 'compressed' checkpoints")
    groups = qc.get("config_groups") or {}
    specs = {name: (g.get("targets") or [], _spec(f"{where}: config_groups.{name}", g, qc.get("format")))
             for name, g in groups.items()}
    ignore = qc.get("ignore") or []
    plan = {}
    for ours, stored in stored_modules.items():
        kind = "Embedding" if ours == HEAD_MODULE else "Linear"
        if any(_matches(t, stored, kind) for t in ignore):
            continue
        for targets, spec in specs.values():
            if any(_matches(t, stored, kind) for t in targets):
                plan[ours] = spec
                break
    if len({s.method for s in plan.values()}) > 1:
        raise QuantizationError(f"{where}: mixes fp8 and int4 decoder layers; phi4mm reads one method a model")
    if HEAD_MODULE in plan and len(plan) == 1:
        raise QuantizationError(f"{where}: quantizes the embedding but no decoder linear; phi4mm quantizes the "
                                "head only with the decoder (`phi4mm quantize --quantize-head`)")
    return Plan(plan)
