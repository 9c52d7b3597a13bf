"""The engine: continuous batching over a paged KV cache, one adapter per request, chunked prefill.

Each `step()` packs the new tokens of every scheduled sequence into one (1, N) row: one token for each running
decode, and a chunk of prompt for sequences still prefilling, under a token budget so a long image or audio
prompt never stalls the decodes. The model sees a pure function call (embeddings, positions, paged attention
backend, per-span adapter plan); the engine owns blocks, sampling, stopping and streaming.

LongRoPE: a sequence whose length passes 4096 tokens switches to the long factors for *all* its keys, as the
reference does: its cache is dropped and the whole sequence is recomputed (the same path as preemption).
"""
from __future__ import annotations

import hashlib
import itertools
import sys
import time
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from phi4mm.api import Model
from phi4mm.engine.kv_cache import BlockPool, CacheFull, PagedAttention, prefer_flash
from phi4mm.inputs.prepare import Prepared
from phi4mm.model.encode import encode_audio_batch, encode_image_batch, encode_media
from phi4mm.model.lora import AdapterPlan, LoraLinear
from phi4mm.model.lora import merge_adapter as merge_lora
from phi4mm.sampling import (
    SamplingBatch,
    SamplingParams,
    apply_constraints,
    apply_min_tokens,
    mask_padded_vocab,
    sample,
)

# The KV pool the command line, batch jobs and server replicas give an engine on a CPU: 16k tokens (4 GiB fp32
# at full size). On a GPU the engine sizes its pool from free memory.
CPU_KV_TOKENS = 16384


def cpu_kv_blocks(device: torch.device | str, block_size: int = 16) -> int | None:
    """`num_blocks` for an Engine of those front ends: CPU_KV_TOKENS' worth on a CPU, None (sized from free
    memory) on a GPU."""
    return None if torch.device(device).type == "cuda" else CPU_KV_TOKENS // block_size
AUDIO_BATCH_FRAMES = 64 * 3000  # padded feature frames per batched conformer forward: 64 clips of 30 s
# Crops per batched SigLIP forward (activations grow linearly in crops: ~30 MB a crop at full size, so ~2 GB
# here); one image of 36 HD crops + its global view always fits.
IMAGE_BATCH_CROPS = 64


class EngineBusy(RuntimeError):
    """The waiting queue is full: retry later (a server answers 429/503)."""


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    token_id: int | None
    text: str  # newly completed text (stop strings and partial UTF-8 held back)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_generated: int = 0


@dataclass(eq=False)  # identity: `seq in self.running` must not compare every field (it did, O(batch^2) a step)
class Sequence:
    id: str
    prep: Prepared
    params: SamplingParams
    prompt_embeds: torch.Tensor | None  # (P, hidden): text and media embeddings (None: audio not encoded yet)
    media_key: bytes  # content hash of the media, folded into prefix-cache hashes
    arrival: float
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys/values are in `blocks`
    long_rope: bool = False
    decoder: Any = None
    text: str = ""
    emitted: int = 0  # chars of `text` already streamed
    cancelled: bool = False
    hasher: Any = None  # running prefix-hash chain over this sequence's full blocks...
    hashed: int = 0  # ...covering this many blocks (registered in the pool)

    @property
    def tokens(self) -> list[int]:
        return self.prep.input_ids + self.generated

    def token_at(self, i: int) -> int:
        p = self.prep.input_ids
        return p[i] if i < len(p) else self.generated[i - len(p)]

    @property
    def length(self) -> int:
        return len(self.prep.input_ids) + len(self.generated)

    @property
    def prefilling(self) -> bool:
        # Every token but the newest sampled one must be in the cache before we can decode.
        return self.num_cached < self.length - (1 if self.generated else 0)


