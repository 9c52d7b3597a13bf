"""The merged-adapter fast path of LoraLinear: equal to base + LoRA (up to rounding) where it applies, unused
everywhere else, invisible to state_dict() and the base weight."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from phi4mm.config import LoraConfig
from phi4mm.model.lora import AdapterPlan, LoraLinear, merge_adapter, unmerge_adapters

IN, OUT = 24, 40


def _lora() -> LoraLinear:
    torch.manual_seed(0)
    lin = LoraLinear(IN, OUT, {"vision": LoraConfig(r=4, lora_alpha=8), "speech": LoraConfig(r=6, lora_alpha=3)})
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.randn_like(p) * 0.2)  # B nonzero: the adapters change the output
    return lin.eval()


def _plans() -> list[AdapterPlan]:
    """Every plan but the uniform one: grouped rows, per token, masked, and none."""
    masks = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).view(2, 3, 1, 1)  # (A, B, 1, 1)
    return [AdapterPlan.build(["speech", "vision", None]), AdapterPlan.build(["speech", None, "speech"]),
            AdapterPlan.for_spans([("speech", 4), ("vision", 5), ("speech", 6)]),
            AdapterPlan.from_masks(["speech", "vision"], masks), AdapterPlan()]


def test_merged_forward_equals_unmerged_for_a_uniform_plan():
    lin, x = _lora(), torch.randn(3, 5, IN)
    plan = AdapterPlan.build("speech")
    want = lin(x, plan)
    assert lin.merge("speech") == OUT * IN * 4 and lin.merge("speech") == 0  # fp32 bytes; a second merge is free
    got = lin(x, plan)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    lin.merged["speech"].zero_()
    assert not lin(x, plan).any()  # the uniform plan read the merged copy, nothing else
    assert lin(x, AdapterPlan.build("vision")).any()  # the other adapter still runs base + LoRA


def test_other_plans_ignore_the_merged_copy():
    lin, x = _lora(), torch.randn(3, 5, IN)
    xs = [x if not p.per_token else x.reshape(1, 15, IN) for p in _plans()]  # (B, T, in); packed: (1, B*T, in)
    before = [lin(xi, p) for xi, p in zip(xs, _plans())]
    lin.merge("speech")
    lin.merge("vision")
    for xi, p, b in zip(xs, _plans(), before):
        assert torch.equal(lin(xi, p), b)  # bit-identical: the base weight + LoRA path


def test_state_dict_and_base_weight_are_untouched():
    lin = _lora()
    keys, weight = list(lin.state_dict()), lin.weight.detach().clone()
    lin.merge("vision")
    assert list(lin.state_dict()) == keys and not list(lin.buffers())
    assert torch.equal(lin.weight, weight)
    lin.unmerge()
    assert not lin.merged and torch.equal(lin.weight, weight)


def test_training_mode_ignores_the_merge():
    lin, x = _lora(), torch.randn(2, 3, IN)
    plan = AdapterPlan.build("speech")
    lin.merge("speech")
    lin.train()
    lin(x, plan).sum().backward()
    assert lin.lora_A["speech"].grad is not None and lin.lora_B["speech"].grad.abs().sum() > 0
    lin.eval()
    lin.unmerge()
    with torch.no_grad():
        want = lin(x, plan)
    lin.merge("speech")
    lin.train()
    with torch.no_grad():
        assert torch.equal(lin(x, plan), want)  # training: the unmerged path, bit for bit


def test_merge_adapter_walks_the_model_and_names_unknown_adapters():
    net = nn.Sequential(_lora(), _lora())
    assert merge_adapter(net, "speech") == 2 * OUT * IN * 4
    assert all("speech" in m.merged for m in net)
    with pytest.raises(ValueError, match=r"'text'.*loaded: \['speech', 'vision'\]"):
        merge_adapter(net, "text")
    unmerge_adapters(net)
    assert not any(m.merged for m in net)
    with pytest.raises(KeyError, match="not loaded"):
        net[0].merge("nope")


def test_add_adapter_drops_a_stale_merge():
    lin = _lora()
    lin.merge("speech")
    lin.add_adapter("speech", LoraConfig(r=2, lora_alpha=2))  # retrained from scratch: B = 0
    assert "speech" not in lin.merged
