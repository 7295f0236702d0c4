"""torch.distributed helpers: set-up from torchrun's environment and reductions that are no-ops without
a process group (so single-process code and tests need no special cases)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """rank / world_size / local_rank of this process; ``owns_group``: True if :func:`setup` created the
    process group (and so :func:`teardown` should destroy it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def setup(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's env vars (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), or reuse one that already exists. Backend: nccl for CUDA, gloo
    otherwise. Without those env vars (or with WORLD_SIZE=1) this is a single process."""
    if is_active():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def teardown(info: DistInfo) -> None:
    if info.owns_group and is_active():
        dist.destroy_process_group()


def all_reduce_min(x: float) -> float:
    """Minimum of a float over ranks (``x`` itself without a process group)."""
    if not is_active():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maximum of a list of floats over ranks (the list itself without a process group)."""
    if not is_active():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, …]; ``[obj]`` without a process group."""
    if not is_active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_active():
        dist.barrier()


def _comm_device() -> torch.device:
    # nccl only reduces CUDA tensors; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
