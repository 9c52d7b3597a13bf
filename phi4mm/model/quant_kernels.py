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


@triton.jit
def _qgemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_ym, stride_sn,
                  INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row of x per program along axis 1: multiply-and-sum on the CUDA cores, no tensor-core padding of
    1 row to 16. Scales are applied to each group's partial sum (the weight is never rounded)."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if INT4:
            offs_h = tl.arange(0, BLOCK_K // 2)
            b = tl.load(w_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + offs_h)[None, :], mask=n_ok[:, None],
                        other=_OFF * 17)  # (BN, BK/2) uint8
            xe = tl.load(x_row + k0 + 2 * offs_h).to(tl.float32)  # inputs 2j (low nibbles)
            xo = tl.load(x_row + k0 + 2 * offs_h + 1).to(tl.float32)  # inputs 2j+1 (high nibbles)
            p = ((b & 0xF).to(tl.float32) - _OFF) * xe[None, :] + ((b >> 4).to(tl.float32) - _OFF) * xo[None, :]
            if BLOCK_K >= GROUP:
                offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
                s = tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=n_ok[:, None],
                            other=0.0).to(tl.float32)  # (BN, BK/GROUP)
                part = tl.sum(tl.reshape(p, (BLOCK_N, BLOCK_K // GROUP, GROUP // 2)), axis=2)  # (BN, BK/GROUP)
                acc += tl.sum(part * s, axis=1)
            else:
                s = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
                acc += tl.sum(p, axis=1) * s
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)  # (BN, BK) fp8
            x = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if not INT4:
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _dequant_int4_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_sn, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """Packed int4 (N, K/2) -> (N, K) in out's dtype, for prefill-sized GEMMs done by cuBLAS afterwards."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = offs_n < N
    b = tl.load(w_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :],
                mask=n_ok[:, None], other=_OFF * 17)
    q = tl.reshape(tl.join((b & 0xF).to(tl.float32) - _OFF, (b >> 4).to(tl.float32) - _OFF), (BLOCK_N, BLOCK_K))
    s = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], (q * s[:, None]).to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None])


# Launch settings by rows for the tensor-core kernel: (max rows, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), from
# bench/quant_kernel_tune.py --sweep on an H200 (best or within 5% of it on the gate_up and down shapes).
CONFIGS = (
    (16, 16, 32, 256, 4, 4),
    (32, 32, 32, 256, 4, 3),
    (64, 64, 32, 256, 4, 3),
    (None, 128, 128, 64, 8, 3),
)
# One row: a program per 8 outputs on the CUDA cores. Measured on an H200 (CUDA-graph replay, 3072 x 16384):
# fp8 12.2 us, int4 18.4 us, bf16 cuBLAS 25.2 us. From 2 rows the tensor-core tiles win (gate_up at 2 rows:
# 21.5 / 27.0 us against the per-row kernel's 26.9 / 35.0).
GEMV_MAX_ROWS = 1
GEMV_CONFIG = (8, 512, 4)  # BLOCK_N, BLOCK_K, warps
DEQUANT_BLOCK = (32, 128)  # BLOCK_N, BLOCK_K of the int4 -> dense kernel (BLOCK_K must divide the group)


def config(m: int) -> tuple[int, int, int, int, int]:
    for top, bm, bn, bk, warps, stages in CONFIGS:
        if top is None or m <= top:
            return bm, bn, bk, warps, stages
    raise AssertionError("unreachable: the last CONFIGS row has no bound")


def _int4_block_k(bk: int, group: int, K: int) -> int:
    """A K-block that divides K (int4 loads are unmasked along K) and divides a group or is a multiple of one."""
    bk = min(bk, group) if bk % group and group % bk else bk
    while K % bk:
        bk //= 2
    return bk


def qmm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, int4: bool, group: int,
        out_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) contiguous rows -> (M, out_features) in x's dtype.

    weight: fp8 (N, K), or int4 bytes (N, K/2) uint8; scale: (N, 1) fp8, or (N, K/group) int4.
    out: an (M, N) tensor of x's dtype with unit column stride to write into (the engine's shared logits
    buffer: the quantized head writes there as the bf16 head's matmul does), else a new one.
    """
    M, K = x.shape
    N = out_features
    if out is not None and (out.shape != (M, N) or out.dtype != x.dtype or out.stride(1) != 1):
        raise ValueError(f"qmm out must be ({M}, {N}) {x.dtype} with unit column stride; got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    y = torch.empty(M, N, device=x.device, dtype=x.dtype) if out is None else out
    if M <= GEMV_MAX_ROWS:
        bn, bk, warps = GEMV_CONFIG
        bk = _int4_block_k(bk, group, K) if int4 else bk
        _qgemv_kernel[(triton.cdiv(N, bn), M)](x, weight, scale, y, N, K, x.stride(0), y.stride(0), scale.stride(0),
                                               INT4=int4, GROUP=group, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
        return y
    bm, bn, bk, warps, stages = config(M)
    bk = _int4_block_k(bk, group, K) if int4 else bk
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _qmm_kernel[grid](x, weight, scale, y, M, N, K, x.stride(0), y.stride(0), scale.stride(0),
                      INT4=int4, GROUP=group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y


def dequantize_int4(weight: torch.Tensor, scale: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """int4 bytes (N, K/2) uint8 and scales (N, K/group) -> (N, K) in `dtype` (w = q * s, rounded once)."""
    N, K = weight.shape[0], weight.shape[1] * 2
    out = torch.empty(N, K, device=weight.device, dtype=dtype)
    bn, bk = DEQUANT_BLOCK
    bk = _int4_block_k(min(bk, group), group, K)
    _dequant_int4_kernel[(triton.cdiv(N, bn), K // bk)](weight, scale, out, N, K, scale.stride(0), GROUP=group,
                                                       BLOCK_N=bn, BLOCK_K=bk)
    return out
