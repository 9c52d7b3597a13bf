"""Runs the model for the engine: media through the towers (cached, batched across requests), the packed
forward of a step (CUDA graphs where shapes allow), and sampling of the rows that need a token.

The model stays a pure function of (embeddings, positions, paged KV, adapter plan) -> logits; this room owns
everything device-side the engine needs around it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from typing import Any

import torch

from phi4mm.api import Model
from phi4mm.engine.kv_cache import BlockPool, PagedAttention, prefer_flash
from phi4mm.engine.persistent_batch import PersistentBatch, plain_greedy
from phi4mm.engine.sequence import Sequence
from phi4mm.inputs.prepare import Prepared
from phi4mm.model.encode import encode_audio_batch, encode_image_batch, encode_media
from phi4mm.model.lora import AdapterPlan
from phi4mm.sampling import (
    apply_constraints,
    apply_min_tokens,
    mask_padded_vocab,
    sample,
)

AUDIO_BATCH_FRAMES = 64 * 3000  # padded feature frames per batched conformer forward: 64 clips of 30 s
# Crops per batched SigLIP forward (activations grow linearly in crops: ~30 MB a crop at full size, so ~2 GB
# here); one image of 36 HD crops + its global view always fits.
IMAGE_BATCH_CROPS = 64
PREFILL_GRAPH_TOKENS = 2048  # the longest lone prompt the static prefill graphs cover


def media_key(prep: Prepared) -> bytes:
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


def media_bytes(value: tuple) -> int:
    """Bytes held by a media cache entry (its image and audio embeddings)."""
    return sum(t.numel() * t.element_size() for t in value if t is not None)


def groups(items: list, size: Callable[[Any], int], budget: int, padded: bool) -> list[list]:
    """Consecutive runs of `items` within `budget`: the sum of `size` (padded=False), or the run's length times
    its newest item's size (padded=True, items in ascending size: every member is padded to the newest)."""
    out: list[list] = []
    for it in items:
        g = out[-1] if out else []
        cost = (len(g) + 1) * size(it) if padded else sum(map(size, g)) + size(it)
        if g and cost <= budget:
            g.append(it)
        else:
            out.append([it])
    return out


