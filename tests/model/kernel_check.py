"""Checks every Triton kernel of phi4mm.model.kernels against its torch version, and the engine running on the
kernels against the reference loop. tests/model/test_kernels.py calls these functions; alone:

    python tests/model/kernel_check.py [cuda|cpu] [checkpoint]   # prints one line per check, exits 1 on a miss

On CUDA the kernels are compiled. On CPU they run under Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before phi4mm.model.kernels is imported, hence a process of its own there.
"""
from __future__ import annotations

import sys

import torch

from phi4mm.model import kernels

Result = tuple[str, bool, str]  # (check, passed, detail)


def kernel_results(device: str, dtype: torch.dtype) -> list[Result]:
    """Each kernel, and each of its code paths, on small shapes. bf16 is for CUDA only: Triton's interpreter
    truncates fp32 -> bf16 instead of rounding to nearest even, and its bf16 dot products are wrong, while the
    kernels must match eager torch bit for bit in bf16."""
    assert kernels.available(torch.empty(0, device=device)), "Triton kernels are not available on " + device
    g = torch.Generator().manual_seed(0)
    out: list[Result] = []

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    # add + RMSNorm: the sum must round as the eager add does; the norm may differ in its last bit (the row sum
    # is reduced in another order). 96 wide: a masked tail in a 128-wide block.
    x, res, w = rnd(5, 96), rnd(5, 96), rnd(96)
    for r in (None, res):
        got, new_res = kernels.add_rms_norm(x, r, w, 1e-5)
        want_res = x if r is None else r + x
        want = kernels.rms_norm_torch(want_res, w, 1e-5)
        err = (got.float() - want.float()).abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7 * want.float().abs().max().item()
        out.append((f"add_rms_norm {dtype} res={r is not None}", torch.equal(new_res, want_res) and err <= tol,
                    f"max err {err:.2e}"))

    # RoPE + cache write: bit-exact, both in the returned q and in the pool. D 32 rotated on its first 24 dims.
    H, KV, D, RD, bs, nb = 6, 2, 32, 24, 4, 12
    qkv = rnd(3, (H + 2 * KV) * D)
    ang = torch.rand(3, RD, generator=g) * 6
    cos, sin = ang.cos().to(device, dtype), ang.sin().to(device, dtype)
    slots = torch.tensor([5, 17, 30], device=device)
    kc = [torch.zeros(nb, bs, KV, D, device=device, dtype=dtype) for _ in range(2)]
    vc = [torch.zeros(nb, bs, KV, D, device=device, dtype=dtype) for _ in range(2)]
    q0 = kernels.rope_store(qkv, cos, sin, slots, kc[0], vc[0], H)
    q1 = kernels.rope_store_torch(qkv, cos, sin, slots, kc[1], vc[1], H)
    # bf16: bit-exact. fp32: the GPU compiler may fuse x*cos + y*sin into one FMA (one rounding, not two).
    same = torch.equal if dtype == torch.bfloat16 else (lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6))
    qq, kk = kernels.rope_qk(qkv, cos, sin, H, KV)
    out.append((f"rope_qk {dtype}", same(qq, q1) and same(kk, kc[1].view(-1, KV, D)[slots]), ""))
    diffs = [(a.float() - b.float()).abs().max().item() for a, b in ((q0, q1), (kc[0], kc[1]), (vc[0], vc[1]))]
    out.append((f"rope_store {dtype}", same(q0, q1) and same(kc[0], kc[1]) and same(vc[0], vc[1]),
                "max err q %.2e k %.2e v %.2e" % tuple(diffs)))

    # Paged decode attention: rows of 1 key, a part of a block, and across many 64-key tiles (one ending
    # mid-tile); 1 partition (normalised in place), and 2 and 3 (partial sums merged; with 3, partitions past
    # the short rows' ends stay empty). 160 keys per table: 3 tiles per row at most.
    nb, bs = 64, 4
    kcache, vcache = rnd(nb, bs, KV, D), rnd(nb, bs, KV, D)
    tables = torch.stack([torch.randperm(nb, generator=g)[:40] for _ in range(4)]).to(device)  # (4, 40)
    lens = torch.tensor([1, 7, 133, 160], device=device)
    q = rnd(4, H, D)
    want = kernels.paged_decode_attention_torch(q, kcache, vcache, tables, lens)
    for parts in (1, 2, 3):
        got = kernels.paged_decode_attention(q, kcache, vcache, tables, lens, parts=parts)
        err = (got.float() - want.float()).abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        out.append((f"paged_decode_attention {dtype} parts={parts}", err <= tol, f"max err {err:.2e}"))

    # SiLU gate: bit-exact in bf16; in fp32 exp() itself may differ in the last bit between libraries.
    gu = rnd(3, 2 * 80, scale=3.0)
    got, want = kernels.silu_mul(gu), kernels.silu_mul_torch(gu)
    ok = torch.equal(got, want) if dtype == torch.bfloat16 else torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    out.append((f"silu_mul {dtype}", ok, ""))

    # Training (model.fused): RoPE and the SiLU gate as autograd functions (the kernels forward, the backward
    # written out) against autograd through the eager ops, values and input gradients.
    from phi4mm.model import fused as fused_train
    from phi4mm.model.reference import apply_rope
    B, T = 2, 5
    x = rnd(B, T, (H + 2 * KV) * D)
    cs = torch.rand(1, 1, T, RD // 2, generator=g) * 6
    cos4 = torch.cat([cs.cos()] * 2, -1).to(device, dtype)  # (1, 1, T, RD)
    sin4 = torch.cat([cs.sin()] * 2, -1).to(device, dtype)
    grads = [rnd(B, H, T, D), rnd(B, KV, T, D), rnd(B, KV, T, D)]
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    outs = fused_train.rope_qkv(a, cos4, sin4, H, KV)
    ref = (apply_rope(b[..., :H * D].view(B, T, H, D).transpose(1, 2), cos4, sin4),
           apply_rope(b[..., H * D:(H + KV) * D].view(B, T, KV, D).transpose(1, 2), cos4, sin4),
           b[..., (H + KV) * D:].view(B, T, KV, D).transpose(1, 2))
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(ref, grads)
    gerr = (a.grad.float() - b.grad.float()).abs().max().item()
    gtol = 1e-5 if dtype == torch.float32 else 2 ** -7 * b.grad.float().abs().max().item()
    out.append((f"train rope_qkv {dtype}", all(same(o, r) for o, r in zip(outs, ref)) and gerr <= gtol,
                f"grad max err {gerr:.2e}"))
    a, b = gu.clone().requires_grad_(), gu.clone().requires_grad_()
    d = rnd(3, 80)
    fused_train.silu_mul(a).backward(d)
    kernels.silu_mul_torch(b).backward(d)
    gerr = (a.grad.float() - b.grad.float()).abs().max().item()
    gtol = 1e-5 if dtype == torch.float32 else 2 ** -7 * b.grad.float().abs().max().item()
    out.append((f"train silu_mul {dtype}", gerr <= gtol, f"grad max err {gerr:.2e}"))
    return out


def engine_results(device: str, ckpt: str, new: int = 5, full: bool = True) -> list[Result]:
    """The engine's static paths, on the kernels, against the reference loop in plain torch (fp32, tiny model):
    decode (DecodeGraphs: rope_store into the paged pool, the split attention and its merge) with a text, a
    speech and a short request in one batch; the static prefill of each prompt alone; and the reference loop
    itself on the kernels (rope_qk, the norms and the gate in its forward).

    full: also a vision request (460 image tokens) and 4-token blocks (CUDA: cheap). Under the interpreter every
    kernel program runs as Python, so there the set is what reaches every kernel and engine path once; the
    engine's adapter masks and block bookkeeping are proven in plain torch by tests/engine (static_decode on
    CPU)."""
    import phi4mm
    from phi4mm.engine.engine import Engine
    from phi4mm.sampling import SamplingParams
    from tests.conftest import scene, tone
    m = phi4mm.load(ckpt, device=device, dtype=torch.float32)
    # ~75 tokens: with 16-token blocks the decode table is padded to 16 blocks, split into 4 partitions of 64
    # keys, so this row spans two (merged) and the short rows leave partitions empty.
    reqs = [dict(prompt="<|user|>Tell me a story about a fox." + " Then another one." * 16 + "<|end|><|assistant|>"),
            dict(prompt="<|user|><|audio_1|>Transcribe the audio to text.<|end|><|assistant|>", audios=[tone(1.1)]),
            dict(prompt="<|system|>Be brief.<|end|><|user|>Hi!<|end|><|assistant|>")]
    if full:
        reqs.insert(2, dict(prompt="<|user|><|image_1|>What is this?<|end|><|assistant|>",
                            images=[scene(448, 300, 1)]))
    assert kernels.available(torch.empty(0, device=device)), "Triton kernels are not available on " + device
    kernels.DISABLED = True  # the reference loop in plain torch ops; the engine below on the kernels
    try:
        want = [m.generate_ids(r["prompt"], r.get("images"), r.get("audios"), max_new_tokens=new) for r in reqs]
    finally:
        kernels.DISABLED = False
    out: list[Result] = []
    for bs in (4, 16) if full else (16,):
        eng = Engine(m, num_blocks=600, block_size=bs, static_decode=True)
        got = [o["token_ids"] for o in eng.generate([dict(r, params=SamplingParams(max_tokens=new)) for r in reqs])]
        out.append((f"engine static decode block_size={bs}", got == want and eng.graphs.steps >= new - 1,
                    f"{got} vs {want}"))
    # One request at a time, no prefix cache: each prompt alone in its step takes the static prefill.
    eng = Engine(m, num_blocks=600, block_size=16, static_decode=True, prefix_caching=False)
    got = [eng.generate([dict(r, params=SamplingParams(max_tokens=new))])[0]["token_ids"] for r in reqs]
    out.append(("engine static prefill, one request at a time",
                got == want and eng.prefill_graphs.steps == len(reqs), f"{got} vs {want}"))
    fused = [m.generate_ids(r["prompt"], r.get("images"), r.get("audios"), max_new_tokens=new) for r in reqs]
    out.append(("reference loop on the fused kernels", fused == want, f"{fused} vs {want}"))
    return out


def main(device: str, ckpt: str | None = None) -> int:
    dtypes = (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)
    results = [r for dt in dtypes for r in kernel_results(device, dt)]
    if ckpt is not None:
        results += engine_results(device, ckpt, full=device == "cuda")
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    sys.exit(main(dev, sys.argv[2] if len(sys.argv) > 2 else None))
