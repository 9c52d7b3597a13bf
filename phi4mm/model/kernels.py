"""Fused decode kernels (Triton) and the plain torch code they replace.

A decode step at small batch is bound by how many kernels it launches, not by arithmetic: the eager layer
launches ~40 (norms in several passes, RoPE by slices and concatenations, a gather of the whole paged history
and a masked SDPA). These four kernels cut a layer to ~10 launches, all inside the CUDA graph:

- `rms_norm` / `add_rms_norm`: the residual add and the norm in one pass over the row.
- `rope_store`: rotates q and k, writes k and v into their paged slots, returns q as (R, H, D).
- `paged_decode_attention`: one query token per row against its blocks read in place (no gather), split over
  the sequence (flash-decoding) when rows are few, merged by a second small kernel.
- `silu_mul`: the MLP gate.

Each op has a torch version with the decoder's exact rounding order (bf16 rounds after each product, as
`decoder.py` does), used on CPU and as the oracle in the tests; the kernels also run under Triton's interpreter
(TRITON_INTERPRET=1) on CPU, which is how CI checks them.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from phi4mm.model.reference import (  # noqa: F401
    apply_rope,
    rms_norm_torch,
    rope_store_torch,
    silu_mul_torch,
)

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the torch versions.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DISABLED = os.environ.get("PHI4MM_NO_TRITON") == "1"  # force the torch versions (A/B timing, debugging)
MIN_DOT = 16  # tl.dot needs at least 16 rows: a GQA group (3 heads) is padded up to it
MAX_PARTS = 64  # partitions per row at most (the merge kernel holds them all at once)
TARGET_PROGRAMS = 264  # ~2 programs per multiprocessor of an H100/H200 (132 SMs)
# Paged decode attention launch settings: keys per partition when a row alone cannot fill the GPU, keys per
# tile, warps and pipeline depth. Chosen with bench/kernel_tune.py on an H200 (bench/results/kernel_tune.json):
# within 5% of each case's best at 1 row x 768 keys (6.0 us), 64 rows x ~640 (45.6 us, 3.6 TB/s) and
# 1 row x 24k (33.1 us).
DECODE_CONFIG = {"part_tokens": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}


def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on this tensor's device (CUDA, or CPU under the interpreter)."""
    return triton is not None and not DISABLED and (t.device.type == "cuda" or INTERPRET)


def _p2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------------------------------ torch versions
def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """q (R, H, D) against each row's first seq_lens keys through its block table -> (R, H, D)."""
    R, H, D = q.shape
    bs, KV = k_cache.shape[1], k_cache.shape[2]
    L = block_tables.shape[1] * bs
    keys = k_cache[block_tables].view(R, L, KV, D).transpose(1, 2)  # (R, KV, L, D)
    vals = v_cache[block_tables].view(R, L, KV, D).transpose(1, 2)  # (R, KV, L, D)
    mask = (torch.arange(L, device=q.device)[None, :] < seq_lens[:, None])[:, None, None, :]  # (R, 1, 1, L)
    out = F.scaled_dot_product_attention(q[:, :, None], keys.to(q.dtype), vals.to(q.dtype), attn_mask=mask,
                                         enable_gqa=True)  # (R, H, 1, D)
    return out[:, :, 0]


