"""The engine's paged KV cache: one block pool shared by all requests, and the attention backend over it.

`BlockPool` owns the memory: keys and values of every layer, cut into fixed-size blocks of `block_size` token
slots, allocated once. A request holds a *block table* (a list of block ids); token `p` of that request lives
in slot `p % block_size` of block `table[p // block_size]`. Blocks are reference counted so that requests with
a common prefix (a system prompt, the same image) share the blocks that hold it (prefix caching, as in vLLM and
nano-vllm). A full block is findable by a hash the engine computes over everything that determines its
contents (the tokens up to its end, the adapter, the media); a freed block keeps its hash until the pool needs
the memory again, so a later request can revive it (least recently freed goes first).

`PagedAttention` is one forward's view of the pool: the engine packs the new tokens of all running sequences
(prefill chunks and single decode tokens alike) into one row `(1, N)`, and this backend writes their keys and
values into their slots and attends, per sequence, over that sequence's blocks. Everything that depends only on
the batch layout (slots, gather tables, masks) is computed once in `build`, never per layer.

No scheduling here: which requests run, how many tokens each gets and when blocks are allocated or freed is the
engine's decision; this file only keeps the books straight and does the arithmetic.
"""
from __future__ import annotations

import contextlib
from collections import Counter, OrderedDict, deque

import torch
import torch.nn.functional as F

from phi4mm.config import TextConfig
from phi4mm.model.decoder import AttentionBackend


def history_bucket(blocks: int) -> int:
    """Which group a sequence of `blocks` KV blocks attends in when a forward mixes lengths: 1-2, 3-8, 9-32,
    33-128... blocks, so a group pads its histories less than 4x while a forward of similar lengths stays one
    group (each group is one more gather and attention call a layer)."""
    return (blocks - 1).bit_length() // 2


def prefer_flash():
    """A context in which SDPA tries FlashAttention first: on an H100/H200 torch picks cuDNN's kernel for bf16
    prefill, which costs ~70 us of CPU a call against ~15 for flash, and eager prefill is CPU-bound."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6: no priority order, keep torch's choice
        return contextlib.nullcontext()


class CacheFull(RuntimeError):
    """Not enough free KV blocks; nothing was allocated. The engine should preempt or wait, then retry."""


class BlockPool:
    """Paged key/value memory for all requests: `k`, `v` of shape (layers, num_blocks, block_size, KV, D).

    Block states: *held* (refcount > 0), *cached* (refcount 0 but still holding a registered hash: reusable by
    `match_prefix` until evicted) and *clean* (refcount 0, no hash). `allocate` takes clean blocks first and then
    evicts cached ones, least recently freed first.
    """

    def __init__(self, cfg: TextConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs num_blocks >= 1 and block_size >= 1; got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.n_kv, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        shape = (cfg.num_hidden_layers, num_blocks, block_size, self.n_kv, self.head_dim)
        # Token-major blocks (slot, head, dim): one token's keys for all heads are contiguous, so the per-token
        # write is one row of `view(-1, KV, D)` and a whole block gathers with one index.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.refcount = [0] * num_blocks
        self._clean: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # refcount-0 blocks with a hash, oldest first
        self._hash_of: dict[int, int] = {}  # block -> registered hash
        self._block_of: dict[int, int] = {}  # hash -> block

    # -- accounting -----------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out now: clean ones plus cached-but-unreferenced ones."""
        return len(self._clean) + len(self._cached)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        """How many blocks hold `num_tokens` tokens (ceil division)."""
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with refcount 1, or CacheFull (and nothing taken)."""
        if n > self.num_free:
            raise CacheFull(f"asked for {n} KV blocks but only {self.num_free} of {self.num_blocks} are free "
                            f"({self.block_size} tokens each); finish or preempt a request, or build the pool "
                            "with more blocks")
        out = []
        for _ in range(n):
            if self._clean:
                b = self._clean.popleft()
            else:
                # Evict the least recently freed cached block: its contents are about to be overwritten.
                b, _ = self._cached.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
            self.refcount[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unreferenced blocks become free (cached ones stay findable).

        Blocks are released last to first, so a finished request's tail (the part least likely to be shared)
        is evicted before its head.
        """
        # Check everything before changing anything: a bad call leaves the pool as it was.
        for b, n in Counter(blocks).items():
            if self.refcount[b] < n:
                raise ValueError(f"block {b} is freed {n} time(s) but holds {self.refcount[b]} reference(s) (double "
                                 "free or a foreign block table); the engine's bookkeeping is wrong")
        for b in reversed(blocks):
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                if b in self._hash_of:
                    self._cached[b] = None  # most recently freed: evicted last
                else:
                    self._clean.append(b)

    # -- prefix caching -------------------------------------------------------------------------------------
    def match_prefix(self, hashes: list[int]) -> list[int]:
        """The blocks of the longest cached run of leading `hashes`, each with a new reference taken.

        `hashes[i]` is the engine's hash of full block i (chained: it covers every token up to the end of block
        i, plus adapter and media identity). A hit on an unreferenced cached block revives it.
        """
        out = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            if self.refcount[b] == 0:
                del self._cached[b]
            self.refcount[b] += 1
            out.append(b)
        return out

    def register(self, block: int, h: int) -> None:
        """Make a filled, held block findable under hash `h` (call once its last slot is written).

        If another block already holds `h` (two requests computed the same prefix at once), the first stays the
        cached copy and this one is left unregistered: it is freed as a clean block.
        """
        if self.refcount[block] <= 0:
            raise ValueError(f"block {block} is registered but not held; register blocks of a running request")
        old = self._hash_of.get(block)
        if old is not None:
            if old != h:
                raise ValueError(f"block {block} is already registered under another hash; a full block's "
                                 "contents never change, so its hash cannot either")
            return
        if h in self._block_of:
            return
        self._hash_of[block], self._block_of[h] = h, block

    def is_cached(self, h: int) -> bool:
        return h in self._block_of


