"""Decode steps and lone prefills with static shapes, captured once per bucket as CUDA graphs.

A decode step launches hundreds of kernels; from Python that costs far more than the GPU work at small
batch. Here a pure-decode batch (one new token per sequence) runs with fixed shapes: the batch is padded to a
bucket (1, 2, 4, ... rows), every block table to a bucket of blocks, adapters are applied by the segmented LoRA
kernels or row masks (one graph per bucket serves every mix; a batch all on one adapter runs it unmasked, or
reads its merged weights where they exist), and all inputs live in persistent buffers
filled by one copy. The same
code runs eagerly (CPU, tests) or captured and replayed (CUDA). Padding rows write their keys into a reserved
scratch block and their outputs are ignored. The decode layer loop uses the fused kernels of kernels.py.

`PrefillGraphs` does the same for a new prompt alone in its step (the time-to-first-token case), padded to a
bucket of tokens (powers of two, then multiples of 256), through the model's own forward.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from phi4mm.engine.kv_cache import BlockPool, PagedAttention, prefer_flash
from phi4mm.model import kernels
from phi4mm.model.lora import AdapterPlan
from phi4mm.model.network import Phi4MM
from phi4mm.sampling import mask_padded_vocab


class _Graph:
    """One bucket's persistent inputs and outputs, and its captured graph.

    Every integer input lives in one device tensor (`ints`) filled from one host staging tensor by a single
    copy a step; views into it:
      block_tables (R, NB)  padded with the scratch block
      slots        (R,)     pool slot of each row's new token
      seq_lens     (R,)     tokens including the new one
      tokens       (R,)     the new token ids
      positions    (R, 1)   their positions
      longs        (R, 1)   1 where the row uses the long RoPE factors
      adapter_ids  (R,)     index into `names`, -1 for none
    Outputs: logits (R, V) with the padded vocabulary masked, greedy (R,) their argmax.
    """

    def __init__(self, rows: int, blocks: int, names: tuple[str, ...], device: torch.device, uniform: bool = False):
        self.rows, self.blocks, self.names = rows, blocks, names
        self.uniform = uniform  # every real row uses names[0]: no masks (padding rows get the adapter too, unread)
        ends = np.cumsum([rows * blocks] + [rows] * 6).tolist()  # where each of the 7 inputs ends
        self.views = list(zip([0] + ends[:-1], ends))
        self.ints = torch.zeros(ends[-1], dtype=torch.long, device=device)
        # Pinned host memory makes the copy asynchronous; the engine rewrites it only after the step's tokens
        # came back, so the previous copy has finished by then.
        self.host = torch.zeros(ends[-1], dtype=torch.long, pin_memory=device.type == "cuda")
        self.host_np = self.host.numpy()
        t = [self.ints[a:b] for a, b in self.views]
        self.block_tables = t[0].view(rows, blocks)  # (R, NB)
        self.slots, self.seq_lens, self.tokens = t[1], t[2], t[3]  # (R,) each
        self.positions, self.longs = t[4].view(rows, 1), t[5].view(rows, 1)  # (R, 1) each
        self.adapter_ids = t[6]  # (R,)
        self.logits: torch.Tensor | None = None
        self.greedy: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def host_view(self, i: int) -> np.ndarray:
        a, b = self.views[i]
        return self.host_np[a:b]


def _capture(fn, pool_handle) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
    """Run fn twice on a side stream (kernels chosen and compiled, workspaces allocated, RoPE tables on the
    device), then capture it into a graph sharing `pool_handle`'s memory -> (graph, fn's outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool_handle):
        out = fn()
    return graph, out


@torch.inference_mode()  # as run() builds them: graphs of inference tensors, no autograd on the shared buffers
def _warm(graphs: dict, build, keys: list[tuple], deadline: float, keep_free: int = 0) -> int:
    """Build (capture) `keys` missing from `graphs` in order until time.monotonic() passes `deadline`, the
    device's free memory falls under `keep_free` bytes, or it runs out (the rest are then captured on first
    use, as before) -> how many are ready."""
    for key in keys:
        if time.monotonic() > deadline:
            break
        if key in graphs:
            continue
        if keep_free and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the warm-up runs' cached blocks go back: free memory is then what it says
            if torch.cuda.mem_get_info()[0] < keep_free:
                break
        try:
            graphs[key] = build(*key)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
    return sum(k in graphs for k in keys)


def _powers(smallest: int, upto: int) -> list[int]:
    """smallest, 2 * smallest, ... up to the first that reaches `upto`."""
    out = [smallest]
    while out[-1] < upto:
        out.append(out[-1] * 2)
    return out


def _bucket(n: int, smallest: int) -> int:
    b = smallest
    while b < n:
        b *= 2
    return b


