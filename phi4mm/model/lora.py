"""Mixture of LoRAs: per-request adapters beside untouched base weights.

`y = W x + (alpha / r) * B(A(dropout(x)))` (PEFT's LoRA). Every decoder linear holds the base weight and one
(A, B) pair per adapter ("vision", r=256 and "speech", r=320 in the published model). The base weight is never
modified: a request names its adapter, and a batch may mix rows with different adapters (or none).

Segmented path (`AdapterPlan.for_rows`, decode with CUDA graphs): one adapter slot per row, every linear applies
all rows' adapters with one shrink and one expand kernel (lora_kernels.py), whatever the mix of adapters.

Optional fast path (`merge_adapter`): a copy `W + scale * B @ A` of each weight for one adapter, used by a
forward whose whole batch runs that adapter (its plan is `((name, None),)`); every other plan is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phi4mm.config import LoraConfig
from phi4mm.model import lora_kernels
from phi4mm.model.lora_kernels import AdapterTable, RowAdapters


@dataclass(frozen=True)
class AdapterPlan:
    """Which rows of a batch use which adapter, computed once per forward (not per layer).

    `groups` holds (adapter name, indices) pairs; indices None means "everything". Indices count batch rows
    (`per_token` False: x is (B, T, in) with one request per row) or tokens of the flattened (B*T) batch
    (`per_token` True: the engine packs several requests into one row). Positions in no group run the base
    weights only (text-only requests).
    """

    groups: tuple[tuple[str, torch.Tensor | None], ...] = ()
    per_token: bool = False
    # Masked plan (CUDA graphs: shapes must not depend on which rows use which adapter): each group's tensor
    # is a (B, T, 1) 0/1 mask and every adapter present runs on every row, masked.
    masked: bool = False
    # Segmented plan: `rows` gives each row of the flattened (B*T) batch a slot in `names` (-1: none); every
    # linear applies them with one kernel pair (lora_kernels.apply). Inference only: no dropout.
    names: tuple[str, ...] = ()
    rows: RowAdapters | None = None
    # per_token plans: for each group, (start, stop) when its tokens are one contiguous run, else None.
    ranges: tuple[tuple[int, int] | None, ...] = ()

    @staticmethod
    def for_rows(names: tuple[str, ...], ids: torch.Tensor) -> AdapterPlan:
        """ids (B*T,) long on the device: index into `names` per row, -1 for none. Sorting the rows by adapter
        happens here, once per forward, with fixed shapes (safe inside a CUDA graph)."""
        return AdapterPlan(names=tuple(names), rows=lora_kernels.segments(ids, len(names)))

    @staticmethod
    def build(adapters: str | list[str | None] | None, device: torch.device | str = "cpu") -> AdapterPlan:
        """`adapters`: one name for the whole batch, or one name (or None) per batch row."""
        if adapters is None:
            return AdapterPlan()
        if isinstance(adapters, str):
            return AdapterPlan(((adapters, None),))
        names = [a for a in dict.fromkeys(adapters) if a is not None]
        if len(names) == 1 and all(a == names[0] for a in adapters):
            return AdapterPlan(((names[0], None),))
        groups = tuple((n, torch.tensor([i for i, a in enumerate(adapters) if a == n], device=device))
                       for n in names)
        return AdapterPlan(groups)

    @staticmethod
    def from_masks(names: list[str], masks: torch.Tensor) -> AdapterPlan:
        """masks: (len(names), B, T, 1) float, 1 where that adapter applies."""
        return AdapterPlan(tuple((n, masks[i]) for i, n in enumerate(names)), masked=True)

    @staticmethod
    def for_spans(spans: list[tuple[str | None, int]], device: torch.device | str = "cpu") -> AdapterPlan:
        """Packed layout: consecutive (adapter, num_tokens) spans of one (1, N) row."""
        names = {a for a, _ in spans}
        if len(names) == 1:
            return AdapterPlan.build(next(iter(names)))
        idx: dict[str, list[int]] = {}
        pos = 0
        for a, n in spans:
            if a is not None:
                idx.setdefault(a, []).extend(range(pos, pos + n))
            pos += n
        # Where an adapter's tokens are one run (one request, or neighbours on the same adapter), its delta is
        # added to a slice: on a CPU ~10x faster than scattering by index.
        ranges = tuple((i[0], i[-1] + 1) if i[-1] - i[0] + 1 == len(i) else None for i in idx.values())
        return AdapterPlan(tuple((a, torch.tensor(i, device=device)) for a, i in idx.items()), per_token=True,
                           ranges=ranges)


NO_ADAPTER = AdapterPlan()


class LoraLinear(nn.Module):
    """A bias-free linear layer with any number of named LoRA adapters.

    Parameters: `weight` [out, in]; `lora_A.<name>` [r, in]; `lora_B.<name>` [out, r].
    """

    def __init__(self, in_features: int, out_features: int, loras: dict[str, LoraConfig]):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(c.r, in_features)) for n, c in loras.items()})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.empty(out_features, c.r)) for n, c in loras.items()})
        self.scale = {n: c.scale for n, c in loras.items()}
        self.dropout = {n: c.dropout for n, c in loras.items()}
        # adapter name -> W + scale * B @ A. A plain dict, not parameters or buffers: state_dict(), the weight
        # loader and `.to()` never see it (merge after the model is on its device and dtype).
        self.merged: dict[str, torch.Tensor] = {}
        self._tables: dict[tuple[str, ...], AdapterTable] = {}  # the segmented kernels' view of the adapters

    def table(self, names: tuple[str, ...]) -> AdapterTable:
        """The adapters `names` in slot order as the segmented kernels read them (pointers, ranks, scales),
        rebuilt when a parameter was replaced (loading, `.to()`, add_adapter). Build it before a CUDA graph
        captures (a warm-up forward does): the graph keeps reading this table's device tensors."""
        missing = [n for n in names if n not in self.lora_A]
        if missing:
            raise KeyError(f"adapter {missing[0]!r} is not loaded (loaded: {sorted(self.lora_A)})")
        a = [self.lora_A[n] for n in names]  # the parameters themselves: the torch fallback keeps gradients
        b = [self.lora_B[n] for n in names]
        scales = [self.scale[n] for n in names]
        t = self._tables.get(names)
        if t is None or t.key != AdapterTable.pointer_key(a, b) or t.scales != scales:
            fresh = AdapterTable.build(a, b, scales)
            if t is not None and t.max_rank == fresh.max_rank and t.device_tensors_fit(fresh):
                t.refill(fresh)  # same device tensors: a captured graph reads the new pointers
            else:
                t = self._tables[names] = fresh
        return t

    def add_adapter(self, name: str, cfg: LoraConfig) -> None:
        """Create a new adapter (training); B starts at zero so the model is unchanged until it trains."""
        dev, dt = self.device, self.dtype
        a = torch.empty(cfg.r, self.in_features, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(a, a=5 ** 0.5)  # PEFT's default init for lora_A
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, cfg.r, device=dev, dtype=dt))
        self.scale[name], self.dropout[name] = cfg.scale, cfg.dropout
        self.merged.pop(name, None)  # a merged copy of the old (A, B) would be stale

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype (activations and adapters); a quantized subclass stores its weight in another."""
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def dense_weight(self) -> torch.Tensor:
        """The base weight (out, in) in the model dtype (a quantized subclass dequantizes it)."""
        return self.weight

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The base projection alone: x (..., in) -> (..., out)."""
        return F.linear(x, self.weight)

    @torch.no_grad()
    def merge(self, name: str) -> int:
        """Build the merged weight of adapter `name` (the base weight is untouched) -> bytes added (0 if it
        already exists). Computed in fp32, then cast once to the weight's dtype."""
        if name not in self.lora_A:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {sorted(self.lora_A)})")
        if name in self.merged:
            return 0
        w = self.dense_weight().float() + self.scale[name] * (self.lora_B[name].float() @ self.lora_A[name].float())
        self.merged[name] = w.to(self.dtype).contiguous()  # (out, in)
        return self.merged[name].numel() * self.merged[name].element_size()

    def unmerge(self) -> None:
        """Drop every merged copy (memory returns once nothing else, e.g. an engine, holds them)."""
        self.merged.clear()

    def _low(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """(alpha / r) * A(dropout(x)): the scale is applied in the small rank space, not on the output."""
        if self.training and self.dropout[name] > 0:
            x = F.dropout(x, self.dropout[name])
        return F.linear(x, self.lora_A[name]) * self.scale[name]  # (..., r)

    def _add_delta(self, y: torch.Tensor, h: torch.Tensor, name: str) -> torch.Tensor:
        """y + B(h) as one GEMM with the add in its epilogue (beta=1): no separate pass over the wide output."""
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B[name].t())
        return out.view(y.shape)  # (N, out) -> y's shape

    def forward(self, x: torch.Tensor, plan: AdapterPlan = NO_ADAPTER) -> torch.Tensor:
        """x: (B, T, in) -> (B, T, out)."""
        if self.merged and len(plan.groups) == 1 and plan.groups[0][1] is None and not self.training:
            # The whole batch runs one adapter and its merged copy exists: one GEMM instead of three. Never
            # while training: the LoRA parameters would get no gradient.
            merged = self.merged.get(plan.groups[0][0])
            if merged is not None:
                return F.linear(x, merged)
        y = self.base(x)
        if plan.rows is not None:
            flat = lora_kernels.apply(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), self.table(plan.names),
                                      plan.rows)  # (B*T, out)
            return flat.view(y.shape)
        for g, (name, rows) in enumerate(plan.groups):
            if name not in self.lora_A:
                raise KeyError(f"adapter {name!r} is not loaded (loaded: {sorted(self.lora_A)})")
            if rows is None:
                y = self._add_delta(y, self._low(x, name), name)
            elif plan.masked:
                # 0/1 row mask on the rank-space activations: the same product, r columns instead of `out`.
                y = self._add_delta(y, self._low(x, name) * rows.to(y.dtype), name)
            elif plan.per_token:
                flat_x = x.reshape(-1, x.shape[-1])  # (B*T, in)
                delta = F.linear(self._low(flat_x.index_select(0, rows), name), self.lora_B[name])
                span = plan.ranges[g] if plan.ranges else None
                if span is not None and not torch.is_grad_enabled():  # y is this call's own output: in place
                    y.view(-1, y.shape[-1])[span[0]:span[1]].add_(delta)
                else:
                    y = y.reshape(-1, y.shape[-1]).index_add(0, rows, delta).view(y.shape)  # (B*T, out) -> (B, T, out)
            else:
                delta = F.linear(self._low(x.index_select(0, rows), name), self.lora_B[name])
                y = y.index_add(0, rows, delta)
        return y