# ------------------------------------------------------------------------------------------ Triton kernels
if triton is not None:
    @triton.jit
    def _round_bf16(v):
        """fp32 -> the nearest bf16 value (ties to even), still in fp32, by integer arithmetic. A plain
        `.to(bf16).to(fp32)` lets the compiler turn `round(a*b) + round(c*d)` into a bf16 FMA, which rounds
        once instead of three times and no longer matches eager torch bit for bit."""
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _add_rms_norm_kernel(X, RES, W, OUT, RES_OUT, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                             HAS_RES: tl.constexpr):
        row = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        m = i < N
        x = tl.load(X + row * N + i, mask=m, other=0.0)
        if HAS_RES:
            # The residual sum is rounded to the activation dtype first, as `x + delta` is in the decoder.
            x = (x.to(tl.float32) + tl.load(RES + row * N + i, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(RES_OUT + row * N + i, x, mask=m)
        x32 = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / N + eps)
        y = (x32 * rstd).to(x.dtype)  # cast, then scale: RMSNorm's order
        w = tl.load(W + i, mask=m, other=0.0)
        tl.store(OUT + row * N + i, (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype), mask=m)

    @triton.jit
    def _rope_store_kernel(QKV, COS, SIN, SLOTS, KC, VC, QOUT, KOUT, H: tl.constexpr, KV: tl.constexpr,
                           D: tl.constexpr, D_PAD: tl.constexpr, RD: tl.constexpr, TO_CACHE: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)  # 0..H-1: query heads; H..H+KV-1: key heads (which also move their values)
        i = tl.arange(0, D_PAD)
        m = i < D
        base = QKV + row * (H + 2 * KV) * D + head * D
        x = tl.load(base + i, mask=m, other=0.0)
        # rotate_half on the first RD dims: [-x2, x1]
        partner = tl.where(i < RD // 2, i + RD // 2, i - RD // 2)
        xr = tl.load(base + partner, mask=i < RD, other=0.0).to(tl.float32)
        xr = tl.where(i < RD // 2, -xr, xr)
        c = tl.load(COS + row * RD + i, mask=i < RD, other=0.0).to(tl.float32)
        s = tl.load(SIN + row * RD + i, mask=i < RD, other=0.0).to(tl.float32)
        # Each product rounds to the dtype, then their sum does: eager torch's order.
        if x.dtype == tl.bfloat16:
            a = _round_bf16(x.to(tl.float32) * c)
            b = _round_bf16(xr * s)
        else:
            a = (x.to(tl.float32) * c).to(x.dtype).to(tl.float32)
            b = (xr * s).to(x.dtype).to(tl.float32)
        y = tl.where(i < RD, (a + b).to(x.dtype), x)
        if head < H:
            tl.store(QOUT + (row * H + head) * D + i, y, mask=m)
        elif TO_CACHE:
            kh = head - H
            slot = tl.load(SLOTS + row)
            tl.store(KC + (slot * KV + kh) * D + i, y.to(KC.dtype.element_ty), mask=m)
            v = tl.load(base + KV * D + i, mask=m, other=0.0)
            tl.store(VC + (slot * KV + kh) * D + i, v.to(VC.dtype.element_ty), mask=m)
        else:
            tl.store(KOUT + (row * KV + head - H) * D + i, y, mask=m)

    @triton.jit
    def _attend_tile(q, KC, VC, BT, row, kvh, t0, stop, acc, l_i, m_i, qk_scale, bt_stride,
                     KV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                     PREC: tl.constexpr):
        """The keys t0 .. t0 + BLOCK_N - 1 (those before `stop`, at least one) folded into the running softmax
        (acc, l_i, m_i) of the query heads q (G_PAD, D) -> the updated (acc, l_i, m_i)."""
        d = tl.arange(0, D)
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < stop
        blk = tl.load(BT + row * bt_stride + t // BS, mask=valid, other=0)
        off = ((blk * BS + t % BS) * KV + kvh)[:, None] * D + d[None, :]  # (BLOCK_N, D) in the pool
        k = tl.load(KC + off, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (G_PAD, BLOCK_N), log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the tile holds at least one valid key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(VC + off, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        return acc, l_i, m_new

    @triton.jit
    def _paged_decode_kernel(Q, KC, VC, BT, LENS, OUT, ACC, MAX, SUM, qk_scale, bt_stride,
                             H: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                             D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, PART: tl.constexpr,
                             NPARTS: tl.constexpr, PREC: tl.constexpr, CONST_BOUNDS: tl.constexpr):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        seq_len = tl.load(LENS + row)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        heads = kvh * G + g  # the query heads that share this key head (GQA)
        q = tl.load(Q + (row * H + heads)[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        start = part * PART
        stop = tl.minimum(start + PART, seq_len)
        if CONST_BOUNDS:
            # Under Triton's interpreter a loop bound read at run time (stop, and start from the program id)
            # becomes a Python int through int() of a one-element array, which Triton 3.6's interpreter does
            # without squeezing and NumPy 2.4 refuses (TypeError). The interpreter walks the partition's whole
            # span instead, skipping the tiles past the row's end: the same tiles, the same arithmetic.
            for i in range(0, PART, BLOCK_N):
                if start + i < stop:
                    acc, l_i, m_i = _attend_tile(q, KC, VC, BT, row, kvh, start + i, stop, acc, l_i, m_i, qk_scale,
                                                 bt_stride, KV, D, BS, BLOCK_N, PREC)
        else:
            for t0 in range(start, stop, BLOCK_N):
                acc, l_i, m_i = _attend_tile(q, KC, VC, BT, row, kvh, t0, stop, acc, l_i, m_i, qk_scale,
                                             bt_stride, KV, D, BS, BLOCK_N, PREC)
        gm = g < G
        if NPARTS == 1:
            out = acc / l_i[:, None]
            tl.store(OUT + (row * H + heads)[:, None] * D + d[None, :], out.to(OUT.dtype.element_ty),
                     mask=gm[:, None])
        else:
            # Partial results: unnormalised sums with their running max and denominator, merged below. A
            # partition past the row's end leaves max -inf and sum 0, which the merge weighs as zero.
            idx = (row * H + heads) * NPARTS + part
            tl.store(MAX + idx, m_i, mask=gm)
            tl.store(SUM + idx, l_i, mask=gm)
            tl.store(ACC + idx[:, None] * D + d[None, :], acc, mask=gm[:, None])

    @triton.jit
    def _merge_parts_kernel(ACC, MAX, SUM, OUT, D: tl.constexpr, NPARTS: tl.constexpr, P_PAD: tl.constexpr):
        rh = tl.program_id(0)  # row * H + head
        p = tl.arange(0, P_PAD)
        d = tl.arange(0, D)
        pm = p < NPARTS
        m = tl.load(MAX + rh * NPARTS + p, mask=pm, other=float("-inf"))
        l_ = tl.load(SUM + rh * NPARTS + p, mask=pm, other=0.0)
        m_all = tl.max(m, axis=0)  # finite: partition 0 always holds the row's first key
        w = tl.exp2(m - m_all)
        acc = tl.load(ACC + (rh * NPARTS + p)[:, None] * D + d[None, :], mask=pm[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_ * w, axis=0)
        tl.store(OUT + rh * D + d, out.to(OUT.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(GU, OUT, I: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = i < I
        gate = tl.load(GU + row * 2 * I + i, mask=m, other=0.0)
        up = tl.load(GU + row * 2 * I + I + i, mask=m, other=0.0)
        g32 = gate.to(tl.float32)
        act = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)  # silu rounds to the dtype, then the product does
        tl.store(OUT + row * I + i, (up.to(tl.float32) * act.to(tl.float32)).to(gate.dtype), mask=m)


# ------------------------------------------------------------------------------------------ dispatch
def add_rms_norm(delta: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, N) rows: residual' = residual + delta (rounded to the dtype), out = RMSNorm(residual') * w.

    residual None: the first norm of the stack, `delta` is the residual itself. -> (out, residual')."""
    if not available(delta):
        res = delta if residual is None else residual + delta
        return rms_norm_torch(res, w, eps), res
    R, N = delta.shape
    out = torch.empty_like(delta)
    res_out = delta if residual is None else torch.empty_like(delta)
    _add_rms_norm_kernel[(R,)](delta, residual if residual is not None else delta, w, out, res_out, eps, N,
                               _p2(N), residual is not None, num_warps=4 if N <= 4096 else 8)
    return out, res_out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of any shape."""
    if not available(x):
        return rms_norm_torch(x, w, eps)
    return add_rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), None, w, eps)[0].view(x.shape)


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate q and k of one new token per row, store k and v in their slots -> q (R, H, D)."""
    if not available(qkv):
        return rope_store_torch(qkv, cos, sin, slots, k_cache, v_cache, n_heads)
    R = qkv.shape[0]
    KV, D = k_cache.shape[2], k_cache.shape[3]
    q = torch.empty(R, n_heads, D, dtype=qkv.dtype, device=qkv.device)
    _rope_store_kernel[(R, n_heads + KV)](qkv, cos, sin, slots, k_cache, v_cache, q, q, n_heads, KV, D, _p2(D),
                                          cos.shape[-1], True, num_warps=1)
    return q


def rope_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
            n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k of packed rows: qkv (R, (H+2KV)*D) contiguous, cos/sin (R, rd) -> q (R, H, D),
    k (R, KV, D). Callers check `available` first (there is no torch twin: decoder.apply_rope is it)."""
    R = qkv.shape[0]
    D = qkv.shape[1] // (n_heads + 2 * n_kv)
    q = torch.empty(R, n_heads, D, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(R, n_kv, D, dtype=qkv.dtype, device=qkv.device)
    _rope_store_kernel[(R, n_heads + n_kv)](qkv, cos, sin, cos, q, q, q, k, n_heads, n_kv, D, _p2(D),
                                            cos.shape[-1], False, num_warps=1)
    return q, k


def decode_parts(rows: int, kv_heads: int, max_keys: int, part_tokens: int | None = None) -> int:
    """How many partitions each row's keys are split into: enough programs to fill the GPU, none empty-ish."""
    part_tokens = part_tokens or DECODE_CONFIG["part_tokens"]
    parts = 1
    while rows * kv_heads * parts < TARGET_PROGRAMS and (parts * 2) * part_tokens <= max_keys \
            and parts * 2 <= MAX_PARTS:
        parts *= 2
    return parts


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           parts: int | None = None, config: dict | None = None) -> torch.Tensor:
    """q (R, H, D), caches (num_blocks, block_size, KV, D), block_tables (R, NB), seq_lens (R,) -> (R, H, D).

    Shapes depend only on (R, NB): safe to capture in a CUDA graph; seq_lens and tables are read on device."""
    if not available(q):
        return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens)
    R, H, D = q.shape
    bs, KV = k_cache.shape[1], k_cache.shape[2]
    G = H // KV
    max_keys = block_tables.shape[1] * bs
    cfg = dict(DECODE_CONFIG, **(config or {}))
    if parts is None:
        parts = decode_parts(R, KV, max_keys, cfg["part_tokens"])
    part = -(-max_keys // parts)
    block_n = cfg["block_n"]
    part = -(-part // block_n) * block_n  # whole tiles per partition
    out = torch.empty_like(q)
    qk_scale = (1.0 / math.sqrt(D)) * 1.4426950408889634  # softmax in base 2: exp2(x * log2 e) = exp(x)
    if parts == 1:
        acc = mx = sm = out  # unused
    else:
        acc = torch.empty(R, H, parts, D, dtype=torch.float32, device=q.device)
        mx = torch.empty(R, H, parts, dtype=torch.float32, device=q.device)
        sm = torch.empty(R, H, parts, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(R, KV, parts)](q, k_cache, v_cache, block_tables, seq_lens, out, acc, mx, sm, qk_scale,
                                         block_tables.stride(0), H, KV, G, max(MIN_DOT, _p2(G)), D, bs, block_n,
                                         part, parts, "ieee" if q.dtype == torch.float32 else "tf32", INTERPRET,
                                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if parts > 1:
        _merge_parts_kernel[(R * H,)](acc, mx, sm, out, D, parts, max(2, _p2(parts)), num_warps=4)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(R, 2I) -> (R, I): up * silu(gate)."""
    if not available(gate_up):
        return silu_mul_torch(gate_up)
    R, I2 = gate_up.shape
    I = I2 // 2
    out = torch.empty(R, I, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _p2(I))
    _silu_mul_kernel[(R, triton.cdiv(I, block))](gate_up, out, I, block, num_warps=4)
    return out


def rotated_heads(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
                  n_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, T, (H + 2KV) * D); cos/sin (B|1, 1, T, rd) -> q (B, H, T, D), k, v (B, KV, T, D), q and k
    rotated (the RoPE kernel when fused, else apply_rope on views), v a view of qkv."""
    B, T, width = qkv.shape
    D = width // (n_heads + 2 * n_kv)
    q_out, kv_out = n_heads * D, n_kv * D
    v = qkv[..., q_out + kv_out:].view(B, T, n_kv, D).transpose(1, 2)  # (B, KV, T, D)
    if not torch.is_grad_enabled() and available(qkv):
        rd = cos.shape[-1]
        c = cos.expand(B, 1, T, rd).reshape(B * T, rd)  # (B*T, rd): one row per token
        s = sin.expand(B, 1, T, rd).reshape(B * T, rd)
        q, k = rope_qk(qkv.reshape(B * T, -1).contiguous(), c, s, n_heads, n_kv)
        q = q.view(B, T, n_heads, D).transpose(1, 2)  # (B*T, H, D) -> (B, H, T, D)
        k = k.view(B, T, n_kv, D).transpose(1, 2)  # (B*T, KV, D) -> (B, KV, T, D)
        return q, k, v
    q = qkv[..., :q_out].view(B, T, n_heads, D).transpose(1, 2)  # (B, H, T, D)
    k = qkv[..., q_out:q_out + kv_out].view(B, T, n_kv, D).transpose(1, 2)  # (B, KV, T, D)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
