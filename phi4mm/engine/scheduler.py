"""Which sequences run in the next step, and with how many tokens: admission, the prefix cache, preemption
and KV block accounting. Pure bookkeeping: no tensors but the pool's block ids.

Every step, running decodes go first (oldest first), one token each; what is left of the step's token budget
goes to prompt chunks (partially prefilled sequences, then new admissions, first come first served). While any
decode is running, each prompt gets at most `prefill_tokens_with_decodes` tokens a step, so a 100K-token
prompt is prefilled in slices between decode steps instead of freezing every stream for seconds, while many
short prompts still fill the step's budget together.

A slice's tokens are counted by their cost, not their number: a chunk token deep in a long prompt also attends
over everything before it, so it costs `1 + history / history_tokens` tokens of the slice (`history_tokens`:
the history at which a token's attention costs as much as its linear layers, 16K at full size), and the slices
shrink as the prompt grows (never below `1/CHUNK_FLOOR_DIVISOR` of a slice, so the prompt always moves on).
Counted by number, the last 512-token slices of a 13K-token prompt made the streams beside it up to 3.4x slower
on a CPU (bench/fairness.py).
"""
from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Callable

import numpy as np

from phi4mm.config import TextConfig
from phi4mm.engine.kv_cache import BlockPool, CacheFull
from phi4mm.engine.sequence import Sequence

CHUNK_FLOOR_DIVISOR = 4  # the smallest slice beside decodes: prefill_tokens_with_decodes / this


