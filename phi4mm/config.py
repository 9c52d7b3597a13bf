"""Configuration: one plain dataclass per tower, with the field names of the HF `config.json`.

Three checkpoint layouts are read:
- `phi4mm`           the official Phi-4-multimodal-instruct directory (remote-code config),
- `phi4_multimodal`  the transformers-native conversion,
- `phi3`             Phi-4-mini-instruct (text only).

transformers' own config defaults are wrong for this checkpoint (32 heads, untied embeddings, audio bias
distance 1000, ...), so every default below is the value of the *published* checkpoint, never HF's.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_TOKEN_ID = 200010  # `<|endoftext10|>`: the image placeholder of the published tokenizer
AUDIO_TOKEN_ID = 200011  # `<|endoftext11|>`: the audio placeholder
LEGACY_IMAGE_RANGE = (-9999, -1)  # the original processor's negative ids for images...
LEGACY_AUDIO_MAX = -10000  # ...and for audio: (-inf, -10000]


class ConfigError(ValueError):
    """A config.json that phi4mm cannot use; the message names the file and the field."""


def _pick(cls, d: dict[str, Any], **renamed: Any):
    """Build dataclass `cls` from the keys of `d` it knows (unknown keys are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    kw.update({k: v for k, v in renamed.items() if v is not None})
    return cls(**kw)


@dataclass
class TextConfig:
    """Phi-4-mini decoder."""

    vocab_size: int = 200064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 24
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.75
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    short_factor: list[float] | None = None  # None: all ones (plain RoPE)
    long_factor: list[float] | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int = 199999
    pad_token_id: int = 199999
    eos_token_id: list[int] = field(default_factory=lambda: [200020, 199999])

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        half = self.rotary_dim // 2
        for name in ("short_factor", "long_factor"):
            f = getattr(self, name)
            if f is None:
                setattr(self, name, [1.0] * half)
            elif len(f) != half:
                raise ConfigError(f"rope_scaling.{name} has {len(f)} entries; this model's rotary dimension "
                                  f"{self.rotary_dim} needs {half}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        # Partial rotary: 0.75 * 128 = 96 dims rotate, the last 32 of each head pass through.
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_scaling_factor(self) -> float:
        """LongRoPE attention scaling for short *and* long factors (docs/architecture.md#decoder-and-longrope)."""
        scale = self.max_position_embeddings / self.original_max_position_embeddings
        if scale <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))


