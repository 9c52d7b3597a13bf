"""phi4mm.sampling: each stage against a plain reference, seeded reproducibility across batch layouts, and the
empirical distribution of the counter-hash inverse-CDF draw against softmax(logits / T). CPU, a few seconds."""
from __future__ import annotations

import math

import pytest
import torch

from phi4mm.sampling import (
    SamplingBatch,
    SamplingParams,
    apply_min_tokens,
    inverse_cdf,
    row_uniforms,
    sample,
)

V = 50
SMALL_V = 6
LOGITS6 = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def make(params: list[SamplingParams], prompts: list[list[int]] | None = None, vocab: int = V) -> SamplingBatch:
    return SamplingBatch.build(params, "cpu", vocab, prompts if prompts is not None else [[] for _ in params])


def draws(logits_row: torch.Tensor, n: int, **kw) -> torch.Tensor:
    """n independent draws: n identical rows with seeds 0..n-1 (tokens, (n,))."""
    batch = make([SamplingParams(seed=s, **kw) for s in range(n)], vocab=logits_row.numel())
    return sample(logits_row.expand(n, -1), batch).tokens


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


# ----------------------------------------------------------------------------------------- deterministic

def test_greedy_is_argmax_any_dtype():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, V, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = sample(logits.to(dtype), make([SamplingParams()] * 7))
        assert torch.equal(out.tokens, logits.to(dtype).float().argmax(-1))
        assert out.tokens.dtype == torch.long and out.top_ids is None


def test_tiny_temperature_and_top_k_1_are_greedy():
    logits = torch.randn(64, V, generator=torch.Generator().manual_seed(1))
    greedy = logits.argmax(-1)
    for kw in (dict(temperature=1e-4), dict(temperature=5.0, top_k=1)):
        batch = make([SamplingParams(seed=i, **kw) for i in range(64)])
        for step in range(5):
            assert torch.equal(sample(logits, batch, step).tokens, greedy)


def test_top_k_1_breaks_ties_like_argmax():
    logits = torch.zeros(4, V).to(torch.bfloat16)
    logits[:, [3, 7, 9]] = 1.0
    batch = make([SamplingParams(temperature=1.0, top_k=1, seed=i) for i in range(4)])
    assert torch.equal(sample(logits, batch).tokens, torch.full((4,), 3))


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5, seed=i) for i in range(6)]
    tokens = sample(logits, make(params)).tokens
    assert torch.equal(tokens[::2], logits[::2].argmax(-1))


# ------------------------------------------------------------------------------------------- filtering

def nucleus(probs: torch.Tensor, p: float) -> set[int]:
    """Reference: the smallest set of most likely tokens whose mass reaches p."""
    kept, mass = set(), 0.0
    for i in probs.argsort(descending=True).tolist():
        kept.add(i)
        mass += float(probs[i])
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.9])
def test_top_p_samples_stay_in_nucleus(top_p):
    T = 0.8
    probs = (LOGITS6 / T).softmax(-1)
    keep = nucleus(probs, top_p)
    counts = torch.bincount(draws(LOGITS6, 20000, temperature=T, top_p=top_p), minlength=SMALL_V).float()
    assert {i for i in range(SMALL_V) if counts[i] > 0} == keep
    renorm = torch.zeros(SMALL_V)
    renorm[list(keep)] = probs[list(keep)] / probs[list(keep)].sum()
    assert chi2(counts, renorm) < 25.0


def test_top_k_then_top_p():
    counts = torch.bincount(draws(LOGITS6, 4000, temperature=1.0, top_k=3, top_p=0.99), minlength=SMALL_V)
    assert set(counts.nonzero().flatten().tolist()) == {0, 1, 2}


