"""What the commands share: loading --model and building an engine from the engine flags (EngineOptions)."""
from __future__ import annotations

from typing import Any


def load_model(args: Any) -> Any:
    """Load --model (the embedded micro model when none was given) with --device / --dtype."""
    import phi4mm
    return phi4mm.load(args.model, device=args.device, dtype=args.dtype)


def engine_options(args: Any, **changes: Any) -> Any:
    """EngineOptions from the engine flags a command has (vLLM's names)."""
    from phi4mm.options import EngineOptions
    given = {"max_model_len": getattr(args, "max_model_len", None),
             "gpu_memory_utilization": getattr(args, "gpu_memory_utilization", None),
             "max_num_seqs": getattr(args, "max_batch", None), "merge_adapter": getattr(args, "merge_adapter", None)}
    return EngineOptions().but(**{k: v for k, v in {**given, **changes}.items() if v is not None})


def engine_takes_options() -> bool:
    """Whether Engine(model, options=EngineOptions(...)) is how this engine is built."""
    import inspect

    from phi4mm.engine.engine import Engine
    return "options" in inspect.signature(Engine).parameters


def make_engine(model: Any, options: Any) -> Any:
    """An Engine on `model` run as `options` says."""
    from phi4mm.engine.engine import Engine, cpu_kv_blocks
    if engine_takes_options():
        return Engine(model, options=options)
    # An engine that predates EngineOptions takes its fields one by one (max_model_len and the memory share
    # are then the engine's own defaults).
    blocks = options.num_blocks if options.num_blocks is not None else cpu_kv_blocks(model.device)
    return Engine(model, num_blocks=blocks, block_size=options.block_size, max_batch=options.max_num_seqs,
                  max_tokens_per_step=options.max_tokens_per_step, max_waiting=options.max_waiting,
                  prefix_caching=options.prefix_caching, media_cache_items=options.media_cache_items,
                  static_decode=options.static_decode, merge_adapter=options.merge_adapter)
