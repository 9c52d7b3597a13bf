"""The decoder's elementwise chains compiled for training: RMSNorm, residual add + RMSNorm, RoPE on the fused
qkv, the SiLU gate and the loss's cross-entropy, each through `torch.compile` (forward and backward fused by Inductor).

Why: an eager training step at full size spends about a third of its GPU time outside matrix products. In one
vision-LoRA step on an H200 (8 prompts of 1,441 tokens, `bench/bench_train.py --profile`), the products took
~290 ms and ~1,700 copies, ~1,200 multiplies and ~800 adds and casts another ~250 ms: RMSNorm alone is six
kernels forward (fp32 upcast, square, mean, rsqrt, two multiplies) and more backward, RoPE is slices, two
concatenations and four multiplies. The inference path has hand-written Triton kernels for these (kernels.py)
but they have no backward; Inductor writes both.

The math is the torch twins' (kernels.rms_norm_torch, decoder.apply_rope, kernels.silu_mul_torch); tests compare
values and gradients with the eager path. Used only while autograd records (training) on CUDA.
PHI4MM_NO_COMPILE=1 turns it off; PHI4MM_COMPILE=1 also turns it on for CPU tensors (tests). If compiling fails,
training warns once and goes on with the eager ops.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from . import kernels

DISABLED = os.environ.get("PHI4MM_NO_COMPILE") == "1"
FORCE = os.environ.get("PHI4MM_COMPILE") == "1"


def enabled(x: torch.Tensor) -> bool:
    """Whether the compiled training ops apply to this activation."""
    return not DISABLED and torch.is_grad_enabled() and (x.is_cuda or FORCE)


class _Compiled:
    """`fn` compiled on first use (shapes dynamic: batches change length); eager for good after a failure."""

    def __init__(self, fn: Callable):
        self.fn, self.compiled, self.failed = fn, None, False

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop training
            self.failed = True
            warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                          "training continues with eager torch ops (set PHI4MM_NO_COMPILE=1 to skip compiling)")
            return self.fn(*args)


def _add_rms_norm(a: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + a, RMSNorm(x + a)): the attention residual and the MLP's input norm in one pass."""
    s = x + a
    return s, kernels.rms_norm_torch(s, w, eps)


def _rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
              n_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, T, (H + 2KV) * D); cos/sin (B|1, 1, T, rd) -> q (B, H, T, D), k, v (B, KV, T, D), q and k rotated."""
    from .decoder import apply_rope
    B, T, width = qkv.shape
    D = width // (n_heads + 2 * n_kv)
    q = qkv[..., :n_heads * D].view(B, T, n_heads, D).transpose(1, 2)  # (B, H, T, D)
    k = qkv[..., n_heads * D:(n_heads + n_kv) * D].view(B, T, n_kv, D).transpose(1, 2)  # (B, KV, T, D)
    v = qkv[..., (n_heads + n_kv) * D:].view(B, T, n_kv, D).transpose(1, 2)  # (B, KV, T, D)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in fp32 of (N, vocab) logits in any dtype: compiled, the upcast happens inside the
    softmax's reduction instead of writing an fp32 copy (N x 200,064 x 4 bytes: 4.5 GB for a 5,600-token
    text batch) that backward would also keep."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


rms_norm = _Compiled(kernels.rms_norm_torch)
cross_entropy_sum = _Compiled(_cross_entropy_sum)
add_rms_norm = _Compiled(_add_rms_norm)
rope_qkv = _Compiled(_rope_qkv)
silu_mul = _Compiled(kernels.silu_mul_torch)
