"""`phi4mm make-checkpoint`: random-weight directories laid out exactly like the published ones.

No model hub is reachable from our machines, so tests, benchmarks and new users work on these. The official
layout has config.json (remote-code form), sharded safetensors with an index, the `vision-lora/` and
`speech-lora/` PEFT folders, generation/preprocessor configs and tokenizer files; the transformers-native
layout is what `Phi4MultimodalForCausalLM.save_pretrained` plus the converter's adapter folders give.

Each tensor's values come from its own generator seeded by (seed, canonical name), so the same seed gives
the same weights in both layouts, whatever the order of writing.
"""
from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from phi4mm.config import ModelConfig

LONG_FACTOR = [1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
               2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
               5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
               11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
               25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
               32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77]
VISION_LORA_TARGET = r"layers.*((self_attn\.(qkv_proj|o_proj))|(mlp\.(gate_up|down)_proj))"
SPEECH_LORA_TARGET = r"((layers.*self_attn\.(qkv|o)_proj)|(layers.*mlp\.(gate_up|down)_proj))"
PEFT_TARGET = r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"

# The published config.json (official layout); its values are summarised in docs/architecture.md#the-model.
OFFICIAL_CONFIG = {
    "architectures": ["Phi4MMForCausalLM"], "model_type": "phi4mm", "attention_bias": False,
    "attention_dropout": 0.0,
    "audio_processor": {"name": "cascades", "config": {
        "activation": "swish", "attention_dim": 1024, "attention_heads": 16, "batch_norm": False,
        "bias_in_glu": True, "causal": True, "chunk_size": -1, "cnn_layer_norm": True, "conv_activation": "swish",
        "conv_glu_type": "swish", "depthwise_multiplier": 1, "depthwise_seperable_out_channel": 1024,
        "dropout_rate": 0.0, "encoder_embedding_config": {"input_size": 80}, "ext_pw_kernel_size": 1,
        "ext_pw_out_channel": 1024, "input_layer": "nemo_conv", "input_size": 80, "kernel_size": 3,
        "left_chunk": 18, "linear_units": 1536, "nemo_conv_settings": {"conv_channels": 1024}, "num_blocks": 24,
        "relative_attention_bias_args": {"t5_bias_max_distance": 500, "type": "t5"}, "time_reduction": 8}},
    "auto_map": {"AutoConfig": "configuration_phi4mm.Phi4MMConfig",
                 "AutoModelForCausalLM": "modeling_phi4mm.Phi4MMForCausalLM", "AutoTokenizer": "Xenova/gpt-4o"},
    "bos_token_id": 199999,
    "embd_layer": {
        "audio_embd_layer": {"compression_rate": 8, "downsample_rate": 1, "embedding_cls": "audio",
                             "enable_gradient_checkpointing": True, "projection_cls": "mlp",
                             "use_conv_downsample": False, "use_qformer": False},
        "embedding_cls": "image_audio",
        "image_embd_layer": {"crop_size": 448, "embedding_cls": "tune_image", "enable_gradient_checkpointing": True,
                             "hd_transform_order": "sub_glb", "image_token_compression_cls": "avg_pool_2d",
                             "projection_cls": "mlp", "use_hd_transform": True, "with_learnable_separator": True}},
    "embd_pdrop": 0.0, "eos_token_id": 199999, "full_attn_mod": 1, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 8192, "interpolate_factor": 1, "lm_head_bias": False,
    "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 24, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "original_max_position_embeddings": 4096, "pad_token_id": 199999,
    "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": LONG_FACTOR, "short_factor": [1.0] * 48, "type": "longrope"},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.46.1", "use_cache": True, "vocab_size": 200064,
    "speech_lora": {"dp": 0.01, "layer": SPEECH_LORA_TARGET, "lora_alpha": 640, "r": 320},
    "vision_lora": {"dp": 0.0, "layer": VISION_LORA_TARGET, "lora_alpha": 512, "r": 256},
}

# Tiny: the same structure with few layers and small widths (vocab stays: the tokenizer is the real one).
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}  # head_dim 16 -> rotary 12 -> 6 LongRoPE factors
TINY_VISION = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4}
TINY_AUDIO = {"attention_dim": 64, "attention_heads": 4, "linear_units": 96, "num_blocks": 2,
              "nemo_conv_settings": {"conv_channels": 64}, "ext_pw_out_channel": 64,
              "depthwise_seperable_out_channel": 64}
TINY_LORA = {"vision": (8, 16), "speech": (10, 20)}
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 199999, "eos_token_id": [200020, 199999],
                     "pad_token_id": 199999, "transformers_version": "4.46.1"}


def official_config(size: str) -> dict:
    if size == "full":
        return copy.deepcopy(OFFICIAL_CONFIG)
    if size != "tiny":
        raise ValueError(f"size {size!r} is not known; use 'tiny' or 'full'")
    return scaled_config(TINY_TEXT, TINY_VISION, TINY_AUDIO, TINY_LORA)


