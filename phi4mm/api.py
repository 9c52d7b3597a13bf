"""Public API: `phi4mm.load(path)` and the `Model` it returns (stable: outside checks call it).

    model = phi4mm.load("Phi-4-multimodal-instruct")
    model.generate("<|user|><|image_1|>What is shown?<|end|><|assistant|>", images=[pil_image])
    model.logits(prompt, audios=[(samples, 48000)])      # float32 (num_prompt_tokens, vocab)

`generate` here is the plain reference loop (one request, a contiguous KV cache); the fast engine is
separate and is proven equal to this loop.
"""
from __future__ import annotations

import re
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
from phi4mm.inputs.tools import tool_constraint
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
from phi4mm.sampling import (
    SamplingBatch,
    SamplingParams,
    apply_constraints,
    generation_defaults,
    mask_padded_vocab,
    sample,
)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
# A Hugging Face model id: owner/name (the hub's own rule for the characters allowed).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# The Hugging Face id of each architecture (config.layout): a model name the server always accepts.
HUB_IDS = {"phi4_multimodal": "microsoft/Phi-4-multimodal-instruct", "phi4mm": "microsoft/Phi-4-multimodal-instruct",
           "phi3": "microsoft/Phi-4-mini-instruct"}
GROWTH_TOKENS = 1024  # the reference loop's KV cache grows by this much when max_tokens is None


def _dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        # bf16 as published on accelerators; fp32 on CPU, where bf16 matmuls are slow on most hosts.
        return torch.bfloat16 if device.type in ("cuda", "mps") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; use auto, bfloat16, float16 or float32")
    return DTYPES[dtype]


