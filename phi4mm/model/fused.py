"""The decoder's elementwise chains fused for training: RMSNorm, residual add + RMSNorm and the loss's
cross-entropy compiled with `torch.compile` (Inductor writes forward and backward), RoPE on the fused qkv and the
SiLU gate as autograd functions whose forward is the inference Triton kernel and whose backward is written out.

Why: an eager training step at full size spent about a third of its GPU time outside matrix products. In one
vision-LoRA step on an H200 (8 prompts of 1,441 tokens, `bench/bench_train.py --profile`), the products took
~290 ms and ~1,700 copies, ~1,200 multiplies and ~800 adds and casts another ~250 ms: RMSNorm alone is six
kernels forward (fp32 upcast, square, mean, rsqrt, two multiplies) and more backward, RoPE is slices, two
concatenations and four multiplies.

The math is the torch twins' (reference.rms_norm_torch, reference.apply_rope, reference.silu_mul_torch); tests compare
values and gradients with the eager path, and check the hand-written gradients numerically. Used only while
autograd records (training) on CUDA. PHI4MM_NO_COMPILE=1 turns it off; PHI4MM_COMPILE=1 also turns it on for
CPU tensors (tests). If compiling fails, training warns once and goes on with the eager ops.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from phi4mm.model import kernels

DISABLED = os.environ.get("PHI4MM_NO_COMPILE") == "1"
FORCE = os.environ.get("PHI4MM_COMPILE") == "1"


def enabled(x: torch.Tensor) -> bool:
    """Whether the fused training ops (compiled and hand-written) apply to this activation."""
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


class _RopeQKV(torch.autograd.Function):
    """qkv (B, T, (H + 2KV) * D) -> q (B, H, T, D), k and v (B, KV, T, D), q and k rotated.

    Written by hand, not compiled: Inductor's kernels for this (dynamic shapes, a (B, T, H, D) <-> (B, H, T, D)
    transpose) took 1.84 ms a layer backward and 0.43 ms forward on an H200 for an 11,528-token batch, 10-20x
    what moving the bytes costs. Forward: the inference RoPE kernel (kernels.rope_qk) on CUDA. Backward: the
    transpose of the rotation, y = x cos + R(x) sin with R(x1, x2) = (-x2, x1), so dx = dy cos + R^T(dy sin),
    R^T(z1, z2) = (z2, -z1), in a few elementwise ops that write the (B, T, ., D) gradient in place.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int):
        q, k, v = kernels.rotated_heads(qkv, cos, sin, n_heads, n_kv)  # (B, H|KV, T, D)
        ctx.save_for_backward(cos, sin)
        ctx.dims = (*qkv.shape[:2], n_heads, n_kv, q.shape[-1])
        return q, k, v.contiguous()  # v a copy: a view of the input would alias qkv across the boundary

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        cos, sin = ctx.saved_tensors
        B, T, n_heads, n_kv, D = ctx.dims
        rd, half = cos.shape[-1], cos.shape[-1] // 2
        grad = torch.empty(B, T, n_heads + 2 * n_kv, D, dtype=dq.dtype, device=dq.device)  # (B, T, heads, D)
        c = cos.transpose(1, 2)[..., :half]  # (B|1, T, 1, rd/2): cos and sin repeat over the two halves
        s = sin.transpose(1, 2)[..., :half]
        for g, out in ((dq, grad[:, :, :n_heads]), (dk, grad[:, :, n_heads:n_heads + n_kv])):
            g = g.transpose(1, 2)  # (B, T, heads, D) view
            g1, g2 = g[..., :half], g[..., half:rd]
            torch.addcmul(g1 * c, g2, s, out=out[..., :half])  # dx1 = dy1 cos + dy2 sin
            torch.addcmul(g2 * c, g1, -s, out=out[..., half:rd])  # dx2 = dy2 cos - dy1 sin
            out[..., rd:] = g[..., rd:]  # the pass-through dims
        grad[:, :, n_heads + n_kv:] = dv.transpose(1, 2)
        return grad.view(B, T, -1), None, None, None, None


class _SiluMul(torch.autograd.Function):
    """gate_up (..., 2I) -> up * silu(gate) (..., I), the gate being the first half. Forward: the inference
    kernel on CUDA; backward in elementwise ops (Inductor's fused kernel took 1.25 ms a layer at 11,528 x 8,192,
    4x the memory traffic's time)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor):
        ctx.save_for_backward(gate_up)
        if kernels.available(gate_up):
            flat = gate_up.reshape(-1, gate_up.shape[-1])
            return kernels.silu_mul(flat).view(*gate_up.shape[:-1], -1)  # (..., I)
        return kernels.silu_mul_torch(gate_up)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad = torch.empty_like(gate_up)
        d_gate, d_up = grad.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        torch.mul(gate, sig, out=d_up).mul_(dout)  # d up = dout * silu(gate)
        # d gate = dout * up * silu'(gate), silu'(g) = sig * (1 + g * (1 - sig))
        torch.mul(dout, up, out=d_gate).mul_(sig)
        d_gate.mul_(torch.rsub(sig, 1.0).mul_(gate).add_(1.0))
        return grad


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
             n_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, T, (H + 2KV) * D); cos/sin (B|1, 1, T, rd) -> q (B, H, T, D), k, v (B, KV, T, D), q and k rotated."""
    return _RopeQKV.apply(qkv, cos, sin, n_heads, n_kv)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2I) -> (..., I): up * silu(gate)."""
    return _SiluMul.apply(gate_up)


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in fp32 of (N, vocab) logits in any dtype: compiled, the upcast happens inside the
    softmax's reduction instead of writing an fp32 copy (N x 200,064 x 4 bytes: 4.5 GB for a 5,600-token
    text batch) that backward would also keep."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


rms_norm = _Compiled(kernels.rms_norm_torch)
cross_entropy_sum = _Compiled(_cross_entropy_sum)
add_rms_norm = _Compiled(_add_rms_norm)
