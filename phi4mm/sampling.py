"""Batched, per-row token sampling for the decode loop.

The engine decodes B requests at once. Each step it calls `sample(logits, batch)` once; every row has its own
parameters, held as device tensors in a `SamplingBatch` built when the batch composition changes (a request
joins or finishes), never per step. Nothing in `sample` / `update` / `apply_min_tokens` reads a value back to
the host, so the decode step can run ahead of Python (and be captured in a CUDA graph).

Order of operations (one pure function each, composed once in `sample`):
    penalties -> greedy rows take argmax -> temperature -> top-k -> top-p -> min-p -> inverse CDF

Randomness. A per-row `torch.Generator` would force a Python loop over rows every step. Instead each row
keeps a 64-bit seed and its own step counter, and its uniform u is a counter-based hash of (seed, step)
computed with integer tensor ops on device (the idea behind Philox, with a cheaper mixer). Sampling inverts
the row's CDF: the first token whose cumulative probability exceeds u x total, which picks token i with
probability p_i. One uniform a row, so the noise costs nothing next to the (B, V) softmax and prefix sum (a
hash per (row, token), as an exponential race needs, was ~15 passes over (B, V) int64: at B=256, V=200k,
several milliseconds of a GPU step and seconds on a CPU). A seeded request draws the same tokens whatever
batch it is in and wherever it sits in it. Unseeded rows get a seed from torch's default generator at
admission (so `torch.manual_seed` makes a whole run repeatable).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MAX_LOGPROBS = 20  # OpenAI's limit on top alternatives per token
MAX_STOP_STRINGS = 16
MAX_TEMPERATURE = 100.0
MAX_COUNT = (1 << 31) - 1  # bound on every count field (tokens, top_k, token ids): they travel as int64 tensors
_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit lane times one stays below 2**63, so int64 never overflows (signed
# overflow is not something to lean on). Both pass an avalanche test at the noise floor of 65k samples, as
# good as lowbias32's constants (which are above 2**31).
_MUL1, _MUL2 = 0x7FC6690F, 0x24149299
# Uniforms are (2k + 1) / 2**25 for the hash's top 24 bits k: every value is exact in float32 and lies in
# [2**-25, 1 - 2**-25], strictly inside (0, 1); 24 bits is float32's precision near 1, where a CDF ends.
_U_BITS = 24


@dataclass(frozen=True)
class TokenConstraint:
    """What a reply may contain, as token ids: it must begin with one of `prefixes` (when any are given), and
    never contains a `banned` id. Tool choice is built on it: "required" and a named function force the
    call's opening tokens, "none" bans the call tag."""

    prefixes: tuple[tuple[int, ...], ...] = ()
    banned: frozenset[int] = frozenset()

    def allowed_next(self, generated: Sequence[int]) -> set[int] | None:
        """Ids that keep the reply on one of the prefixes after `generated`; None once it is past them all
        (or when there are none): then only `banned` applies."""
        n = len(generated)
        nxt = set()
        for p in self.prefixes:
            if n >= len(p):
                if tuple(generated[:len(p)]) == p:
                    return None  # a prefix is complete: the rest is free
                continue
            if tuple(generated) == p[:n]:
                nxt.add(p[n])
        return nxt or None


def apply_constraints(logits: Tensor, params: Sequence[SamplingParams], generated: Sequence[Sequence[int]]
                      ) -> Tensor:
    """In place: mask each constrained row of logits (B, V) to the tokens its constraint allows next (see
    `TokenConstraint`). Unconstrained rows are untouched; a host loop over the constrained rows only."""
    V = logits.shape[-1]
    for row, (p, gen) in enumerate(zip(params, generated)):
        c = p.constraint
        if c is None:
            continue
        allowed = c.allowed_next(gen)
        if allowed is not None:
            keep = torch.zeros(V, dtype=torch.bool, device=logits.device)
            keep[torch.tensor(sorted(a for a in allowed if 0 <= a < V), dtype=torch.long, device=logits.device)] = True
            logits[row].masked_fill_(~keep, float("-inf"))
        elif c.banned:
            ids = torch.tensor(sorted(b for b in c.banned if 0 <= b < V), dtype=torch.long, device=logits.device)
            logits[row, ids] = float("-inf")
    return logits


