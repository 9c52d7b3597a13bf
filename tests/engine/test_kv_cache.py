"""Paged KV cache: block pool bookkeeping, and paged attention equal to the dense path (fp32, 1e-5).

The model tests drive the pool the way the engine will (allocate, pack new tokens of several sequences into one
row, advance, free) with a tiny harness below; scheduling itself is not under test here.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

import phi4mm
from phi4mm.engine.kv_cache import BlockPool, CacheFull, PagedAttention
from phi4mm.model.lora import NO_ADAPTER, AdapterPlan

TOL = {"rtol": 1e-5, "atol": 1e-5}
VOCAB_HI = 199000  # plain text ids (below the special and placeholder tokens)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.fixture(scope="module", params=DEVICES)
def model(request, tiny_official):
    return phi4mm.load(tiny_official, device=request.param, dtype=torch.float32)


@pytest.fixture(scope="module")
def cpu_model(tiny_official):
    return phi4mm.load(tiny_official, dtype=torch.float32)


def tiny_cfg():
    from phi4mm.config import ModelConfig
    from phi4mm.model.checkpoint import official_config
    return ModelConfig.from_hf(official_config("tiny")).text


# -- a minimal engine-like harness ----------------------------------------------------------------------------
@dataclass
class Seq:
    ids: list[int]
    table: list[int] = field(default_factory=list)
    num_cached: int = 0


def ids_of(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_HI, (n,), generator=g).tolist()


def block_hashes(ids: list[int], bs: int, adapter: str | None = None) -> list[int]:
    """Chained hash per full block (what the engine computes): block i covers ids[: (i+1)*bs] and the adapter."""
    out, h = [], hash(("adapter", adapter))
    for i in range(len(ids) // bs):
        h = hash((h, tuple(ids[i * bs:(i + 1) * bs])))
        out.append(h)
    return out


def step(net, pool: BlockPool, batch: list[tuple[Seq, int]], plan: AdapterPlan = NO_ADAPTER,
         all_logits: bool = False) -> torch.Tensor:
    """One packed forward: `num_new` tokens of each sequence. Returns (S, vocab) last logits, or (N, vocab)."""
    for s, n in batch:
        need = pool.blocks_for(s.num_cached + n) - len(s.table)
        if need > 0:
            s.table += pool.allocate(need)
    attn = PagedAttention.build(pool, [(s.table, s.num_cached, n) for s, n in batch], pool.k.device)
    new = [t for s, n in batch for t in s.ids[s.num_cached:s.num_cached + n]]
    embeds = net.embed(torch.tensor([new], device=pool.k.device))  # (1, N, hidden)
    logits = net(embeds, attn.positions, plan=plan, attn=attn, last_only=False if all_logits else attn.last_index)
    for s, n in batch:
        s.num_cached += n
    return logits[0] if all_logits else logits[:, 0]  # (N, V) or (S, V)


def dense(net, ids: list[int], plan: AdapterPlan = NO_ADAPTER) -> torch.Tensor:
    """(T, vocab) logits of the plain dense forward over the whole sequence."""
    dev = net.embed_tokens.weight.device
    return net(net.embed(torch.tensor([ids], device=dev)), torch.arange(len(ids), device=dev)[None], plan=plan)[0]


def make_pool(model, num_blocks: int, block_size: int) -> BlockPool:
    return BlockPool(model.config.text, num_blocks, block_size, torch.float32, model.device)


# -- pool bookkeeping -----------------------------------------------------------------------------------------
def test_allocate_free_refcounts():
    pool = BlockPool(tiny_cfg(), 6, 4, torch.float32)
    assert pool.k.shape == (2, 6, 4, 2, 16)
    a = pool.allocate(4)
    assert len(set(a)) == 4 and pool.num_free == 2 and all(pool.refcount[b] == 1 for b in a)
    pool.free(a[:2])
    assert pool.num_free == 4 and pool.can_allocate(4) and not pool.can_allocate(5)
    with pytest.raises(ValueError, match="double free"):
        pool.free([a[0]])
    with pytest.raises(ValueError, match="double free"):
        pool.free([a[2], a[2]])  # one reference held, two dropped: refused, and nothing changed
    assert pool.refcount[a[2]] == 1


def test_cache_full_is_atomic():
    pool = BlockPool(tiny_cfg(), 5, 4, torch.float32)
    held = pool.allocate(3)
    with pytest.raises(CacheFull, match="only 2 of 5"):
        pool.allocate(3)
    assert pool.num_free == 2 and sum(pool.refcount) == 3  # nothing partially taken
    pool.free(held)
    assert pool.num_free == 5 and sum(pool.refcount) == 0


def test_eviction_is_least_recently_freed_first():
    pool = BlockPool(tiny_cfg(), 5, 4, torch.float32)
    a, b = pool.allocate(2), pool.allocate(2)
    for blk, h in zip(a + b, [10, 11, 20, 21]):
        pool.register(blk, h)
    pool.free(a)  # released tail first: a[1] (hash 11) is the oldest, then a[0]
    pool.free(b)  # then b[1], b[0]
    assert pool.num_free == 5
    first = pool.allocate(1)  # the never-registered block goes before any cached one
    assert first[0] not in a + b and all(pool.is_cached(h) for h in (10, 11, 20, 21))
    assert pool.allocate(1) == [a[1]] and not pool.is_cached(11)
    assert pool.match_prefix([10, 11]) == [a[0]]  # revived; 11 is gone, so the run stops there
    assert pool.allocate(1) == [b[1]] and not pool.is_cached(21)  # a[0] is held again: skipped
    assert pool.allocate(1) == [b[0]]
    with pytest.raises(CacheFull):
        pool.allocate(1)
    assert pool.match_prefix([20]) == []


def test_shared_prefix_and_hit_after_owner_finished():
    pool = BlockPool(tiny_cfg(), 8, 4, torch.float32)
    owner = pool.allocate(3)
    pool.register(owner[0], 1)
    pool.register(owner[1], 2)
    shared = pool.match_prefix([1, 2, 3])
    assert shared == owner[:2] and [pool.refcount[x] for x in owner] == [2, 2, 1]
    pool.free(owner)
    assert [pool.refcount[x] for x in owner] == [1, 1, 0] and pool.num_free == 6
    pool.free(shared)
    assert pool.num_free == 8
    again = pool.match_prefix([1, 2])  # both finished: the cached blocks are revived
    assert again == owner[:2] and pool.num_free == 6
    # A second block computing the same prefix does not steal the hash; it is freed clean.
    dup = pool.allocate(1)
    pool.register(dup[0], 1)
    pool.free(dup)
    assert pool.match_prefix([1]) == [owner[0]]


def test_never_hands_out_a_held_block():
    pool = BlockPool(tiny_cfg(), 16, 2, torch.float32)
    rng = random.Random(0)
    live: list[list[int]] = []
    for _ in range(2000):
        op = rng.random()
        if op < 0.4:
            n = rng.randint(1, 5)
            held_before = {b for t in live for b in t}
            try:
                got = pool.allocate(n)
            except CacheFull:
                assert n > pool.num_free
                continue
            assert not held_before & set(got) and len(set(got)) == n
            for b in got:
                if rng.random() < 0.5:
                    pool.register(b, rng.randint(0, 30))
            live.append(got)
        elif op < 0.6:
            got = pool.match_prefix([rng.randint(0, 30) for _ in range(rng.randint(1, 3))])
            if got:
                live.append(got)
        elif live:
            pool.free(live.pop(rng.randrange(len(live))))
        counts = [0] * pool.num_blocks
        for t in live:
            for b in t:
                counts[b] += 1
        assert counts == pool.refcount
        assert pool.num_free == sum(c == 0 for c in counts)


def test_build_rejects_short_tables_and_shared_writes():
    pool = BlockPool(tiny_cfg(), 8, 4, torch.float32)
    t = pool.allocate(2)
    with pytest.raises(ValueError, match="needs? 3 blocks"):
        PagedAttention.build(pool, [(t, 6, 3)], "cpu")
    pool.register(t[0], 7)
    pool.match_prefix([7])  # t[0] now shared
    with pytest.raises(ValueError, match="refcount is 2"):
        PagedAttention.build(pool, [(t, 3, 1)], "cpu")  # position 3 is in the shared block
    PagedAttention.build(pool, [(t, 4, 1)], "cpu")  # position 4: own block, fine


# -- paged attention vs dense ---------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [None, "speech"])
def test_packed_prefill_then_decode_equals_dense(model, adapter):
    """(a) one packed prefill of 3 sequences, (b) then packed decode steps, each equal to the dense forward."""
    net, plan = model.net, AdapterPlan.build(adapter)
    pool = make_pool(model, 32, 4)
    seqs = [Seq(ids_of(i, n)) for i, n in enumerate([7, 12, 3])]
    logits = step(net, pool, [(s, len(s.ids)) for s in seqs], plan, all_logits=True)  # (22, V)
    starts = [0, 7, 19, 22]
    for i, s in enumerate(seqs):
        torch.testing.assert_close(logits[starts[i]:starts[i + 1]], dense(net, s.ids, plan), **TOL)
    for k in range(4):
        for s in seqs:
            s.ids.append(ids_of(100 + k, 1)[0])
        last = step(net, pool, [(s, 1) for s in seqs], plan)  # (3, V): the pure-decode path
        for i, s in enumerate(seqs):
            torch.testing.assert_close(last[i], dense(net, s.ids, plan)[-1], **TOL)


def test_chunked_prefill_interleaved_with_decodes(model):
    """(c) a 17-token prompt in chunks of 5, packed with two other sequences' decodes, equals the whole prompt."""
    net = model.net
    pool = make_pool(model, 32, 4)
    long_ = Seq(ids_of(7, 17))
    others = [Seq(ids_of(8, 6)), Seq(ids_of(9, 9))]
    step(net, pool, [(s, len(s.ids)) for s in others])
    want = dense(net, long_.ids)
    while long_.num_cached < len(long_.ids):
        n = min(5, len(long_.ids) - long_.num_cached)
        for s in others:
            s.ids.append(ids_of(50 + long_.num_cached, 1)[0])
        # Decodes first, the chunk in the middle: the row is (1, 1 + n + 1), with query padding.
        out = step(net, pool, [(others[0], 1), (long_, n), (others[1], 1)])  # (3, V)
        torch.testing.assert_close(out[1], want[long_.num_cached - 1], **TOL)
        for i, s in enumerate(others):
            torch.testing.assert_close(out[0 if i == 0 else 2], dense(net, s.ids)[-1], **TOL)
    long_.ids.append(ids_of(99, 1)[0])
    torch.testing.assert_close(step(net, pool, [(long_, 1)])[0], dense(net, long_.ids)[-1], **TOL)