PREFILL_STEP = 128  # past twice this many tokens prefill buckets grow linearly: an image prompt of 1,334 tokens
                    # pads to 1,408 (256-token steps padded it to 1,536: 9% more prefill work, ~2 ms on an
                    # H200). Prefill time is linear in tokens; the graphs share one memory pool.


def prefill_bucket(n: int, smallest: int) -> int:
    """Powers of two up to PREFILL_STEP * 2, then multiples of PREFILL_STEP."""
    if n <= 2 * PREFILL_STEP:
        return _bucket(n, smallest)
    return -(-n // PREFILL_STEP) * PREFILL_STEP


class DecodeGraphs:
    """Runs pure-decode steps through static buckets; captures a CUDA graph per bucket on first use."""

    def __init__(self, net: Phi4MM, pool: BlockPool, scratch_block: int, max_rows: int = 64,
                 min_blocks: int = 16, capture: bool | None = None, decodable: int | None = None):
        self.net, self.pool, self.scratch = net, pool, scratch_block
        self.decodable = net.cfg.text.vocab_size if decodable is None else decodable
        self.device = pool.k.device
        self.max_rows = max_rows
        self.min_blocks = min_blocks
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.graphs: dict[tuple[int, int, tuple[str, ...], bool], _Graph] = {}
        self._logits: torch.Tensor | None = None  # (max rows bucket, V): see _logits_out
        self._pool_handle = None
        self.steps = 0  # decode steps served by this path
        first = net.layers[0].self_attn.qkv_proj
        self.adapter_names = tuple(sorted(first.lora_A))  # slot order of the segmented kernels
        self._merged = first.merged  # adapter name -> merged weight (merge_adapter): read at each step

    def fits(self, num_rows: int, max_blocks: int) -> bool:
        return num_rows <= self.max_rows and max_blocks <= self.pool.num_blocks

    def warm_keys(self, max_tokens: int) -> list[tuple[int, int, tuple[str, ...], bool]]:
        """The buckets a server meets first, most used first: every row bucket up to max_rows, for contexts up
        to `max_tokens`, with no adapter, with the adapter slots, and with each adapter alone."""
        rows = [_bucket(1, 1)]
        while rows[-1] < self.max_rows:
            rows.append(min(rows[-1] * 2, _bucket(self.max_rows, 1)))
        blocks = sorted({self._blocks_bucket(b) for b in
                         _powers(self.min_blocks, -(-max_tokens // self.pool.block_size))})
        kinds = [((), False)] + ([(self.adapter_names, False)] if self.adapter_names else []) + \
            [((name,), True) for name in self.adapter_names]
        return [(r, b, names, uniform) for b in blocks for names, uniform in kinds for r in rows]  # short first

    def warm(self, keys: list[tuple[int, int, tuple[str, ...], bool]], deadline: float, keep_free: int = 0) -> int:
        """Capture `keys` (from warm_keys) in order until time.monotonic() passes `deadline` or free device
        memory falls under `keep_free` -> how many are ready. A bucket met first in traffic costs its capture
        there (~0.1-1 s of three forwards on a GPU)."""
        return _warm(self.graphs, self._build, keys, deadline, keep_free)

    def _blocks_bucket(self, max_blocks: int) -> int:
        # Powers of two keep the number of graphs small; never more than the pool holds.
        return min(_bucket(max_blocks, self.min_blocks), self.pool.num_blocks)

    def _build(self, rows: int, blocks: int, names: tuple[str, ...], uniform: bool) -> _Graph:
        g = _Graph(rows, blocks, names, self.device, uniform)
        self._fill(g, [], [], [], [], [])
        g.ints.copy_(g.host)
        if self.capture:
            g.graph, (g.logits, g.greedy) = _capture(lambda: self._forward(g), self._pool_handle)
            self._pool_handle = g.graph.pool()
        return g

    def _fill(self, g: _Graph, tokens: list[int], positions: list[int], longs: list[bool],
              tables: list[list[int]], adapters: list[str | None]) -> None:
        """Write a step's inputs into the staging tensor; rows past len(tokens) are padding (scratch block)."""
        n, bs = len(tokens), self.pool.block_size
        table = g.host_view(0).reshape(g.rows, g.blocks)  # (R, NB)
        table.fill(self.scratch)
        for i, t in enumerate(tables):
            table[i, :len(t)] = t
        pos = np.zeros(g.rows, dtype=np.int64)  # (R,)
        pos[:n] = positions
        slots = g.host_view(1)
        slots[:] = table[np.arange(g.rows), pos // bs] * bs + pos % bs
        g.host_view(2)[:] = pos + 1
        toks = g.host_view(3)
        toks.fill(0)
        toks[:n] = tokens
        g.host_view(4)[:] = pos
        lg = g.host_view(5)
        lg.fill(0)
        lg[:n] = longs
        ids = g.host_view(6)
        ids.fill(-1)
        ids[:n] = [g.names.index(a) if a is not None else -1 for a in adapters]

    def _forward(self, g: _Graph) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder for one new token per row, with the fused kernels of kernels.py (their torch versions
        off CUDA): ~10 launches a layer instead of ~40. Same arithmetic as DecoderLayer, rounding included."""
        net, pool = self.net, self.pool
        x = net.embed_tokens(g.tokens)  # (R, hidden)
        plan = AdapterPlan()
        if g.uniform:
            plan = AdapterPlan.build(g.names[0])  # merged: one GEMM a linear; else base + B(A x), no masks
        elif g.names:
            plan = AdapterPlan.for_rows(g.names, g.adapter_ids)  # rows sorted by adapter once, for every layer
        cos, sin = net.rope.cos_sin(g.positions, g.longs != 0, x.dtype)  # (R, 1, 1, rd)
        cos, sin = cos.view(x.shape[0], -1), sin.view(x.shape[0], -1)  # (R, rd)
        eps = net.cfg.text.rms_norm_eps
        residual = None
        for i, layer in enumerate(net.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h, residual = kernels.add_rms_norm(x, residual, layer.input_layernorm.weight, eps)
            qkv = attn.qkv_proj(h[:, None], plan)[:, 0]  # (R, (H + 2 KV) * D)
            q = kernels.rope_store(qkv, cos, sin, g.slots, pool.k[i], pool.v[i], attn.n_heads)  # (R, H, D)
            o = kernels.paged_decode_attention(q, pool.k[i], pool.v[i], g.block_tables, g.seq_lens)
            x = attn.o_proj(o.view(o.shape[0], 1, -1), plan)[:, 0]  # (R, H*D) -> (R, hidden)
            h, residual = kernels.add_rms_norm(x, residual, layer.post_attention_layernorm.weight, eps)
            x = mlp.down_proj(kernels.silu_mul(mlp.gate_up_proj(h[:, None], plan)[:, 0])[:, None], plan)[:, 0]
        h, _ = kernels.add_rms_norm(x, residual, net.norm.weight, eps)
        logits = self._logits_out(g.rows, h.dtype)  # (R, V)
        net.head(h, out=logits)  # into the shared buffer (a quantized head through its kernels)
        mask_padded_vocab(logits, self.decodable)
        return logits, logits.argmax(-1)  # (R, V), (R,): greedy rows need only the second

    def _logits_out(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """(rows, V) of one buffer every bucket writes its logits into. Per-graph outputs would keep
        rows x V values alive for each of the dozens of graphs (~1.6 GB in bf16 for a warmed 256-row server);
        one step runs at a time and its logits are consumed before the next, so they can share."""
        vocab = self.net.cfg.text.vocab_size  # the head's rows (its weight may be stored quantized)
        if self._logits is None or self._logits.shape[0] < rows or self._logits.dtype != dtype:
            if self.graphs and any(g.graph is not None for g in self.graphs.values()) and self._logits is not None:
                raise RuntimeError("the shared logits buffer cannot grow once graphs read it")
            self._logits = torch.empty(_bucket(self.max_rows, 1), vocab, dtype=dtype, device=self.device)
        return self._logits[:rows]

    @torch.inference_mode()
    def run(self, tokens: list[int], positions: list[int], longs: list[bool], tables: list[list[int]],
            adapters: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for n sequences -> logits (n, V) (padded vocabulary masked) and their argmax (n,).
        Each sequence's new token goes at `positions`."""
        n = len(tokens)
        self.steps += 1
        rows = _bucket(n, 1)
        blocks = self._blocks_bucket(max(len(t) for t in tables))
        present = {a for a in adapters if a is not None}
        # Three kinds of graph per bucket: no adapter; every row on one adapter (its merged weights where they
        # exist, else base + its LoRA with no row masks: a transcription batch, ~40 fewer small kernels a layer
        # at batch 1); any other mix (all loaded adapters as slots, each row's picked by mask or kernel).
        uniform = len(present) == 1 and None not in adapters
        names = tuple(present) if uniform else self.adapter_names if present else ()
        key = (rows, blocks, names, uniform)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._build(rows, blocks, names, uniform)
        self._fill(g, tokens, positions, longs, tables, adapters)
        g.ints.copy_(g.host, non_blocking=True)  # one copy for every input
        if g.graph is not None:
            g.graph.replay()
            return g.logits[:n], g.greedy[:n]
        logits, greedy = self._forward(g)
        return logits[:n], greedy[:n]


class _Prefill:
    """One prefill bucket: a fresh prompt padded to `tokens`, its persistent inputs and outputs.

    embeds (1, T, hidden); ints holds slots (T,) (pads write into the scratch block) and last (1,) (the row of
    the prompt's last token); positions (1, T) is fixed: a fresh prompt starts at position 0.
    """

    def __init__(self, tokens: int, hidden: int, dtype: torch.dtype, device: torch.device):
        self.tokens = tokens
        self.embeds = torch.zeros(1, tokens, hidden, dtype=dtype, device=device)
        self.ints = torch.zeros(tokens + 1, dtype=torch.long, device=device)
        self.host = torch.zeros(tokens + 1, dtype=torch.long, pin_memory=device.type == "cuda")
        self.slots, self.last = self.ints[:tokens], self.ints[tokens:]  # (T,), (1,)
        self.positions = torch.arange(tokens, device=device)[None]  # (1, T)
        self.logits: torch.Tensor | None = None
        self.greedy: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None


class PrefillGraphs:
    """A whole prompt of one new sequence (nothing cached, nothing else in the step: the time-to-first-token
    case) run with static shapes, captured once per (token bucket, adapter, RoPE factors).

    Eager prefill is bound by the CPU: ~15 launches a layer from Python cost ~3x the GPU time of a 512-token
    prompt. Padding the prompt to a bucket (`prefill_bucket`) changes nothing for the real tokens: attention is
    causal, so pads (placed after them) are never attended to, and their keys go to the scratch block.
    """

    def __init__(self, net: Phi4MM, pool: BlockPool, scratch_block: int, decodable: int, max_tokens: int = 2048,
                 min_tokens: int = 64, capture: bool | None = None):
        self.net, self.pool, self.scratch, self.decodable = net, pool, scratch_block, decodable
        self.device = pool.k.device
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.graphs: dict[tuple[int, str | None, bool], _Prefill] = {}
        self._pool_handle = None
        self.steps = 0  # prefills served by this path

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens

    def warm_keys(self, adapters: list[str | None]) -> list[tuple[int, str | None, bool]]:
        """Every token bucket up to max_tokens for each adapter (None first), short RoPE factors: a fresh prompt
        this short never needs the long ones."""
        sizes, n = [], self.min_tokens
        while n <= self.max_tokens:
            sizes.append(n)
            n = prefill_bucket(n + 1, self.min_tokens)
        return [(t, a, False) for a in adapters for t in sizes]

    def warm(self, keys: list[tuple[int, str | None, bool]], deadline: float, keep_free: int = 0) -> int:
        """Capture `keys` in order until time.monotonic() passes `deadline` or free device memory falls under
        `keep_free` -> how many are ready."""
        return _warm(self.graphs, self._build, keys, deadline, keep_free)

    def _forward(self, g: _Prefill, adapter: str | None, long: bool) -> tuple[torch.Tensor, torch.Tensor]:
        attn = PagedAttention(self.pool, g.slots, g.positions, g.last, None, None, None, None, None, [g.tokens],
                              fresh=True)
        with prefer_flash():
            logits = self.net(g.embeds, g.positions, plan=AdapterPlan.build(adapter), long_rope=long,
                              last_only=g.last, attn=attn)[:, 0]  # (1, V)
        logits = mask_padded_vocab(logits, self.decodable)
        return logits, logits.argmax(-1)

    def _build(self, tokens: int, adapter: str | None, long: bool) -> _Prefill:
        cfg = self.net.cfg.text
        g = _Prefill(tokens, cfg.hidden_size, self.net.dtype, self.device)
        g.ints[:tokens] = self.scratch * self.pool.block_size  # warm-up and capture write only scratch slots
        if self.capture:
            g.graph, (g.logits, g.greedy) = _capture(lambda: self._forward(g, adapter, long), self._pool_handle)
            self._pool_handle = g.graph.pool()
        return g

    @torch.inference_mode()
    def run(self, embeds: torch.Tensor, table: list[int], adapter: str | None,
            long: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds (n, hidden) of a fresh sequence whose block table covers n tokens -> logits (1, V) of its last
        token (padded vocabulary masked) and their argmax (1,)."""
        n = embeds.shape[0]
        self.steps += 1
        tokens = prefill_bucket(n, self.min_tokens)
        key = (tokens, adapter, long)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._build(tokens, adapter, long)
        bs = self.pool.block_size
        h = g.host.numpy()
        i = np.arange(tokens)
        real = np.asarray(table, dtype=np.int64)[i[:n] // bs] * bs + i[:n] % bs  # (n,)
        h[:n] = real
        h[n:tokens] = self.scratch * bs + i[n:] % bs  # pads cycle over the scratch block's slots
        h[tokens] = n - 1
        g.ints.copy_(g.host, non_blocking=True)
        g.embeds[0, :n].copy_(embeds)
        if g.graph is not None:
            g.graph.replay()
            return g.logits, g.greedy
        return self._forward(g, adapter, long)
