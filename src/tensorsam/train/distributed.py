"""DDP and FSDP2 set-up under ``torchrun``: the process group, the device, the wrapper, and the rank.

Launched by ``torchrun --nproc-per-node N`` (on one machine or several, see ``docs/scaling.md``),
:func:`setup` joins the process group (NCCL on GPUs, gloo on CPUs) from the environment torchrun
sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, the rendezvous); started as a plain process it does
nothing and training runs on one process.  :func:`wrap` then applies the strategy:

- ``ddp`` (the default): a whole replica per process in ``DistributedDataParallel`` (nothing on
  one process);
- ``fsdp``: FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over the
  ranks (DTensors), checkpoints written with ``torch.distributed.checkpoint``
  (:mod:`tensorsam.train.checkpoint`).  It needs a process group even on one process:
  ``torchrun --nproc-per-node 1`` is a world of size 1.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys

import torch
from torch import nn

from tensorsam.norms import dtensor_class

STRATEGIES = ("ddp", "fsdp")
TORCHRUN_HINT = ("launch it with torchrun, e.g. `torchrun --nproc-per-node 2 -m tensorsam vision "
                 "--distributed fsdp ...` (`--nproc-per-node 1` for one process: a world of size 1)")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    strategy: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside ``torch.distributed``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting ``RANK`` and ``WORLD_SIZE``) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_strategy(strategy: str) -> str:
    """``strategy`` if it is one of :data:`STRATEGIES`; ``fsdp`` also needs a process group (or torchrun's
    environment to make one)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown distributed strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    dist = torch.distributed
    joined = dist.is_available() and dist.is_initialized()
    if strategy == "fsdp" and not (joined or launched_by_torchrun()):
        raise ValueError("--distributed fsdp shards the model over the processes of a torchrun job, and this "
                         f"process was not started by torchrun: {TORCHRUN_HINT}")
    return strategy


def setup(device: str = "auto", backend: str | None = None, strategy: str = "ddp") -> DistInfo:
    """Join the process group if torchrun started this process; pick the device (``auto``: this
    process's GPU if there is one, else the CPU); check ``strategy`` (``ddp`` or ``fsdp``)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    check_strategy(strategy)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dist = torch.distributed
    if launched_by_torchrun() and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    rank, world = rank_and_world()
    if use_cuda:
        index = local_rank if device == "auto" or device == "cuda" else torch.device(device).index
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank, world, local_rank, dev, strategy)


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` on ``info.device``: sharded with FSDP2 under ``fsdp`` (build the optimizer after
    this: sharding replaces the parameters), in ``DistributedDataParallel`` under ``ddp`` when there
    are several processes, else as it is."""
    model = model.to(info.device)
    if info.strategy == "fsdp":
        return shard(model, info.device)
    if info.world_size == 1:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _blocks(module: nn.Module):
    """The outermost modules with parameters that sit in an ``nn.Sequential`` or ``nn.ModuleList``
    (a ResNet's residual blocks, a transformer's layers): FSDP2's units of all-gather."""
    container = isinstance(module, (nn.Sequential, nn.ModuleList))
    for child in module.children():
        if container and any(True for _ in child.parameters()):
            yield child
        else:
            yield from _blocks(child)


def shard(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """FSDP2 over every rank of the default process group (a 1-D mesh): ``fully_shard`` on each
    block (:func:`_blocks`), then on the root for the parameters left (stem, head).  Buffers
    (BatchNorm statistics) are not sharded: as DDP does, rank 0's are broadcast before every
    forward (:func:`sync_buffers`), so every rank evaluates and saves the same model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"FSDP2 needs a process group: {TORCHRUN_HINT}")
    device = device or next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in list(_blocks(model)):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if dist.get_world_size() > 1 and any(True for _ in model.buffers()):
        model.register_forward_pre_hook(lambda module, args: sync_buffers(module))
    return model


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers: one broadcast per dtype (no-op on one process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    by_kind: dict = {}
    for b in model.buffers():
        by_kind.setdefault((b.dtype, b.device), []).append(b)
    for bufs in by_kind.values():
        flat = torch._utils._flatten_dense_tensors(bufs)
        dist.broadcast(flat, src=0)
        for b, value in zip(bufs, torch._utils._unflatten_dense_tensors(flat, bufs)):
            b.copy_(value)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the model itself otherwise, FSDP2's included)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FSDPModule", None)
    return [] if cls is None else [m for m in unwrap(model).modules() if isinstance(m, cls)]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded: FSDP2 modules in it, or DTensor parameters."""
    dt = dtensor_class()
    return bool(_fsdp_modules(model)) or (dt is not None and any(isinstance(p, dt) for p in unwrap(model).parameters()))


def resharded(model: nn.Module) -> nn.Module:
    """``model`` with every FSDP2 module's parameters sharded again: after a forward pass without a
    backward one (an evaluation), FSDP2 keeps the root's parameters whole, which its state-dict
    functions do not expect."""
    for m in _fsdp_modules(model):
        m.reshard()
    return unwrap(model)


def full_state_dict(model: nn.Module) -> dict:
    """A CPU copy of ``unwrap(model).state_dict()`` with every sharded tensor gathered whole (then a
    collective: every rank must call it), as one process would have it."""
    net = unwrap(model)
    if is_sharded(net):
        resharded(net)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
    else:
        state = net.state_dict()
    return {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in state.items()}


def load_full_state_dict(model: nn.Module, state: dict) -> None:
    """Load a whole (unsharded) state dict such as :func:`full_state_dict`'s; a sharded model takes
    its shards of it (every rank must call it)."""
    net = unwrap(model)
    if is_sharded(net):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # a copy: torch puts the distributed tensors it makes into the dict it is given
        set_model_state_dict(resharded(net), dict(state), options=StateDictOptions(full_state_dict=True))
    else:
        net.load_state_dict(state)


def cleanup() -> None:
    """Leave the process group (no-op outside one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
