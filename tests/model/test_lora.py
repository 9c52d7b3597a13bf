"""LoraLinear's fast paths: the merged adapter (equal to base + LoRA up to rounding where it applies, unused
everywhere else, invisible to state_dict() and the base weight) and the segmented kernels (each row its own
adapter, equal to the plain products)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from phi4mm.config import LoraConfig
from phi4mm.model.lora import AdapterPlan, LoraLinear, merge_adapter, unmerge_adapters

IN, OUT = 24, 40
ROOT = Path(__file__).resolve().parents[2]


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


def test_segmented_plan_equals_grouped_plan():
    """The per-row plan (the decode graphs' plan: one slot per row, -1 none) gives the grouped plan's output;
    here through the torch version, the kernels are checked in test_segmented_kernels_match_plain_products."""
    lin, x = _lora(), torch.randn(4, 1, IN)
    names = ("speech", "vision")
    adapters = ["vision", None, "speech", "vision"]
    ids = torch.tensor([names.index(a) if a else -1 for a in adapters])
    with torch.inference_mode():
        got = lin(x, AdapterPlan.for_rows(names, ids))
        want = lin(x, AdapterPlan.build(adapters))
        assert torch.equal(got[1], lin(x)[1])  # the row without adapter: base weight only
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    rows = AdapterPlan.for_rows(names, ids).rows
    assert rows.order.tolist() == [2, 0, 3, 1] and rows.counts.tolist() == [1, 2] and rows.starts.tolist() == [0, 1]


def test_adapter_table_follows_replaced_parameters():
    """The kernels read adapters through device pointers: a parameter replaced (a reload, `.to()`) must not
    leave the table pointing at the old memory, and the table's device tensors stay the same (CUDA graphs)."""
    lin = _lora()
    t = lin.table(("speech", "vision"))
    ptrs = t.a_ptrs
    with torch.no_grad():
        lin.lora_A["speech"].data = lin.lora_A["speech"].data.clone()
    t2 = lin.table(("speech", "vision"))
    assert t2 is t and t2.a_ptrs is ptrs and t.a_ptrs[0].item() == lin.lora_A["speech"].data_ptr()
    lin.to(torch.float64)
    assert lin.table(("speech", "vision")).b_ptrs[1].item() == lin.lora_B["vision"].data_ptr()
    with pytest.raises(KeyError, match="'nope' is not loaded"):
        lin.table(("nope",))


def test_segmented_kernels_match_plain_products():
    """The Triton kernels under the interpreter (a child process: TRITON_INTERPRET must be set before Triton is
    imported) against the plain products: mixed rows, ranks and scales, rows without adapter untouched."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PHI4MM_LORA_KERNELS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "tests/model/lora_check.py"), "cpu"], env=env, check=False,
                       capture_output=True, text=True, timeout=600)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "FAIL" not in r.stdout and r.stdout.count("ok ") == 10


def test_packed_runs_add_their_delta_to_a_slice_with_the_same_result():
    """A packed plan marks each adapter's tokens that form one run; inference adds their delta to that slice,
    training scatters by index: the outputs are bit-identical, and equal each span alone."""
    plan = AdapterPlan.for_spans([(None, 3), ("speech", 4), ("vision", 5), (None, 2), ("vision", 1)])
    assert plan.ranges == ((3, 7), None)  # speech: one run; vision: two runs, scattered by index
    lin, x = _lora(), torch.randn(1, 15, IN)
    with torch.no_grad():
        fast = lin(x, plan)
    with torch.enable_grad():
        slow = lin(x, plan)
    assert torch.equal(fast, slow)
    alone = [lin(x[:, a:b], AdapterPlan.build(n)) for n, a, b in
             ((None, 0, 3), ("speech", 3, 7), ("vision", 7, 12), (None, 12, 14), ("vision", 14, 15))]
    torch.testing.assert_close(fast, torch.cat(alone, 1), rtol=0, atol=1e-6)