def merge_adapter(net: nn.Module, name: str) -> int:
    """Merge adapter `name` into a weight copy in every LoraLinear of `net` -> bytes added.

    Why: a batch all on one adapter (transcription: every request on "speech") then costs one GEMM per
    projection instead of three; at batch 64 decode the two small LoRA GEMMs were ~16% of GPU time. The price
    is a second copy of every decoder weight (~6.4 GB in bf16 for the full model). The merged path equals the
    unmerged one only up to rounding: `W + s * B @ A` is rounded once to the weight dtype (bf16 on GPU), where
    the unmerged path rounds `W x` and `B(A x)` separately, so greedy tokens can differ where logits nearly tie.
    """
    layers = [m for m in net.modules() if isinstance(m, LoraLinear)]
    loaded = sorted({n for m in layers for n in m.lora_A})
    if not layers or any(name not in m.lora_A for m in layers):
        raise ValueError(f"cannot merge adapter {name!r}: it is not loaded in every LoRA layer (loaded: "
                         f"{loaded}); pick one of those, or load the checkpoint with its adapters")
    return sum(m.merge(name) for m in layers)


def unmerge_adapters(net: nn.Module) -> None:
    """Drop every merged copy made by `merge_adapter`: all plans go back to base weight + LoRA."""
    for m in net.modules():
        if isinstance(m, LoraLinear):
            m.unmerge()
