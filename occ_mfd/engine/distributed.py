"""torch.distributed helpers: set-up from torchrun's environment and reductions that are no-ops without
a process group (so single-process code and tests need no special cases)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DeviceUnavailable(RuntimeError):
    """The device asked for does not exist here (no CUDA build of torch, no visible GPU, index out of range)."""


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, or :class:`DeviceUnavailable` with one line saying what to do. Checks
    CUDA only (CPU always exists); does not initialise CUDA beyond what ``torch.cuda.device_count`` does."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceUnavailable(f"--device {device!r}: not a device ({e}); use cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if torch.version.cuda is None:
        raise DeviceUnavailable(
            f"--device {device}: this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of "
            f"torch (README: 'Installing on a GPU machine') or use --device cpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise DeviceUnavailable(
            f"--device {device}: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU{hint}; "
            f"check nvidia-smi and the driver, or use --device cpu")
    if device.index is not None and device.index >= n:
        raise DeviceUnavailable(f"--device {device}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
    return device


@dataclass(frozen=True)
class DistInfo:
    """rank / world_size / local_rank of this process; ``owns_group``: True if :func:`setup` created the
    process group (and so :func:`teardown` should destroy it); ``device``: this rank's device
    (``cuda:local_rank`` for CUDA under torchrun, already made current)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_device(device: str | torch.device, local_rank: int) -> torch.device:
    """This rank's device: a CUDA device without an index becomes ``cuda:local_rank``; others are kept."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


def setup(device: str | torch.device) -> DistInfo:
    """Join the process group described by torchrun's env vars (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), or reuse one that already exists. Backend: nccl for CUDA, gloo
    otherwise. Without those env vars (or with WORLD_SIZE=1) this is a single process.

    ``device``: ``"cpu"``, ``"cuda"`` (→ ``cuda:LOCAL_RANK``) or ``"cuda:N"`` (kept). For CUDA the order is the
    one torch documents for NCCL: ``torch.cuda.set_device`` first, then ``init_process_group(...,
    device_id=...)``, which binds the communicator to this rank's GPU (collectives, ``barrier`` and
    ``all_gather_object`` then never touch another rank's GPU). A missing GPU raises :class:`DeviceUnavailable`.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = rank_device(device, local_rank)
    if dev.type == "cuda":
        check_device(dev)
        torch.cuda.set_device(dev)
    if is_active():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False, dev)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(local_rank=local_rank, device=dev)
    if dev.type == "cuda":
        dist.init_process_group(backend="nccl", init_method="env://", device_id=dev)
    else:
        dist.init_process_group(backend="gloo", init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True, dev)


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
    if not is_active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])  # this rank's GPU, not a guess of NCCL's
    else:
        dist.barrier()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (moved to the backend's device and back); ``t`` itself without a group."""
    if not is_active():
        return t
    c = t.to(_comm_device())
    dist.all_reduce(c, op=dist.ReduceOp.SUM)
    if c is not t:
        t.copy_(c)
    return t


def _comm_device() -> torch.device:
    # nccl only reduces CUDA tensors; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
