"""Phi-4-mini text decoder: fused qkv / gate_up, GQA, RMSNorm, partial rotary LongRoPE, LoRA on every linear.

The decoder is a pure function of (input embeddings, positions, KV cache, adapter plan). It never samples and
keeps no per-request state: the cache is an explicit object owned by the caller.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phi4mm.config import LoraConfig, TextConfig
from phi4mm.model import ops
from phi4mm.model.lora import AdapterPlan, LoraLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back to the activation dtype, *then* scale: the order matters in bf16.
        return ops.rms_norm(x, self.weight, self.eps)


class LongRope:
    """Partial rotary embedding with LongRoPE short/long frequency factors (docs/architecture.md#decoder-and-longrope).

    Not a module: it has no weights, and its tables are derived from the config on whichever device asks.
    """

    def __init__(self, cfg: TextConfig):
        self.cfg = cfg
        self.rotary_dim = cfg.rotary_dim
        self.scaling = cfg.rope_scaling_factor  # sqrt(17/12) for the published model, short and long alike
        # Explicit CPU: the model may be built under a meta-device context; these tables are never weights.
        cpu = torch.device("cpu")
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=cpu) / self.rotary_dim
        base = cfg.rope_theta ** exponent  # (rotary_dim/2,)
        self.inv_freq = {
            False: 1.0 / (torch.tensor(cfg.short_factor, dtype=torch.float32, device=cpu) * base),
            True: 1.0 / (torch.tensor(cfg.long_factor, dtype=torch.float32, device=cpu) * base),
        }
        self._on_device: dict[tuple[str, bool], torch.Tensor] = {}

    def _inv(self, long: bool, device: torch.device) -> torch.Tensor:
        # Cached per device: no host-to-device copy per call (and none inside a CUDA graph capture).
        key = (str(device), long)
        if key not in self._on_device:
            self._on_device[key] = self.inv_freq[long].to(device)
        return self._on_device[key]

    def use_long(self, total_len: int) -> bool:
        """Long factors once the sequence is longer than the original context (4096), as HF/MS do."""
        return total_len > self.cfg.original_max_position_embeddings

    def cos_sin(self, positions: torch.Tensor, long: bool | torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, rotary_dim), computed in fp32 then cast.

        long: one choice for the batch, or a (B, T) bool tensor (packed sequences on both sides of 4096).
        """
        dev = positions.device
        if isinstance(long, torch.Tensor):
            inv = torch.where(long[..., None], self._inv(True, dev), self._inv(False, dev))  # (B, T, rotary_dim/2)
        else:
            inv = self._inv(long, dev)
        freqs = positions.float()[..., None] * inv  # (B, T, rotary_dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, rotary_dim)
        cos = (emb.cos() * self.scaling).to(dtype)[:, None]  # (B, 1, T, rotary_dim)
        sin = (emb.sin() * self.scaling).to(dtype)[:, None]
        return cos, sin


class KVCache:
    """Contiguous per-layer key/value cache: (layers, B, kv_heads, max_len, head_dim) for keys and values.

    `length` is the number of filled slots (shared by all rows; left padding is handled by a key mask).
    The fast engine has its own paged cache; this one serves the reference loop and the tests.
    """

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, kv, T, D) at slots [length, length+T) and return all keys/values so far."""
        t0, t1 = self.length, self.length + k.shape[2]
        if t1 > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {t1} were asked for")
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, loras: dict[str, LoraConfig]):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        # Fused projection: rows [0:q_out] are Q, then K, then V.
        self.qkv_proj = LoraLinear(cfg.hidden_size, q_out + 2 * kv_out, loras)
        self.o_proj = LoraLinear(q_out, cfg.hidden_size, loras)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: AdapterPlan,
                attn: AttentionBackend, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv_proj(x, plan)
        q, k, v = ops.rope_heads(qkv, cos, sin, self.n_heads, self.n_kv)  # (B, H, T, D), (B, KV, T, D) x 2
        out = attn(layer, q, k, v)  # (B, H, T, D): the backend stores k/v in its cache and attends
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1), plan)  # (B, T, H*D)


class AttentionBackend:
    """Where keys/values live and how attention over them is computed, for one forward call.

    The decoder hands each layer's rotated q, k, v (B, heads, T, D) to the backend; the backend stores k/v in
    its cache (contiguous here, paged in the engine) and returns the attention output (B, H, T, D).
    """

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DenseAttention(AttentionBackend):
    """SDPA over an optional contiguous KVCache, with an additive mask (None: plain causal)."""

    def __init__(self, mask: torch.Tensor | None, cache: KVCache | None):
        self.mask, self.cache = mask, cache

    def __call__(self, layer, q, k, v):
        if self.cache is not None:
            k, v = self.cache.write(layer, k, v)
        # GQA: each KV head serves n_heads / n_kv query heads. No mask means an unpadded first chunk (with or
        # without a cache to fill): plain causal attention.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.mask is None,
                                              enable_gqa=True)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig, loras: dict[str, LoraConfig]):
        super().__init__()
        # Fused: the first `intermediate_size` output rows are the gate, the rest are "up".
        self.gate_up_proj = LoraLinear(cfg.hidden_size, 2 * cfg.intermediate_size, loras)
        self.down_proj = LoraLinear(cfg.intermediate_size, cfg.hidden_size, loras)

    def forward(self, x: torch.Tensor, plan: AdapterPlan) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x, plan)), plan)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, loras: dict[str, LoraConfig]):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, loras)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, loras)

    def forward(self, x, cos, sin, plan, attn, layer):
        a = self.self_attn(self.input_layernorm(x), cos, sin, plan, attn, layer)
        # The residual add and the second norm in one pass where a fused path exists.
        x, h = ops.add_rms_norm(a, x, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps)
        return x + self.mlp(h, plan)


def attention_mask(key_mask: torch.Tensor | None, q_len: int, past: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor | None:
    """Additive mask (B|1, 1, T, past+T): causal, plus padded keys (key_mask False) hidden.

    Returns None for the common unpadded prefill, so SDPA can take its causal fast path.
    """
    if key_mask is None and past == 0:
        return None
    total = past + q_len
    q_idx = torch.arange(past, total, device=device)[:, None]
    allowed = torch.arange(total, device=device)[None, :] <= q_idx  # (T, S)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :total].bool()  # (B, 1, T, S)
        # A fully padded query row (left padding) sees only finfo.min scores: softmax stays finite (uniform),
        # and its output is never read.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
