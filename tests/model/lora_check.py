"""Checks the segmented LoRA kernels (phi4mm.model.lora_kernels) against the plain products; run by
tests/model/test_lora.py in a child process.

On CUDA when present, else on CPU under Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton is
imported, hence a separate process). Prints one line per check and exits non-zero on a miss. With a checkpoint
path as second argument it also runs the engine's static decode (which uses these kernels for any mix of
adapters) against the reference loop, token for token in fp32.
"""
from __future__ import annotations

import sys

import torch

from phi4mm.model import kernels, lora_kernels
from phi4mm.model.lora_kernels import AdapterTable


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    return ok


def plain(y: torch.Tensor, x: torch.Tensor, a: list, b: list, scales: list, ids: list[int]) -> torch.Tensor:
    """Row by row: y[m] + scale * (x[m] A^T) B^T for the row's adapter, nothing for -1 (in fp64)."""
    out = y.double().clone()
    for m, slot in enumerate(ids):
        if slot >= 0:
            out[m] += scales[slot] * (x[m].double() @ a[slot].double().t()) @ b[slot].double().t()
    return out


def kernel_checks(device: str) -> bool:
    assert kernels.available(torch.empty(0, device=device)), "Triton kernels are not available on " + device
    g = torch.Generator().manual_seed(0)
    good = True
    # Three adapters of different ranks (one not a multiple of 16) and scales; an input dimension long enough
    # to be split several ways; an output dimension that is not a whole number of tiles.
    # bf16 on CUDA only: Triton's interpreter gets bf16 dot products wrong. bf16 is checked against the fp64
    # products within bf16 rounding of the output (the kernels sum in another order than cuBLAS).
    for dtype in (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,):
        def tol(want: torch.Tensor, dtype: torch.dtype = dtype) -> float:
            return 1e-5 if dtype == torch.float32 else 2 ** -7 * want.abs().max().item()

        K, N, ranks, scales = 600, 200, (40, 24, 64), [2.0, 0.25, 1.5]
        a = [(torch.randn(r, K, generator=g) * 0.05).to(device, dtype) for r in ranks]
        b = [(torch.randn(N, r, generator=g) * 0.05).to(device, dtype) for r in ranks]
        table = AdapterTable.build(a, b, scales)
        cases = {
            "one row, adapter 1": [1],
            "one row, no adapter": [-1],
            "mixed, 7 rows": [0, -1, 2, 2, 1, -1, 0],
            "all rows on one adapter, 40 rows (several row tiles)": [2] * 40,
            "a third each and none, 150 rows": [(i % 4) - 1 for i in range(150)],
            "unsorted, uneven segments, 64 rows": torch.randint(-1, 3, (64,), generator=g).tolist(),
        }
        for name, ids in cases.items():
            M = len(ids)
            x = torch.randn(M, K + 8, generator=g).to(device, dtype)[:, 4:K + 4]  # rows with a stride (a view)
            y0 = torch.randn(M, N, generator=g).to(device, dtype)
            rows = lora_kernels.segments(torch.tensor(ids, device=device), len(ranks))
            got = lora_kernels.apply(y0.clone(), x, table, rows)
            again = lora_kernels.apply(y0.clone(), x, table, rows)
            want = plain(y0, x, a, b, scales, ids)
            err = (got.double() - want).abs().max().item()
            none = torch.tensor([i < 0 for i in ids], device=device)
            untouched = torch.equal(got[none], y0[none])  # rows without adapter: not a bit changed
            torch_err = (lora_kernels.apply_torch(y0.clone(), x, table, rows).double() - want).abs().max().item()
            same = torch.equal(got, again)
            good &= check(f"segmented lora {dtype} {name}", err <= tol(want) and untouched and same,
                          f"max err {err:.2e} (torch version {torch_err:.2e}), deterministic {same}")
        # The kernel path writes into y: a (M, N) view with a row stride (the base GEMM's output is contiguous,
        # but nothing in the contract asks for it).
        big = torch.randn(5, N + 16, generator=g).to(device, dtype)
        ids = [1, 0, -1, 2, 1]
        x = torch.randn(5, K, generator=g).to(device, dtype)
        want = plain(big[:, :N], x, a, b, scales, ids)
        view = big[:, :N]
        lora_kernels.apply(view, x, table, lora_kernels.segments(torch.tensor(ids, device=device), 3))
        err = (big[:, :N].double() - want).abs().max().item()
        good &= check(f"segmented lora into a strided view {dtype}", err <= tol(want), f"max err {err:.2e}")
    return good


def linear_checks(device: str) -> bool:
    """LoraLinear with the segmented plan against the grouped plan (index_select / index_add per adapter)."""
    from phi4mm.config import LoraConfig
    from phi4mm.model.lora import AdapterPlan, LoraLinear
    torch.manual_seed(1)
    lin = LoraLinear(48, 72, {"vision": LoraConfig(r=16, lora_alpha=8), "speech": LoraConfig(r=20, lora_alpha=40)})
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    lin = lin.to(device).eval()
    names = tuple(sorted(lin.lora_A))
    good = True
    for adapters in (["speech", None, "vision", "speech"], ["vision"] * 3, [None, None]):
        x = torch.randn(len(adapters), 1, 48, device=device)  # (B, 1, in): one decode token per row
        ids = torch.tensor([names.index(n) if n else -1 for n in adapters], device=device)
        with torch.inference_mode():
            got = lin(x, AdapterPlan.for_rows(names, ids))
            want = lin(x, AdapterPlan.build(adapters, device=device))
        err = (got - want).abs().max().item()
        good &= check(f"LoraLinear segmented plan {adapters}", err <= 1e-5, f"max err {err:.2e}")
    return good


def engine_checks(device: str, ckpt: str, new: int = 5) -> bool:
    """Static decode (segmented kernels for any adapter mix) against the reference loop, fp32, tiny model."""
    import phi4mm
    from phi4mm.engine.engine import Engine
    from phi4mm.sampling import SamplingParams
    from tests.conftest import scene, tone
    m = phi4mm.load(ckpt, device=device, dtype=torch.float32)
    speech = [dict(prompt="<|user|><|audio_1|>Transcribe the audio to text.<|end|><|assistant|>",
                   audios=[tone(0.6 + 0.3 * i, seed=i)]) for i in range(2)]
    vision = dict(prompt="<|user|><|image_1|>What is this?<|end|><|assistant|>", images=[scene(300, 200, 2)])
    text = dict(prompt="<|system|>Be brief.<|end|><|user|>Hi!<|end|><|assistant|>")
    good = True
    for label, reqs in (("mixed: speech, vision, text, speech", speech[:1] + [vision, text] + speech[1:]),
                        ("all rows on speech", speech)):
        kernels.DISABLED = True  # the reference loop in plain torch ops
        want = [m.generate_ids(r["prompt"], r.get("images"), r.get("audios"), max_new_tokens=new) for r in reqs]
        kernels.DISABLED = False
        eng = Engine(m, num_blocks=400, block_size=16, static_decode=True)
        got = [o["token_ids"] for o in eng.generate([dict(r, params=SamplingParams(max_tokens=new)) for r in reqs])]
        graphs = sorted({(k[2], k[3]) for k in eng.graphs.graphs})
        good &= check(f"engine static decode, {label}", got == want and eng.graphs.steps >= new - 1,
                      f"{got} vs {want}; graphs {graphs}")
    return good


if __name__ == "__main__":
    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    ok = kernel_checks(dev) & linear_checks(dev)
    if len(sys.argv) > 2:
        ok &= engine_checks(dev, sys.argv[2])
    sys.exit(0 if ok else 1)
