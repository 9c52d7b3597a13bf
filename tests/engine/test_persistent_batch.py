"""The engine's persistent sampling rows: whatever joins, leaves, moves or is rewritten, a row holds what a batch
built afresh from its sequence would hold, and a sequence sampled in a changing batch (joins, finishes,
preemption) draws exactly the tokens it draws alone."""
from __future__ import annotations

import random

import pytest
import torch

import phi4mm
from phi4mm.engine.engine import Engine
from phi4mm.engine.persistent_batch import PersistentBatch, plain_greedy
from phi4mm.engine.sequence import Sequence
from phi4mm.inputs.prepare import Prepared
from phi4mm.sampling import SamplingBatch, SamplingParams

V = 50
SAMPLED = {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.2, "presence_penalty": 0.3,
           "frequency_penalty": 0.2}
PROMPTS = [
    "<|user|>Tell me a story about a fox.<|end|><|assistant|>",
    "<|system|>Be brief.<|end|><|user|>Hi!<|end|><|assistant|>",
    "<|user|>List three colours of the sea and the sky at dusk.<|end|><|assistant|>",
    "<|user|>What is the capital of France?<|end|><|assistant|>",
    "<|user|>Write a haiku about the rain falling on an old stone bridge.<|end|><|assistant|>",
    "<|user|>Count from one to ten.<|end|><|assistant|>",
    "<|user|>Why is the grass green?<|end|><|assistant|>",
]


def seq(i: int, params: SamplingParams, prompt: list[int], generated: list[int]) -> Sequence:
    s = Sequence(f"r{i}", Prepared(prompt, None, None, None, "speech"), params, None, b"", float(i), 10_000)
    s.generated = list(generated)
    return s


def expected_rows(seqs: list[Sequence]) -> SamplingBatch:
    return SamplingBatch.build([s.params for s in seqs], "cpu", V, [s.prep.input_ids for s in seqs],
                               [s.generated for s in seqs],
                               seeds=[s.params.seed if s.params.seed is not None else s.sampling_seed for s in seqs])


def test_rows_equal_a_fresh_build_through_joins_leaves_and_moves():
    rng = random.Random(0)
    pool = []
    for i in range(12):
        params = SamplingParams(temperature=rng.choice([0.0, 0.7]), top_k=rng.choice([0, 5]),
                                repetition_penalty=rng.choice([1.0, 1.3]), min_tokens=rng.choice([0, 2]),
                                stop_token_ids=list(range(i % 4)), seed=None if i % 3 == 0 else 100 + i)
        pool.append(seq(i, params, [rng.randrange(V) for _ in range(rng.randint(1, 9))],
                        [rng.randrange(V) for _ in range(rng.randint(0, 4))]))
    pb = PersistentBatch("cpu", V)
    seeds: dict[str, int] = {}
    for _ in range(60):
        running = rng.sample(pool, rng.randint(1, 10))
        ready = rng.sample(running, rng.randint(1, len(running)))
        rows = pb.rows(ready, running)
        assert len(pb) <= len(running) and sorted(rows.slots) == rows.slots
        ordered = [ready[i] for i in rows.order]
        want = expected_rows(ordered)
        for name in SamplingBatch.row_fields():
            got, ref = getattr(rows.batch, name), getattr(want, name)
            if name == "stop_token_ids":  # the kept table may be wider: the extra columns are -1 (no id)
                assert (got[:, ref.shape[1]:] == -1).all()
                got = got[:, :ref.shape[1]]
            assert torch.equal(got, ref), name
        for s in ordered:  # an unseeded sequence keeps the seed it drew, whatever happens to its row
            assert seeds.setdefault(s.id, s.sampling_seed if s.params.seed is None else s.params.seed) == \
                (s.sampling_seed if s.params.seed is None else s.params.seed)
        tokens = torch.randint(0, V, (len(ordered),))
        pb.record(rows, tokens)
        for s, t in zip(ordered, tokens.tolist()):
            s.generated.append(t)
        stale = [s for s in ordered if not plain_greedy(s.params)]
        if stale and rng.random() < 0.3:  # a token the rows did not record: the row is written again
            rng.choice(stale).generated.append(rng.randrange(V))


@pytest.fixture(scope="module")
def model(tiny_official):
    return phi4mm.load(tiny_official, dtype=torch.float32)


def requests() -> list[dict]:
    """Seeded sampled requests of different lengths, one greedy with logprobs, one holding EOS back and one plain
    greedy (sampled on the fast path when it is alone in a step, in the rows otherwise)."""
    out = [{"prompt": p, "params": SamplingParams(max_tokens=5 + 2 * i, ignore_eos=True, seed=40 + i, **SAMPLED)}
           for i, p in enumerate(PROMPTS)]
    out[3]["params"] = SamplingParams(max_tokens=9, logprobs=2)
    out[5]["params"] = SamplingParams(max_tokens=8, min_tokens=8, seed=7, **SAMPLED)
    out[6]["params"] = SamplingParams(max_tokens=14)
    return out


def test_joins_finishes_and_preemption_leave_each_sequence_its_tokens_alone(model):
    reqs = requests()
    alone = [Engine(model, num_blocks=256).generate([r])[0]["token_ids"] for r in reqs]
    # Few blocks and rows, small prefill chunks: three requests start, one more joins every other step while
    # others decode, they finish at different steps, and some are preempted (their rows dropped, then written
    # again from their tokens when they come back).
    eng = Engine(model, num_blocks=12, block_size=4, max_batch=4, max_tokens_per_step=24)
    got: dict[str, list[int]] = {}
    owner, todo, steps, joined_mid_run = {}, list(enumerate(reqs)), 0, 0
    while todo or eng.has_work():
        while todo and (len(owner) < 3 + steps // 2 or not eng.has_work()):
            i, r = todo.pop(0)
            joined_mid_run += any(got.values())
            owner[eng.add_request(**r)] = i
        for out in eng.step():
            if out.token_id is not None:
                got.setdefault(out.request_id, []).append(out.token_id)
        steps += 1
    assert eng.stats["preemptions"] > 0 and joined_mid_run > 0
    assert [got[rid] for rid in sorted(owner, key=owner.get)] == alone
    assert len(eng.runner.sampling) <= eng.max_batch