def scaled_config(text: dict, vision: dict, audio: dict, lora: dict[str, tuple[int, int]]) -> dict:
    """The published config.json with smaller sizes: `text` keys over the decoder's, `vision` as the vision
    tower's, `audio` over the audio encoder's (original names), `lora` name -> (r, alpha)."""
    d = copy.deepcopy(OFFICIAL_CONFIG)
    d.update(text)
    half = text["hidden_size"] // text["num_attention_heads"] * 3 // 8  # rotary_dim / 2 (partial rotary 0.75)
    # Keep real-looking long factors (not ones) so the long-context path is exercised.
    d["rope_scaling"] = {"type": "longrope", "short_factor": [1.0] * half,
                         "long_factor": LONG_FACTOR[:: len(LONG_FACTOR) // half][:half]}
    d["vision_config"] = dict(vision)  # our extension: the published file has no vision sizes
    d["audio_processor"]["config"].update(copy.deepcopy(audio))  # nested dicts: the caller's stay untouched
    for name, (r, alpha) in lora.items():
        d[f"{name}_lora"].update(r=r, lora_alpha=alpha)
    return d


def hf_config(cfg: ModelConfig) -> dict:
    """The transformers-native config.json for the same model."""
    t, v, a = cfg.text, cfg.vision, cfg.audio
    return {
        "architectures": ["Phi4MultimodalForCausalLM"], "model_type": "phi4_multimodal",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "hidden_act": "silu", "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "original_max_position_embeddings": t.original_max_position_embeddings,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": t.rope_theta,
                            "partial_rotary_factor": t.partial_rotary_factor,
                            "original_max_position_embeddings": t.original_max_position_embeddings,
                            "short_factor": t.short_factor, "long_factor": t.long_factor},
        "tie_word_embeddings": t.tie_word_embeddings, "bos_token_id": t.bos_token_id, "pad_token_id": t.pad_token_id,
        "eos_token_id": [199999, 200020], "sliding_window": 262144, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "dtype": "bfloat16",
        "transformers_version": "5.17.0",
        "vision_config": {"model_type": "phi4_multimodal_vision", "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
                          "num_attention_heads": v.num_attention_heads, "image_size": v.image_size,
                          "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps, "crop_size": v.crop_size,
                          "feature_layer": v.feature_layer, "hidden_act": "gelu_pytorch_tanh"},
        "audio_config": {"model_type": "phi4_multimodal_audio", **{k: getattr(a, k) for k in (
            "hidden_size", "intermediate_size", "num_blocks", "num_attention_heads", "activation", "chunk_size",
            "left_chunk", "ext_pw_out_channel", "depthwise_separable_out_channel", "depthwise_multiplier",
            "kernel_size", "conv_activation", "input_size", "conv_glu_type", "time_reduction",
            "bias_max_distance", "bias_symmetric", "nemo_activation", "nemo_conv_channels", "downsample_rate")}},
    }


def unused_vision_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Stored-but-unused SigLIP tensors (last layer, post_layernorm, MAP head), keyed by HF-native name."""
    v = cfg.vision
    c, i, last = v.hidden_size, v.intermediate_size, v.num_hidden_layers - 1
    p = f"img_processor.encoder.layers.{last}."
    shapes = {p + "layer_norm1.weight": (c,), p + "layer_norm1.bias": (c,), p + "layer_norm2.weight": (c,),
              p + "layer_norm2.bias": (c,), p + "mlp.fc1.weight": (i, c), p + "mlp.fc1.bias": (i,),
              p + "mlp.fc2.weight": (c, i), p + "mlp.fc2.bias": (c,)}
    for proj in "qkv":
        shapes[p + f"self_attn.{proj}_proj.weight"], shapes[p + f"self_attn.{proj}_proj.bias"] = (c, c), (c,)
    shapes[p + "self_attn.out_proj.weight"], shapes[p + "self_attn.out_proj.bias"] = (c, c), (c,)
    h = "img_processor.head."
    shapes.update({"img_processor.post_layernorm.weight": (c,), "img_processor.post_layernorm.bias": (c,),
                   h + "probe": (1, 1, c), h + "attention.in_proj_weight": (3 * c, c),
                   h + "attention.in_proj_bias": (3 * c,), h + "attention.out_proj.weight": (c, c),
                   h + "attention.out_proj.bias": (c,), h + "layernorm.weight": (c,), h + "layernorm.bias": (c,),
                   h + "mlp.fc1.weight": (i, c), h + "mlp.fc1.bias": (i,), h + "mlp.fc2.weight": (c, i),
                   h + "mlp.fc2.bias": (c,)})
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], seed: int, device: str = "cpu") -> torch.Tensor:
    """Deterministic, well-scaled random values: activations stay O(1) through any depth of tiny model.

    Values depend on (seed, name, device type): a CUDA generator makes full-size weights in seconds.
    """
    g = torch.Generator(device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    kw = {"generator": g, "device": device}
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight" or name.endswith("global_invstd"):
        return 1.0 + 0.1 * torch.rand(shape, **kw)  # norm gains and inverse std stay positive
    if name.endswith("embed_tokens.weight"):
        return 0.02 * torch.randn(shape, **kw)
    if len(shape) <= 1 or leaf in ("b1", "b2") or name.endswith("global_mean"):
        return 0.05 * torch.randn(shape, **kw)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    # Trained LoRA updates are small next to the base weights; random full-size ones would swamp them.
    gain = 0.1 if ".lora_B." in name else 1.0
    return gain * torch.randn(shape, **kw) / fan_in ** 0.5


def write_shards(tensors: dict[str, torch.Tensor], out: Path, n_shards: int) -> None:
    names = sorted(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    per = total / n_shards
    shards, cur, size = [], [], 0
    for k in names:
        cur.append(k)
        size += tensors[k].numel() * tensors[k].element_size()
        if size >= per * (len(shards) + 1) and len(shards) < n_shards - 1:
            shards.append(cur)
            cur = []
    shards.append(cur)
    weight_map = {}
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_adapter_folder(out: Path, name: str, lora, tensors: dict[str, torch.Tensor], target: str) -> None:
    folder = out / f"{name}-lora"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.dropout, "target_modules": target, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "base_model_name_or_path": None}, indent=2))


