"""Joining a Ray cluster, shared by batch jobs on replicas (`tasks.batch`) and server replicas (`serve.replicas`)."""
from __future__ import annotations

from typing import Any


def connect(address: str | None, what: str, device: str, gpus: float) -> tuple[Any, bool, str]:
    """Ray, joined to the cluster at `address` (default: the one `ray start` made here, else a new local one)
    unless this process already is. Returns (the ray module, whether this call started it, the replicas'
    device: "cuda" when they get GPUs, since Ray sets each one's CUDA_VISIBLE_DEVICES to its own)."""
    try:
        import ray
    except ImportError as e:
        raise ValueError(f"{what} needs Ray: pip install 'phi4mm[ray]' (or run without --replicas)") from e
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    return ray, started, "cuda" if gpus > 0 and device == "cpu" else device
