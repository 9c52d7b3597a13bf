"""Public API: `phi4mm.load(path)` and the `Model` it returns (stable: outside checks call it).

    model = phi4mm.load("Phi-4-multimodal-instruct")
    model.generate("<|user|><|image_1|>What is shown?<|end|><|assistant|>", images=[pil_image])
    model.logits(prompt, audios=[(samples, 48000)])      # float32 (num_prompt_tokens, vocab)

`generate` here is the plain reference loop (one request, a contiguous KV cache); the fast engine is
separate and is proven equal to this loop.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from phi4mm.config import ConfigError, ModelConfig
from phi4mm.inputs.prepare import TEXT_ADAPTER, Prepared, prepare
from phi4mm.inputs.tokenizer import Tokenizer
from phi4mm.model.decoder import KVCache
from phi4mm.model.encode import encode_media
from phi4mm.model.lora import AdapterPlan
from phi4mm.model.network import Phi4MM
from phi4mm.model.quant import (
    LoadTimeQuantizer,
    Plan,
    QuantizationError,
    check_method,
    convert,
    device_note,
)
from phi4mm.model.weights import (
    CheckpointError,
    load_weights,
    lora_configs_from_folders,
    prequantized_plan,
)
from phi4mm.sampling import SamplingBatch, SamplingParams, mask_padded_vocab, sample

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def _dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        # bf16 as published on accelerators; fp32 on CPU, where bf16 matmuls are slow on most hosts.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of bfloat16, float16, float32")
    return DTYPES[dtype]


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
         adapters: bool = True, quantization: str | None = None) -> Model:
    """Load a checkpoint directory: the official layout, the transformers-native one, or Phi-4-mini.

    adapters=False skips the LoRA adapters (text-only use of a multimodal checkpoint's decoder).
    quantization: "fp8" or "int4" quantizes the decoder's linears while loading (docs/quantization.md); a
    checkpoint written by `phi4mm quantize` is loaded quantized without it.
    Raises ConfigError / CheckpointError / QuantizationError (ValueError subclasses) with a message naming
    the file at fault, or what to use instead.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; pass the checkpoint folder (holding config.json)")
    device = torch.device(device)
    dt = _dtype(dtype, device)
    check_method(quantization)
    cfg = ModelConfig.from_dir(path)
    if cfg.layout == "phi4_multimodal" and adapters:
        cfg.loras = lora_configs_from_folders(path)
        for name in ("vision", "speech"):
            if name not in cfg.loras:
                raise CheckpointError(f"{path / (name + '-lora')} (adapter_config.json) is missing; copy the "
                                      f"checkpoint's {name}-lora/ folder, or load with adapters=False")
    if not adapters:
        cfg.loras = {}
    tok = Tokenizer.from_dir(path)
    if cfg.vision is not None or cfg.audio is not None:
        # Placeholders are looked up by name: a checkpoint with its own vocabulary (the micro model) puts
        # `<|endoftext10|>` / `<|endoftext11|>` at other ids than the published 200010 / 200011.
        cfg.image_token_id, cfg.audio_token_id = tok.image_token_id, tok.audio_token_id
    with torch.device("meta"):
        net = Phi4MM(cfg)
    t0 = time.perf_counter()
    stored = prequantized_plan(net, path, cfg.layout)
    if stored is not None and stored.modules:
        if quantization is not None and {quantization} != stored.methods:
            raise QuantizationError(f"{path} is already quantized to {'/'.join(sorted(stored.methods))}; load it "
                                    f"without quantization=, or quantize the unquantized checkpoint to {quantization}")
        convert(net, stored)
        quantization = next(iter(stored.methods))
    quantizer = None
    if quantization is not None:
        note = device_note(quantization, device)
        if note:
            warnings.warn(note, stacklevel=2)
        if stored is None or not stored.modules:
            quantizer = LoadTimeQuantizer(Plan.decoder(net, quantization))
    load_weights(net, path, cfg.layout, str(device), dt, skip_lora=not adapters, quantizer=quantizer)
    net.eval()
    model = Model(net, cfg, tok, device, dt)
    model.quantization = quantization
    if adapters and (path / f"{TEXT_ADAPTER}-lora" / "adapter_config.json").is_file():
        # A text fine-tune saved beside the checkpoint (`phi4mm train --stage text` writes text-lora/): loaded
        # strictly, and text-only prompts then run through it (processor.prepare).
        from phi4mm.model.adapters import load_adapter
        load_adapter(model, path / f"{TEXT_ADAPTER}-lora", TEXT_ADAPTER)
    model.load_seconds = time.perf_counter() - t0
    return model


class Model:
    """A loaded Phi-4-multimodal (or Phi-4-mini) with its tokenizer and processors."""

    def __init__(self, net: Phi4MM, cfg: ModelConfig, tokenizer: Tokenizer, device: torch.device,
                 dtype: torch.dtype):
        self.net, self.config, self.tokenizer, self.device, self.dtype = net, cfg, tokenizer, device, dtype
        self.load_seconds = 0.0
        self.quantization: str | None = None  # "fp8" / "int4": the decoder's linears are stored quantized

    @cached_property
    def decodable(self) -> int:
        """Ids below this are text; the embedding rows past it are table padding. Built on first use: the
        id -> bytes table takes ~1 s for the full vocabulary, and a load that never generates needs none of it
        (the engine builds it at start anyway, for streaming)."""
        return len(self.tokenizer.token_bytes())

    def prepare(self, prompt: str | Sequence[dict], images: Sequence[Any] | None = None,
                audios: Sequence[Any] | None = None, tools: list[dict] | None = None) -> Prepared:
        return prepare(prompt, self.tokenizer, self.config, images, audios, tools)

    def _embed(self, prep: Prepared) -> torch.Tensor:
        img, aud = encode_media(self.net, prep, self.device, self.dtype)
        ids = torch.tensor([prep.input_ids], device=self.device)
        return self.net.embed(ids, img, aud)  # (1, T, hidden)

    @torch.inference_mode()
    def logits(self, prompt: str | Sequence[dict], images: Sequence[Any] | None = None,
               audios: Sequence[Any] | None = None) -> torch.Tensor:
        """float32 logits (num_prompt_tokens, vocab) for the prompt, with its media."""
        prep = self.prepare(prompt, images, audios)
        embeds = self._embed(prep)
        positions = torch.arange(embeds.shape[1], device=self.device)[None]  # (1, T)
        out = self.net(embeds, positions, plan=AdapterPlan.build(prep.adapter))
        return out[0].float()

    @torch.inference_mode()
    def generate(self, prompt_or_messages: str | Sequence[dict], images: Sequence[Any] | None = None,
                 audios: Sequence[Any] | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, tools: list[dict] | None = None) -> str:
        """Generate a reply (greedy at temperature 0). Stops at `<|end|>` / `<|endoftext|>`."""
        ids = self.generate_ids(prompt_or_messages, images, audios, max_new_tokens, temperature, top_p, seed, tools)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def generate_ids(self, prompt_or_messages, images=None, audios=None, max_new_tokens: int = 256,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                     tools: list[dict] | None = None) -> list[int]:
        if isinstance(prompt_or_messages, Prepared):
            prep = prompt_or_messages  # already tokenised and preprocessed (the engine, the tests)
        else:
            prep = self.prepare(prompt_or_messages, images, audios, tools)
        embeds = self._embed(prep)
        n_prompt = embeds.shape[1]
        limit = self.config.text.max_position_embeddings
        if n_prompt >= limit:
            raise ValueError(f"the prompt has {n_prompt} tokens; the context holds {limit}")
        max_new_tokens = min(max_new_tokens, limit - n_prompt)
        if max_new_tokens < 1:
            return []
        plan = AdapterPlan.build(prep.adapter)
        # The engine's sampler: the same seed draws the same tokens here and in a batched engine.
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        sampler = SamplingBatch.build([params], self.device, self.config.text.vocab_size, [prep.input_ids])
        eos = set(self.tokenizer.eos_token_ids)
        rope = self.net.rope
        cache = KVCache(self.config.text, 1, n_prompt + max_new_tokens, self.dtype, self.device)
        long = rope.use_long(n_prompt)
        logits = self._prefill(embeds, cache, plan, long)
        out: list[int] = []
        for step in range(max_new_tokens):
            tokens = sample(mask_padded_vocab(logits[None].float(), self.decodable), sampler).tokens
            sampler.update(tokens)
            tok = int(tokens[0])
            out.append(tok)
            if tok in eos or step == max_new_tokens - 1:
                break
            tok_embed = self.net.embed_tokens(torch.tensor([[tok]], device=self.device))
            embeds = torch.cat([embeds, tok_embed], dim=1)  # kept whole for a LongRoPE re-prefill
            total = embeds.shape[1]
            if rope.use_long(total) and not long:
                # Crossing 4096 tokens: the reference recomputes every key with the long factors.
                long = True
                cache.reset()
                logits = self._prefill(embeds, cache, plan, long)
                continue
            pos = torch.tensor([[total - 1]], device=self.device)
            logits = self.net(tok_embed, pos, cache=cache, plan=plan, long_rope=long, last_only=True)[0, -1]
            cache.advance(1)
        return out

    def _prefill(self, embeds: torch.Tensor, cache: KVCache, plan: AdapterPlan, long: bool) -> torch.Tensor:
        positions = torch.arange(embeds.shape[1], device=self.device)[None]  # (1, T)
        logits = self.net(embeds, positions, cache=cache, plan=plan, long_rope=long, last_only=True)[0, -1]
        cache.advance(embeds.shape[1])
        return logits
