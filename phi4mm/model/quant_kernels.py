"""Triton GEMM kernels that read fp8 or packed int4 weights and dequantize them in registers.

Why not a library: on the stack we run (torch 2.11, Triton 3.6, an H200) torchao's int4 kernels cannot be
installed, its fp8 weight-only path dequantizes the whole weight eagerly (15x slower than bf16) and its fp8
dynamic-activation GEMM is 1.4-2.2x slower than bf16 at decode sizes. A decode step reads every weight once
per token, so a kernel that streams 1 (fp8) or 0.5 (int4) bytes a weight instead of 2 is what makes
quantization pay at small batch; at large batch the same kernel amortises the dequantization over many rows.

One kernel serves both formats: `y (M, N) = x (M, K) @ dequant(W (N, K)).T`.
- fp8: W is float8_e4m3fn (N, K) with one fp32 scale per output channel, applied once to the accumulator.
- int4: W is two 4-bit values a byte, (N, K/2) uint8, element 2j in the low nibble, stored as q + 8 (the
  bytes of compressed-tensors' int32 packing); one scale per (row, group of GROUP inputs), multiplied into
  the weight tile in fp32 and rounded to the activation dtype, exactly as the torch path dequantizes.

Everything is static-shaped and sync-free: safe inside CUDA graphs. The launch settings are a table by rows
(no autotuning: it would synchronise, and a first call may happen while a graph is being captured).
Runs under Triton's interpreter on CPU (TRITON_INTERPRET=1 before import), which is how CI checks it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

INT4_OFFSET = 8  # stored nibble = q + 8, q in [-8, 7] (compressed-tensors' unsigned offset)
_OFF: tl.constexpr = tl.constexpr(INT4_OFFSET)  # the same, visible inside the kernel
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows: fewer are padded (masked loads, no extra memory traffic)


@triton.jit
def _qmm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_sn,
                INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)  # (BM, BK)
        if INT4:
            # K is a multiple of GROUP and BLOCK_K divides it or is a multiple of it: no K mask needed.
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b = tl.load(w_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :], mask=n_ok[:, None],
                        other=_OFF * 17)  # (BN, BK/2) uint8; padding rows decode to zeros
            lo = (b & 0xF).to(tl.int32) - _OFF
            hi = (b >> 4).to(tl.int32) - _OFF
            q = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)).to(tl.float32)  # (BN, BK/2, 2): 2j low, 2j+1 high
            if BLOCK_K >= GROUP:
                offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
                s = tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=n_ok[:, None],
                            other=0.0).to(tl.float32)  # (BN, BK/GROUP)
                w = tl.reshape(tl.reshape(q, (BLOCK_N, BLOCK_K // GROUP, GROUP)) * s[:, :, None],
                               (BLOCK_N, BLOCK_K))
            else:
                s = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
                w = q * s[:, None]
            # Rounded to the activation dtype as the torch path's dequantized weight is, then multiplied.
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        else:
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :],
                        mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0)  # (BN, BK) fp8
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if not INT4:
        s = tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * s[None, :]  # one scale per output channel: applied once, to the sum
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# Launch settings by rows: (max rows, BLOCK_M, BLOCK_N, BLOCK_K for fp8, warps, stages). Small M: narrow
# output tiles so a 3072-wide projection still spreads over every multiprocessor (the op is bound by reading
# the weight); large M: square-ish tiles for tensor-core throughput.
CONFIGS = (
    (16, 16, 32, 128, 4, 4),
    (32, 32, 32, 128, 4, 4),
    (64, 64, 64, 128, 4, 4),
    (None, 128, 128, 64, 8, 3),
)


def config(m: int) -> tuple[int, int, int, int, int]:
    for top, bm, bn, bk, warps, stages in CONFIGS:
        if top is None or m <= top:
            return bm, bn, bk, warps, stages
    raise AssertionError("unreachable: the last CONFIGS row has no bound")


def qmm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, int4: bool, group: int,
        out_features: int) -> torch.Tensor:
    """x (M, K) contiguous rows -> (M, out_features) in x's dtype.

    weight: fp8 (N, K), or int4 bytes (N, K/2) uint8; scale: (N, 1) fp8, or (N, K/group) int4.
    """
    M, K = x.shape
    N = out_features
    bm, bn, bk, warps, stages = config(M)
    if int4:  # a K-block must divide K (int4 loads are unmasked along K) and a group or a multiple of one
        bk = min(bk, group) if bk % group and group % bk else bk
        while K % bk:
            bk //= 2
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _qmm_kernel[grid](x, weight, scale, y, M, N, K, x.stride(0), y.stride(0), scale.stride(0),
                      INT4=int4, GROUP=group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y
