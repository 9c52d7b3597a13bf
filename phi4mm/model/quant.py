"""Quantized decoder weights: fp8 (e4m3, one scale per output channel) and int4 (groups of 128, symmetric).

What is quantized: the decoder's base linears (qkv, o, gate_up, down: 3.2 of the full model's 5.6 billion
parameters), and, when asked (`head=True`), the tied embedding/output head (0.61 billion, read whole by every
decode step's logits). The LoRA adapters, norms and the vision/audio towers stay in the model dtype: the
adapters are small low-rank corrections whose error would add to the base weight's, and the towers run once
per image/audio clip (compute-bound prefill work, not per-token reads).

The numbers, kept as compressed-tensors stores them so a checkpoint written here loads in vLLM/transformers:
- fp8: `q = fp8_e4m3(w / s)`, `s = max|w_row| / 448` (one per output row), rounded to bf16 before use.
- int4: `q = clamp(round(w / s), -8, 7)`, `s = max|w_group| / 7` per row and group of 128 inputs (bf16). The
  divisor 7 (not 7.5) wastes the -8 level but makes re-quantizing a dequantized weight give the same bytes.
  Packed eight a int32 (`weight_packed`, (out, in/8)): element i in bits 4i..4i+3, stored as q + 8.

Compute: on CUDA, `quant_kernels.qmm` reads the quantized weight and dequantizes in registers (decode sizes);
from DENSE_MIN_ROWS rows (prefill) fp8 quantizes the activations per token and runs `torch._scaled_mm` on the
fp8 tensor cores (compute capability >= 8.9), int4 dequantizes the weight once and runs a bf16 GEMM (not for
the head: see QuantEmbedding). Elsewhere (CPU, autograd, older GPUs for fp8) the weight is dequantized to the
activation dtype and multiplied: slow, but the same numbers.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phi4mm.config import LoraConfig
from phi4mm.model import kernels
from phi4mm.model.lora import LoraLinear

METHODS = ("fp8", "int4")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
INT4_GROUP = 128  # inputs sharing one scale
INT4_QMAX = 7  # scale divisor: |q| <= 7 from the scale, -8 is never produced
INT4_QMIN = -8
INT4_OFFSET = 8  # stored nibble = q + 8
MIN_GROUP = 16  # a smaller K-block cannot feed a tensor-core dot product
SCALE_DTYPE = torch.bfloat16  # scales are rounded to bf16 (as compressed-tensors stores them for bf16 models)
FP8_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada, Hopper and later
# From this many rows (prefill) a dense tensor-core GEMM beats dequantizing inside the kernel: fp8 runs
# torch._scaled_mm with per-token activation scales, int4 dequantizes the weight once and runs cuBLAS.
DENSE_MIN_ROWS = 256
TINY = torch.finfo(torch.float32).tiny  # an all-zero row/group gets this scale instead of 0 (no 0/0)
QUANT_LEAVES = ("weight", "weight_packed", "weight_scale", "weight_shape")  # stored names under a linear
HEAD_MODULE = "embed_tokens"  # the tied embedding / output head, quantized only when asked (`head=True`)
HEAD_CHUNK = 16384  # vocabulary rows dequantized at a time by the head's torch path (~100 MB in bf16 at full size)


class QuantizationError(ValueError):
    """A quantization request that cannot be honoured; the message says what to use instead."""


def check_method(method: str | None) -> str | None:
    if method is None or method in METHODS:
        return method
    raise QuantizationError(f"quantization {method!r} is not supported; use one of {', '.join(METHODS)} "
                            "(or none for the checkpoint's dtype)")


def device_note(method: str, device: torch.device | str, capability: tuple[int, int] | None = None) -> str | None:
    """Raise where `method` cannot run on `device`; return a note where it runs a slower way, else None.

    capability: the CUDA compute capability (read from the device when None)."""
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        raise QuantizationError(f"quantization {method!r} runs on cuda or cpu, not {device.type}; load without "
                                "quantization on this device")
    if device.type == "cpu":
        return (f"{method} on the CPU dequantizes each weight before its matmul: memory is saved, decoding is "
                "slower than unquantized; use a CUDA GPU for speed")
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if method == "fp8" and tuple(capability) < FP8_MIN_CAPABILITY:
        return (f"this GPU (compute capability {capability[0]}.{capability[1]}) has no fp8 tensor cores: fp8 "
                "weights are upcast before each matmul (weight-only, no fp8 compute); int4 is faster here")
    return None


def int4_group(in_features: int) -> int:
    """128 inputs a group, or the largest power-of-two divisor of in_features below it (tiny models)."""
    g = INT4_GROUP
    while g >= MIN_GROUP and in_features % g:
        g //= 2
    if g < MIN_GROUP:
        raise QuantizationError(f"int4 needs in_features divisible by {MIN_GROUP}; this layer has {in_features}")
    return g


# ------------------------------------------------------------------------------------------ the numbers
def _bf16_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """fp32 scale, rounded through bf16 (exactly what a stored checkpoint holds)."""
    return (amax.float() / qmax).clamp(min=TINY).to(SCALE_DTYPE).float()


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (fp8 (out, in), fp32 scale (out, 1))."""
    scale = _bf16_scale(w.abs().amax(dim=1, keepdim=True), FP8_MAX)  # (out, 1)
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], (out, in) -> int32 (out, in/8), compressed-tensors' layout (little-endian)."""
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        raise QuantizationError("int4 packing assumes a little-endian host")
    out, n = q.shape
    u = (q.to(torch.int16) + INT4_OFFSET).to(torch.uint8).view(out, n // 2, 2)  # (out, in/2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).contiguous().view(torch.int32)  # bytes (out, in/2) -> (out, in/8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 (out, in/8) -> int8 (out, in) in [-8, 7]."""
    b = packed.contiguous().view(torch.uint8)  # (out, in/2)
    u = torch.stack((b & 0xF, b >> 4), dim=-1)  # (out, in/2, 2)
    return (u.to(torch.int8) - INT4_OFFSET).view(b.shape[0], -1)


def quantize_int4(w: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (packed int32 (out, in/8), fp32 scale (out, in/group))."""
    out, n = w.shape
    group = int4_group(n) if group is None else group
    g = w.float().view(out, n // group, group)  # (out, groups, group)
    scale = _bf16_scale(g.abs().amax(dim=-1), INT4_QMAX)  # (out, groups)
    q = torch.round(g / scale[..., None]).clamp(INT4_QMIN, INT4_QMAX).view(out, n)
    return pack_int4(q), scale


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = unpack_int4(packed)  # (out, in)
    out, n = q.shape
    groups = scale.shape[1]
    w = q.float().view(out, groups, n // groups) * scale.float()[..., None]  # (out, groups, group)
    return w.view(out, n).to(dtype)


def quantize_weight(method: str, w: torch.Tensor, dtype: torch.dtype, group: int | None = None
                    ) -> dict[str, torch.Tensor]:
    """One dense weight -> its stored tensors (leaf name -> tensor), scales in `dtype` (the model's)."""
    if method == "fp8":
        q, s = quantize_fp8(w)
        return {"weight": q, "weight_scale": s.to(dtype)}
    packed, s = quantize_int4(w, group)
    return {"weight_packed": packed, "weight_scale": s.to(dtype),
            "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64, device=w.device)}


# ------------------------------------------------------------------------------------------ the layer
def _scaled_mm_fp8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token activation scales, fp8 x fp8 on tensor cores: x (M, K) -> (M, N) in x's dtype."""
    xs = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=TINY)  # (M, 1)
    xq = (x.float() / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    # w.t() is (K, N) column-major: the layout _scaled_mm wants for its second operand.
    return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale.float().view(1, -1), out_dtype=x.dtype)


class QuantizedWeight:
    """A (out, in) weight stored quantized, under compressed-tensors' names, and its products.

    Shared by the decoder linears (`QuantLoraLinear`) and the tied embedding/head (`QuantEmbedding`), so the
    head's matmul runs exactly the kernels and fallbacks the linears do. Buffers:
    fp8: `weight` float8_e4m3fn (out, in), `weight_scale` (out, 1);
    int4: `weight_packed` int32 (out, in/8), `weight_scale` (out, in/group), `weight_shape` int64 [out, in].
    """

    in_features: int
    out_features: int
    method: str
    group: int
    # Prefill-sized int4 products dequantize the whole weight once (a transient the size of the bf16 weight),
    # then run cuBLAS: right for a decoder linear, not for the 1.2 GB head whose memory is the point.
    DEQUANTIZE_FOR_PREFILL = True

    def init_quant(self, in_features: int, out_features: int, method: str, group: int | None) -> None:
        """Register the empty buffers of `method` (an nn.Module's __init__ calls this)."""
        self.method = check_method(method)
        if method == "fp8":
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE))
            self.register_buffer("weight_scale", torch.empty(out_features, 1))
            self.group = in_features
            return
        self.group = int4_group(in_features) if group is None else group
        if self.group < MIN_GROUP or self.group & (self.group - 1) or in_features % self.group:
            raise QuantizationError(f"int4 group size {self.group} does not fit a layer of {in_features} "
                                    f"inputs: it must be a power of two >= {MIN_GROUP} dividing them")
        self.register_buffer("weight_packed", torch.empty(out_features, in_features // 8, dtype=torch.int32))
        self.register_buffer("weight_scale", torch.empty(out_features, in_features // self.group))
        self.register_buffer("weight_shape", torch.empty(2, dtype=torch.int64))

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype (activations, adapters, scales)."""
        return self.weight_scale.dtype

    @property
    def device(self) -> torch.device:
        return self.weight_scale.device

    def dense_weight(self) -> torch.Tensor:
        if self.method == "fp8":
            return dequantize_fp8(self.weight, self.weight_scale, self.dtype)
        return dequantize_int4(self.weight_packed, self.weight_scale, self.dtype)

    def dense_rows(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """Only the selected output rows, dequantized: rows (...) ids or a slice -> (..., in) in the model dtype.
        Each row is computed as `dense_weight` computes it, so the values are equal bit for bit."""
        scale = self.weight_scale[rows]
        if self.method == "fp8":
            q = self.weight.view(torch.uint8)[rows].view(FP8_DTYPE)  # gather the bytes: fp8 has no index kernel
            return dequantize_fp8(q, scale, self.dtype)
        packed = self.weight_packed[rows]
        lead = packed.shape[:-1]
        flat = dequantize_int4(packed.reshape(-1, packed.shape[-1]), scale.reshape(-1, scale.shape[-1]), self.dtype)
        return flat.view(*lead, self.in_features)

    def dense_product(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, in) @ dequant(W).T in plain torch (CPU, autograd, GPUs without fp8): the same numbers, slowly."""
        return F.linear(x, self.dense_weight().to(x.dtype))

    def project(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype through the quantized weight (into `out` when given): a
        decoder linear's base product, or the head's logits."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if out is not None:
            self.quant_matmul(x2, out.view(-1, self.out_features))
            return out
        return self.quant_matmul(x2).view(*lead, self.out_features)  # (M, out) -> (..., out)

    def quant_matmul(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x (M, in) contiguous rows -> (M, out) in x's dtype, written into `out` (M, out) when given."""
        y = self._product(x, out)
        if out is not None and y is not out:
            out.copy_(y)
            return out
        return y

    def _product(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled() or not kernels.available(x):
            return self.dense_product(x)  # autograd, CPU: plain torch
        from phi4mm.model import quant_kernels  # imports Triton: only where it runs
        if self.method == "fp8":
            if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < FP8_MIN_CAPABILITY:
                return self.dense_product(x)  # no fp8 in hardware: weight-only upcast
            if x.shape[0] >= DENSE_MIN_ROWS and x.shape[0] % 16 == 0 and x.device.type == "cuda" \
                    and x.dtype == torch.bfloat16:
                return _scaled_mm_fp8(x, self.weight, self.weight_scale)
            return quant_kernels.qmm(x, self.weight, self.weight_scale, False, self.group, self.out_features, out)
        packed = self.weight_packed.view(torch.uint8)  # (out, in/2): the int32 words' bytes
        if x.shape[0] >= DENSE_MIN_ROWS and self.DEQUANTIZE_FOR_PREFILL:  # dequantize once, then cuBLAS
            return F.linear(x, quant_kernels.dequantize_int4(packed, self.weight_scale, self.group, x.dtype))
        return quant_kernels.qmm(x, packed, self.weight_scale, True, self.group, self.out_features, out)


class QuantLoraLinear(QuantizedWeight, LoraLinear):
    """`LoraLinear` whose base weight is stored quantized (`QuantizedWeight`'s buffers); the LoRA adapters stay
    in the model dtype."""

    def __init__(self, in_features: int, out_features: int, loras: dict[str, LoraConfig], method: str,
                 group: int | None = None):
        super().__init__(in_features, out_features, loras)
        del self.weight  # the dense parameter: replaced by the buffers
        self.init_quant(in_features, out_features, method, group)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) through the quantized weight."""
        return self.project(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.method}, group={self.group}"


class QuantEmbedding(QuantizedWeight, nn.Module):
    """The tied token embedding / output head, stored once, quantized like a decoder linear (vocab, hidden).

    A lookup dequantizes only the rows it reads; `project` (QuantizedWeight's) is the head's matmul through the
    same kernels as the linears. The full bf16 matrix never exists: off the GPU kernels the head is dequantized
    HEAD_CHUNK rows at a time."""

    DEQUANTIZE_FOR_PREFILL = False

    def __init__(self, num_embeddings: int, embedding_dim: int, method: str, group: int | None = None):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.in_features, self.out_features = embedding_dim, num_embeddings  # as the head (a linear) sees it
        self.init_quant(embedding_dim, num_embeddings, method, group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> (..., hidden) in the model dtype."""
        return self.dense_rows(ids)

    def dense_product(self, x: torch.Tensor) -> torch.Tensor:
        # In slices of the vocabulary: a whole dequantized copy would cost what quantizing the head saves.
        return torch.cat([F.linear(x, self.dense_rows(slice(a, a + HEAD_CHUNK)).to(x.dtype))
                          for a in range(0, self.out_features, HEAD_CHUNK)], dim=-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.method}, group={self.group}"


# ------------------------------------------------------------------------------------------ whole models
@dataclass(frozen=True)
class Spec:
    """How one linear is quantized: the method and, for int4, the inputs per scale (None: `int4_group`)."""

    method: str
    group: int | None = None


@dataclass(frozen=True)
class Plan:
    """Which LoraLinears of a model are quantized, and how: module name -> Spec."""

    modules: dict[str, Spec]

    @staticmethod
    def decoder(net: nn.Module, method: str, head: bool = False) -> Plan:
        """Every decoder base linear (LoraLinear) of `net`; head: also the tied embedding/head (HEAD_MODULE)."""
        check_method(method)
        modules = {n: Spec(method) for n, m in net.named_modules() if isinstance(m, LoraLinear)}
        if head:
            check_head(net)
            modules[HEAD_MODULE] = Spec(method)
        return Plan(modules)

    @property
    def head(self) -> bool:
        """Whether the tied embedding/head is quantized too."""
        return HEAD_MODULE in self.modules

    @property
    def methods(self) -> set[str]:
        return {s.method for s in self.modules.values()}

    def weight_names(self) -> set[str]:
        """The dense parameter names these modules replace (`layers.0.self_attn.qkv_proj.weight`, ...)."""
        return {f"{n}.weight" for n in self.modules}


def check_head(net: nn.Module) -> None:
    """Raise unless `net` has a tied embedding/head to quantize (one matrix serving both)."""
    if getattr(net, "lm_head", None) is not None:
        raise QuantizationError("quantize_head quantizes the tied embedding/head, but this model has a separate "
                                "lm_head (tie_word_embeddings is false); load it without quantize_head")
    if not isinstance(getattr(net, HEAD_MODULE, None), (nn.Embedding, QuantEmbedding)):
        raise QuantizationError(f"quantize_head needs a token embedding ({HEAD_MODULE}); this model has none")


def convert(net: nn.Module, plan: Plan) -> None:
    """Swap each planned LoraLinear for a QuantLoraLinear sharing its adapters, and the planned embedding for a
    QuantEmbedding (built on the model's device, e.g. meta before loading). The base weight's values are not
    carried over: load or `quantize_into` them."""
    for name, spec in plan.modules.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        old = parent.get_submodule(leaf)
        if isinstance(old, QuantizedWeight):
            continue
        device = next(iter(old.parameters())).device
        if isinstance(old, nn.Embedding):
            with torch.device(device):
                setattr(parent, leaf, QuantEmbedding(old.num_embeddings, old.embedding_dim, spec.method, spec.group))
            continue
        with torch.device(device):
            new = QuantLoraLinear(old.in_features, old.out_features, {}, spec.method, spec.group)
        new.lora_A, new.lora_B = old.lora_A, old.lora_B
        new.scale, new.dropout, new.merged = old.scale, old.dropout, {}
        new.train(old.training)
        setattr(parent, leaf, new)


class LoadTimeQuantizer:
    """Quantizes decoder weights while the loader reads them: each dense tensor is turned into its quantized
    tensors on the device as soon as it is read, so a full bf16 copy never exists in memory at once."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.weights = plan.weight_names()

    def wants(self, ours: str) -> bool:
        return ours in self.weights

    def take(self, ours: str, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A dense weight (our name) -> our names of its quantized tensors."""
        module = ours[: -len(".weight")]
        with torch.no_grad():
            spec = self.plan.modules[module]
            out = quantize_weight(spec.method, w, dtype, spec.group)
        return {f"{module}.{leaf}": t for leaf, t in out.items()}


def quantize_model(net: nn.Module, method: str, head: bool = False) -> int:
    """Quantize a loaded model's decoder linears (head: and its tied embedding/head) in place -> bytes saved.
    (Loading with `quantization=` does this while reading the checkpoint instead, without the dense copy.)"""
    plan = Plan.decoder(net, method, head)
    dense = {n: net.get_submodule(n).weight.detach() for n in plan.modules
             if not isinstance(net.get_submodule(n), QuantizedWeight)}
    before = sum(w.numel() * w.element_size() for w in dense.values())
    convert(net, Plan({n: plan.modules[n] for n in dense}))
    after = 0
    for name, w in dense.items():
        mod = net.get_submodule(name)
        for leaf, t in quantize_weight(method, w, w.dtype, mod.group if method == "int4" else None).items():
            setattr(mod, leaf, t)
            after += t.numel() * t.element_size()
    if net.training:
        warnings.warn("quantized a model in training mode: its base weights have no gradient", stacklevel=2)
    return before - after


def quantized_bytes(net: nn.Module) -> int:
    """Bytes held by quantized weights (decoder linears, and the head when quantized) and their scales."""
    return sum(b.numel() * b.element_size() for m in net.modules() if isinstance(m, QuantizedWeight)
               for b in m.buffers(recurse=False))
