"""The engine: continuous batching over a paged KV cache, one adapter per request, chunked prefill.

Each `step()` packs the new tokens of every scheduled sequence into one (1, N) row: one token for each running
decode, and a chunk of prompt for sequences still prefilling, under a token budget so a long image or audio
prompt never stalls the decodes. The model sees a pure function call (embeddings, positions, paged attention
backend, per-span adapter plan); the engine owns blocks, sampling, stopping and streaming.

Rooms: `scheduler.py` decides what runs (admission, prefix cache, preemption, blocks), `runner.py` runs it
(media towers, the packed forward, CUDA graphs, sampling), `sequence.py` holds one request's state and its
stopping rules. This facade validates requests, glues a step together and keeps one request's failure from
reaching the others.

LongRoPE: a sequence whose length passes the original context (4096 tokens) switches to the long factors for
*all* its keys, as the reference does: its cache is dropped and the whole sequence is recomputed (the same
path as preemption).
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from typing import Any

import torch

from phi4mm.api import Model
from phi4mm.engine.kv_cache import BlockPool, CacheFull
from phi4mm.engine.runner import ModelRunner, media_key
from phi4mm.engine.scheduler import Scheduler, history_tokens
from phi4mm.engine.sequence import Sequence, StepOutput
from phi4mm.inputs.prepare import Prepared
from phi4mm.model.lora import LoraLinear
from phi4mm.model.lora import merge_adapter as merge_lora
from phi4mm.options import EngineOptions
from phi4mm.sampling import SamplingParams

__all__ = ["CacheFull", "Engine", "EngineBusy", "StepOutput", "cpu_kv_blocks"]

# The KV pool the command line, batch jobs and server replicas give an engine on a CPU: 16k tokens (4 GiB fp32
# at full size). On a GPU the engine sizes its pool from the memory it may use.
CPU_KV_TOKENS = 16384
CPU_MAX_NUM_SEQS = 64
WARM_CONTEXT_TOKENS = 2048  # warm_graphs() covers decode contexts up to this; longer ones capture on first use
GPU_MAX_NUM_SEQS = 256  # decode keeps gaining past 64 rows on a large GPU while the pool holds them
# GPU memory kept out of the KV pool for activations: a 2048-token prefill chunk, the towers' batches (which
# halve themselves on out-of-memory), CUDA graphs' private pools and the allocator's fragmentation.
ACTIVATION_RESERVE_BYTES = 4 << 30


def cpu_kv_blocks(device: torch.device | str, block_size: int = 16) -> int | None:
    """`num_blocks` for an Engine of those front ends: CPU_KV_TOKENS' worth on a CPU, None (sized from free
    memory) on a GPU."""
    return None if torch.device(device).type == "cuda" else CPU_KV_TOKENS // block_size


class EngineBusy(RuntimeError):
    """The waiting queue is full: retry later (a server answers 429)."""


class Engine:
    """Continuous-batching engine over a loaded `Model`.

    options: an `EngineOptions` (phi4mm/options.py); keyword arguments of the same names (and the older
    `max_batch` for max_num_seqs) override its fields. num_blocks: KV blocks of `block_size` tokens (default:
    what `gpu_memory_utilization` leaves on a GPU, CPU_KV_TOKENS on a CPU). max_model_len: the context one
    sequence may use; the model's, lowered to what the pool holds. merge_adapter: an adapter ("speech",
    "vision") merged into a copy of each decoder weight (lora.merge_adapter): forwards whose whole batch uses it
    (transcription) skip the LoRA GEMMs, for ~6.4 GB more on the full model. The copy lives on the model's
    layers, so `model.generate` and other engines on this model use it too.
    """

    def __init__(self, model: Model, num_blocks: int | None = None, block_size: int | None = None,
                 max_batch: int | None = None, *, options: EngineOptions | None = None, **overrides: Any):
        opts = options or EngineOptions()
        given = {"num_blocks": num_blocks, "block_size": block_size, "max_num_seqs": max_batch, **overrides}
        unknown = set(given) - {f.name for f in dataclasses.fields(EngineOptions)}
        if unknown:
            raise TypeError(f"Engine got unknown option(s) {sorted(unknown)}; see phi4mm.options.EngineOptions")
        opts = opts.but(**{k: v for k, v in given.items() if v is not None})
        self.options = opts
        self.model, self.net, self.cfg = model, model.net, model.config
        self.device, self.dtype = model.device, model.dtype
        self.block_size, self.max_waiting = opts.block_size, opts.max_waiting
        self.merged_bytes, self._merged = 0, []
        if opts.merge_adapter is not None:
            # Before the KV pool is sized from free memory (the copy must not be squeezed out by it) and before
            # any graph is captured (a uniform graph of this adapter records the merged path). The engine holds
            # the copies: unmerge_adapters() while it lives must not free memory its captured graphs read.
            self.merged_bytes = merge_lora(self.net, opts.merge_adapter)
            self._merged = [m.merged[opts.merge_adapter] for m in self.net.modules() if isinstance(m, LoraLinear)]
        blocks = opts.num_blocks or default_blocks(self.cfg.text, opts.block_size, self.dtype, self.device,
                                                   opts.gpu_memory_utilization)
        self.max_batch = opts.max_num_seqs or (GPU_MAX_NUM_SEQS if self.device.type == "cuda" else CPU_MAX_NUM_SEQS)
        self.pool = BlockPool(self.cfg.text, blocks, opts.block_size, self.dtype, self.device)
        context = self.cfg.text.max_position_embeddings
        if opts.max_model_len is not None and not 1 < opts.max_model_len:
            raise ValueError(f"max_model_len={opts.max_model_len} must be > 1 (--max-model-len)")
        wanted = min(opts.max_model_len or context, context)
        # One sequence may never hold more than the pool (a scratch block is kept for the static shapes).
        self.max_model_len = min(wanted, (blocks - 1) * opts.block_size)
        self.context_note = None
        if self.max_model_len < wanted:
            self.context_note = (f"max_model_len lowered from {wanted} to {self.max_model_len} tokens: the KV cache "
                                 f"holds {blocks * opts.block_size} (raise --gpu-memory-utilization or lower "
                                 "--max-model-len)")
        static = opts.static_decode if opts.static_decode is not None else self.device.type == "cuda"
        self.runner = ModelRunner(model, self.pool, self.max_batch, opts.max_tokens_per_step, static,
                                  opts.media_cache_items, opts.media_cache_bytes)
        self.scheduler = Scheduler(self.pool, self.max_batch, opts.max_tokens_per_step,
                                   opts.prefill_tokens_with_decodes, opts.prefix_caching, self.net.rope.use_long,
                                   history_tokens(self.cfg.text))
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.eos = set(model.tokenizer.eos_token_ids)
        model.tokenizer.token_bytes()  # build the streaming-decode table now, not on the first request
        self._counts = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "isolated_failures": 0}
        self.graphs_ready = (0, 0)  # (decode, prefill) static buckets captured by warm_graphs()

    # ---------------------------------------------------------------- state, for the server and tests
    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def graphs(self):
        return self.runner.graphs

    @property
    def prefill_graphs(self):
        return self.runner.prefill_graphs

    @property
    def stats(self) -> dict[str, int]:
        return {**self._counts, **self.scheduler.stats}

    @stats.setter
    def stats(self, values: dict[str, int]) -> None:
        for k, v in values.items():
            (self.scheduler.stats if k in self.scheduler.stats else self._counts)[k] = v

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt: str | Seq[dict] | Prepared, images: Seq[Any] | None = None,
                    audios: Seq[Any] | None = None, params: SamplingParams | None = None,
                    tools: list[dict] | None = None, request_id: str | None = None) -> str:
        """Validate and queue a request; returns its id. Raises ValueError for bad input, EngineBusy when full.

        params.max_tokens None: as many tokens as the sequence's context (max_model_len) has left."""
        params = (params or SamplingParams()).validate()
        if len(self.waiting) >= self.max_waiting:
            raise EngineBusy(f"{len(self.waiting)} requests are already waiting (limit {self.max_waiting}); "
                             "retry shortly")
        prep = prompt if isinstance(prompt, Prepared) else self.model.prepare(prompt, images, audios, tools)
        limit = self.max_model_len
        if prep.num_tokens + 1 > limit:
            raise ValueError(f"the prompt has {prep.num_tokens} tokens; this server holds {limit} tokens per "
                             "request (prompt + reply): shorten the prompt, or raise --max-model-len / "
                             "--gpu-memory-utilization")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=limit - prep.num_tokens)
        elif prep.num_tokens + params.max_tokens > limit:
            raise ValueError(f"max_tokens={params.max_tokens} does not fit: the prompt has {prep.num_tokens} tokens "
                             f"and a request may hold {limit} (--max-model-len); ask for at most "
                             f"{limit - prep.num_tokens} or leave max_tokens out")
        key = media_key(prep)
        # Audio-only and image-only prompts are encoded at the next step, together with the others of their kind
        # then waiting (one conformer or SigLIP forward for a batch); image + audio prompts and text now.
        deferred = (prep.audios is None) != (prep.images is None) and key not in self.runner.media_cache
        try:
            embeds = None if deferred else self.runner.prompt_embeds(prep, key)
        except (RuntimeError, IndexError) as e:  # a prompt the towers cannot serve: this request's error only
            raise ValueError(f"the prompt does not fit its media: {' '.join(str(e).split())[:200]}") from e
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, prep, params, embeds, key, time.monotonic(), limit)
        seq.long_rope = self.net.rope.use_long(prep.num_tokens)
        seq.decoder = self.model.tokenizer.stream_decoder(skip_special_tokens=True)
        self.seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def cancel(self, request_id: str) -> bool:
        """Stop a request now; its blocks return to the pool at once. False if it is unknown or finished."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return False
        seq.cancelled = True
        self.scheduler.release(seq)
        return True

    def has_work(self) -> bool:
        # A cancelled request still owes its caller a final "cancelled" output from the next step.
        return bool(self.waiting or self.running or any(s.cancelled for s in self.seqs.values()))

    # ---------------------------------------------------------------- the step
    def step(self) -> list[StepOutput]:
        outs = [self._finish(s, "cancelled") for s in list(self.seqs.values()) if s.cancelled]
        pending = [s for s in self.waiting if s.prompt_embeds is None][:self.max_batch]
        outs += [self._finish(s, "error", err) for s, err in self.runner.encode_waiting(pending)]
        plan = self.scheduler.schedule()
        if not plan:
            return outs
        self._counts["steps"] += 1
        outs += self._run(plan)
        self._counts["prefill_tokens"] += sum(n for _, n in plan if n > 1)
        self._counts["decode_tokens"] += sum(1 for _, n in plan if n == 1)
        return outs

    def _run(self, plan: list[tuple[Sequence, int]]) -> list[StepOutput]:
        """Forward and sample `plan`. A failure fails only the request that causes it: the plan is split in
        halves and each half re-run (a forward only rewrites the same cache slots, so re-running is safe) until
        the failing sequence is alone."""
        try:
            logits, greedy = self.runner.forward(plan)  # (S, V): each planned sequence's last new token
            ready = [(i, s) for i, (s, n) in enumerate(plan) if s.num_cached + n == s.length]
            toks, lps, tops = (self.runner.sample([s for _, s in ready], logits, [i for i, _ in ready], greedy,
                                                  self.running) if ready else ([], [], []))
        except torch.OutOfMemoryError as e:  # fail the prefills of this step, keep serving the others
            torch.cuda.empty_cache()
            outs = [self._finish(s, "error", f"out of memory during prefill: {e}") for s, n in plan if n > 1]
            rest = [(s, n) for s, n in plan if n == 1]
            return outs + (self._run(rest) if rest and len(rest) < len(plan) else [])
        except Exception as e:  # noqa: BLE001 - one request's bad state must not fail the batch
            if len(plan) == 1:
                self._counts["isolated_failures"] += 1
                return [self._finish(plan[0][0], "error", f"the engine could not run this request "
                                                          f"({type(e).__name__}: {' '.join(str(e).split())[:200]})")]
            half = len(plan) // 2
            return self._run(plan[:half]) + self._run(plan[half:])
        self.scheduler.commit(plan)
        # Sample only where this step's tokens reach the sequence's newest token: a prompt fully prefilled,
        # a decode, or the last chunk of a recompute.
        outs = []
        for (_, seq), tok, lp, top in zip(ready, toks, lps, tops):
            out, reason = seq.advance(tok, self.eos, lp, top)
            if reason:
                fin = self._finish(seq, reason)
                out.text += fin.text
                out.finished, out.finish_reason = True, reason
            outs.append(out)
        return outs

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> StepOutput:
        self.scheduler.release(seq)
        self.seqs.pop(seq.id, None)
        return seq.final(reason, error)

    # ---------------------------------------------------------------- conveniences
    def warmup(self) -> float:
        """Run the text paths a server meets first (a lone prompt through the static prefill, two prompts packed,
        a prefix-cache hit, decode at batch 1 and 2) so that their kernels compile, then capture the static
        buckets traffic meets first (`graph_warmup_seconds` at most; see `warm_graphs`), before a user waits for
        them. -> seconds taken. Leaves no request, no held block and zeroed stats."""
        t0 = time.monotonic()
        p = SamplingParams(max_tokens=3, ignore_eos=True)
        a = self.model.prepare("<|user|>Warm up the engine, please.<|end|><|assistant|>")
        b = self.model.prepare("<|user|>Warm up the engine again, please, with a longer prompt.<|end|><|assistant|>")
        self.generate([{"prompt": a, "params": p}])
        self.generate([{"prompt": a, "params": p}, {"prompt": b, "params": p}])
        self.warm_graphs(time.monotonic() + self.options.graph_warmup_seconds)
        self.stats = dict.fromkeys(self.stats, 0)
        return time.monotonic() - t0

    def warm_graphs(self, deadline: float) -> tuple[int, int]:
        """Capture decode buckets (every batch size bucket, contexts up to WARM_CONTEXT_TOKENS, no adapter then
        the adapter slots) and then lone-prompt buckets (no adapter, then each adapter) until time.monotonic()
        passes `deadline` -> (decode, prefill) buckets ready; also in `self.graphs_ready`. Only where graphs
        are captured (CUDA): elsewhere a bucket costs nothing to build on first use."""
        decode, prefill = self.runner.graphs, self.runner.prefill_graphs
        if decode is None or not decode.capture:
            return self.graphs_ready
        # Graphs may take at most half the activation reserve: the towers and long prompts need the rest.
        total = torch.cuda.mem_get_info(self.device)[1]
        keep = int(total * (1 - self.options.gpu_memory_utilization)) + ACTIVATION_RESERVE_BYTES // 2
        d = decode.warm(decode.warm_keys(min(WARM_CONTEXT_TOKENS, self.max_model_len)), deadline, keep)
        p = prefill.warm(prefill.warm_keys([None, *decode.adapter_names]), deadline, keep) if prefill else 0
        self.graphs_ready = (d, p)
        return self.graphs_ready

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


def default_blocks(cfg, block_size: int, dtype: torch.dtype, device: torch.device,
                   gpu_memory_utilization: float) -> int:
    """KV blocks for a pool: on a GPU, what the process may fill (gpu_memory_utilization of the total, vLLM's
    meaning) less what is already used and ACTIVATION_RESERVE_BYTES; on a CPU, CPU_KV_TOKENS."""
    per_block = 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
    if device.type == "cuda":
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1] "
                             "(--gpu-memory-utilization)")
        free, total = torch.cuda.mem_get_info(device)
        room = int(total * gpu_memory_utilization) - (total - free) - ACTIVATION_RESERVE_BYTES
        if room < 16 * per_block:
            raise ValueError(f"the GPU has no room for a KV cache: {free / 2**30:.1f} GiB free of "
                             f"{total / 2**30:.1f} GiB; raise --gpu-memory-utilization or free the GPU")
        return room // per_block
    return CPU_KV_TOKENS // block_size
