"""Segmented LoRA for a batch that mixes adapters: one shrink and one expand launch per linear, whatever the mix.

The Punica / S-LoRA idea. Each row m of a batch names an adapter slot `ids[m]` (-1: none). Once per forward the
rows are sorted by slot (`segments`: device ops only, so it sits inside a CUDA graph); then for every linear

    shrink:  P[s, m, :r_a] = x[m, ks] @ A_a[:, ks]^T        split s of the input dimension, fp32 partials
    expand:  y[m] += round(scale_a * round(sum_s P[s, m])) @ B_a^T      in place, rows without adapter untouched

Each program of either kernel owns a tile of one adapter's segment: it reads that adapter's A or B through a
pointer table (no stacked copy of the adapters, so no memory beyond their own bytes; ranks may differ: the
vision adapter has r=256, the speech one r=320) and gathers its rows by index inside the kernel (no gather or
scatter launch). The grid is sized for the worst case (every row on every slot) so its shape depends only on
the batch size; programs whose segment is empty or shorter return at once. The shrink splits the input
dimension so that a handful of rows still spreads over the whole GPU; the expand sums the splits in a fixed
order (no atomics: the same inputs give the same bits, run after run).

The rounding follows `LoraLinear`: `x @ A^T` rounds to the activation dtype, the scale multiplies and rounds,
the expand adds `h @ B^T` to y with one rounding (as `addmm` does).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from phi4mm.model import kernels

triton = kernels.triton
if triton is not None:
    import triton.language as tl

# Opt-in: on an H200 the first version of these kernels took 5.0 ms a step for the speech adapter at batch 1
# against 4.1 ms for the masked products (all 128 LoRA linears in CUDA graphs); they won only on a batch mixing
# adapters (6.1 against 6.8 ms at 64 rows). PHI4MM_LORA_KERNELS=1 turns them on (docs/measurements.md).
DISABLED = os.environ.get("PHI4MM_LORA_KERNELS") != "1"
MIN_DOT = 16  # tl.dot needs 16 rows at least: a segment of one row is padded (masked) up to it
MAX_SPLIT = 16  # input-dimension splits of the shrink at most (the expand re-reads every split)
# Tile sizes, rows per tile by batch size. Shrink: rows x rank x input; expand: rows x output x rank.
# Past MIN_DOT rows the expand takes wider output tiles: each tile re-reads its rows' rank-space values.
CONFIG = {"shrink_n": 32, "shrink_k": 128, "expand_n": 64, "expand_n_wide": 128, "expand_k": 32, "num_warps": 4,
          "num_stages": 2}


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter slot each row of a (M, ...) batch uses, sorted into segments.

    ids (M,) int64, -1 for none; order (M,) int32: rows sorted by slot (rows without adapter last);
    counts (S,) int32 rows per slot; starts (S,) int32 where each slot's rows begin in `order`."""

    ids: torch.Tensor
    order: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor

    @property
    def slots(self) -> int:
        return self.counts.shape[0]


def segments(ids: torch.Tensor, slots: int) -> RowAdapters:
    """ids (M,) with values in [-1, slots) -> RowAdapters. Fixed shapes, no host sync: capturable."""
    # A counting sort in elementwise ops: torch.bincount reads its maximum back to the host and cannot be
    # captured, and a sort is more than this needs.
    key = torch.where(ids < 0, slots, ids)  # (M,) rows without adapter sort last
    onehot = (key[:, None] == torch.arange(slots + 1, device=ids.device)).to(torch.int32)  # (M, S + 1)
    counts = onehot.sum(0)  # (S + 1,)
    starts = torch.cumsum(counts, 0) - counts  # (S + 1,)
    within = (torch.cumsum(onehot, 0) * onehot).sum(1) - 1  # (M,) rank of each row inside its segment
    pos = starts[key] + within  # (M,) where each row goes in the sorted order
    order = torch.empty_like(pos).scatter_(0, pos, torch.arange(key.shape[0], device=ids.device, dtype=pos.dtype))
    return RowAdapters(ids, order.to(torch.int32), counts[:slots].to(torch.int32), starts[:slots].to(torch.int32))