# Fields of generation_config.json that set a sampling default, and the SamplingParams field each sets.
GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(model_dir: str | Path | None) -> dict[str, Any]:
    """SamplingParams defaults from a checkpoint's generation_config.json, read as transformers reads it: without
    `do_sample: true` decoding is greedy (temperature 0), with it the file's temperature / top_p / top_k / min_p
    apply (1.0 where absent); repetition_penalty and max_new_tokens apply either way. No file: {} (greedy).
    Every front end (Python API, CLI, batch, server) starts from these, so the same checkpoint answers alike."""
    if model_dir is None:
        return {}
    f = Path(model_dir) / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text())
    except ValueError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); fix or remove it") from None
    out: dict[str, Any] = {}
    sampled = bool(d.get("do_sample", False))
    for key, name in GENERATION_CONFIG_FIELDS.items():
        if key in d and d[key] is not None and (sampled or key in ("repetition_penalty", "max_new_tokens")):
            out[name] = int(d[key]) if name in ("top_k", "max_tokens") else float(d[key])
    if sampled:
        out.setdefault("temperature", 1.0)
    else:
        out["temperature"] = 0.0
    return out


@dataclass
class SamplingParams:
    """What one request asks of the sampler (OpenAI / vLLM field names and meanings)."""
    max_tokens: int | None = None     # None: what remains of the context the engine can hold
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # HF/CTRL: over prompt + output; >1 discourages repeats
    presence_penalty: float = 0.0     # OpenAI: over generated tokens only
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None       # number of top alternatives to report; None = no logprobs
    min_tokens: int = 0
    constraint: TokenConstraint | None = None  # decoding constraint (tool_choice); None: free

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the bad field, the value seen and the allowed range. Returns self."""
        def bad(name: str, allowed: str) -> None:
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is out of range: {allowed}")

        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            bad("temperature", f"use 0 (greedy) up to {MAX_TEMPERATURE}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]; 1 turns nucleus sampling off")
        if not 0 <= self.top_k <= MAX_COUNT:
            bad("top_k", f"must be in 0..{MAX_COUNT}; 0 turns top-k off")
        if not 0.0 <= self.min_p < 1.0:
            bad("min_p", "must be in [0, 1); 0 turns min-p off")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, "must be in [-2, 2]; 0 turns it off")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "must be > 0; 1 turns it off")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= MAX_COUNT:
            bad("max_tokens", f"must be in 1..{MAX_COUNT}, or None for the rest of the context")
        if not 0 <= self.min_tokens <= MAX_COUNT:
            bad("min_tokens", f"must be in 0..{MAX_COUNT}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 64):
            bad("seed", "must fit in 64 bits")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            bad("logprobs", f"must be None or 0..{MAX_LOGPROBS}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"SamplingParams.stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS}")
        if any(not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop={self.stop!r} contains an empty string; remove it")
        if any(not 0 <= t <= MAX_COUNT for t in self.stop_token_ids):
            bad("stop_token_ids", f"token ids must be in 0..{MAX_COUNT}")
        return self


# ---------------------------------------------------------------------------------------------- randomness

def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer mixer (xorshift-multiply, lowbias32 shape) on int64 lanes in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


def _row_keys(seeds: Tensor, steps: Tensor) -> Tensor:
    """One 32-bit key per (row seed, row step): (B,) int64. Both seed halves and the step are chained through
    the mixer, so nearby seeds or steps give unrelated keys."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32  # arithmetic shift, then mask: the high half's bits
    k = _mix32(lo ^ 0x9E3779B9)
    k = _mix32(k ^ hi)
    # Two rounds after the step: one round over consecutive counters left a detectable step-to-step pattern
    # (chi-square on successive draws). This runs on (B,) only, so it is free.
    return _mix32(_mix32(k ^ (steps & _MASK32)) ^ 0x85EBCA6B)