class PagedAttention(AttentionBackend):
    """Causal attention for a packed row of sequences over a `BlockPool`, for one forward call.

    Sequence s contributes `num_new[s]` consecutive tokens to the packed row `(1, N)`, at absolute positions
    `num_cached[s] .. num_cached[s] + num_new[s] - 1`; query t of s sees keys 0 .. num_cached[s] + t of s only.

    Precomputed by `build` (shapes; S sequences, N = sum(num_new), Bmax blocks per table, L = Bmax*block_size):
      slot_mapping (N,)            flat pool slot of each new token
      positions    (1, N)          absolute positions, to pass to the model for RoPE
      last_index   (S,)            index in the row of each sequence's last new token (the model's `last_only`)
      block_tables (S, Bmax)       padded with block 0 (masked out)
      kv_lens      (S,)            num_cached + num_new
      mask         (S, 1, T, L)    True = attend; T = max(num_new)
      q_index      (S*T,) | None   gathers the packed queries into (S, T) order; None when all num_new are equal
    """

    def __init__(self, pool: BlockPool, slot_mapping: torch.Tensor, positions: torch.Tensor,
                 last_index: torch.Tensor, block_tables: torch.Tensor, kv_lens: torch.Tensor, mask: torch.Tensor,
                 q_index: torch.Tensor | None, out_index: torch.Tensor | None, num_new: list[int],
                 fresh: bool = False):
        self.pool = pool
        # Every sequence starts from an empty cache (first prefill chunks): attention needs only this forward's
        # own keys, so each sequence runs plain causal SDPA on them, with no gather and no dense mask.
        self.fresh = fresh
        self.slot_mapping, self.positions, self.last_index = slot_mapping, positions, last_index
        self.block_tables, self.kv_lens, self.mask = block_tables, kv_lens, mask
        self.q_index, self.out_index = q_index, out_index
        self.num_new = num_new
        self.num_seqs, self.q_len = len(num_new), max(num_new)
        # Decodes beside prompt chunks attend apart (`split`): (packed-row indices, that group's backend).
        self.parts: list[tuple[torch.Tensor, PagedAttention]] = []

    @classmethod
    def build(cls, pool: BlockPool, seqs: list[tuple[list[int], int, int]],
              device: torch.device | str) -> PagedAttention:
        """seqs: (block_table, num_cached, num_new) per sequence, in the order their tokens are packed.

        The block table must already cover num_cached + num_new tokens, and the blocks written to (those holding
        the new tokens) must be held by this sequence alone: shared prefix blocks are read-only.
        """
        if not seqs:
            raise ValueError("PagedAttention.build needs at least one sequence")
        bs = pool.block_size
        tables, cached, new = [], [], []
        for i, (table, nc, nn) in enumerate(seqs):
            if nn < 1 or nc < 0:
                raise ValueError(f"sequence {i}: num_cached={nc}, num_new={nn}; each sequence in a forward needs "
                                 "num_new >= 1 and num_cached >= 0")
            need = pool.blocks_for(nc + nn)
            if len(table) < need:
                raise ValueError(f"sequence {i}: {nc + nn} tokens need {need} blocks of {bs} but its block table "
                                 f"has {len(table)}; allocate the missing blocks before the forward")
            # Writing into a shared block would change another request's cached prefix under it. Per block
            # touched (not per token): one block for a decode, ~chunk/block_size for a prefill chunk.
            for b in table[nc // bs:(nc + nn - 1) // bs + 1]:
                if pool.refcount[b] != 1:
                    raise ValueError(f"sequence {i} writes into block {b} whose refcount is {pool.refcount[b]}; "
                                     "new tokens must go to blocks this sequence holds alone (match at most "
                                     "(prompt_len - 1) // block_size prefix blocks, so the last token is computed "
                                     "in a block of its own)")
            tables.append(table[:need])
            cached.append(nc)
            new.append(nn)

        S, T = len(seqs), max(new)
        bmax = max(len(t) for t in tables)
        # Host-side tensors from the Python lists (the only O(S * Bmax) Python work), then one copy each to the
        # device. Block 0 pads the tables: padded columns are masked, and gathering them is harmless.
        bt = torch.zeros(S, bmax, dtype=torch.long)
        for s, t in enumerate(tables):
            bt[s, :len(t)] = torch.tensor(t, dtype=torch.long)
        nc_t = torch.tensor(cached, dtype=torch.long)  # (S,)
        nn_t = torch.tensor(new, dtype=torch.long)  # (S,)
        kv_lens = nc_t + nn_t  # (S,)
        seq_of = torch.repeat_interleave(torch.arange(S), nn_t)  # (N,) which sequence each packed token is
        starts = torch.cumsum(nn_t, 0) - nn_t  # (S,) row index of each sequence's first new token
        t_in_seq = torch.arange(int(nn_t.sum())) - starts[seq_of]  # (N,) offset among that sequence's new tokens
        pos = nc_t[seq_of] + t_in_seq  # (N,) absolute positions
        slots = bt[seq_of, pos // bs] * bs + pos % bs  # (N,)

        if all(c == 0 for c in cached):
            return cls(pool, slots.to(device), pos[None].to(device), (starts + nn_t - 1).to(device), bt, kv_lens,
                       None, None, None, new, fresh=True)
        groups = [(n > 1, history_bucket(len(t))) for n, t in zip(new, tables)]
        if len(set(groups)) > 1:
            return cls.split(pool, seqs, device, groups, slots.to(device), pos[None].to(device),
                             (starts + nn_t - 1).to(device), starts.tolist())
        # Causality and lengths in one mask over the padded key axis: key j is visible to query t of s when
        # j <= num_cached + t and j < kv_len. Padded query rows (t >= num_new) keep j < kv_len: never empty, so
        # softmax stays finite there too (their outputs are dropped).
        j = torch.arange(bmax * bs)  # (L,)
        q_abs = nc_t[:, None] + torch.arange(T)[None, :]  # (S, T)
        mask = (j[None, None, :] <= q_abs[:, :, None]) & (j[None, None, :] < kv_lens[:, None, None])  # (S, T, L)

        q_index = out_index = None
        if any(n != T for n in new):
            # Queries go to (S, T) order by a gather; padding rows repeat the sequence's last new token (any valid
            # index does: their outputs are never read). Outputs come back by the inverse gather.
            within = torch.arange(T)[None, :].clamp(max=(nn_t - 1)[:, None])  # (S, T)
            q_index = (starts[:, None] + within).reshape(-1)  # (S*T,)
            out_index = seq_of * T + t_in_seq  # (N,) row of each packed token in the flattened (S*T)
            q_index, out_index = q_index.to(device), out_index.to(device)

        return cls(pool, slots.to(device), pos[None].to(device), (starts + nn_t - 1).to(device), bt.to(device),
                   kv_lens.to(device), mask[:, None].to(device), q_index, out_index, new)  # mask (S, 1, T, L)

    @classmethod
    def split(cls, pool: BlockPool, seqs: list[tuple[list[int], int, int]], device: torch.device | str,
              groups: list[tuple[bool, int]], slots: torch.Tensor, positions: torch.Tensor, last_index: torch.Tensor,
              starts: list[int]) -> PagedAttention:
        """A forward whose sequences attend in groups (`groups`: each one's key): decodes apart from prompt chunks,
        and histories of very different lengths apart (`history_bucket`). Padded together, every sequence would
        be padded to the longest new-token count and the longest history: beside one 13K-token prompt, 32
        streams of ~100 tokens each attended over 13K keys, whether the prompt was being prefilled (512 queries
        each) or decoding, and a CPU step took 1.6 s, then 0.2 s, instead of 0.03 s (bench/fairness.py)."""
        new = [n for _, _, n in seqs]
        att = cls(pool, slots, positions, last_index, None, None, None, None, None, new)
        for key in dict.fromkeys(groups):
            pick = [i for i, g in enumerate(groups) if g == key]
            rows = torch.cat([torch.arange(starts[i], starts[i] + new[i]) for i in pick]).to(device)
            att.parts.append((rows, cls.build(pool, [seqs[i] for i in pick], device)))
        return att

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, KV, N, D) of the packed row -> attention output (1, H, N, D)."""
        pool = self.pool
        D, KV = q.shape[3], k.shape[1]
        # Store this layer's new keys/values in their slots; every sequence then reads its whole history,
        # these tokens included, from the pool.
        kl = pool.k[layer].view(-1, KV, D)  # (num_blocks*block_size, KV, D): a view, writes land in the pool
        vl = pool.v[layer].view(-1, KV, D)  # (num_blocks*block_size, KV, D)
        kl.index_copy_(0, self.slot_mapping, k[0].transpose(0, 1).to(kl.dtype))  # k[0]^T: (N, KV, D)
        vl.index_copy_(0, self.slot_mapping, v[0].transpose(0, 1).to(vl.dtype))
        if not self.parts:
            return self.attend(layer, q, k, v)
        out = torch.empty_like(q)
        for rows, part in self.parts:
            out.index_copy_(2, rows, part.attend(layer, q.index_select(2, rows), k.index_select(2, rows),
                                                 v.index_select(2, rows)))
        return out

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the packed row over the pool, its keys/values already stored -> (1, H, N, D)."""
        pool, S, T = self.pool, self.num_seqs, self.q_len
        H, D = q.shape[1], q.shape[3]
        if self.fresh:
            outs, start = [], 0
            for n in self.num_new:
                sl = slice(start, start + n)
                outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True,
                                                           enable_gqa=True))  # (1, H, n, D)
                start += n
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (1, H, N, D)

        # Gather whole blocks (one index per block, not per token) into a padded per-sequence history.
        keys = pool.k[layer][self.block_tables]  # (S, Bmax, block_size, KV, D)
        vals = pool.v[layer][self.block_tables]  # (S, Bmax, block_size, KV, D)
        keys = keys.flatten(1, 2).transpose(1, 2).to(q.dtype)  # (S, KV, L, D)
        vals = vals.flatten(1, 2).transpose(1, 2).to(q.dtype)  # (S, KV, L, D)

        if self.q_index is None:
            # Every sequence has T new tokens (pure decode: T == 1; or one sequence): the packed row already is
            # (S, T) in order, so no padding is needed.
            qs = q[0].reshape(H, S, T, D).transpose(0, 1)  # (S, H, T, D)
        else:
            qs = q[0].index_select(1, self.q_index).view(H, S, T, D).transpose(0, 1)  # (S, H, T, D)
        out = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=self.mask, enable_gqa=True)  # (S, H, T, D)
        out = out.transpose(0, 1).reshape(H, S * T, D)  # (H, S*T, D)
        if self.out_index is not None:
            out = out.index_select(1, self.out_index)  # (H, N, D): drop the padding rows
        return out[None]  # (1, H, N, D)

    # Decode steps on GPU do not come here: phi4mm/engine/graphs.py runs them with static shapes as CUDA graphs,
    # reading blocks in place through kernels.paged_decode_attention. Prefill chunks over a cached prefix still
    # gather whole histories here.
