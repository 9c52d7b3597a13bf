"""The serving engine: continuous batching over a paged KV cache (see docs/architecture.md).

`from phi4mm.engine import Engine` is the public entry point; the rooms are `engine.py` (the facade),
`scheduler.py`, `runner.py`, `sequence.py`, `kv_cache.py`, `graphs.py` and `async_engine.py`.
"""
from phi4mm.engine.engine import (
    CacheFull,
    Engine,
    EngineBusy,
    StepOutput,
    cpu_kv_blocks,
)

__all__ = ["CacheFull", "Engine", "EngineBusy", "StepOutput", "cpu_kv_blocks"]