def test_prefix_cache_hit_reuses_blocks(cpu_model):
    """(d) B shares A's first two blocks: it holds them with A (refcount 2), computes only its tail, and its
    logits equal the dense forward; after both finish a third request revives the cached blocks."""
    net, bs = cpu_model.net, 4
    pool = make_pool(cpu_model, 16, bs)
    prefix = ids_of(11, 2 * bs)
    a = Seq(prefix + ids_of(12, 3))
    step(net, pool, [(a, len(a.ids))])
    for blk, h in zip(a.table, block_hashes(a.ids, bs)):
        pool.register(blk, h)

    b = Seq(prefix + ids_of(13, 5))
    # Cap the match so at least one prompt token is computed (the logits of the last one are needed).
    hit = pool.match_prefix(block_hashes(b.ids, bs)[:(len(b.ids) - 1) // bs])
    assert hit == a.table[:2] and [pool.refcount[x] for x in hit] == [2, 2]
    b.table, b.num_cached = list(hit), len(hit) * bs
    free_before = pool.num_free
    out = step(net, pool, [(b, len(b.ids) - b.num_cached)])
    assert pool.num_free == free_before - 2  # only the tail (5 tokens: 2 blocks) was allocated
    torch.testing.assert_close(out[0], dense(net, b.ids)[-1], **TOL)

    pool.free(a.table)
    pool.free(b.table)
    assert pool.num_free == 16
    c = Seq(prefix + ids_of(14, 2))
    hit = pool.match_prefix(block_hashes(c.ids, bs)[:(len(c.ids) - 1) // bs])
    assert hit == a.table[:2]
    c.table, c.num_cached = list(hit), len(hit) * bs
    torch.testing.assert_close(step(net, pool, [(c, 2)])[0], dense(net, c.ids)[-1], **TOL)


def test_block_size_one_and_exact_block_boundary(cpu_model):
    """(e) one token per block; and a prompt filling its blocks exactly, whose next token opens a new block."""
    net = cpu_model.net
    pool = make_pool(cpu_model, 40, 1)
    seqs = [Seq(ids_of(20, 5)), Seq(ids_of(21, 8))]
    logits = step(net, pool, [(s, len(s.ids)) for s in seqs], all_logits=True)
    torch.testing.assert_close(logits[:5], dense(net, seqs[0].ids), **TOL)
    torch.testing.assert_close(logits[5:], dense(net, seqs[1].ids), **TOL)
    for s in seqs:
        s.ids.append(ids_of(22, 1)[0])
    last = step(net, pool, [(s, 1) for s in seqs])
    for i, s in enumerate(seqs):
        torch.testing.assert_close(last[i], dense(net, s.ids)[-1], **TOL)
    assert pool.num_free == 40 - 15

    pool = make_pool(cpu_model, 8, 4)
    s = Seq(ids_of(23, 8))
    step(net, pool, [(s, 8)])
    assert len(s.table) == 2 and pool.num_free == 6
    s.ids.append(ids_of(24, 1)[0])
    out = step(net, pool, [(s, 1)])
    assert len(s.table) == 3  # position 8 is slot 0 of a fresh block
    torch.testing.assert_close(out[0], dense(net, s.ids)[-1], **TOL)


def test_pool_exhaustion_leaks_nothing(cpu_model):
    """(f) a request that does not fit raises CacheFull; the pool is unchanged and still serves the others."""
    net = cpu_model.net
    pool = make_pool(cpu_model, 4, 4)
    a = Seq(ids_of(30, 10))  # 3 blocks
    step(net, pool, [(a, 10)])
    b = Seq(ids_of(31, 6))  # needs 2, 1 left
    with pytest.raises(CacheFull):
        step(net, pool, [(b, 6)])
    assert b.table == [] and pool.num_free == 1 and sum(pool.refcount) == 3
    a.ids.append(ids_of(32, 1)[0])
    torch.testing.assert_close(step(net, pool, [(a, 1)])[0], dense(net, a.ids)[-1], **TOL)
    pool.free(a.table)
    assert pool.num_free == 4 and sum(pool.refcount) == 0


def test_mixed_adapters_in_one_packed_row(model):
    """Per-sequence adapters in the packed row (token-span plan) equal each sequence's dense forward."""
    net = model.net
    pool = make_pool(model, 32, 4)
    adapters = [None, "speech", "vision"]
    seqs = [Seq(ids_of(40 + i, n)) for i, n in enumerate([6, 9, 4])]
    plan = AdapterPlan.for_spans([(a, len(s.ids)) for a, s in zip(adapters, seqs)], model.device)
    last = step(net, pool, [(s, len(s.ids)) for s in seqs], plan)
    for i, (a, s) in enumerate(zip(adapters, seqs)):
        torch.testing.assert_close(last[i], dense(net, s.ids, AdapterPlan.build(a))[-1], **TOL)
    for s in seqs:
        s.ids.append(ids_of(41, 1)[0])
    plan = AdapterPlan.for_spans([(a, 1) for a in adapters], model.device)
    last = step(net, pool, [(s, 1) for s in seqs], plan)
    for i, (a, s) in enumerate(zip(adapters, seqs)):
        torch.testing.assert_close(last[i], dense(net, s.ids, AdapterPlan.build(a))[-1], **TOL)