def test_min_p():
    T, min_p = 1.0, 0.2
    probs = (LOGITS6 / T).softmax(-1)
    keep = {i for i in range(SMALL_V) if probs[i] >= min_p * probs.max()}
    assert keep == {0, 1, 2}  # the test means something only if some tokens are cut
    counts = torch.bincount(draws(LOGITS6, 20000, temperature=T, min_p=min_p), minlength=SMALL_V).float()
    assert {i for i in range(SMALL_V) if counts[i] > 0} == keep
    renorm = torch.where(probs >= min_p * probs.max(), probs, torch.zeros(()))
    assert chi2(counts, renorm / renorm.sum()) < 25.0


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(3, V)
    logits[:, [5, 9, 11]] = 10.0  # eos, row 0's stop id, row 2's stop id
    params = [SamplingParams(min_tokens=2, stop_token_ids=[9]), SamplingParams(min_tokens=0),
              SamplingParams(min_tokens=3, stop_token_ids=[11, 12])]
    batch = make(params)
    masked = apply_min_tokens(logits.clone(), batch, torch.tensor([1, 0, 3]), eos_ids=[5])
    inf = float("-inf")
    assert masked[0, 5] == inf and masked[0, 9] == inf and masked[0, 11] == 10.0
    assert (masked[1] == logits[1]).all()  # min_tokens 0
    assert (masked[2] == logits[2]).all()  # already generated 3
    # Default num_generated is the batch's own step counter.
    masked = apply_min_tokens(logits.clone(), batch, None, eos_ids=torch.tensor([5]))
    assert masked[2, 5] == inf and masked[2, 11] == inf and masked[2, 12] == inf and masked[1, 5] == 10.0


# ------------------------------------------------------------------------------------------- penalties

def reference_penalties(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams) -> list[float]:
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.presence_penalty + p.frequency_penalty * output.count(t)
    return out


def test_penalties_match_reference():
    vocab = 12
    g = torch.Generator().manual_seed(3)
    params = [SamplingParams(repetition_penalty=1.3, logprobs=3),
              SamplingParams(presence_penalty=0.7, frequency_penalty=0.4),
              SamplingParams(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.1),
              SamplingParams()]
    prompts = [[1, 2, 2, 5], [0, 3], [7, 7, 8], [4]]
    batch = make(params, [p + [-1, -10000] for p in prompts], vocab=vocab)  # placeholders are not tokens
    outputs: list[list[int]] = [[] for _ in params]
    for _ in range(6):
        logits = torch.randn(len(params), vocab, generator=g) * 3
        forced = torch.randint(0, vocab, (len(params),), generator=g)
        expected = torch.tensor([reference_penalties(logits[i].tolist(), prompts[i], outputs[i], params[i])
                                 for i in range(len(params))])
        out = sample(logits, batch)
        assert torch.equal(out.tokens, expected.argmax(-1))
        assert torch.allclose(out.logprobs, expected.log_softmax(-1).gather(1, out.tokens[:, None])[:, 0],
                              atol=1e-5)
        batch.update(forced)  # feed tokens of our choosing so every penalty sees repeats
        for i, t in enumerate(forced.tolist()):
            outputs[i].append(t)
    assert torch.equal(batch.output_counts.sum(1), torch.full((len(params),), 6, dtype=torch.int32))
    # A batch rebuilt from the token lists carries the same state as the one kept and updated.
    rebuilt = SamplingBatch.build(params, "cpu", vocab, prompts, outputs)
    for name in ("output_counts", "prompt_mask", "steps"):
        assert torch.equal(getattr(rebuilt, name), getattr(batch, name)), name


# -------------------------------------------------------------------------------------------- logprobs

def test_logprobs_are_log_softmax_of_penalised_logits_before_temperature():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=0.7, top_p=0.5, logprobs=5, seed=1),
              SamplingParams(logprobs=2), SamplingParams(logprobs=None),
              SamplingParams(temperature=2.0, logprobs=0, seed=2)]
    out = sample(logits, make(params))
    ref = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.tokens[:, None])[:, 0], atol=1e-6)
    assert out.top_ids.shape == (4, 5) and out.top_logprobs.shape == (4, 5)
    vals, ids = ref.topk(5, dim=-1)
    assert torch.equal(out.top_ids, ids) and torch.allclose(out.top_logprobs, vals)
    zero = sample(logits[:1], make([SamplingParams(logprobs=0)]))
    assert zero.top_ids.shape == (1, 0)


# ------------------------------------------------------------------------------------------ randomness

