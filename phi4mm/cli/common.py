"""What the commands share: the model they load and the engine they run it on, from their flags."""
from __future__ import annotations

from typing import Any


def load_model(args: Any) -> Any:
    """Load --model (the embedded micro model when none was given) with --device / --dtype."""
    import phi4mm
    return phi4mm.load(args.model, device=args.device, dtype=args.dtype,
                       quantization=getattr(args, "quantization", None),
                       quantize_head=getattr(args, "quantize_head", False))


def engine_options(args: Any, **changes: Any) -> Any:
    """EngineOptions from the engine flags a command has (vLLM's names)."""
    from phi4mm.options import EngineOptions
    given = {"max_model_len": getattr(args, "max_model_len", None),
             "gpu_memory_utilization": getattr(args, "gpu_memory_utilization", None),
             "max_num_seqs": getattr(args, "max_batch", None), "merge_adapter": getattr(args, "merge_adapter", None),
             "graph_warmup_seconds": getattr(args, "graph_warmup_seconds", None)}
    return EngineOptions().but(**{k: v for k, v in {**given, **changes}.items() if v is not None})


def make_engine(model: Any, options: Any) -> Any:
    """An Engine on `model` run as `options` says."""
    from phi4mm.engine.engine import Engine
    return Engine(model, options=options)
