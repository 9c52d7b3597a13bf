"""Decode steps with static shapes, captured once per bucket as CUDA graphs.

A decode step launches ~50 kernels per layer; from Python that costs far more than the GPU work at small
batch. Here a pure-decode batch (one new token per sequence) runs with fixed shapes: the batch is padded to a
bucket (1, 2, 4, ... rows), every block table to a bucket of blocks, adapters are applied through masks, and
all inputs live in persistent buffers. The same code runs eagerly (CPU, tests) or captured and replayed
(CUDA). Padding rows write their keys into a reserved scratch block and their outputs are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .decoder import AttentionBackend
from .kv_cache import BlockPool
from .lora import AdapterPlan
from .model import Phi4MM


class StaticDecodeAttention(AttentionBackend):
    """One new token per row over a paged pool, all shapes fixed by (rows, blocks per row).

    Buffers: block_tables (R, NB) long, seq_lens (R,) long (tokens including the new one), slots (R,) long.
    """

    def __init__(self, pool: BlockPool, rows: int, blocks: int, device: torch.device):
        self.pool = pool
        self.block_tables = torch.zeros(rows, blocks, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.long, device=device)
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)
        self.key_pos = torch.arange(blocks * pool.block_size, device=device)  # (L,)

    def __call__(self, layer, q, k, v):
        R, KV, D = k.shape[0], self.pool.n_kv, self.pool.head_dim
        kc, vc = self.pool.k[layer], self.pool.v[layer]  # (num_blocks, block_size, KV, D)
        kc.view(-1, KV, D).index_copy_(0, self.slots, k[:, :, 0])  # (R, KV, D) new keys into their slots
        vc.view(-1, KV, D).index_copy_(0, self.slots, v[:, :, 0])
        L = self.key_pos.shape[0]
        keys = kc[self.block_tables].view(R, L, KV, D).transpose(1, 2)  # (R, KV, L, D)
        values = vc[self.block_tables].view(R, L, KV, D).transpose(1, 2)  # (R, KV, L, D)
        mask = (self.key_pos[None, :] < self.seq_lens[:, None])[:, None, None, :]  # (R, 1, 1, L)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)  # (R, H, 1, D)


@dataclass
class _Graph:
    attn: StaticDecodeAttention
    tokens: torch.Tensor  # (R,) long
    positions: torch.Tensor  # (R, 1) long
    long: torch.Tensor  # (R, 1) bool
    masks: torch.Tensor  # (A, R, 1, 1) float, one per adapter in `names`
    names: tuple[str, ...]
    logits: torch.Tensor | None = None
    graph: "torch.cuda.CUDAGraph | None" = None


def _bucket(n: int, smallest: int) -> int:
    b = smallest
    while b < n:
        b *= 2
    return b


class DecodeGraphs:
    """Runs pure-decode steps through static buckets; captures a CUDA graph per bucket on first use."""

    def __init__(self, net: Phi4MM, pool: BlockPool, scratch_block: int, max_rows: int = 64,
                 min_blocks: int = 16, capture: bool | None = None):
        self.net, self.pool, self.scratch = net, pool, scratch_block
        self.device = pool.k.device
        self.max_rows = max_rows
        self.min_blocks = min_blocks
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.graphs: dict[tuple[int, int, tuple[str, ...]], _Graph] = {}
        self._pool_handle = None
        self.steps = 0  # decode steps served by this path

    def fits(self, num_rows: int, max_blocks: int) -> bool:
        return num_rows <= self.max_rows and max_blocks <= self.pool.num_blocks

    def _blocks_bucket(self, max_blocks: int) -> int:
        # Powers of two keep the number of graphs small; never more than the pool holds.
        return min(_bucket(max_blocks, self.min_blocks), self.pool.num_blocks)

    def _build(self, rows: int, blocks: int, names: tuple[str, ...]) -> _Graph:
        d = self.device
        g = _Graph(StaticDecodeAttention(self.pool, rows, blocks, d), torch.zeros(rows, dtype=torch.long, device=d),
                   torch.zeros(rows, 1, dtype=torch.long, device=d), torch.zeros(rows, 1, dtype=torch.bool, device=d),
                   torch.zeros(len(names), rows, 1, 1, device=d), names)
        self._reset_padding(g)
        if self.capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: kernels chosen, workspaces allocated, RoPE tables on device
                    self._forward(g)
            torch.cuda.current_stream().wait_stream(stream)
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph, pool=self._pool_handle):
                g.logits = self._forward(g)
            self._pool_handle = g.graph.pool()
        return g

    def _reset_padding(self, g: _Graph) -> None:
        g.attn.block_tables.fill_(self.scratch)
        g.attn.slots.fill_(self.scratch * self.pool.block_size)
        g.attn.seq_lens.fill_(1)
        g.tokens.zero_()
        g.positions.zero_()
        g.masks.zero_()

    def _forward(self, g: _Graph) -> torch.Tensor:
        embeds = self.net.embed_tokens(g.tokens)[:, None]  # (R, 1, hidden)
        plan = AdapterPlan.from_masks(list(g.names), g.masks) if g.names else AdapterPlan()
        return self.net(embeds, g.positions, plan=plan, long_rope=g.long, attn=g.attn)[:, 0]  # (R, V)

    @torch.inference_mode()
    def run(self, tokens: list[int], positions: list[int], longs: list[bool], tables: list[list[int]],
            adapters: list[str | None]) -> torch.Tensor:
        """One decode step for n sequences -> logits (n, V). Each sequence's new token goes at `positions`."""
        n = len(tokens)
        self.steps += 1
        rows = _bucket(n, 1)
        blocks = self._blocks_bucket(max(len(t) for t in tables))
        names = tuple(sorted({a for a in adapters if a is not None}))
        key = (rows, blocks, names)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._build(rows, blocks, names)
        self._reset_padding(g)
        bs = self.pool.block_size
        table = torch.full((n, blocks), self.scratch, dtype=torch.long)
        for i, t in enumerate(tables):
            table[i, :len(t)] = torch.tensor(t)
        pos = torch.tensor(positions)
        slots = table[torch.arange(n), pos // bs] * bs + pos % bs
        g.attn.block_tables[:n].copy_(table, non_blocking=True)
        g.attn.slots[:n].copy_(slots, non_blocking=True)
        g.attn.seq_lens[:n].copy_(pos + 1, non_blocking=True)
        g.tokens[:n].copy_(torch.tensor(tokens), non_blocking=True)
        g.positions[:n, 0].copy_(pos, non_blocking=True)
        g.long[:n, 0].copy_(torch.tensor(longs), non_blocking=True)
        for j, name in enumerate(names):
            g.masks[j, :n, 0, 0].copy_(torch.tensor([float(a == name) for a in adapters]), non_blocking=True)
        if g.graph is not None:
            g.graph.replay()
            return g.logits[:n]
        return self._forward(g)[:n]
