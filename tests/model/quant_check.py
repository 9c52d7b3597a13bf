"""Checks the quantized-GEMM Triton kernels (phi4mm.model.quant_kernels) against the torch path; run by
tests/model/test_quant.py in a child process with TRITON_INTERPRET=1 (set before Triton is imported), or
directly on a GPU. Prints one line per check and exits non-zero on a miss."""
from __future__ import annotations

import sys

import torch

from phi4mm.config import LoraConfig
from phi4mm.model import kernels, quant
from phi4mm.model.lora import AdapterPlan


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    return ok


def main(device: str) -> int:
    from phi4mm.model import quant_kernels as qk
    assert kernels.available(torch.empty(0, device=device)), "Triton is not available on " + device
    g = torch.Generator().manual_seed(0)
    good = True
    tol = 1e-5 if device == "cpu" else 2e-3  # CUDA dot products on fp32 inputs round them to tf32
    # fp32 activations: the interpreter's bf16 dot products are not trustworthy (see kernel_check.py).
    for N, K, M in ((40, 256, 1), (48, 64, 3), (24, 512, 17)):
        w = torch.randn(N, K, generator=g).to(device)
        x = torch.randn(M, K, generator=g).to(device)
        for method in quant.METHODS:
            t = quant.quantize_weight(method, w, torch.float32)
            if method == "int4":
                group = quant.int4_group(K)
                packed = t["weight_packed"].view(torch.uint8)
                dense = quant.dequantize_int4(t["weight_packed"], t["weight_scale"], torch.float32)
                y = qk.qmm(x, packed, t["weight_scale"], True, group, N)
                kd = qk.dequantize_int4(packed, t["weight_scale"], group, torch.float32)
                good &= check(f"dequantize_int4 kernel {N}x{K}", torch.equal(kd, dense))
            else:
                dense = quant.dequantize_fp8(t["weight"], t["weight_scale"], torch.float32)
                y = qk.qmm(x, t["weight"], t["weight_scale"], False, K, N)
            want = x @ dense.T
            # Same products, summed in another order: fp32 rounding only.
            err = ((y - want).abs().max() / want.abs().max()).item()
            good &= check(f"qmm {method} M={M} N={N} K={K}", err < tol, f"rel err {err:.1e}")
    # The layer: kernels (under inference mode) against the dequantize-then-matmul path, with adapters mixed.
    loras = {"a": LoraConfig(r=4, lora_alpha=8, dropout=0.0)}
    for method in quant.METHODS:
        lin = quant.QuantLoraLinear(128, 40, loras, method).to(device)
        for leaf, t in quant.quantize_weight(method, torch.randn(40, 128, generator=g), torch.float32).items():
            setattr(lin, leaf, t.to(device))
        lin.lora_A["a"].data.normal_(generator=None)
        lin.lora_B["a"].data.normal_()
        x = torch.randn(3, 2, 128, generator=g).to(device)
        plan = AdapterPlan.build(["a", None, "a"], device)
        with torch.inference_mode():
            fast = lin(x, plan)
        slow = lin(x, plan)  # grad mode: the plain torch path
        err = ((fast - slow).abs().max() / slow.abs().max()).item()
        good &= check(f"QuantLoraLinear {method} kernels vs torch", err < tol, f"rel err {err:.1e}")
    # The quantized tied head: the same kernels, writing into a caller's buffer (the engine's shared logits),
    # at one row (the GEMV kernel) and a few (tensor-core tiles); lookups dequantize only their rows.
    vocab, hidden = 200, 128
    for method in quant.METHODS:
        emb = quant.QuantEmbedding(vocab, hidden, method).to(device)
        for leaf, t in quant.quantize_weight(method, torch.randn(vocab, hidden, generator=g), torch.float32).items():
            setattr(emb, leaf, t.to(device))
        for rows in (1, 5):
            h = torch.randn(rows, hidden, generator=g).to(device)
            buf = torch.full((rows, vocab), float("nan"), device=device)
            with torch.inference_mode():
                fast = emb.project(h, out=buf)
            slow = h @ emb.dense_weight().T
            err = ((fast - slow).abs().max() / slow.abs().max()).item()
            good &= check(f"QuantEmbedding {method} head rows={rows} into a buffer", fast is buf and err < tol,
                          f"rel err {err:.1e}")
        ids = torch.tensor([[0, vocab - 1, 7], [7, 3, 0]], device=device)
        good &= check(f"QuantEmbedding {method} lookup", torch.equal(emb(ids), emb.dense_weight()[ids]))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