@dataclass
class AdapterTable:
    """One linear's adapters, in slot order, as the kernels read them: device pointers to each A (r, in) and
    B (out, r) (both contiguous, in the activation dtype), ranks and scales. `key` holds the pointers it was
    built from, so a reloaded or moved parameter is noticed (see `LoraLinear.table`)."""

    a: list[torch.Tensor]
    b: list[torch.Tensor]
    scales: list[float]
    a_ptrs: torch.Tensor  # (S,) int64
    b_ptrs: torch.Tensor  # (S,) int64
    ranks: torch.Tensor  # (S,) int32
    scale_t: torch.Tensor  # (S,) float32
    max_rank: int
    aligned: bool  # every rank a multiple of 16: rows of B start 32-byte aligned (vector loads)
    key: tuple

    @staticmethod
    def pointer_key(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple:
        return tuple(t.data_ptr() for t in a) + tuple(t.data_ptr() for t in b)

    @staticmethod
    def build(a: list[torch.Tensor], b: list[torch.Tensor], scales: list[float]) -> AdapterTable:
        for t in a + b:
            if not t.is_contiguous():
                raise ValueError(f"LoRA weights must be contiguous for the segmented kernels (got strides "
                                 f"{t.stride()} for shape {tuple(t.shape)}); call .contiguous() on the adapter")
        dev = a[0].device
        ranks = [t.shape[0] for t in a]
        return AdapterTable(
            list(a), list(b), list(scales),
            torch.tensor([t.data_ptr() for t in a], dtype=torch.int64, device=dev),
            torch.tensor([t.data_ptr() for t in b], dtype=torch.int64, device=dev),
            torch.tensor(ranks, dtype=torch.int32, device=dev),
            torch.tensor(scales, dtype=torch.float32, device=dev),
            max(ranks), all(r % 16 == 0 for r in ranks), AdapterTable.pointer_key(a, b))


    def device_tensors_fit(self, other: AdapterTable) -> bool:
        return self.a_ptrs.shape == other.a_ptrs.shape and self.a_ptrs.device == other.a_ptrs.device

    def refill(self, other: AdapterTable) -> None:
        """Take `other`'s adapters, keeping this table's device tensors (their addresses are in CUDA graphs)."""
        for mine, theirs in ((self.a_ptrs, other.a_ptrs), (self.b_ptrs, other.b_ptrs), (self.ranks, other.ranks),
                             (self.scale_t, other.scale_t)):
            mine.copy_(theirs)
        self.a, self.b, self.scales, self.aligned, self.key = other.a, other.b, other.scales, other.aligned, other.key


def apply_torch(y: torch.Tensor, x: torch.Tensor, table: AdapterTable, rows: RowAdapters) -> torch.Tensor:
    """The plain products, one masked pass per adapter: y (M, N) + each row's adapter delta -> new y."""
    for slot, (a, b, s) in enumerate(zip(table.a, table.b, table.scales)):
        mask = (rows.ids == slot).to(y.dtype)[:, None]  # (M, 1)
        y = torch.addmm(y, F.linear(x, a) * s * mask, b.t())
    return y


def _row_tile(m: int) -> int:
    return MIN_DOT if m <= MIN_DOT else 32 if m <= 128 else 64


def apply(y: torch.Tensor, x: torch.Tensor, table: AdapterTable, rows: RowAdapters,
          config: dict | None = None) -> torch.Tensor:
    """y (M, N) += each row's (scale * x A^T) B^T, in place where the kernels run -> y.

    x (M, K) with unit stride along K; y (M, N) likewise. Kernels where `kernels.available` (CUDA, or CPU
    under TRITON_INTERPRET=1), else the plain products."""
    if DISABLED or not kernels.available(x) or torch.is_grad_enabled() and (x.requires_grad or table.a[0].requires_grad):
        return apply_torch(y, x, table, rows)
    M, K = x.shape
    N = y.shape[1]
    if x.stride(1) != 1 or y.stride(1) != 1 or table.a[0].dtype != x.dtype or y.dtype != x.dtype:
        raise ValueError(f"segmented LoRA wants unit-stride rows and one dtype: x {tuple(x.stride())} {x.dtype}, "
                         f"y {tuple(y.stride())} {y.dtype}, adapters {table.a[0].dtype}")
    cfg = dict(CONFIG, **(config or {}))
    bm, R = _row_tile(M), table.max_rank
    m_tiles = -(-M // bm)
    expand_n = cfg["expand_n"] if M <= MIN_DOT else cfg["expand_n_wide"]
    # Split the input dimension until a lone segment fills the GPU (TARGET_PROGRAMS), whole k-tiles per split;
    # but every expand tile re-reads its rows' partial sums, split x rows x rank x 4 bytes: keep that within
    # twice its share of B (expand_n x rank x 2 bytes), so many rows get few splits.
    k_tiles = -(-K // cfg["shrink_k"])
    r_tiles = -(-R // cfg["shrink_n"])
    split = max(1, min(MAX_SPLIT, k_tiles, kernels.TARGET_PROGRAMS // (m_tiles * r_tiles), expand_n // min(M, bm)))
    k_split = -(-k_tiles // split) * cfg["shrink_k"]
    split = -(-K // k_split)
    partial = torch.empty(split, M, R, dtype=torch.float32, device=x.device)  # (split, M, R)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    S = rows.slots
    _shrink_kernel[(m_tiles, r_tiles * split, S)](
        x, table.a_ptrs, table.ranks, rows.order, rows.counts, rows.starts, partial, M, K, x.stride(0), R,
        bm, cfg["shrink_n"], cfg["shrink_k"], k_split, split, prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _expand_kernel[(m_tiles, -(-N // expand_n), S)](
        y, partial, table.b_ptrs, table.ranks, table.scale_t, rows.order, rows.counts, rows.starts, M, N,
        y.stride(0), R, bm, expand_n, cfg["expand_k"], split, prec, table.aligned,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


if triton is not None:
    @triton.jit
    def _segment_rows(ORDER, COUNTS, STARTS, slot, pid_m, BM: tl.constexpr):
        """This program's rows of `slot`'s segment -> (row indices (BM,), valid mask (BM,))."""
        cnt = tl.load(COUNTS + slot)
        i = pid_m * BM + tl.arange(0, BM)
        valid = i < cnt
        rows = tl.load(ORDER + tl.load(STARTS + slot) + i, mask=valid, other=0)
        return rows, valid

    @triton.jit
    def _shrink_kernel(X, A_PTRS, RANKS, ORDER, COUNTS, STARTS, P, M, K, stride_xm, R: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, K_SPLIT: tl.constexpr,
                       SPLIT: tl.constexpr, PREC: tl.constexpr):
        pid_m = tl.program_id(0)
        slot = tl.program_id(2)
        if pid_m * BM >= tl.load(COUNTS + slot):
            return  # this slot has fewer rows (or none)
        rank = tl.load(RANKS + slot)
        pid_n = tl.program_id(1) // SPLIT
        s = tl.program_id(1) % SPLIT
        if pid_n * BN >= rank:
            return  # a smaller adapter than the largest
        rows, valid = _segment_rows(ORDER, COUNTS, STARTS, slot, pid_m, BM)
        n = pid_n * BN + tl.arange(0, BN)
        nm = n < rank
        # A pointer read from memory tells the compiler nothing of its alignment: without these hints every load
        # is one 2-byte element. Parameters are allocated 256-byte aligned; whole tiles of k are contiguous.
        a_ptr = tl.multiple_of(tl.load(A_PTRS + slot).to(tl.pointer_type(X.dtype.element_ty)), 16)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K_SPLIT, BK):
            k = tl.max_contiguous(tl.multiple_of(s * K_SPLIT + k0 + tl.arange(0, BK), BK), BK)
            km = k < K
            xt = tl.load(X + rows[:, None] * stride_xm + k[None, :], mask=valid[:, None] & km[None, :], other=0.0)
            at = tl.load(a_ptr + n[:, None] * K + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)  # (BN, BK)
            acc += tl.dot(xt, tl.trans(at), input_precision=PREC)
        tl.store(P + (s * M + rows[:, None]) * R + n[None, :], acc, mask=valid[:, None] & nm[None, :])

    @triton.jit
    def _expand_kernel(Y, P, B_PTRS, RANKS, SCALES, ORDER, COUNTS, STARTS, M, N, stride_ym, R: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                       PREC: tl.constexpr, ALIGNED: tl.constexpr):
        pid_m = tl.program_id(0)
        slot = tl.program_id(2)
        if pid_m * BM >= tl.load(COUNTS + slot):
            return
        rows, valid = _segment_rows(ORDER, COUNTS, STARTS, slot, pid_m, BM)
        rank = tl.load(RANKS + slot)
        if ALIGNED:
            rank = tl.multiple_of(rank, 16)
        scale = tl.load(SCALES + slot)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        nm = n < N
        b_ptr = tl.multiple_of(tl.load(B_PTRS + slot).to(tl.pointer_type(Y.dtype.element_ty)), 16)
        out = Y + rows[:, None] * stride_ym + n[None, :]
        acc = tl.load(out, mask=valid[:, None] & nm[None, :], other=0.0).to(tl.float32)
        for k0 in range(0, rank, BK):
            k = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BK), BK), BK)
            km = k < rank
            h = tl.zeros([BM, BK], dtype=tl.float32)
            for s in tl.static_range(SPLIT):  # fixed order: deterministic sums
                h += tl.load(P + (s * M + rows[:, None]) * R + k[None, :], mask=valid[:, None] & km[None, :],
                             other=0.0)
            # LoraLinear's rounding: x A^T rounds to the dtype, the scaled value rounds again.
            h = (h.to(Y.dtype.element_ty).to(tl.float32) * scale).to(Y.dtype.element_ty)
            bt = tl.load(b_ptr + n[:, None] * rank + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)  # (BN, BK)
            acc += tl.dot(h, tl.trans(bt), input_precision=PREC)
        tl.store(out, acc.to(Y.dtype.element_ty), mask=valid[:, None] & nm[None, :])
