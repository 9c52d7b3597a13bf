"""The decoder's elementwise math in plain torch: the definition every fused path is tested against.

`kernels.py` holds the Triton versions (inference), `fused.py` the training versions (compiled, or autograd
functions with a written-out backward); `ops.py` picks one per call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D): rotate the first rotary_dim dims (halves convention), pass the rest through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


def rms_norm_torch(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (decoder.RMSNorm's torch path): normalise in fp32, cast, then scale."""
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_store_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int) -> torch.Tensor:
    """qkv (R, (H+2KV)*D); cos/sin (R, rd); k/v_cache (num_blocks, block_size, KV, D) -> q (R, H, D)."""
    R = qkv.shape[0]
    KV, D = k_cache.shape[2], k_cache.shape[3]
    q = qkv[:, :n_heads * D].view(R, n_heads, 1, D)  # (R, H, 1, D): apply_rope's (B, H, T, D) with T = 1
    k = qkv[:, n_heads * D:(n_heads + KV) * D].view(R, KV, 1, D)  # (R, KV, 1, D)
    v = qkv[:, (n_heads + KV) * D:].view(R, KV, D)  # (R, KV, D)
    c, s = cos[:, None, None], sin[:, None, None]  # (R, 1, 1, rd)
    q, k = apply_rope(q, c, s), apply_rope(k, c, s)
    k_cache.view(-1, KV, D).index_copy_(0, slots, k[:, :, 0].to(k_cache.dtype))  # (R, KV, D) into their slots
    v_cache.view(-1, KV, D).index_copy_(0, slots, v.to(v_cache.dtype))
    return q[:, :, 0]  # (R, H, D)


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2I) -> (..., I): up * silu(gate), the gate being the first half (decoder.MLP's torch path)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)
