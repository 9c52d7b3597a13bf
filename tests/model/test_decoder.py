"""Decoder equivalences: cached decode vs full forward, padded batch vs single, LongRoPE tables."""
from __future__ import annotations

import math

import pytest
import torch

import phi4mm
from phi4mm.config import ModelConfig
from phi4mm.model.checkpoint import official_config
from phi4mm.model.decoder import KVCache, LongRope, RMSNorm
from phi4mm.model.lora import AdapterPlan


@pytest.fixture(scope="module")
def model(tiny_official):
    return phi4mm.load(tiny_official, dtype=torch.float32)


@pytest.mark.parametrize("adapter", [None, "vision", "speech"])
def test_cached_decode_equals_full_forward(model, adapter):
    net, plan = model.net, AdapterPlan.build(adapter)
    torch.manual_seed(0)
    n = 17
    emb = net.embed(torch.randint(0, 199000, (1, n + 5)))
    cache = KVCache(model.config.text, 1, n + 5, torch.float32, "cpu")
    net(emb[:, :n], torch.arange(n)[None], cache=cache, plan=plan)
    cache.advance(n)
    for t in range(n, n + 5):
        step = net(emb[:, t:t + 1], torch.tensor([[t]]), cache=cache, plan=plan)[0, -1]
        cache.advance(1)
        full = net(emb[:, :t + 1], torch.arange(t + 1)[None], plan=plan)[0, -1]
        torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_single(model):
    net = model.net
    torch.manual_seed(1)
    short, long_ = torch.randint(0, 199000, (1, 6)), torch.randint(0, 199000, (1, 11))
    pad = torch.full((1, 5), model.config.text.pad_token_id)
    ids = torch.cat([torch.cat([pad, short], 1), long_])  # (2, 11), row 0 left-padded
    key_mask = torch.ones(2, 11, dtype=torch.bool)
    key_mask[0, :5] = False
    pos = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), torch.arange(6)]), torch.arange(11)])
    out = net(net.embed(ids), pos, key_mask=key_mask)
    torch.testing.assert_close(out[0, 5:], net(net.embed(short), torch.arange(6)[None])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], net(net.embed(long_), torch.arange(11)[None])[0], rtol=1e-5, atol=1e-5)


def test_longrope_tables_follow_the_spec():
    cfg = ModelConfig.from_hf(official_config("full")).text
    rope = LongRope(cfg)
    assert math.isclose(rope.scaling, math.sqrt(17 / 12), rel_tol=1e-12)
    i = torch.arange(48, dtype=torch.float64)
    want_long = 1 / (torch.tensor(cfg.long_factor, dtype=torch.float64) * 10000 ** (2 * i / 96))
    torch.testing.assert_close(rope.inv_freq[True].double(), want_long, rtol=1e-6, atol=0)
    assert not rope.use_long(4096) and rope.use_long(4097)  # HF/MS: long once the length passes 4096
    cos, sin = rope.cos_sin(torch.tensor([[0, 5]]), long=False, dtype=torch.float32)
    assert cos.shape == (1, 1, 2, 96)
    torch.testing.assert_close(cos[0, 0, 0], torch.full((96,), rope.scaling))  # position 0: cos 1, scaled


def test_rmsnorm_casts_before_the_weight():
    """bf16: normalise in fp32, cast, then multiply (the order changes the rounding)."""
    norm = RMSNorm(8, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(4, 8).to(torch.bfloat16)
    x32 = x.float()
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(norm(x), want)


def test_generation_is_deterministic_and_stops(model):
    p = "<|user|>Count to three.<|end|><|assistant|>"
    a = model.generate_ids(p, max_new_tokens=8)
    assert a == model.generate_ids(p, max_new_tokens=8) and 1 <= len(a) <= 8
    s1 = model.generate_ids(p, max_new_tokens=8, temperature=1.0, seed=3)
    assert s1 == model.generate_ids(p, max_new_tokens=8, temperature=1.0, seed=3)
    with pytest.raises(ValueError, match="context holds"):
        model.generate_ids("x" * 10, max_new_tokens=1) if False else model.generate_ids(
            __import__("phi4mm.inputs.prepare", fromlist=["Prepared"]).Prepared([1] * 131072, None, None, None, "speech"))


def test_packed_spans_with_mixed_adapters_equal_each_alone(model):
    """The engine's packed layout: three requests in one (1, N) row, each with its own adapter."""
    net = model.net
    torch.manual_seed(4)
    lens, adapters = [5, 7, 3], ["vision", None, "speech"]
    ids = [torch.randint(0, 199000, (1, n)) for n in lens]
    x = net.embed(torch.cat(ids, 1))
    for layer in net.layers[:1]:
        lin = layer.self_attn.qkv_proj
        y = lin(x, AdapterPlan.for_spans(list(zip(adapters, lens))))
        start = 0
        for i, (a, n) in enumerate(zip(adapters, lens)):
            alone = lin(x[:, start:start + n], AdapterPlan.build(a))
            torch.testing.assert_close(y[:, start:start + n], alone, rtol=1e-6, atol=1e-6)
            start += n