class ModelRunner:
    def __init__(self, model: Model, pool: BlockPool, max_num_seqs: int, max_tokens_per_step: int,
                 static_shapes: bool, media_cache_items: int, media_cache_bytes: int):
        self.model, self.net, self.cfg, self.pool = model, model.net, model.config, pool
        self.device, self.dtype = model.device, model.dtype
        self.media_cache: dict[bytes, tuple] = {}  # oldest first
        self.media_cache_items, self.media_cache_bytes = media_cache_items, media_cache_bytes
        self.media_cached_bytes = 0  # what the cache holds now
        self.eos = sorted(model.tokenizer.eos_token_ids)
        self.sampling = PersistentBatch(self.device, self.cfg.text.vocab_size)
        # Pure-decode steps, and a new prompt alone in its step, run with static shapes (CUDA graphs on GPU, by
        # default); padding rows and tokens of those buckets write into one reserved scratch block.
        self.graphs = self.prefill_graphs = None
        if static_shapes:
            from phi4mm.engine.graphs import DecodeGraphs, PrefillGraphs
            scratch = pool.allocate(1)[0]
            self.graphs = DecodeGraphs(self.net, pool, scratch, max_rows=max_num_seqs, decodable=model.decodable)
            self.prefill_graphs = PrefillGraphs(self.net, pool, scratch, model.decodable,
                                                max_tokens=min(PREFILL_GRAPH_TOKENS, max_tokens_per_step))

    # ---------------------------------------------------------------- media
    def cache_media(self, key: bytes, value: tuple) -> None:
        """Keep a prompt's tower outputs, dropping the oldest until both bounds hold (an item larger than the
        byte bound alone is not kept)."""
        size = media_bytes(value)
        if key in self.media_cache or size > self.media_cache_bytes or self.media_cache_items <= 0:
            return
        while self.media_cache and (len(self.media_cache) >= self.media_cache_items
                                    or self.media_cached_bytes + size > self.media_cache_bytes):
            self.media_cached_bytes -= media_bytes(self.media_cache.pop(next(iter(self.media_cache))))
        self.media_cache[key] = value
        self.media_cached_bytes += size

    @torch.inference_mode()
    def prompt_embeds(self, prep: Prepared, key: bytes, media: tuple | None = None) -> torch.Tensor:
        """(P, hidden) prompt embeddings; tower outputs are cached by content hash (same image asked twice).
        Raises ValueError when the prompt's placeholders and the towers' outputs disagree."""
        if media is not None:
            img, aud = media
        elif prep.images is None and prep.audios is None:
            img = aud = None
        elif key in self.media_cache:
            img, aud = self.media_cache[key]
        else:
            img, aud = encode_media(self.net, prep, self.device, self.dtype)
            self.cache_media(key, (img, aud))
        ids = torch.tensor([prep.input_ids], device=self.device)
        return self.net.embed(ids, img, aud)[0]

    def encode_waiting(self, waiting: list[Sequence]) -> list[tuple[Sequence, str]]:
        """Encode the media of waiting audio-only and image-only prompts in batches (one tower forward each, not
        one a request): clips of similar length together, images up to IMAGE_BATCH_CROPS crops.
        -> (sequence, error) for those that failed; a failing batch fails its requests only."""
        todo, keys = [], set()
        failed: list[tuple[Sequence, str]] = []
        for s in waiting:
            if s.media_key in self.media_cache:
                failed += self.attach(s)
            elif s.media_key not in keys:
                keys.add(s.media_key)
                todo.append(s)
        clips = sorted([s for s in todo if s.prep.images is None], key=lambda s: s.prep.audios.features.shape[1])
        for group in groups(clips, lambda s: s.prep.audios.features.shape[1], AUDIO_BATCH_FRAMES, padded=True):
            failed += self.encode_group(group, "audio")  # ascending length: the newest member sets the padding
        images = [s for s in todo if s.prep.images is not None]

        def crops(s: Sequence) -> int:  # (images, crops per image) of its padded pixel batch
            return s.prep.images.pixel_values.shape[0] * s.prep.images.pixel_values.shape[1]
        for group in groups(images, crops, IMAGE_BATCH_CROPS, padded=False):
            failed += self.encode_group(group, "image")
        done = {id(s) for s, _ in failed}
        for s in waiting:  # the duplicates of those just encoded
            if s.prompt_embeds is None and id(s) not in done and s.media_key in self.media_cache:
                failed += self.attach(s)
        return failed

    def attach(self, s: Sequence, media: tuple | None = None) -> list[tuple[Sequence, str]]:
        """Build one sequence's prompt embeddings from cached or given tower outputs; a mismatch fails it alone."""
        try:
            s.prompt_embeds = self.prompt_embeds(s.prep, s.media_key, media)
            return []
        except (RuntimeError, ValueError, IndexError) as e:
            return [(s, f"the prompt does not fit its media: {' '.join(str(e).split())[:200]}")]

    def encode_group(self, group: list[Sequence], kind: str) -> list[tuple[Sequence, str]]:
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
                return self.encode_group(group[:half], kind) + self.encode_group(group[half:], kind)
            return [(group[0], f"the {kind} encoder ran out of memory: {e}")]
        except (RuntimeError, ValueError) as e:
            return [(s, f"the {kind} encoder failed: {e}") for s in group]
        failed = []
        for s, emb in zip(group, embs):
            media = (None, emb) if kind == "audio" else (emb, None)
            self.cache_media(s.media_key, media)
            failed += self.attach(s, media)
        return failed

    # ---------------------------------------------------------------- the forward
    @torch.inference_mode()
    def forward(self, plan: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
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
                return self.prefill_graphs.run(self.embeds(seq, 0, n), seq.blocks, seq.prep.adapter, seq.long_rope)
        embeds, positions, longs, spans, last = [], [], [], [], []
        n_total = 0
        for seq, n in plan:
            start = seq.num_cached
            embeds.append(self.embeds(seq, start, start + n))
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

    def embeds(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """(end - start, hidden): the embeddings of tokens [start, end) of a sequence, prompt or generated."""
        p = seq.prep.num_tokens
        parts = []
        if start < p:
            parts.append(seq.prompt_embeds[start:min(end, p)])
        if end > p:
            gen = torch.tensor(seq.generated[max(start - p, 0):end - p], device=self.device)
            parts.append(self.net.embed_tokens(gen))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # ---------------------------------------------------------------- sampling
    @torch.inference_mode()
    def sample(self, seqs: list[Sequence], logits: torch.Tensor, rows: list[int], greedy: torch.Tensor | None,
               running: Collection[Sequence] = ()) -> tuple[list[int], list[float | None], list[Any]]:
        """One token for each of `seqs` from its row of `logits` -> (tokens, logprobs, top logprobs).
        running: the scheduler's running sequences (their sampling rows are kept; others' are dropped)."""
        if all(plain_greedy(s.params) for s in seqs):
            # No per-row state needed: no sampling rows (their (B, V) penalty tables). A decode step's graph
            # already took the argmax (every row of it is ready).
            if greedy is None:
                greedy = self.ready_logits(logits, rows).argmax(-1)
            return greedy.tolist(), [None] * len(seqs), [None] * len(seqs)
        # The persistent rows come in slot order: the logits rows are picked in that order, and the results put
        # back in the order of `seqs` on the host.
        batch_rows = self.sampling.rows(seqs, running or seqs)
        order, batch = batch_rows.order, batch_rows.batch
        ordered = [seqs[i] for i in order]
        # A constrained row (tool_choice "required" / a named function) may only continue its allowed prefix.
        picked = apply_constraints(self.ready_logits(logits, [rows[i] for i in order]),
                                   [s.params for s in ordered], [s.generated for s in ordered])
        picked = apply_min_tokens(picked.float(), batch, None, self.eos)
        res = sample(picked, batch)
        drawn = res.tokens.tolist()  # the one host sync of the step
        self.sampling.record(batch_rows, res.tokens)
        lps = res.logprobs.tolist() if res.logprobs is not None else [None] * len(seqs)
        tops = (list(zip(res.top_ids.tolist(), res.top_logprobs.tolist())) if res.top_ids is not None
                else [None] * len(seqs))
        toks: list[int] = [0] * len(seqs)
        lp_out: list[float | None] = [None] * len(seqs)
        top_out: list[Any] = [None] * len(seqs)
        for i, s, tok, lp, top in zip(order, ordered, drawn, lps, tops):
            n = s.params.logprobs
            toks[i], lp_out[i] = tok, lp if n is not None else None
            top_out[i] = (top[0][:n], top[1][:n]) if top and n else None
        return toks, lp_out, top_out

    def ready_logits(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The rows of `logits` to sample from, with the padded vocabulary masked."""
        picked = logits.index_select(0, torch.tensor(rows, device=self.device))  # (len(rows), V)
        return mask_padded_vocab(picked, self.model.decodable)
