"""DDP set-up under ``torchrun``: the process group, the device, the wrapper, and the rank.

Launched by ``torchrun --nproc-per-node N``, :func:`setup` joins the process group (NCCL on GPUs,
gloo on CPUs) from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, the
master address); started as a plain process it does nothing and training runs on one process.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside ``torch.distributed``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup(device: str = "auto", backend: str | None = None) -> DistInfo:
    """Join the process group if torchrun started this process; pick the device (``auto``: this
    process's GPU if there is one, else the CPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dist = torch.distributed
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    rank, world = rank_and_world()
    if use_cuda:
        index = local_rank if device == "auto" or device == "cuda" else torch.device(device).index
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank, world, local_rank, dev)


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` on ``info.device``, in ``DistributedDataParallel`` when there are several processes."""
    model = model.to(info.device)
    if info.world_size == 1:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def cleanup() -> None:
    """Leave the process group (no-op outside one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