def row_uniforms(seeds: Tensor, steps: Tensor) -> Tensor:
    """u ~ U(0, 1), one per row: (B,) float32, a pure function of (seed, step)."""
    bits = _row_keys(seeds, steps) >> (32 - _U_BITS)  # (B,) the key's top bits
    return (bits * 2 + 1).float() / float(1 << (_U_BITS + 1))


def inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Token i of each row with probability weights_i / sum(weights): (B, V) non-negative float32 (need not
    sum to 1) and u (B,) in (0, 1) -> (B,) int64. The first index whose prefix sum exceeds u x total."""
    cdf = weights.cumsum(dim=-1)  # (B, V), non-decreasing
    total = cdf[:, -1:]
    # u < 1, but u x total may round up to total: keep the target strictly below it, so some index exceeds it.
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # (B, 1)
    picked = torch.searchsorted(cdf, target, right=True).clamp_max_(weights.shape[-1] - 1)  # (B, 1)
    # A token of zero weight has cdf equal to its neighbour's on a sequential scan, so it is never the first
    # to exceed the target; a parallel scan may round across its blocks, so make sure.
    ok = weights.gather(1, picked) > 0
    return torch.where(ok, picked, weights.argmax(dim=-1, keepdim=True)).squeeze(1)


# -------------------------------------------------------------------------------------------- batch state

@dataclass
class SamplingBatch:
    """Per-row sampling state for B rows, as device tensors (all shapes lead with B).

    Penalty state costs B*V*5 bytes (int32 output counts + bool prompt mask), e.g. 64 MB for B=64, V=200k.
    The `any_*` flags are host booleans computed from the params, so `sample` skips whole stages without
    looking at tensors.
    """
    params: list[SamplingParams]
    vocab_size: int
    temperature: Tensor         # (B,) float32; greedy rows hold 0
    top_p: Tensor               # (B,) float32
    top_k: Tensor               # (B,) int64; "off" stored as vocab_size
    min_p: Tensor               # (B,) float32
    repetition_penalty: Tensor  # (B,) float32
    presence_penalty: Tensor    # (B,) float32
    frequency_penalty: Tensor   # (B,) float32
    seeds: Tensor               # (B,) int64, the 64-bit seed's bit pattern
    steps: Tensor               # (B,) int64, tokens this row has generated (its noise counter)
    min_tokens: Tensor          # (B,) int64
    stop_token_ids: Tensor      # (B, S) int64, padded with -1
    prompt_mask: Tensor         # (B, V) bool: token occurs in the prompt (repetition penalty only)
    output_counts: Tensor       # (B, V) int32: times each token was generated

    # ---- construction
    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device | str, vocab_size: int,
              prompt_token_ids: list[list[int]], output_token_ids: list[list[int]] | None = None,
              seeds: list[int] | None = None) -> SamplingBatch:
        """Validate params and upload per-row state. Host work happens here, once per admission.

        output_token_ids (optional): tokens each row has already generated, for rebuilding a batch mid-request
        (e.g. after preemption); they restore output_counts and the noise counter `steps`, so penalties and
        seeded draws continue as if the batch had been kept and `update`d. seeds (optional): each row's seed in
        place of its params.seed (the engine keeps one drawn for an unseeded request across preemption).
        """
        if len(params) != len(prompt_token_ids):
            raise ValueError(f"{len(params)} SamplingParams but {len(prompt_token_ids)} prompts; pass one each")
        outputs = output_token_ids if output_token_ids is not None else [[] for _ in params]
        if len(outputs) != len(params):
            raise ValueError(f"{len(params)} SamplingParams but {len(outputs)} output_token_ids; pass one each")
        for p in params:
            p.validate()
        B, V = len(params), vocab_size
        f32 = {"dtype": torch.float32, "device": device}
        # Python ints of any sign/size -> the int64 with the same low 64 bits.
        if seeds is None:
            fresh = torch.randint(0, 1 << 62, (B,)).tolist()  # default generator: repeatable under manual_seed
            seeds = [p.seed if p.seed is not None else fresh[i] for i, p in enumerate(params)]
        seed_bits = [s % (1 << 64) for s in seeds]
        seed_bits = [s - (1 << 64) if s >= (1 << 63) else s for s in seed_bits]

        S = max([len(p.stop_token_ids) for p in params] + [0])
        stop_ids = torch.tensor([p.stop_token_ids + [-1] * (S - len(p.stop_token_ids)) for p in params],
                                dtype=torch.long).reshape(B, S)
        # One flat scatter for all prompts (a per-row loop of tiny tensors dominates build time at large B).
        def flat(seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
            lens = torch.tensor([len(ids) for ids in seqs], dtype=torch.long)
            cols = torch.tensor([t for ids in seqs for t in ids], dtype=torch.long)
            rows = torch.repeat_interleave(torch.arange(B), lens)
            # Multimodal placeholders can be negative (HF's legacy image/audio ids): they are not text tokens.
            ok = (cols >= 0) & (cols < V)
            return rows[ok], cols[ok]

        prompt_mask = torch.zeros(B, V, dtype=torch.bool)
        prompt_mask[flat(prompt_token_ids)] = True
        output_counts = torch.zeros(B, V, dtype=torch.int32)
        rows, cols = flat(outputs)
        output_counts.index_put_((rows, cols), torch.ones_like(rows, dtype=torch.int32), accumulate=True)
        return cls(
            params=list(params), vocab_size=V,
            temperature=torch.tensor([p.temperature for p in params], **f32),
            top_p=torch.tensor([p.top_p for p in params], **f32),
            top_k=torch.tensor([min(p.top_k, V) if p.top_k > 0 else V for p in params], dtype=torch.long, device=device),
            min_p=torch.tensor([p.min_p for p in params], **f32),
            repetition_penalty=torch.tensor([p.repetition_penalty for p in params], **f32),
            presence_penalty=torch.tensor([p.presence_penalty for p in params], **f32),
            frequency_penalty=torch.tensor([p.frequency_penalty for p in params], **f32),
            seeds=torch.tensor(seed_bits, dtype=torch.long, device=device),
            steps=torch.tensor([len(o) for o in outputs], dtype=torch.long, device=device),
            min_tokens=torch.tensor([p.min_tokens for p in params], dtype=torch.long, device=device),
            stop_token_ids=stop_ids.to(device),
            prompt_mask=prompt_mask.to(device),
            output_counts=output_counts.to(device),
        )

    def __post_init__(self) -> None:
        # Host booleans saying which stages this batch needs at all, computed once per composition so
        # `sample` can skip whole (B, V) passes without a per-step loop over rows or a look at tensors.
        ps, V = self.params, self.vocab_size
        self.any_sampled = any(p.temperature > 0 for p in ps)
        self.any_penalty = any(p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                               or p.frequency_penalty != 0.0 for p in ps)
        self.any_top_k_or_p = any(p.temperature > 0 and (0 < p.top_k < V or p.top_p < 1.0) for p in ps)
        self.any_min_p = any(p.temperature > 0 and p.min_p > 0 for p in ps)
        self.any_min_tokens = any(p.min_tokens > 0 for p in ps)
        asked = [p.logprobs for p in ps if p.logprobs is not None]
        # N for top_ids / top_logprobs: the most any row asks for; None when no row asks.
        self.num_logprobs: int | None = max(asked) if asked else None
        self.eos_cache: dict[tuple[int, ...], Tensor] = {}  # apply_min_tokens' uploaded EOS ids

    def __len__(self) -> int:
        return len(self.params)

    # ---- per-step update and membership changes
    def update(self, tokens: Tensor) -> None:
        """Record the tokens (B,) just chosen: bump their output counts and every row's step, on device."""
        self.output_counts.scatter_add_(1, tokens.long()[:, None],
                                        torch.ones_like(tokens, dtype=torch.int32)[:, None])
        self.steps += 1

    @classmethod
    def row_fields(cls) -> list[str]:
        """The per-row tensor fields."""
        return [f.name for f in fields(cls) if f.type == "Tensor"]

    def select(self, rows: Sequence[int]) -> SamplingBatch:
        """A batch of just `rows` (host indices, in the order given), keeping their counts, steps, seeds."""
        rows = list(rows)
        idx = torch.tensor(rows, dtype=torch.long, device=self.seeds.device)
        picked = {n: getattr(self, n).index_select(0, idx) for n in self.row_fields()}
        out = SamplingBatch(params=[self.params[r] for r in rows], vocab_size=self.vocab_size, **picked)
        return out._trim_stop_ids()

    def concat(self, other: SamplingBatch) -> SamplingBatch:
        """Rows of self followed by rows of other (e.g. newly admitted requests)."""
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"cannot concat batches with vocab sizes {self.vocab_size} and {other.vocab_size}")
        joined = {}
        for n in self.row_fields():
            a, b = getattr(self, n), getattr(other, n)
            if n == "stop_token_ids":  # widths differ: pad the narrower with -1
                S = max(a.shape[1], b.shape[1])
                a, b = (torch.nn.functional.pad(t, (0, S - t.shape[1]), value=-1) for t in (a, b))
            joined[n] = torch.cat([a, b.to(a.device)], 0)
        return SamplingBatch(params=self.params + other.params, vocab_size=self.vocab_size, **joined)

    def _trim_stop_ids(self) -> SamplingBatch:
        S = max([len(p.stop_token_ids) for p in self.params] + [0])  # host-known: no sync
        self.stop_token_ids = self.stop_token_ids[:, :S]
        return self


