"""Checkpoints of sharded (FSDP2) training, written with ``torch.distributed.checkpoint`` (DCP).

A sharded run's checkpoint path (e.g. a sweep cell's ``.work/<cell>_fit.ckpt``) is a directory::

    CKPT/latest                  text file: the name of the newest complete checkpoint
    CKPT/step-00000006/          the checkpoint after iteration 6
        .metadata                DCP: where each tensor's pieces lie; the non-tensor entries
        __0_0.distcp             DCP: the shards rank 0 wrote (one file per rank)
        __1_0.distcp
        loop.pt                  rank 0: the loop's state (iteration, RNG streams, extra, fingerprint,
                                 scheduler, scaler, tracker, best state), read with weights_only=True
    CKPT/.step-00000007.*.tmp/   a checkpoint being written

The DCP part is ``{"model": ..., "optimizer": ...}`` from ``get_state_dict``: keyed by parameter
name (FQN), each rank saving its own shards, so a checkpoint written by N processes loads into M
(DCP reshards on load).  The optimizer's param groups, which hold the wrapper's counters and SAM's
seed, are non-tensor entries of it, read back with ``weights_only=True`` as well.  Every rank writes
its files into a temporary directory that rank 0 made; rank 0 then fsyncs it, renames it to
``step-<iteration>`` and points ``latest`` at it (:func:`tensorsam.run.io.finish_directory`), so a
process killed at any point leaves ``latest`` naming a complete checkpoint.  All ranks must see one
file system (shared storage across machines).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from tensorsam.run.io import (
    atomic_torch_save,
    begin_directory,
    finish_directory,
    latest_directory,
    load_checkpoint,
)
from tensorsam.run.loop import Loop
from tensorsam.train.distributed import is_sharded, resharded, sync_buffers, unwrap

LOOP_FILE = "loop.pt"


def step_name(iteration: int) -> str:
    """The directory name of the checkpoint after ``iteration`` (sorts by iteration)."""
    return f"step-{iteration:08d}"


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def on_rank0(fn: Callable):
    """``fn()`` run by rank 0, its result handed to every rank (one broadcast); an error there is
    raised on every rank (a ``ValueError`` stays one), so that no rank waits for the others forever."""
    if not _distributed():
        return fn()
    dist = torch.distributed
    box: list = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except Exception as err:  # noqa: BLE001 - handed to every rank, re-raised below
            error, box = err, [("error", (type(err) is ValueError, f"{type(err).__name__}: {err}"))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if error is not None:
        raise error
    if kind == "error":
        is_value, text = value
        raise (ValueError if is_value else RuntimeError)(f"rank 0 failed: {text}")
    return value


def sharded_state(model, optimizer) -> dict:
    """``{"model", "optimizer"}`` from DCP's ``get_state_dict`` (FQN-keyed, sharded tensors as DTensors);
    it creates the optimizer's state first if there is none (a zero-gradient, lr-0 ``step()``)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(resharded(model), optimizer)
    return {"model": model_state, "optimizer": optim_state}