class Engine:
    """Continuous-batching engine over a loaded `Model`.

    num_blocks: KV blocks of `block_size` tokens (default: most of the free GPU memory, or 4096 on CPU).
    max_batch: sequences in flight; max_tokens_per_step: budget of packed tokens per forward (prefill chunk).
    merge_adapter: an adapter ("speech", "vision") to merge into a copy of each decoder weight (lora.merge_adapter):
    forwards whose whole batch uses it (transcription) skip the LoRA GEMMs, for ~6.4 GB more on the full model.
    The copy lives on the model's layers, so `model.generate` and other engines on this model use it too.
    """

    def __init__(self, model: Model, num_blocks: int | None = None, block_size: int = 16, max_batch: int = 64,
                 max_tokens_per_step: int = 2048, max_waiting: int = 1024, prefix_caching: bool = True,
                 media_cache_items: int = 64, static_decode: bool | None = None, merge_adapter: str | None = None):
        self.model, self.net, self.cfg = model, model.net, model.config
        self.device, self.dtype = model.device, model.dtype
        self.block_size, self.max_batch = block_size, max_batch
        self.max_tokens_per_step, self.max_waiting = max_tokens_per_step, max_waiting
        self.prefix_caching = prefix_caching
        self.merged_bytes, self._merged = 0, []
        if merge_adapter is not None:
            # Before the KV pool is sized from free memory (the copy must not be squeezed out by it) and before
            # any graph is captured (a uniform graph of this adapter records the merged path). The engine holds
            # the copies: unmerge_adapters() while it lives must not free memory its captured graphs read.
            self.merged_bytes = merge_lora(self.net, merge_adapter)
            self._merged = [m.merged[merge_adapter] for m in self.net.modules() if isinstance(m, LoraLinear)]
        if num_blocks is None:
            num_blocks = _default_blocks(self.cfg.text, block_size, self.dtype, self.device)
        self.pool = BlockPool(self.cfg.text, num_blocks, block_size, self.dtype, self.device)
        # Pure-decode steps, and a new prompt alone in its step, run with static shapes (CUDA graphs on GPU, by
        # default); padding rows and tokens of those buckets write into one reserved scratch block.
        self.graphs = self.prefill_graphs = None
        if static_decode if static_decode is not None else self.device.type == "cuda":
            from phi4mm.engine.graphs import DecodeGraphs, PrefillGraphs
            scratch = self.pool.allocate(1)[0]
            self.graphs = DecodeGraphs(self.net, self.pool, scratch, max_rows=max_batch, decodable=model.decodable)
            self.prefill_graphs = PrefillGraphs(self.net, self.pool, scratch, model.decodable,
                                                max_tokens=min(2048, max_tokens_per_step))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._media_cache: dict[bytes, tuple] = {}
        self._media_cache_items = media_cache_items
        self.eos = set(model.tokenizer.eos_token_ids)
        model.tokenizer.token_bytes()  # build the streaming-decode table now, not on the first request
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0, "prefix_hit_tokens": 0}

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt: str | Seq[dict] | Prepared, images: Seq[Any] | None = None,
                    audios: Seq[Any] | None = None, params: SamplingParams | None = None,
                    tools: list[dict] | None = None, request_id: str | None = None) -> str:
        """Validate and queue a request; returns its id. Raises ValueError for bad input, EngineBusy when full."""
        params = params or SamplingParams()
        params.validate()
        if len(self.waiting) >= self.max_waiting:
            raise EngineBusy(f"{len(self.waiting)} requests are already waiting (limit {self.max_waiting}); "
                             "retry shortly")
        prep = prompt if isinstance(prompt, Prepared) else self.model.prepare(prompt, images, audios, tools)
        limit = self.cfg.text.max_position_embeddings
        if prep.num_tokens + 1 > limit:
            raise ValueError(f"the prompt has {prep.num_tokens} tokens; the context holds {limit}: shorten it")
        need = -(-min(prep.num_tokens + (params.max_tokens or 1), limit) // self.block_size)
        if need > self.pool.num_blocks:
            raise ValueError(f"prompt + max_tokens needs {need} KV blocks but the cache has {self.pool.num_blocks}; "
                             "lower max_tokens or start the engine with more cache memory")
        key = self._media_key(prep)
        # Audio-only and image-only prompts are encoded at the next step, together with the others of their kind
        # then waiting (one conformer or SigLIP forward for a batch); image + audio prompts and text now.
        deferred = (prep.audios is None) != (prep.images is None) and key not in self._media_cache
        embeds = None if deferred else self._prompt_embeds(prep, key)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, prep, params, embeds, key, time.monotonic())
        seq.long_rope = self.net.rope.use_long(prep.num_tokens)
        seq.decoder = self.model.tokenizer.stream_decoder(skip_special_tokens=True)
        self.seqs[rid] = seq
        self.waiting.append(seq)
        return rid

    def cancel(self, request_id: str) -> bool:
        """Stop a request now; its blocks return to the pool at once. False if it is unknown or finished."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return False
        seq.cancelled = True
        self._release(seq)
        return True

    def has_work(self) -> bool:
        # A cancelled request still owes its caller a final "cancelled" output from the next step.
        return bool(self.waiting or self.running or any(s.cancelled for s in self.seqs.values()))

    # ---------------------------------------------------------------- media
    @staticmethod
    def _media_key(prep: Prepared) -> bytes:
        """Content hash of the prompt's media (and audio projector): the media cache's and prefix cache's key.

        Images: the processor's digest of their uint8 HD canvases (`ImageInputs.digest`; 1.7 ms for an 896x896
        image), else SHA-256 over the float pixels' memory (12 MB, ~8 ms). Audio: over its features. A
        cryptographic hash, because a collision would hand one request another's cached image or audio."""
        h = hashlib.sha256()
        images = prep.images
        if images is not None and images.digest:
            h.update(b"canvas:" + images.digest)
        elif images is not None:
            h.update(images.pixel_values.contiguous().numpy())
            h.update(images.image_sizes.contiguous().numpy())
        if prep.audios is not None:
            h.update(prep.audios.features.contiguous().numpy())
        h.update(prep.audio_projector.encode())
        return h.digest()[:16]

    def _cache_media(self, key: bytes, value: tuple) -> None:
        if len(self._media_cache) >= self._media_cache_items:
            self._media_cache.pop(next(iter(self._media_cache)))
        self._media_cache[key] = value

    def _prompt_embeds(self, prep: Prepared, key: bytes, media: tuple | None = None) -> torch.Tensor:
        """(P, hidden) prompt embeddings; tower outputs are cached by content hash (same image asked twice)."""
        if media is not None:
            img, aud = media
        elif prep.images is None and prep.audios is None:
            img = aud = None
        elif key in self._media_cache:
            img, aud = self._media_cache[key]
        else:
            with torch.inference_mode():
                img, aud = encode_media(self.net, prep, self.device, self.dtype)
            self._cache_media(key, (img, aud))
        with torch.inference_mode():
            ids = torch.tensor([prep.input_ids], device=self.device)
            return self.net.embed(ids, img, aud)[0]

    def _encode_waiting(self) -> list[StepOutput]:
        """Encode the media of waiting audio-only and image-only prompts in batches (one tower forward each, not
        one a request): clips of similar length together, images up to IMAGE_BATCH_CROPS crops. A batch that
        fails fails its requests only."""
        # The next max_batch in arrival order (admission is FIFO: a long clip at the head must not wait behind
        # shorter ones). Prompts with the same media as one before them wait for its result (the media cache).
        todo, keys = [], set()
        for s in [s for s in self.waiting if s.prompt_embeds is None][:self.max_batch]:
            if s.media_key in self._media_cache:
                s.prompt_embeds = self._prompt_embeds(s.prep, s.media_key)
            elif s.media_key not in keys:
                keys.add(s.media_key)
                todo.append(s)
        outs = []
        clips = sorted([s for s in todo if s.prep.images is None], key=lambda s: s.prep.audios.features.shape[1])
        for group in _groups(clips, lambda s: s.prep.audios.features.shape[1], AUDIO_BATCH_FRAMES, padded=True):
            outs += self._encode_group(group, "audio")  # ascending length: the newest member sets the padding
        images = [s for s in todo if s.prep.images is not None]

        def crops(s: Sequence) -> int:  # (images, crops per image) of its padded pixel batch
            return s.prep.images.pixel_values.shape[0] * s.prep.images.pixel_values.shape[1]
        for group in _groups(images, crops, IMAGE_BATCH_CROPS, padded=False):
            outs += self._encode_group(group, "image")
        for s in [s for s in self.waiting if s.prompt_embeds is None and s.media_key in self._media_cache]:
            s.prompt_embeds = self._prompt_embeds(s.prep, s.media_key)  # the duplicates of those just encoded
        return outs

    def _encode_group(self, group: list[Sequence], kind: str) -> list[StepOutput]:
        """One tower forward ("audio": the conformer, "image": SigLIP) for `group`. Out of memory: the two
        halves separately (the KV pool leaves the encoders what it does not hold, and 64 clips of 30 s need
        ~16 GB of activations); any other failure, or out of memory for one prompt alone, fails the group's
        requests with the reason."""
        encode = encode_audio_batch if kind == "audio" else encode_image_batch
        try:
            with torch.inference_mode():
                embs = encode(self.net, [s.prep for s in group], self.device, self.dtype)
        except torch.OutOfMemoryError as e:
            if len(group) > 1:
                half = len(group) // 2
                return self._encode_group(group[:half], kind) + self._encode_group(group[half:], kind)
            return [self._finish(group[0], "error", f"the {kind} encoder ran out of memory: {e}")]
        except (RuntimeError, ValueError) as e:
            return [self._finish(s, "error", f"the {kind} encoder failed: {e}") for s in group]
        for s, emb in zip(group, embs):
            media = (None, emb) if kind == "audio" else (emb, None)
            self._cache_media(s.media_key, media)
            s.prompt_embeds = self._prompt_embeds(s.prep, s.media_key, media)
        return []

    # ---------------------------------------------------------------- scheduling
    def _hasher(self, seq: Sequence):
        # Blocks are only interchangeable between requests with the same media, adapter and RoPE factors.
        key = seq.media_key + (seq.prep.adapter or "-").encode() + (b"L" if seq.long_rope else b"S")
        return hashlib.blake2b(key, digest_size=8)

    def _block_hash(self, h, toks: list[int], b: int) -> int:
        """Extend the chain `h` by block b's tokens; the chain's digest identifies the whole prefix."""
        h.update(np.asarray(toks[b * self.block_size:(b + 1) * self.block_size], dtype=np.int64).tobytes())
        return int.from_bytes(h.copy().digest(), "little") >> 1

    def _block_hashes(self, seq: Sequence, upto: int) -> list[int]:
        """Hash chain over the full blocks of the first `upto` tokens."""
        h, toks = self._hasher(seq), seq.tokens
        return [self._block_hash(h, toks, b) for b in range(upto // self.block_size)]

    def _ensure_blocks(self, seq: Sequence, upto: int) -> bool:
        need = -(-upto // self.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        try:
            seq.blocks += self.pool.allocate(need)
            return True
        except CacheFull:
            return False

    def _admit_prefix(self, seq: Sequence) -> None:
        if not self.prefix_caching or seq.num_cached or seq.blocks:
            return
        hashes = self._block_hashes(seq, seq.length - 1)  # always leave >= 1 token to compute
        hit = self.pool.match_prefix(hashes)
        seq.blocks = list(hit)
        seq.num_cached = len(hit) * self.block_size
        self.stats["prefix_hit_tokens"] += seq.num_cached

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's cache; it is recomputed from its tokens when readmitted."""
        self.pool.free(seq.blocks)
        seq.blocks, seq.num_cached, seq.hasher = [], 0, None
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.stats["preemptions"] += 1

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """-> (sequence, number of new tokens) for this step."""
        budget = self.max_tokens_per_step
        plan: list[tuple[Sequence, int]] = []
        # Running decodes first (oldest first); preempt the newest when blocks run out.
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq not in self.running or seq.prefilling:
                continue
            if not seq.long_rope and self.net.rope.use_long(seq.length):
                seq.long_rope = True  # crossing 4096: every key must be recomputed with the long factors
                self._preempt(seq)
                continue
            while not self._ensure_blocks(seq, seq.length):
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running and budget > 0:
                plan.append((seq, 1))
                budget -= 1
        # Then prefill chunks: partially prefilled running sequences, then admissions.
        for seq in [s for s in self.running if s.prefilling] + list(self.waiting):
            if budget <= 0:
                break
            if seq in self.waiting:
                if len(self.running) >= self.max_batch or seq.prompt_embeds is None:
                    break
                self._admit_prefix(seq)
            # A recompute (preemption, LongRoPE switch) covers every token, the newest sampled one included.
            remaining = seq.length - seq.num_cached
            n = min(remaining, budget)
            if n <= 0 or not self._ensure_blocks(seq, seq.num_cached + n):
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

    # ---------------------------------------------------------------- the step
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outs = [self._finish(s, "cancelled") for s in list(self.seqs.values()) if s.cancelled]
        outs += self._encode_waiting()
        plan = self._schedule()
        if not plan:
            return outs
        self.stats["steps"] += 1
        try:
            logits, greedy = self._forward(plan)  # (S, V): each planned sequence's last new token
        except torch.OutOfMemoryError as e:  # fail the prefills of this step, keep serving the others
            torch.cuda.empty_cache()
            return outs + [self._finish(s, "error", f"out of memory during prefill: {e}") for s, n in plan if n > 1]
        for seq, n in plan:
            seq.num_cached += n
            if self.prefix_caching:
                self._register_full_blocks(seq)
        # Sample only where this step's tokens reach the sequence's newest token: a prompt fully prefilled,
        # a decode, or the last chunk of a recompute.
        ready = [(i, s) for i, (s, _) in enumerate(plan) if s.num_cached == s.length]
        if ready:
            seqs = [s for _, s in ready]
            rows = [i for i, _ in ready]
            if all(_plain_greedy(s.params) for s in seqs):
                # No per-row state needed: no sampling batch (its (B, V) penalty tables). A decode step's graph
                # already took the argmax (every row of it is ready).
                if greedy is None:
                    greedy = self._ready_logits(logits, rows).argmax(-1)
                toks, lps, tops = greedy.tolist(), [None] * len(seqs), [None] * len(seqs)
            else:
                picked = apply_constraints(self._ready_logits(logits, rows), [s.params for s in seqs],
                                           [s.generated for s in seqs])
                batch = SamplingBatch.build([s.params for s in seqs], self.device, self.cfg.text.vocab_size,
                                            [s.prep.input_ids for s in seqs], [s.generated for s in seqs])
                picked = apply_min_tokens(picked.float(), batch, None, sorted(self.eos))
                res = sample(picked, batch)
                toks = res.tokens.tolist()  # the one host sync of the step
                want_lp = [s.params.logprobs is not None for s in seqs]
                lps = [lp if w else None for lp, w in zip(res.logprobs.tolist(), want_lp)]
                tops = (list(zip(res.top_ids.tolist(), res.top_logprobs.tolist())) if res.top_ids is not None
                        else [None] * len(seqs))
                tops = [(t[0][:s.params.logprobs], t[1][:s.params.logprobs]) if t and s.params.logprobs else None
                        for t, s in zip(tops, seqs)]
            for seq, tok, lp, top in zip(seqs, toks, lps, tops):
                outs.append(self._append(seq, tok, lp, top))
        self.stats["prefill_tokens"] += sum(n for _, n in plan if n > 1)
        self.stats["decode_tokens"] += sum(1 for _, n in plan if n == 1)
        return outs

    def _ready_logits(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The rows of `logits` to sample from, with the padded vocabulary masked."""
        picked = logits.index_select(0, torch.tensor(rows, device=self.device))  # (len(rows), V)
        return mask_padded_vocab(picked, self.model.decodable)

    def _forward(self, plan: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> logits (S, V) of each planned sequence's last new token, and their argmax when a decode graph
        computed it (None otherwise)."""
        if self.graphs is not None and all(n == 1 for _, n in plan) and \
                self.graphs.fits(len(plan), max(len(s.blocks) for s, _ in plan)):
            return self.graphs.run([s.token_at(s.num_cached) for s, _ in plan], [s.num_cached for s, _ in plan],
                                   [s.long_rope for s, _ in plan], [s.blocks for s, _ in plan],
                                   [s.prep.adapter for s, _ in plan])
        if self.prefill_graphs is not None and len(plan) == 1:
            seq, n = plan[0]
            if seq.num_cached == 0 and n == seq.length and self.prefill_graphs.fits(n):
                # A whole new prompt alone in the step (time to first token): static shapes, one graph.
                return self.prefill_graphs.run(self._embeds(seq, 0, n), seq.blocks, seq.prep.adapter, seq.long_rope)
        embeds, positions, longs, spans, last = [], [], [], [], []
        n_total = 0
        for seq, n in plan:
            start = seq.num_cached
            embeds.append(self._embeds(seq, start, start + n))
            positions.append(torch.arange(start, start + n))
            longs.append(torch.full((n,), seq.long_rope))
            spans.append((seq.prep.adapter, n))
            n_total += n
            last.append(n_total - 1)
        x = torch.cat(embeds)[None]  # (1, N, hidden)
        pos = torch.cat(positions)[None].to(self.device)  # (1, N)
        long = torch.cat(longs)[None].to(self.device)  # (1, N)
        attn = PagedAttention.build(self.pool, [(s.blocks, s.num_cached, n) for s, n in plan], self.device)
        with prefer_flash():
            return self.net(x, pos, plan=AdapterPlan.for_spans(spans, self.device), long_rope=long,
                            last_only=torch.tensor(last, device=self.device), attn=attn)[:, 0], None  # (S, V)

    def _embeds(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        p = seq.prep.num_tokens
        parts = []
        if start < p:
            parts.append(seq.prompt_embeds[start:min(end, p)])
        if end > p:
            gen = torch.tensor(seq.generated[max(start - p, 0):end - p], device=self.device)
            parts.append(self.net.embed_tokens(gen))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Make newly filled blocks findable by later requests (incremental: each block hashed once)."""
        full = seq.num_cached // self.block_size
        if seq.hasher is None or seq.hashed > full:
            seq.hasher, seq.hashed = self._hasher(seq), 0
        toks = seq.tokens if seq.hashed < full else None
        while seq.hashed < full:
            self.pool.register(seq.blocks[seq.hashed], self._block_hash(seq.hasher, toks, seq.hashed))
            seq.hashed += 1

    # ---------------------------------------------------------------- stopping
    def _append(self, seq: Sequence, tok: int, lp, top) -> StepOutput:
        p = seq.params
        seq.generated.append(tok)
        reason = None
        stop_tok = (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids
        if not stop_tok:
            seq.text += seq.decoder.push(tok)
        if stop_tok:
            reason = "stop"
        if p.stop:
            for s in p.stop:
                i = seq.text.find(s, max(0, seq.emitted - len(s)))
                if i >= 0:
                    seq.text, reason = seq.text[:i], "stop"
        if reason is None and (len(seq.generated) >= (p.max_tokens or float("inf"))
                               or seq.length >= self.cfg.text.max_position_embeddings):
            reason = "length"
        if reason is not None and not stop_tok:
            seq.text += seq.decoder.flush() if reason == "length" else ""
        # Hold back a tail that could still become a stop string.
        hold = 0 if reason else max((len(s) - 1 for s in p.stop), default=0)
        delta = seq.text[seq.emitted:len(seq.text) - hold] if len(seq.text) - hold > seq.emitted else ""
        seq.emitted += len(delta)
        out = StepOutput(seq.id, tok, delta, logprob=lp, top_logprobs=top and list(zip(*top)),
                         num_prompt_tokens=seq.prep.num_tokens, num_generated=len(seq.generated))
        if reason:
            fin = self._finish(seq, reason)
            out.text += fin.text
            out.finished, out.finish_reason = True, reason
        return out

    def _release(self, seq: Sequence) -> None:
        if seq.blocks:
            self.pool.free(seq.blocks)
            seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> StepOutput:
        self._release(seq)
        self.seqs.pop(seq.id, None)
        rest = seq.text[seq.emitted:] if reason != "cancelled" else ""
        seq.emitted = len(seq.text)
        return StepOutput(seq.id, None, rest, True, reason, error=error, num_prompt_tokens=seq.prep.num_tokens,
                          num_generated=len(seq.generated))

    # ---------------------------------------------------------------- conveniences
    def warmup(self) -> float:
        """Run the text paths a server meets first (a lone prompt through the static prefill, two prompts packed,
        a prefix-cache hit, decode at batch 1 and 2) so that their kernels compile and their graphs are captured
        before a user waits for them. -> seconds taken. Leaves no request, no held block and zeroed stats."""
        t0 = time.monotonic()
        p = SamplingParams(max_tokens=3, ignore_eos=True)
        a = self.model.prepare("<|user|>Warm up the engine, please.<|end|><|assistant|>")
        b = self.model.prepare("<|user|>Warm up the engine again, please, with a longer prompt.<|end|><|assistant|>")
        self.generate([dict(prompt=a, params=p)])
        self.generate([dict(prompt=a, params=p), dict(prompt=b, params=p)])
        self.stats = dict.fromkeys(self.stats, 0)
        return time.monotonic() - t0

    def stream(self) -> Iterator[StepOutput]:
        while self.has_work():
            yield from self.step()

    def generate(self, requests: Seq[dict], progress: bool = False, desc: str = "generate",
                 errors: str = "raise") -> list[dict]:
        """Offline: each request is a dict of add_request's arguments; returns text, tokens, finish reason.

        Requests are queued as the waiting queue has room (any number of them, never EngineBusy), so a long
        list streams through the engine. progress: a tqdm bar on stderr counting finished requests.
        errors: "raise" stops at a request add_request refuses (ValueError); "return" gives that request
        finish_reason "error" and its message, and goes on with the others (batch jobs).
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return'; got {errors!r}")
        from tqdm import tqdm
        todo = iter(enumerate(requests))
        res: list[dict] = [{"text": "", "token_ids": [], "finish_reason": None} for _ in requests]
        owner: dict[str, int] = {}  # request id -> index in requests
        bar = tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, disable=not progress or None,
                   dynamic_ncols=True)
        pending = True
        while pending or self.has_work():
            while pending and len(self.waiting) < self.max_waiting:
                nxt = next(todo, None)
                if nxt is None:
                    pending = False
                    break
                try:
                    owner[self.add_request(**nxt[1])] = nxt[0]
                except ValueError as e:
                    if errors == "raise":
                        raise
                    res[nxt[0]].update(finish_reason="error", error=" ".join(str(e).split()))
                    bar.update(1)
            for out in self.step():
                i = owner.get(out.request_id)
                if i is None:
                    continue
                r = res[i]
                r["text"] += out.text
                if out.token_id is not None:
                    r["token_ids"].append(out.token_id)
                if out.finished:
                    r["finish_reason"], r["error"] = out.finish_reason, out.error
                    bar.update(1)
        bar.close()
        return res


def _groups(items: list, size, budget: int, padded: bool) -> list[list]:
    """Consecutive runs of `items` within `budget`: the sum of `size` (padded=False), or the run's length times
    its newest item's size (padded=True, items in ascending size: every member is padded to the newest)."""
    groups: list[list] = []
    for it in items:
        g = groups[-1] if groups else []
        cost = (len(g) + 1) * size(it) if padded else sum(map(size, g)) + size(it)
        if g and cost <= budget:
            g.append(it)
        else:
            groups.append([it])
    return groups


def _plain_greedy(p: SamplingParams) -> bool:
    return (p.temperature == 0 and p.repetition_penalty == 1 and p.presence_penalty == 0
            and p.frequency_penalty == 0 and p.logprobs is None and p.min_tokens == 0 and p.constraint is None)


def _default_blocks(cfg, block_size: int, dtype: torch.dtype, device: torch.device) -> int:
    per_block = 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(16, int(free * 0.85) // per_block)  # leave room for activations
    return 4096