def run_row(params: SamplingParams, logits_seq: list[torch.Tensor], others: int, position: int,
            start_after: int = 0) -> list[int]:
    """Generate len(logits_seq) tokens for one row placed at `position` in a batch of `others + 1` rows whose
    other rows are random; the row joins after `start_after` steps of the others (via concat)."""
    g = torch.Generator().manual_seed(99)
    other = [SamplingParams(temperature=1.0, top_k=7, seed=1000 + i) for i in range(others)]
    batch = make(other) if others else None
    for _ in range(start_after):
        batch.update(sample(torch.randn(others, V, generator=g), batch).tokens)
    mine = make([params])
    if batch is None:
        batch = mine
    else:  # put the new row at `position`
        order = list(range(position)) + [others] + list(range(position, others))
        batch = batch.concat(mine).select(order)
    got = []
    for row_logits in logits_seq:
        logits = torch.randn(others + 1, V, generator=g)
        logits[position] = row_logits
        tokens = sample(logits, batch).tokens
        batch.update(tokens)
        got.append(int(tokens[position]))
    return got


def test_seed_reproducible_across_batch_layouts():
    seq = list(torch.randn(12, V, generator=torch.Generator().manual_seed(5)))
    p = SamplingParams(temperature=1.2, top_p=0.95, seed=1234)
    alone = run_row(p, seq, others=0, position=0)
    assert run_row(p, seq, others=4, position=3) == alone
    assert run_row(p, seq, others=4, position=0, start_after=3) == alone
    other_seed = run_row(SamplingParams(temperature=1.2, top_p=0.95, seed=4321), seq, others=0, position=0)
    assert other_seed != alone


def test_seed_range_and_unseeded_rows():
    logits = torch.zeros(1, V)
    # Seeds differing only in the high 32 bits, and negative or >= 2**63 seeds, are all accepted and distinct.
    seeds = [0, 1 << 32, -1, (1 << 64) - 1, 1 << 63]
    seqs = []
    for s in seeds:
        b = make([SamplingParams(temperature=1.0, seed=s)])
        seqs.append(tuple(int(sample(logits, b, k).tokens) for k in range(8)))
    assert seqs[2] == seqs[3]  # -1 and 2**64 - 1 have the same 64 bits
    assert len({seqs[0], seqs[1], seqs[2], seqs[4]}) == 4
    torch.manual_seed(0)
    a = make([SamplingParams(temperature=1.0)] * 3)
    torch.manual_seed(0)
    b = make([SamplingParams(temperature=1.0)] * 3)
    assert torch.equal(a.seeds, b.seeds) and len(set(a.seeds.tolist())) == 3


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_distribution_over_seeds_matches_softmax(T):
    counts = torch.bincount(draws(LOGITS6, 20000, temperature=T), minlength=SMALL_V).float()
    probs = (LOGITS6 / T).softmax(-1)
    assert chi2(counts, probs) < 25.0  # df 5: p ~ 1e-4
    assert 0.5 * (counts / counts.sum() - probs).abs().sum() < 0.015


def test_distribution_over_steps_matches_softmax():
    """One seed, 20000 consecutive steps (the step counter passed as a tensor): no drift or cycles."""
    n, T = 20000, 2.0  # T = 2 keeps every pair cell's expected count above 30, where chi-square holds
    batch = make([SamplingParams(temperature=T, seed=7)] * n, vocab=SMALL_V)
    tokens = sample(LOGITS6.expand(n, -1), batch, torch.arange(n)).tokens
    counts = torch.bincount(tokens, minlength=SMALL_V).float()
    assert chi2(counts, (LOGITS6 / T).softmax(-1)) < 25.0
    # Successive draws are independent: the pair (t, t+1) table matches the product distribution.
    probs = (LOGITS6 / T).softmax(-1)
    pairs = torch.bincount(tokens[:-1] * SMALL_V + tokens[1:], minlength=SMALL_V ** 2).float()
    assert chi2(pairs, torch.outer(probs, probs).flatten()) < 70.0  # df 35: p ~ 5e-4


def test_row_uniforms_are_uniform_and_uncorrelated():
    """One uniform per (seed, step): over 256 seeds x 1024 steps, mean and variance of U(0, 1), and no
    correlation between neighbouring steps or neighbouring seeds."""
    seeds = torch.arange(256).repeat_interleave(1024)
    steps = torch.arange(1024).repeat(256)
    u = row_uniforms(seeds, steps).view(256, 1024)
    assert abs(float(u.mean()) - 0.5) < 0.002 and abs(float(u.var()) - 1 / 12) < 0.001
    c = torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]
    assert abs(float(c)) < 0.01
    c = torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]
    assert abs(float(c)) < 0.01
    assert bool((u > 0).all() and (u < 1).all())