@dataclass
class VisionConfig:
    """SigLIP-so400m-patch14-448 (NaViT position ids) + HD crops + projector. The official config.json has
    no vision sizes (the remote code hard-codes them), so these defaults are the real model's."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27  # stored in the checkpoint; only the first 26 run (feature layer -2)
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    crop_size: int = 448
    feature_layer: int = -2

    @property
    def num_layers_run(self) -> int:
        # hidden_states has num_hidden_layers + 1 entries; feature_layer -2 is the output of layer L-1.
        return self.num_hidden_layers + 1 + self.feature_layer

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size  # 448 / 14 = 32


@dataclass
class AudioConfig:
    """Conformer speech encoder (field names of the transformers-native config)."""

    hidden_size: int = 1024
    intermediate_size: int = 1536
    num_blocks: int = 24
    num_attention_heads: int = 16
    activation: str = "swish"
    chunk_size: int = -1
    left_chunk: int = 18
    ext_pw_out_channel: int = 1024
    depthwise_separable_out_channel: int = 1024
    depthwise_multiplier: int = 1
    kernel_size: int = 3
    conv_activation: str = "swish"
    input_size: int = 80
    conv_glu_type: str = "swish"
    time_reduction: int = 8
    bias_max_distance: int = 500  # official t5_bias_max_distance; HF's default 1000 is wrong here
    bias_symmetric: bool = False
    nemo_activation: str = "relu"
    nemo_conv_channels: int = 1024
    downsample_rate: int = 1

    @classmethod
    def from_official(cls, d: dict[str, Any]) -> AudioConfig:
        """From config.json `audio_processor.config` of the official directory (original names)."""
        rel = d.get("relative_attention_bias_args") or {}
        return _pick(cls, d,
                     hidden_size=d.get("attention_dim"),
                     num_attention_heads=d.get("attention_heads"),
                     intermediate_size=d.get("linear_units"),
                     nemo_conv_channels=(d.get("nemo_conv_settings") or {}).get("conv_channels"),
                     depthwise_separable_out_channel=d.get("depthwise_seperable_out_channel"),
                     bias_max_distance=rel.get("t5_bias_max_distance"))


@dataclass
class LoraConfig:
    r: int
    lora_alpha: float
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r


@dataclass
class ModelConfig:
    text: TextConfig
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    # Adapter names are the ones the model card and PEFT folders use: "vision" and "speech".
    loras: dict[str, LoraConfig] = field(default_factory=dict)
    layout: str = "phi4mm"  # phi4mm | phi4_multimodal | phi3
    image_token_id: int = IMAGE_TOKEN_ID
    audio_token_id: int = AUDIO_TOKEN_ID
    dynamic_hd: int = 36  # max HD crops per image (preprocessor_config.json)

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a parsed config.json of any supported layout."""
        mt = d.get("model_type")
        if mt == "phi4mm":
            return cls._from_official(d)
        if mt == "phi4_multimodal":
            return cls._from_transformers(d)
        if mt == "phi3":
            return cls(text=_text_from(d, d.get("rope_scaling")), layout="phi3")
        raise ConfigError(f"{source}: model_type {mt!r} is not supported; phi4mm reads 'phi4mm' (official "
                          "Phi-4-multimodal-instruct), 'phi4_multimodal' (transformers-native) and 'phi3' "
                          "(Phi-4-mini-instruct)")

    @classmethod
    def _from_official(cls, d: dict[str, Any]) -> ModelConfig:
        text = _text_from(d, d.get("rope_scaling"))
        # Our tiny fixtures add `vision_config`; the published file has none and uses the SigLIP defaults.
        vision = _pick(VisionConfig, d.get("vision_config") or {})
        img = (d.get("embd_layer") or {}).get("image_embd_layer") or {}
        if "crop_size" in img:
            vision.crop_size = img["crop_size"]
        audio_d = (d.get("audio_processor") or {}).get("config")
        audio = AudioConfig.from_official(audio_d) if audio_d else None
        loras = {}
        for name in ("vision", "speech"):
            lc = d.get(f"{name}_lora")
            if lc:
                loras[name] = LoraConfig(r=lc["r"], lora_alpha=lc["lora_alpha"], dropout=lc.get("dp", 0.0))
        return cls(text=text, vision=vision, audio=audio, loras=loras, layout="phi4mm")

    @classmethod
    def _from_transformers(cls, d: dict[str, Any]) -> ModelConfig:
        text = _text_from(d, d.get("rope_parameters") or d.get("rope_scaling"))
        vision = _pick(VisionConfig, d.get("vision_config") or {})
        audio = _pick(AudioConfig, d.get("audio_config") or {})
        return cls(text=text, vision=vision, audio=audio, layout="phi4_multimodal")

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        f = path / "config.json"
        if not f.is_file():
            raise ConfigError(f"{path} has no config.json: pass the checkpoint directory itself (the folder "
                              "holding config.json and the *.safetensors shards)")
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f} is not valid JSON ({e}); re-copy it from the checkpoint") from None
        cfg = cls.from_hf(d, source=str(f))
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            try:
                cfg.dynamic_hd = int(json.loads(pre.read_text()).get("dynamic_hd", cfg.dynamic_hd))
            except (json.JSONDecodeError, TypeError, ValueError):
                raise ConfigError(f"{pre} is not valid; re-copy it from the checkpoint") from None
        return cfg


def _text_from(d: dict[str, Any], rope: dict[str, Any] | None) -> TextConfig:
    rope = rope or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("longrope", "default", None):
        raise ConfigError(f"rope type {kind!r} is not supported (expected 'longrope')")
    if "num_attention_heads" not in d:
        raise ConfigError("config.json has no num_attention_heads; the published value is 24")
    eos = d.get("eos_token_id", 199999)
    eos = [eos] if isinstance(eos, int) else list(eos)
    if 200020 not in eos and d.get("vocab_size", 0) > 200020:
        # The published config says 199999 only; generation_config.json adds <|end|> (the turn end the model emits).
        eos = [200020] + eos
    return _pick(TextConfig, d,
                 rope_theta=rope.get("rope_theta", d.get("rope_theta")),
                 partial_rotary_factor=rope.get("partial_rotary_factor", d.get("partial_rotary_factor")),
                 original_max_position_embeddings=rope.get("original_max_position_embeddings",
                                                           d.get("original_max_position_embeddings")),
                 short_factor=rope.get("short_factor"), long_factor=rope.get("long_factor"),
                 eos_token_id=eos)
