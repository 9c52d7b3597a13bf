"""Training checkpoints for an exact resume: trained tensors, optimizer and scheduler state, RNG states and the
data position (`out/checkpoint-STEP/`). FSDP runs write their shards through torch.distributed.checkpoint."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

# FSDP checkpoints: every rank writes its shards of the trained tensors and their optimizer state through
# torch.distributed.checkpoint (frozen weights are not written: they come from the base again).
_SHARDED = "sharded"


def _sharded_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # strict=False: the frozen weights are absent by design; dcp.load itself fails on a missing trained tensor.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_state(path: Path, trainables: dict[str, nn.Parameter], opt, sched, stage: str, step: int, epoch: int,
             pos: int, losses: list[float], sharded: nn.Module | None = None, rank: int = 0) -> None:
    """A resumable checkpoint. sharded: the FSDP root (every rank calls; rank 0 also writes the rest)."""
    path.mkdir(parents=True, exist_ok=True)
    if sharded is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(sharded, opt, options=_sharded_options())
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / _SHARDED))
        if rank != 0:
            return
    else:
        save_file({n: p.detach().contiguous() for n, p in trainables.items()}, str(path / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict() if sharded is None else None, "scheduler": sched.state_dict()},
               path / "optimizer.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(rng, path / "rng.pt")
    (path / "state.json").write_text(json.dumps({"stage": stage, "step": step, "epoch": epoch, "position": pos,
                                                 "losses": losses, "fsdp": sharded is not None}, indent=1))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest out/checkpoint-STEP folder, None when there is none."""
    found = [(int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(found)[1] if found else None


def load_state(path: Path, trainables: dict[str, nn.Parameter], opt, sched, stage: str,
               sharded: nn.Module | None = None) -> tuple[int, int, int, list[float]]:
    """Restore a save_state checkpoint into the run; returns (step, epoch, data position, losses so far)."""
    if not (path / "state.json").is_file():
        raise ValueError(f"{path} is not a training checkpoint (no state.json); pass an out/checkpoint-STEP folder")
    state = json.loads((path / "state.json").read_text())
    if state["stage"] != stage:
        raise ValueError(f"{path} was written by stage {state['stage']!r}, not {stage!r}")
    written_sharded = bool(state.get("fsdp", False))
    if written_sharded != (sharded is not None):
        raise ValueError(f"{path} was written by {'an FSDP' if written_sharded else 'a non-FSDP'} run; resume it "
                         f"{'with' if written_sharded else 'without'} --fsdp")
    if sharded is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_state_dict,
            set_state_dict,
        )
        model_sd, optim_sd = get_state_dict(sharded, opt, options=_sharded_options())
        dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / _SHARDED))
        set_state_dict(sharded, opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=_sharded_options())
    else:
        saved = load_file(str(path / "trainable.safetensors"))
        if sorted(saved) != sorted(trainables):
            raise ValueError(f"{path} holds {len(saved)} trainable tensors, this run trains {len(trainables)}; "
                             "resume with the same stage and lora_rank")
        with torch.no_grad():
            for n, p in trainables.items():
                p.copy_(saved[n])
    o = torch.load(path / "optimizer.pt", weights_only=False)
    if sharded is None:
        opt.load_state_dict(o["optimizer"])
    sched.load_state_dict(o["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"], state["epoch"], state["position"], state["losses"]