def test_inverse_cdf_never_draws_a_token_of_zero_weight():
    """At the uniforms' extremes (u just above 0, just below 1) the draw lands on the first and last tokens of
    positive weight, never on a filtered one (weight 0), whatever sits at either end of the row."""
    w = torch.tensor([[0.0, 0.0, 3.0, 0.0, 1.0, 0.0],  # zero-weight tokens at both ends and between
                      [0.0, 0.0, 0.0, 0.0, 0.0, 7.0],  # all mass on the last token
                      [5.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all mass on the first
                      [1e-30, 1.0, 0.0, 0.0, 0.0, 1e-30]])  # weights below float32's resolution at both ends
    lo = torch.full((4,), 2.0 ** -25)
    hi = torch.full((4,), 1 - 2.0 ** -25)
    assert inverse_cdf(w, lo).tolist() == [2, 5, 0, 1]
    assert inverse_cdf(w, hi).tolist() == [4, 5, 0, 1]
    # Every boundary of the cumulative sum, approached from both sides: a drawn token always has weight.
    big = torch.rand(64, 1000, generator=torch.Generator().manual_seed(3))
    big[big < 0.7] = 0.0
    u = torch.rand(64, generator=torch.Generator().manual_seed(4))
    picked = inverse_cdf(big, u)
    assert bool((big.gather(1, picked[:, None]) > 0).all())


# ---------------------------------------------------------------------------------------- batch state

def test_select_and_concat_keep_per_row_state():
    params = [SamplingParams(temperature=0.5, top_k=5, seed=1, stop_token_ids=[3]),
              SamplingParams(temperature=1.0, repetition_penalty=1.2, seed=2, stop_token_ids=[4, 5, 6]),
              SamplingParams(presence_penalty=0.5, seed=3)]
    batch = make(params, [[1, 2], [3], [4, 4]])
    batch.update(torch.tensor([7, 8, 9]))
    batch.update(torch.tensor([7, 1, 2]))
    sub = batch.select([2, 0])
    assert sub.params == [params[2], params[0]]
    for name in ("temperature", "top_k", "seeds", "steps", "prompt_mask", "output_counts", "min_tokens",
                 "repetition_penalty", "presence_penalty"):
        assert torch.equal(getattr(sub, name), getattr(batch, name)[[2, 0]]), name
    assert sub.stop_token_ids.tolist() == [[-1], [3]]  # trimmed to the widest remaining row
    assert sub.any_penalty and not sub.any_min_p

    new = make([SamplingParams(temperature=1.0, seed=9, stop_token_ids=[1, 2])], [[0]])
    joined = sub.concat(new)
    assert len(joined) == 3 and joined.params[2] is new.params[0]
    assert joined.stop_token_ids.tolist() == [[-1, -1], [3, -1], [1, 2]]
    assert joined.steps.tolist() == [2, 2, 0] and joined.output_counts[1, 7] == 2
    assert joined.prompt_mask[2, 0] and not joined.prompt_mask[2, 1]
    # The moved row keeps drawing what it would have drawn in place.
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(6))
    in_place = sample(logits[[1, 1, 0]], batch).tokens[0]
    assert sample(logits, joined).tokens[1] == in_place

    with pytest.raises(ValueError, match="vocab sizes"):
        sub.concat(make([SamplingParams()], vocab=V + 1))


def test_build_rejects_mismatched_prompts():
    with pytest.raises(ValueError, match="one each"):
        SamplingBatch.build([SamplingParams()], "cpu", V, [[], []])


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("kw, field", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=101.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(min_p=1.0), "min_p"), (dict(min_p=-0.1), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-2.1), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(max_tokens=0), "max_tokens"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(min_tokens=-1), "min_tokens"),
    (dict(stop=["x"] * 17), "stop"), (dict(stop=["ok", ""]), "stop"), (dict(stop_token_ids=[-3]), "stop_token_ids"),
])
def test_validate_rejects(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw).validate()


def test_validate_accepts_edges():
    SamplingParams(temperature=0.0, top_p=1.0, min_p=0.0, logprobs=20, presence_penalty=-2.0,
                   frequency_penalty=2.0, stop=["a"] * 16, max_tokens=1).validate()
    with pytest.raises(ValueError, match="top_p"):  # build validates too
        make([SamplingParams(top_p=0.0)])
    assert not math.isnan(sample(torch.zeros(1, V), make([SamplingParams(temperature=100.0, seed=0, logprobs=0)])).logprobs[0])
