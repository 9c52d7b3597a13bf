"""`phi4mm make-checkpoint`: a random-weight checkpoint directory laid out exactly like the published one."""
from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from phi4mm.config import ModelConfig
from phi4mm.inputs.tokenizer import write_tokenizer_files
from phi4mm.model.checkpoint import (
    GENERATION_CONFIG,
    PEFT_TARGET,
    SPEECH_LORA_TARGET,
    VISION_LORA_TARGET,
    hf_config,
    official_config,
    random_tensor,
    unused_vision_shapes,
    write_adapter_folder,
    write_shards,
)
from phi4mm.model.network import Phi4MM
from phi4mm.model.weights import IMAGE_PREFIX, RENAMES, rename_key


def make_checkpoint(out: str | Path, size: str = "tiny", layout: str = "official", seed: int = 0,
                    dtype: torch.dtype = torch.bfloat16, n_shards: int | None = None, device: str = "cpu",
                    config: dict | None = None, init: Callable[[str, tuple[int, ...]], torch.Tensor] | None = None,
                    tokenizer_dir: str | Path | None = None) -> Path:
    """Write a random-weight checkpoint directory; returns its path.

    device: where the random numbers are drawn ("cuda" for full size); the same (seed, device) gives the
    same weights in both layouts. config (an official-layout config.json dict), init (name, shape -> tensor)
    and tokenizer_dir (tokenizer files to copy) build a new model instead of a size (the micro model).
    """
    if layout not in ("official", "hf"):
        raise ValueError(f"layout {layout!r} is not known; use 'official' or 'hf'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    off = copy.deepcopy(config) if config is not None else official_config(size)
    cfg = ModelConfig.from_hf(off)
    with torch.device("meta"):
        net = Phi4MM(cfg)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    extra = {"vision." + k: s for k, s in unused_vision_shapes(cfg).items()}
    store_layout = "phi4mm" if layout == "official" else "phi4_multimodal"
    main: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, torch.Tensor]] = {n: {} for n in cfg.loras}
    for name, shape in {**ours, **extra}.items():
        t = init(name, shape) if init is not None else random_tensor(name, shape, seed, device)
        t = (t.to(dtype) if not name.endswith(("global_mean", "global_invstd")) else t.float()).cpu()
        lora = name.split(".lora_")
        if len(lora) == 2:
            ab, adapter = lora[1].split(".")
            adapters[adapter][f"base_model.model.model.{lora[0]}.lora_{ab}.weight"] = t
            if layout == "hf":
                continue  # transformers-native shards hold no LoRA: it lives in the folders only
        if name in extra:
            main[IMAGE_PREFIX + name[len("vision."):]] = t
        else:
            main[rename_key(name, RENAMES[store_layout])] = t
    write_shards(main, out, n_shards or (3 if size == "full" else 2))
    targets = {"vision": VISION_LORA_TARGET, "speech": SPEECH_LORA_TARGET}
    for name, tensors in adapters.items():
        write_adapter_folder(out, name, cfg.loras[name], tensors, PEFT_TARGET if layout == "hf" else targets[name])
    config = off if layout == "official" else hf_config(cfg)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = dict(GENERATION_CONFIG)
    if config is not None:
        gen.update({k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    _write_processor_files(out, layout)
    if tokenizer_dir is not None:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy2(Path(tokenizer_dir) / f, out / f)
        return out
    write_tokenizer_files(out, "phi4mm" if layout == "official" else "phi4_multimodal")
    return out


def _write_processor_files(out: Path, layout: str) -> None:
    audio = {"audio_compression_rate": 8, "audio_downsample_rate": 1, "audio_feat_stride": 1}
    if layout == "official":
        pre = {"auto_map": {"AutoProcessor": "processing_phi4mm.Phi4MMProcessor",
                            "AutoImageProcessor": "processing_phi4mm.Phi4MMImageProcessor",
                            "AutoFeatureExtractor": "processing_phi4mm.Phi4MMAudioFeatureExtractor"},
               "image_processor_type": "Phi4MMImageProcessor", "processor_class": "Phi4MMProcessor",
               "feature_extractor_type": "Phi4MMAudioFeatureExtractor", "dynamic_hd": 36, **audio}
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        return
    image = {"image_processor_type": "Phi4MultimodalImageProcessor", "dynamic_hd": 36, "patch_size": 14,
             "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "image_mean": [0.5] * 3,
             "image_std": [0.5] * 3, "resample": 3, "rescale_factor": 1 / 255, "size": {"height": 448, "width": 448}}
    feat = {"feature_extractor_type": "Phi4MultimodalFeatureExtractor", "feature_size": 80, "hop_length": 160,
            "n_fft": 512, "padding_side": "right", "padding_value": 0.0, "preemphasis": 0.97,
            "return_attention_mask": True, "sampling_rate": 16000, "win_length": 400, **audio}
    (out / "preprocessor_config.json").write_text(json.dumps(
        {**image, **feat, "processor_class": "Phi4MultimodalProcessor"}, indent=2))
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Phi4MultimodalProcessor", "image_processor": image, "audio_processor": feat}, indent=2))