# ------------------------------------------------------------------------------------------ pure stages

def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition (HF/CTRL, prompt + output) then presence/frequency (OpenAI, output only). (B, V) float32."""
    counts = batch.output_counts
    seen = batch.prompt_mask | (counts > 0)
    rep = batch.repetition_penalty[:, None]
    # Dividing a positive logit and multiplying a negative one both push the token down when rep > 1.
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return (logits - batch.frequency_penalty[:, None] * counts
            - batch.presence_penalty[:, None] * (counts > 0).float())


def apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Keep each row's k best tokens, then the smallest prefix whose probability reaches top_p; -inf the rest.

    One sort serves both. The mask is scattered back by index, so ties at the boundary are cut exactly
    (top_k=1 stays greedy even for bf16 logits with tied maxima).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # (B, V)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = rank >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p (the first one is never dropped).
    drop |= ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop[:, 0] = False
    mask = torch.empty_like(drop).scatter_(1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def mask_padded_vocab(logits: Tensor, decodable: int) -> Tensor:
    """In place: the embedding rows past the tokenizer's last id (the table is padded to a multiple of 64, as
    the published 200064) are never sampled. No text decodes from them, and an undertrained model can rank
    them first (a micro recipe smoke run did)."""
    if decodable < logits.shape[-1]:
        logits[..., decodable:] = float("-inf")
    return logits


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens with p < min_p * p_max. In log space that is logit < max + log(min_p): no softmax needed,
    and min_p = 0 gives log 0 = -inf, keeping everything."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None]
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_min_tokens(logits: Tensor, batch: SamplingBatch, num_generated: Tensor | None,
                     eos_ids: Sequence[int] | Tensor) -> Tensor:
    """-inf the EOS ids and each row's stop_token_ids in rows that have generated fewer than min_tokens.

    logits (B, V) is modified in place and returned. num_generated (B,); None uses `batch.steps`, which
    counts the same thing when `update` is called once per generated token.
    """
    if not batch.any_min_tokens:  # no row holds anything back: skip the (B, V) ban table
        return logits
    if num_generated is None:
        num_generated = batch.steps
    B, V = logits.shape
    if not isinstance(eos_ids, Tensor):
        # A list would be copied host->device (a sync) every call: upload once per batch and reuse.
        key = tuple(eos_ids)
        if key not in batch.eos_cache:
            batch.eos_cache[key] = torch.tensor(key, dtype=torch.long, device=logits.device)
        eos_ids = batch.eos_cache[key]
    eos = eos_ids.to(logits.device).reshape(1, -1).expand(B, -1)
    idx = torch.cat([eos, batch.stop_token_ids], dim=1)  # (B, E + S), -1 = padding
    # Padding goes to a spare column V. Every entry of a row scatters the same flag, so duplicate indices
    # never disagree.
    idx = torch.where(idx >= 0, idx, V)
    below = (num_generated.to(logits.device) < batch.min_tokens)[:, None].expand_as(idx)
    ban = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device).scatter_(1, idx, below)
    return logits.masked_fill_(ban[:, :V], float("-inf"))


# --------------------------------------------------------------------------------------------- sampling

@dataclass
class SampleOutput:
    tokens: Tensor                     # (B,) int64
    logprobs: Tensor | None            # (B,) float32, log-prob of the chosen token (see `sample`); None if none asked
    top_ids: Tensor | None             # (B, N) int64, N = most logprobs any row asked for; None if none asked
    top_logprobs: Tensor | None        # (B, N) float32


def sample(logits: Tensor, batch: SamplingBatch, step: Tensor | int | None = None) -> SampleOutput:
    """Pick the next token for every row.

    logits: (B, V), any float dtype (computed in float32). step: the noise counter, (B,) or one int for all
    rows; None (the usual case) uses each row's own `batch.steps`, which `batch.update` advances — this is
    what keeps a seeded row's draws independent of when other rows joined.

    Reported logprobs are log_softmax of the *penalised* logits, before temperature and top-k/p/min-p
    filtering (OpenAI's convention: the model's distribution after penalties, so they are comparable across
    temperatures, and a filtered-out alternative still gets a finite value).
    """
    if logits.shape != (len(batch), batch.vocab_size):  # shapes are host metadata: no sync
        raise ValueError(f"logits have shape {tuple(logits.shape)} but the SamplingBatch holds {len(batch)} rows "
                         f"of vocab {batch.vocab_size}; rebuild/select/concat the batch when rows change")
    logits = logits.float()
    if batch.any_penalty:
        logits = apply_penalties(logits, batch)
    tokens = logits.argmax(dim=-1)

    if batch.any_sampled:
        greedy = batch.temperature == 0
        temp = torch.where(greedy, torch.ones_like(batch.temperature), batch.temperature)
        scaled = logits / temp[:, None]
        if batch.any_top_k_or_p:
            scaled = apply_top_k_top_p(scaled, batch.top_k, batch.top_p)
        if batch.any_min_p:
            scaled = apply_min_p(scaled, batch.min_p)
        steps = batch.steps if step is None else torch.as_tensor(step, dtype=torch.long,
                                                                 device=logits.device).expand_as(batch.steps)
        # Unnormalised probabilities (the row's best token weighs 1; filtered tokens 0): inverse_cdf divides
        # by the total itself, so softmax's own division would be a wasted pass.
        weights = (scaled - scaled.amax(dim=-1, keepdim=True)).exp_()  # (B, V)
        drawn = inverse_cdf(weights, row_uniforms(batch.seeds, steps))
        tokens = torch.where(greedy, tokens, drawn)

    n = batch.num_logprobs
    if n is None:  # no row reports logprobs: skip the (B, V) log-softmax
        return SampleOutput(tokens=tokens, logprobs=None, top_ids=None, top_logprobs=None)
    logp = logits.log_softmax(dim=-1)  # (B, V)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    # n = 0 gives (B, 0): the rows asked for the chosen token's logprob only
    top_lp, top_ids = logp.topk(n, dim=-1)
    return SampleOutput(tokens=tokens, logprobs=chosen, top_ids=top_ids, top_logprobs=top_lp)