def _weights_only_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's default load planner, except that every non-tensor entry is first read with
        ``torch.load(weights_only=True)``: a checkpoint holding other objects is refused, not unpickled."""

        def load_bytes(self, read_item, value):
            data = value.read()
            try:
                torch.load(io.BytesIO(data), weights_only=True)
            except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
                raise ValueError(f"entry {read_item.dest_index.fqn!r} is not plain data (tensors, numbers, "
                                 f"strings, lists, dicts): {type(err).__name__}") from None
            super().load_bytes(read_item, io.BytesIO(data))

    return WeightsOnlyLoadPlanner()


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines[:3])[:600]


def save_sharded(parent, iteration: int, model, optimizer, loop_state: Callable[[], dict], *,
                 verify: bool = False) -> Path:
    """Write the checkpoint after ``iteration`` into ``parent`` (see the module docstring); every rank
    must call it.  ``loop_state()`` (called on rank 0 only) is the rest, saved as :data:`LOOP_FILE`;
    ``verify`` reads that back with ``weights_only=True`` before anything is published."""
    from torch.distributed.checkpoint import save

    sync_buffers(unwrap(model))                      # rank 0's BatchNorm statistics, as the next forward has
    state = sharded_state(model, optimizer)
    name = step_name(iteration)
    tmp = on_rank0(lambda: begin_directory(parent, name))
    try:
        save(state, checkpoint_id=tmp)
        on_rank0(lambda: atomic_torch_save(loop_state(), Path(tmp) / LOOP_FILE, verify=verify))
    except BaseException:
        if not _distributed() or torch.distributed.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return on_rank0(lambda: finish_directory(parent, name, tmp))


def load_sharded(directory, model, optimizer) -> dict:
    """Load a checkpoint written by :func:`save_sharded` (by any number of processes) into ``model``
    and ``optimizer``, in place; returns its loop state.  Every rank must call it."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import set_state_dict

    directory = Path(directory)
    state = sharded_state(model, optimizer)
    try:
        load(state, checkpoint_id=directory, planner=_weights_only_planner())
        set_state_dict(unwrap(model), optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise ValueError(f"checkpoint {directory} does not fit this run's model and optimizer: "
                         f"{type(err).__name__}: {_first_line(err)}") from None
    return load_checkpoint(directory / LOOP_FILE)


class ShardedLoop(Loop):
    """A :class:`~tensorsam.run.Loop` whose checkpoints are DCP directories (module docstring): the
    sharded ``model`` and ``optimizer`` go through DCP, the objects of ``state`` (scheduler, tracker,
    best state: the same on every rank) into rank 0's loop file.  Every rank builds it, resumes and
    saves together.  A fresh run (no ``resume``) clears what an earlier one left at ``checkpoint``."""

    def __init__(self, total: int, *, model, optimizer, state: dict, checkpoint=None, resume: bool = False,
                 **kwargs):
        super().__init__(total, state=state, checkpoint=checkpoint, resume=False, **kwargs)
        self.model, self.optimizer = model, optimizer
        if self.checkpoint is None:
            return
        path = self.checkpoint
        if resume and path.is_file():
            raise ValueError(f"cannot resume from {path}: it is the checkpoint file of an unsharded run (DDP or one "
                             "process), and this run is sharded (FSDP2); resume it with --distributed ddp, or "
                             "start afresh without --resume")
        latest = on_rank0(lambda: latest_directory(path) if resume else _clear(path))
        if latest is not None:
            self._restore(load_sharded(latest, model, optimizer))
            self.iteration = self.start

    def save(self) -> None:
        """Write a checkpoint now (every rank; no-op without a checkpoint path)."""
        if self.checkpoint is None:
            return
        save_sharded(self.checkpoint, self.iteration, self.model, self.optimizer, self.state_dict,
                     verify=not self._verified)
        self._verified = True


def _clear(path: Path) -> None:
    """Remove an earlier run's checkpoint (a file or a directory) at ``path``."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def make_loop(total: int, *, model, optimizer, state: dict, checkpoint=None, resume: bool = False,
              **kwargs) -> Loop:
    """The clock of a training run: a :class:`ShardedLoop` (DCP directories) when ``model`` is sharded,
    else a :class:`~tensorsam.run.Loop` with one checkpoint file holding the model and the optimizer
    too.  Resuming either from the other's kind of checkpoint is refused with a message saying how."""
    if is_sharded(model):
        return ShardedLoop(total, model=model, optimizer=optimizer, state=state, checkpoint=checkpoint,
                           resume=resume, **kwargs)
    path = None if checkpoint is None else Path(checkpoint)
    if path is not None and path.is_dir():
        if resume:
            raise ValueError(f"cannot resume from {path}: it holds the DCP checkpoints of a sharded run (FSDP2), "
                             "and this run is not sharded; resume it with --distributed fsdp under torchrun, or "
                             "start afresh without --resume")
        on_rank0(lambda: _clear(path))
    return Loop(total, state={"model": unwrap(model), "optimizer": optimizer, **state}, checkpoint=checkpoint,
                resume=resume, **kwargs)
