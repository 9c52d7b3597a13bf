"""One door to the decoder's elementwise ops: each call picks the fastest path that is valid for it.

- inference on a device with Triton (`kernels.available`): fused kernels (fewer launches, the same rounding);
- training on CUDA (`fused.enabled`): compiled chains or autograd functions with a written-out backward;
- otherwise the plain torch definition (`reference.py`), which every other path is tested against.
"""
from __future__ import annotations

import torch

from phi4mm.model import fused, kernels, reference


def inference_kernels(x: torch.Tensor) -> bool:
    """The Triton kernels have no backward: they run only where autograd is not recording."""
    return not torch.is_grad_enabled() and kernels.available(x)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if inference_kernels(x):
        return kernels.rms_norm(x, w, eps)
    if fused.enabled(x):
        return fused.rms_norm(x, w, eps)
    return reference.rms_norm_torch(x, w, eps)


def add_rms_norm(a: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """a, x (B, T, N) -> (x + a, RMSNorm(x + a)): the attention residual and the MLP's input norm."""
    if inference_kernels(x):
        B, T, N = x.shape
        h, s = kernels.add_rms_norm(a.reshape(B * T, N), x.reshape(B * T, N).contiguous(), w, eps)  # (B*T, N)
        return s.view(B, T, N), h.view(B, T, N)
    if fused.enabled(x):
        return fused.add_rms_norm(a, x, w, eps)
    s = x + a
    return s, reference.rms_norm_torch(s, w, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2I) -> silu(gate) * up (..., I)."""
    if inference_kernels(gate_up):
        act = kernels.silu_mul(gate_up.reshape(-1, gate_up.shape[-1]))  # (B*T, I)
        return act.view(*gate_up.shape[:-1], -1)
    if fused.enabled(gate_up):
        return fused.silu_mul(gate_up)
    return reference.silu_mul_torch(gate_up)


def rope_heads(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, T, (H + 2KV) * D) -> q (B, H, T, D), k, v (B, KV, T, D), q and k rotated."""
    # Training on CUDA: an autograd function with a written-out backward; otherwise views and a forward.
    heads = fused.rope_qkv if fused.enabled(qkv) else kernels.rotated_heads
    return heads(qkv, cos, sin, n_heads, n_kv)