def history_tokens(cfg: TextConfig) -> float:
    """The history at which one token's attention (QK and PV over every earlier key) costs as many FLOPs as its
    linear layers: 16.4K tokens at full size, 288 for the tiny test model."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    linear = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    return linear / (2 * q)  # multiply-adds: the linears' per token, attention's per key and token


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_tokens_per_step: int,
                 prefill_tokens_with_decodes: int, prefix_caching: bool, use_long_rope: Callable[[int], bool],
                 history_tokens: float = math.inf):
        self.pool, self.block_size = pool, pool.block_size
        self.max_num_seqs, self.max_tokens_per_step = max_num_seqs, max_tokens_per_step
        self.prefill_tokens_with_decodes = prefill_tokens_with_decodes
        self.history_tokens = history_tokens  # see the module docstring (inf: chunks counted by number)
        self.prefix_caching = prefix_caching
        self.use_long_rope = use_long_rope  # LongRoPE switches factors past the original context
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = {"preemptions": 0, "prefix_hit_tokens": 0}

    # ---------------------------------------------------------------- queues
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def release(self, seq: Sequence) -> None:
        """Take a sequence out of both queues and give its blocks back."""
        if seq.blocks:
            self.pool.free(seq.blocks)
            seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    # ---------------------------------------------------------------- the prefix cache
    def hasher(self, seq: Sequence):
        # Blocks are only interchangeable between requests with the same media, adapter and RoPE factors.
        key = seq.media_key + (seq.prep.adapter or "-").encode() + (b"L" if seq.long_rope else b"S")
        return hashlib.blake2b(key, digest_size=8)

    def block_hash(self, h, toks: list[int], b: int) -> int:
        """Extend the chain `h` by block b's tokens; the chain's digest identifies the whole prefix."""
        h.update(np.asarray(toks[b * self.block_size:(b + 1) * self.block_size], dtype=np.int64).tobytes())
        return int.from_bytes(h.copy().digest(), "little") >> 1

    def admit_prefix(self, seq: Sequence) -> None:
        if not self.prefix_caching or seq.num_cached or seq.blocks:
            return
        h, toks = self.hasher(seq), seq.tokens
        upto = seq.length - 1  # always leave >= 1 token to compute
        hit = self.pool.match_prefix([self.block_hash(h, toks, b) for b in range(upto // self.block_size)])
        seq.blocks = list(hit)
        seq.num_cached = len(hit) * self.block_size
        self.stats["prefix_hit_tokens"] += seq.num_cached

    def commit(self, plan: list[tuple[Sequence, int]]) -> None:
        """The plan's tokens are in the cache now: count them and make newly filled blocks findable by later
        requests (incremental: each block hashed once)."""
        for seq, n in plan:
            seq.num_cached += n
            if not self.prefix_caching:
                continue
            full = seq.num_cached // self.block_size
            if seq.hasher is None or seq.hashed > full:
                seq.hasher, seq.hashed = self.hasher(seq), 0
            toks = seq.tokens if seq.hashed < full else None
            while seq.hashed < full:
                self.pool.register(seq.blocks[seq.hashed], self.block_hash(seq.hasher, toks, seq.hashed))
                seq.hashed += 1

    # ---------------------------------------------------------------- blocks
    def ensure_blocks(self, seq: Sequence, upto: int) -> bool:
        need = -(-upto // self.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        try:
            seq.blocks += self.pool.allocate(need)
            return True
        except CacheFull:
            return False

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's cache; it is recomputed from its tokens when readmitted."""
        self.pool.free(seq.blocks)
        seq.blocks, seq.num_cached, seq.hasher = [], 0, None
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.stats["preemptions"] += 1

    # ---------------------------------------------------------------- the plan
    def schedule(self) -> list[tuple[Sequence, int]]:
        """-> (sequence, number of new tokens) for this step."""
        budget = self.max_tokens_per_step
        plan: list[tuple[Sequence, int]] = []
        # Running decodes first (oldest first); preempt the newest when blocks run out. Membership is checked in
        # a set, rebuilt after the (rare) preemptions: a list scan per row was O(batch^2) a step.
        running = set(self.running)
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq not in running or seq.prefilling:
                continue
            if not seq.long_rope and self.use_long_rope(seq.length):
                seq.long_rope = True  # crossing the switch: every key must be recomputed with the long factors
                self.preempt(seq)
                running = set(self.running)
                continue
            while not self.ensure_blocks(seq, seq.length):
                victim = max(self.running, key=lambda s: s.arrival)
                self.preempt(victim)
                running = set(self.running)
                if victim is seq:
                    break
            if seq in running and budget > 0:
                plan.append((seq, 1))
                budget -= 1
        # While decodes wait on this step, each prompt gets a slice of at most prefill_tokens_with_decodes: a
        # long prompt is spread over many steps (the streams keep their pace), while many short prompts still
        # fill the step's budget together (a slice for all of them together starved throughput: ~470 steps for
        # 160 queued multimodal requests).
        decoding = bool(plan)
        per_prompt = self.prefill_tokens_with_decodes if decoding else budget
        floor = max(self.prefill_tokens_with_decodes // CHUNK_FLOOR_DIVISOR, 1)
        # Then prefill chunks: partially prefilled running sequences, then admissions.
        for seq in [s for s in self.running if s.prefilling] + list(self.waiting):
            if budget <= 0:
                break
            if seq in self.waiting:
                if len(self.running) >= self.max_num_seqs or seq.prompt_embeds is None:
                    break
                self.admit_prefix(seq)
            # Beside decodes, a token costs its attention over the history too (module docstring).
            per_token = 1 + seq.num_cached / self.history_tokens if decoding else 1
            # A recompute (preemption, LongRoPE switch) covers every token, the newest sampled one included.
            n = min(seq.length - seq.num_cached, budget, max(int(per_prompt / per_token), floor))
            if n <= 0 or not self.ensure_blocks(seq, seq.num_cached + n):
                if seq in self.waiting and seq.blocks:
                    # Not admitted after all: give back the prefix blocks it matched, or it would hold them
                    # while waiting and starve the running decodes (a livelock).
                    self.pool.free(seq.blocks)
                    seq.blocks, seq.num_cached = [], 0
                break
            if seq in self.waiting:
                self.waiting.remove(seq)
                self.running.append(seq)
            plan.append((seq, n))
            budget -= n
        return plan
