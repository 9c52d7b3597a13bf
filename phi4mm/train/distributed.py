"""Training over several processes (torchrun): the process group, sums over ranks, and FSDP2 sharding."""
from __future__ import annotations

import os

import torch
from torch import nn


def shard(loss_mod: nn.Module, model, world: int) -> None:
    """FSDP2 (`fully_shard`): each decoder layer, SigLIP layer and conformer block is a group of its own (its
    weights are gathered just before it runs and freed after), the rest (embeddings, norms, projectors, a CTC
    head) the root's. bf16 runs gather in bf16 and reduce gradients in fp32 (the trained fp32 masters and the
    frozen bf16 weights share groups)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(model.device.type, (world,))
    policy = MixedPrecisionPolicy() if model.dtype == torch.float32 else \
        MixedPrecisionPolicy(param_dtype=model.dtype, reduce_dtype=torch.float32)
    net = model.net
    blocks = list(net.layers)
    if net.vision is not None:
        blocks += list(net.vision.img_processor.encoder.layers)
    if net.audio is not None:
        blocks += list(net.audio.encoder.encoders)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(loss_mod, mesh=mesh, mp_policy=policy)


def init_distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun (WORLD_SIZE > 1) the process group is initialised here."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def finish_distributed() -> None:
    """Leave the process group: every rank first waits at a barrier, so no rank tears its connections down while
    a peer still has gloo or NCCL work in flight (an early leaver can abort the other with SIGABRT)."""
    import gc

    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # FSDP state caught in reference cycles lets go of its pending work while the group still lives
    dist.barrier()
    dist.destroy_process_group()


def all_sum(x: float, world: int, device: torch.device) -> float:
    """x summed over the ranks (x itself in one process)."""
    if world <= 1:
        return x
    import torch.distributed as dist
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(float(x), dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.item()