def _mps_works() -> bool:
    """Apple's MPS backend, when present and able to run a bf16 matmul (older macOS versions cannot)."""
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        return False
    try:
        x = torch.ones(2, 2, device="mps", dtype=torch.bfloat16)
        return bool((x @ x).sum().item() == 8)
    except (RuntimeError, TypeError):
        return False


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None): the first CUDA GPU, else Apple MPS where it works, else the CPU. A device asked for by
    name must exist here; ValueError in one sentence otherwise."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_works() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device} is not a device name; use auto, cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only PyTorch"
            raise ValueError(f"device {device} is not available: no CUDA GPU is visible here ({build}); use "
                             "--device auto or cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {device} is not available: this machine has {n} CUDA GPU(s), "
                             f"cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps" and not _mps_works():
        raise ValueError(f"device {device} is not available: Apple MPS is missing or not usable here; use "
                         "--device auto or cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device} is not supported; use auto, cpu, cuda or mps")
    return dev


def resolve_model(model: str | Path) -> Path:
    """A checkpoint folder, or a Hugging Face id (microsoft/Phi-4-multimodal-instruct) resolved through
    huggingface_hub: the local cache first (works offline), else a download with a progress bar. ValueError in
    one sentence when it is neither a folder nor obtainable."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists():
        raise ConfigError(f"{name} is a file; pass the checkpoint folder (the one holding config.json)")
    if not HUB_ID.fullmatch(name):
        raise ConfigError(f"{name} is not a folder, nor a Hugging Face model id (owner/name, e.g. "
                          "microsoft/Phi-4-multimodal-instruct)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise ConfigError(f"{name} is not a folder; to fetch it from the Hugging Face hub, pip install "
                          "huggingface_hub") from None
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):  # not cached, or an incomplete entry: try the hub
        pass
    try:
        return Path(snapshot_download(name))  # tqdm bars on stderr, one per file
    except Exception as e:  # noqa: BLE001 - offline, unknown, gated, disk full: each said in one sentence
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(f"{name} is not a folder, not in the Hugging Face cache ({HF_HUB_CACHE}), and could not "
                          f"be downloaded ({type(e).__name__}: {why}); check the name and the network, or pass a "
                          "local checkpoint folder") from None


def load(path: str | Path, device: str | torch.device = "auto", dtype: torch.dtype | str | None = None,
         adapters: bool = True, quantization: str | None = None, quantize_head: bool = False) -> Model:
    """Load a checkpoint: a folder (the official layout, the transformers-native one, or Phi-4-mini) or a Hugging
    Face id such as "microsoft/Phi-4-multimodal-instruct" (cache first, else downloaded).

    device "auto": CUDA, else Apple MPS, else CPU. adapters=False skips the LoRA adapters (text-only use of a
    multimodal checkpoint's decoder). quantization: "fp8" or "int4" quantizes the decoder's linears while
    loading (docs/quantization.md); a checkpoint written by `phi4mm quantize` is loaded quantized without it.
    quantize_head: with quantization, also the tied embedding/output head (one stored matrix: lookups
    dequantize only the rows they read); a checkpoint written with `--quantize-head` loads that way by itself.
    Raises ConfigError / CheckpointError / QuantizationError (ValueError subclasses) with a message naming
    the file at fault, or what to use instead.
    """
    path = resolve_model(path)
    device = pick_device(device)
    dt = _dtype(dtype, device)
    check_method(quantization)
    if not isinstance(quantize_head, bool):
        raise QuantizationError(f"quantize_head (--quantize-head) is True or False; got {quantize_head!r}")
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
        if quantize_head and not stored.head:
            raise QuantizationError(f"quantize_head (--quantize-head) cannot be added to {path}, whose head was "
                                    "written unquantized; load it without the flag, or write a checkpoint with "
                                    "`phi4mm quantize --quantize-head` from the unquantized one")
        convert(net, stored)
        quantization, quantize_head = next(iter(stored.methods)), stored.head
    elif quantize_head and quantization is None:
        raise QuantizationError("quantize_head (--quantize-head) quantizes the tied embedding/head with the "
                                "decoder's method; give quantization (--quantization) fp8 or int4 with it")
    quantizer = None
    if quantization is not None:
        note = device_note(quantization, device)
        if note:
            warnings.warn(note, stacklevel=2)
        if stored is None or not stored.modules:
            quantizer = LoadTimeQuantizer(Plan.decoder(net, quantization, head=quantize_head))
    load_weights(net, path, cfg.layout, str(device), dt, skip_lora=not adapters, quantizer=quantizer)
    net.eval()
    model = Model(net, cfg, tok, device, dt)
    model.quantization = quantization
    model.quantized_head = bool(quantize_head)
    if adapters and (path / f"{TEXT_ADAPTER}-lora" / "adapter_config.json").is_file():
        # A text fine-tune saved beside the checkpoint (`phi4mm train --stage text` writes text-lora/): loaded
        # strictly, and text-only prompts then run through it (processor.prepare).
        from phi4mm.model.adapters import load_adapter
        load_adapter(model, path / f"{TEXT_ADAPTER}-lora", TEXT_ADAPTER)
    model.load_seconds = time.perf_counter() - t0
    model.path = path
    model.sampling_defaults = generation_defaults(path)
    return model


class Model:
    """A loaded Phi-4-multimodal (or Phi-4-mini) with its tokenizer and processors."""

    def __init__(self, net: Phi4MM, cfg: ModelConfig, tokenizer: Tokenizer, device: torch.device,
                 dtype: torch.dtype):
        self.net, self.config, self.tokenizer, self.device, self.dtype = net, cfg, tokenizer, device, dtype
        self.load_seconds = 0.0
        self.path: Path | None = None
        # SamplingParams fields from the checkpoint's generation_config.json (sampling.generation_defaults).
        self.sampling_defaults: dict[str, Any] = {}
        self.quantization: str | None = None  # "fp8" / "int4": the decoder's linears are stored quantized
        self.quantized_head = False  # the tied embedding/head is stored quantized too

    @property
    def hub_ids(self) -> list[str]:
        """The Hugging Face id of this architecture, when it has one (clients name the model by it)."""
        return [HUB_IDS[self.config.layout]] if self.config.layout in HUB_IDS else []

    def sampling_params(self, **given: Any) -> SamplingParams:
        """SamplingParams from the checkpoint's defaults, overridden by the fields given (None: not given)."""
        return SamplingParams(**{**self.sampling_defaults, **{k: v for k, v in given.items() if v is not None}})

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
               audios: Sequence[Any] | None = None, last: int | None = None) -> torch.Tensor:
        """float32 logits (num_prompt_tokens, vocab) for the prompt, with its media; `last`: only the last
        that many positions' (last, vocab), as transformers' logits_to_keep (a long prompt's full logits take
        T x 200,064 floats: 3.4 GB at 4,200 tokens)."""
        prep = self.prepare(prompt, images, audios)
        embeds = self._embed(prep)
        T = embeds.shape[1]
        positions = torch.arange(T, device=self.device)[None]  # (1, T)
        keep: bool | torch.Tensor = False
        if last is not None:
            if not 0 < last:
                raise ValueError(f"last must be a positive number of positions; got {last}")
            keep = torch.arange(max(T - last, 0), T, device=self.device)
        out = self.net(embeds, positions, plan=AdapterPlan.build(prep.adapter), last_only=keep)
        return out[:, 0].float() if last is not None else out[0].float()

    @torch.inference_mode()
    def generate(self, prompt_or_messages: str | Sequence[dict], images: Sequence[Any] | None = None,
                 audios: Sequence[Any] | None = None, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, tools: list[dict] | None = None,
                 tool_choice: str | dict | None = None, max_new_tokens: int | None = None) -> str:
        """Generate a reply; stops at `<|end|>` / `<|endoftext|>`. Sampling defaults come from the checkpoint's
        generation_config.json (greedy when it asks for no sampling). max_tokens None: what remains of the
        context (`max_new_tokens` is the same, as transformers spells it). tool_choice: OpenAI's "none" /
        "auto" / "required" / {"type": "function", "function": {"name": ...}}, enforced while decoding."""
        ids = self.generate_ids(prompt_or_messages, images, audios, max_tokens, temperature, top_p, seed, tools,
                                tool_choice=tool_choice, max_new_tokens=max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def generate_ids(self, prompt_or_messages, images=None, audios=None, max_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                     tools: list[dict] | None = None, tool_choice: str | dict | None = None,
                     max_new_tokens: int | None = None) -> list[int]:
        if max_new_tokens is not None:
            if max_tokens is not None and max_tokens != max_new_tokens:
                raise ValueError(f"max_tokens={max_tokens} and max_new_tokens={max_new_tokens} disagree; give one")
            max_tokens = max_new_tokens
        if max_tokens == 0:
            return []
        constraint = None
        if tool_choice is not None:
            tools, constraint = tool_constraint(tools, tool_choice, self.tokenizer)
        if isinstance(prompt_or_messages, Prepared):
            prep = prompt_or_messages  # already tokenised and preprocessed (the engine, the tests)
        else:
            prep = self.prepare(prompt_or_messages, images, audios, tools)
        embeds = self._embed(prep)
        n_prompt = embeds.shape[1]
        limit = self.config.text.max_position_embeddings
        if n_prompt >= limit:
            raise ValueError(f"the prompt has {n_prompt} tokens; the context holds {limit}")
        params = self.sampling_params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        params.constraint = constraint
        params.validate()
        room = limit - n_prompt
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        if max_new < 1:
            return []
        plan = AdapterPlan.build(prep.adapter)
        # The engine's sampler: the same seed draws the same tokens here and in a batched engine.
        sampler = SamplingBatch.build([params], self.device, self.config.text.vocab_size, [prep.input_ids])
        eos = set(self.tokenizer.eos_token_ids)
        rope = self.net.rope
        # With no max_tokens the cache starts small and grows (a re-prefill) rather than holding the whole context.
        size = n_prompt + (max_new if params.max_tokens is not None else min(max_new, GROWTH_TOKENS))
        cache = KVCache(self.config.text, 1, size, self.dtype, self.device)
        long = rope.use_long(n_prompt)
        logits = self._prefill(embeds, cache, plan, long)
        out: list[int] = []
        for step in range(max_new):
            masked = mask_padded_vocab(logits[None].float(), self.decodable)
            tokens = sample(apply_constraints(masked, [params], [out]), sampler).tokens
            sampler.update(tokens)
            tok = int(tokens[0])
            out.append(tok)
            if tok in eos or step == max_new - 1:
                break
            tok_embed = self.net.embed_tokens(torch.tensor([[tok]], device=self.device))
            embeds = torch.cat([embeds, tok_embed], dim=1)  # kept whole for a LongRoPE re-prefill
            total = embeds.shape[1]
            if total > cache.max_len:  # the grown-on-demand cache is full: a larger one, refilled
                cache = KVCache(self.config.text, 1, min(n_prompt + max_new, 2 * cache.max_len), self.dtype,
                                self.device)
                logits = self._prefill(embeds, cache, plan, long)
                continue
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
