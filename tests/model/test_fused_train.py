"""The compiled training ops (phi4mm/model/fused.py) give the eager path's loss and gradients.

On CUDA they are on by default while training; here PHI4MM_COMPILE's switch turns them on for CPU tensors so
Inductor's CPU backend compiles the same functions (forward and backward) on the tiny model.
"""
from __future__ import annotations

import pytest
import torch

import phi4mm
from phi4mm.inputs.prepare import TEXT_ADAPTER
from phi4mm.inputs.records import Record
from phi4mm.model import fused as fused_train
from phi4mm.train.data import collate, encode
from phi4mm.train.loss import LossModule
from phi4mm.train.stages import setup_stage

CHATS = [("Say hi.", "Hi there, how are you today?"), ("Name three colours, please.", "Blue, red and green.")]


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.net.zero_grad(set_to_none=True)
    loss = LossModule(model).train()(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.net.named_parameters() if p.grad is not None}


def test_compiled_training_ops_equal_eager(tiny_official, monkeypatch):
    model = phi4mm.load(tiny_official)
    setup_stage(model, "text", 4)
    with torch.no_grad():  # B starts at zero (the model unchanged); nonzero B lets A's gradients show too
        for name, p in model.net.named_parameters():
            if f"lora_B.{TEXT_ADAPTER}" in name:
                p.normal_(0, 0.02)
    recs = [Record(i + 1, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], [], [])
            for i, (q, a) in enumerate(CHATS)]
    batch = collate([encode(model, r, TEXT_ADAPTER) for r in recs], model.config.text.pad_token_id)
    assert len(set(batch.lengths.tolist())) == 2  # right padding in the batch

    ref_loss, ref_grads = _loss_and_grads(model, batch)
    monkeypatch.setattr(fused_train, "FORCE", True)
    loss, grads = _loss_and_grads(model, batch)
    for op in (fused_train.rms_norm, fused_train.add_rms_norm, fused_train.cross_entropy_sum):
        assert op.compiled is not None and not op.failed, op.fn.__name__  # the compiled path really ran

    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert ref_grads.keys() == grads.keys() and len(grads) == 4 * 2 * model.config.text.num_hidden_layers
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_hand_written_gradients_of_rope_and_the_silu_gate():
    """Numerical gradients (float64) of the two autograd functions whose backward is written out."""
    from phi4mm.model.reference import apply_rope
    g = torch.Generator().manual_seed(0)
    B, T, H, KV, D, rd = 2, 5, 4, 2, 8, 6  # partial rotary: 6 of 8 dims rotate
    qkv = torch.randn(B, T, (H + 2 * KV) * D, dtype=torch.float64, generator=g, requires_grad=True)
    ang = torch.randn(1, 1, T, rd // 2, dtype=torch.float64, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1) * 1.2, torch.cat([ang.sin()] * 2, -1) * 1.2  # (1, 1, T, rd), scaled
    assert torch.autograd.gradcheck(lambda x: fused_train.rope_qkv(x, cos, sin, H, KV), (qkv,))
    q, k, v = fused_train.rope_qkv(qkv, cos, sin, H, KV)
    ref_q = apply_rope(qkv[..., :H * D].view(B, T, H, D).transpose(1, 2), cos, sin)
    assert torch.equal(q, ref_q) and torch.equal(v, qkv[..., (H + KV) * D:].view(B, T, KV, D).transpose(1, 2))
    gate_up = torch.randn(3, 7, 10, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(fused_train.silu_mul, (gate_up,))


def test_compiled_ops_stay_off_without_autograd(monkeypatch):
    monkeypatch.setattr(fused_train, "FORCE", True)
    x = torch.ones(2, 3)
    with torch.no_grad():
        assert not fused_train.enabled(x)  # inference keeps the eager ops or the Triton kernels
    assert fused_train.enabled(x)
    monkeypatch.setattr(fused_train, "DISABLED", True)
    assert not fused_train.enabled(x)


def test_a_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    op = fused_train._Compiled(lambda x: x * 2)

    def broken(*a, **k):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    with pytest.warns(UserWarning, match="training continues with eager torch ops"):
        assert torch.equal(op(torch.ones(2)), torch.full((2,), 2.0))
    assert op.failed and torch.equal(op(torch.ones(2)), torch.full((2,), 2.0))  # no second warning, no retry
