"""The training stages: which parameters each `phi4mm train` stage trains, and freezing everything else.

A stage names the towers the checkpoint must have, the regexes over our parameter names that train, the LoRA it
trains (created when missing), and which samples reach a trained parameter (docs/architecture.md).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from phi4mm.config import LoraConfig, ModelConfig
from phi4mm.inputs.prepare import TEXT_ADAPTER
from phi4mm.model.lora import LoraLinear
from phi4mm.model.weights import LORA_PARAM
from phi4mm.train.data import Example

_VISION_PROJ = r"vision\.(img_projection_(up|down)\.\w+|(global|sub)_img_feature_extensor)"
_VISION_ENC = r"vision\.img_processor\..+"
_AUDIO_ENC = r"audio\.encoder\..+"
_SPEECH_PROJ = r"audio\.(up|down)_proj_for_speech\.\w+"
_DECODER = r"embed_tokens\.weight|norm\.weight|layers\.\d+\.(\w+_layernorm|(self_attn|mlp)\.\w+)\.weight"
DEFAULT_TEXT_RANK = 16  # new adapters get lora_alpha = 2 * r, the published ratio (256/512, 320/640)


@dataclass(frozen=True)
class Stage:
    towers: tuple[str, ...]  # towers the checkpoint must have ("vision", "audio")
    patterns: tuple[str, ...]  # regexes over our parameter names: exactly these train
    adapter: str | None  # the LoRA this stage trains (created when missing or when lora_rank is given)
    uses: Callable[[Example], bool]  # does a sample reach a trained parameter?


def _has_image(e: Example) -> bool:
    return e.has_image


STAGES = {
    "vision-projector": Stage(("vision",), (_VISION_PROJ,), None, _has_image),
    "vision-encoder": Stage(("vision",), (_VISION_PROJ, _VISION_ENC), None, _has_image),
    "vision-lora": Stage(("vision",), (LORA_PARAM.format("vision"),), "vision", lambda e: e.adapter == "vision"),
    "speech-encoder": Stage(("audio",), (_AUDIO_ENC, _SPEECH_PROJ), None, lambda e: e.has_audio),
    "speech-lora": Stage(("audio",), (_SPEECH_PROJ, LORA_PARAM.format("speech")), "speech",
                         lambda e: e.adapter == "speech"),
    "vision-speech": Stage(("vision", "audio"), (LORA_PARAM.format("vision"), _VISION_ENC, _VISION_PROJ), "vision",
                           _has_image),
    "text": Stage((), (LORA_PARAM.format(TEXT_ADAPTER),), TEXT_ADAPTER, lambda e: e.adapter == TEXT_ADAPTER),
    # Pre-training the decoder itself (the micro model's first stage; Phi-4-mini arrives pre-trained).
    "decoder": Stage((), (_DECODER,), None, lambda e: not e.has_image and not e.has_audio),
    # Pre-training an encoder alone as a CTC recogniser of the sample's answer (ctc_units): the audio encoder
    # (the micro model's stand-in for the original's encoder, "initialised from an attention encoder-decoder ASR
    # model"), or SigLIP reading a rendered word. The head is thrown away afterwards: only the encoder is exported.
    "speech-ctc": Stage(("audio",), (_AUDIO_ENC,), None, lambda e: e.has_audio),
    "vision-ctc": Stage(("vision",), (_VISION_ENC,), None, _has_image),
}
CTC_STAGES = ("speech-ctc", "vision-ctc")


# The LoRA an encoder/projector stage may train alongside (`with_lora=True`): its modality's adapter.
STAGE_LORA = {"vision-projector": "vision", "vision-encoder": "vision", "speech-encoder": "speech"}


def stage_spec(stage: str, with_lora: bool = False) -> Stage:
    """STAGES[stage], plus its modality's LoRA when with_lora (the micro model's encoder stages: a frozen
    4-layer decoder that only ever saw text does not learn to read a new tower's tokens; measured flat at
    ~2 nats over 1,100 vision-encoder steps on the H100)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not known; use one of {', '.join(STAGES)}")
    st = STAGES[stage]
    if not with_lora:
        return st
    if stage not in STAGE_LORA:
        raise ValueError(f"with_lora applies to the encoder/projector stages ({', '.join(STAGE_LORA)}), not "
                         f"{stage!r}, which trains {'its adapter' if st.adapter else 'no adapter'} already")
    name = STAGE_LORA[stage]
    return Stage(st.towers, st.patterns + (LORA_PARAM.format(name),), name, st.uses)


def trainable_names(net: nn.Module, stage: str | Stage) -> list[str]:
    """Our parameter names that `stage` trains (after its adapter exists)."""
    st = STAGES[stage] if isinstance(stage, str) else stage
    pats = [re.compile(p) for p in st.patterns]
    return [n for n, _ in net.named_parameters() if any(p.fullmatch(n) for p in pats)]


def check_stage(cfg: ModelConfig, stage: str, model_dir: Path, with_lora: bool = False) -> Stage:
    st = stage_spec(stage, with_lora)
    for tower in st.towers:
        if getattr(cfg, tower) is None:
            raise ValueError(f"stage {stage!r} trains the {tower} side, but the checkpoint at {model_dir} has no "
                             f"{tower} tower (a text-only Phi-4-mini?); use stage 'text' or a multimodal checkpoint")
    return st


def setup_stage(model, stage: str, lora_rank: int | None, with_lora: bool = False) -> list[str]:
    """Create/re-initialise the stage's adapter, freeze everything else; returns the trainable names."""
    st = stage_spec(stage, with_lora)
    net = model.net
    name = st.adapter
    if name is not None and (lora_rank is not None or name not in model.config.loras):
        if lora_rank is None and name != TEXT_ADAPTER:
            raise ValueError(f"the checkpoint has no {name!r} adapter to train; pass lora_rank=R to create one")
        old = model.config.loras.get(name)
        r = lora_rank or DEFAULT_TEXT_RANK
        cfg = LoraConfig(r=r, lora_alpha=2.0 * r, dropout=old.dropout if old else 0.0)
        for m in net.modules():
            if isinstance(m, LoraLinear):
                m.add_adapter(name, cfg)  # B = 0: the model is unchanged until it trains
        model.config.loras[name] = cfg
    names = trainable_names(net, st)
    for n, p in net.named_parameters():
        p.requires_grad_(n in names)
        if n in names and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master copies of what trains; frozen weights keep the load dtype
    return names
