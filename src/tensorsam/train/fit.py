"""``fit``: the epoch loop over batches, on the resumable clock (:class:`tensorsam.run.Loop`).

- **Batches.** Each epoch's order is a permutation drawn from (``seed``, epoch), so a checkpoint of
  the global step fixes both the epoch's shuffle and the position in it: a run killed mid-epoch
  resumes at the same batch, bit-identically on the CPU.  Under ``torch.distributed`` every rank
  draws the same permutation and takes every ``world_size``-th index of it (``batch_size`` is per
  rank); the last incomplete batch of an epoch is dropped.
- **Evaluation** every ``eval_every`` steps, or at the end of every epoch (``None``), and after the
  last step: loss and accuracy on ``val`` and, if given, ``test`` (the test split is scored only
  there and never chooses anything).  The best state on validation accuracy is kept.
- **Per step**: :func:`tensorsam.train.steps.train_step`, then ``scheduler.step()`` (per-iteration
  schedules) and ``tracker.record(step)`` (a :class:`~tensorsam.dynamics.NormTracker`).
- **Checkpoints** (model, optimizer, scheduler, scaler, tracker, best state, history, RNG streams)
  every ``checkpoint_every`` steps, on SIGINT/SIGTERM and at the end; under ``torch.distributed``
  rank 0 writes and every rank resumes from the same file.  A sharded model (FSDP2, see
  :func:`tensorsam.train.distributed.shard`) checkpoints into a directory of
  ``torch.distributed.checkpoint`` checkpoints instead (:mod:`tensorsam.train.checkpoint`), which
  resumes on any number of processes: with the same global batch (``batch_size`` x world size),
  every step after the resume takes the same examples as the run that wrote it.
- **FSDP2**: SAM's first pass is always the global gradient (``sam_sync=True``, the one meaning
  sharded weights allow), and the best state is gathered whole on every rank.
- **Divergence** is a result: each step's loss goes into a :class:`~tensorsam.run.loop.Divergence`
  on the device (no host sync in the step), read at each evaluation point.  A diverged run stops
  there, without evaluating or touching the best state, and returns ``status='diverged'`` with
  ``diverged_at`` (the step, 1-based); with a GradScaler or ``skip_nonfinite`` only a non-finite
  loss that persists counts (see :class:`~tensorsam.run.loop.Divergence`).  Without either, a
  non-finite validation or test loss at an evaluation point (weights made non-finite by the last
  step) is a divergence at the next step, ``done + 1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tensorsam.run.loop import Divergence
from tensorsam.train.checkpoint import make_loop, on_rank0
from tensorsam.train.distributed import full_state_dict, is_sharded, rank_and_world
from tensorsam.train.steps import train_step

Data = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: the per-evaluation ``history`` (list of dicts), the final and
    best-on-validation metrics, the best state (a ``state_dict`` of CPU tensors, or ``None``
    without validation data), the median seconds per training step (evaluation excluded), and
    ``status``: ``'ok'``, or ``'diverged'`` with ``diverged_at`` (the step; then ``final`` is empty,
    the history and the best state are those before the divergence)."""

    history: list[dict]
    final: dict
    best_val_acc: float | None
    best_step: int | None
    test_acc_at_best_val: float | None
    best_state: dict | None
    seconds_per_step: float | None
    steps: int
    status: str = "ok"
    diverged_at: int | None = None


class _Best:
    """The best-on-validation model state, checkpointed with the run."""

    def __init__(self):
        self.state: dict | None = None

    def state_dict(self) -> dict:
        return {"state": self.state}

    def load_state_dict(self, sd: dict) -> None:
        self.state = sd["state"]


def _batched_outputs(model: nn.Module, x: torch.Tensor, batch_size: int, autocast: Callable | None):
    """``(start, outputs)`` of ``model`` in eval mode over ``x`` in batches, on the model's device."""
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        with autocast() if autocast else contextlib.nullcontext():
            yield i, model(x[i:i + batch_size].to(device))


def evaluate(model: nn.Module, data: Data, batch_size: int = 1024, loss_fn: Callable = F.cross_entropy,
             autocast: Callable | None = None) -> dict:
    """Mean loss and accuracy of ``model`` (in eval mode, restored afterwards) on ``data``; one host
    read per call."""
    x, y = data
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    with torch.no_grad():
        for i, out in _batched_outputs(model, x, batch_size, autocast):
            yb = y[i:i + batch_size].to(device)
            loss_sum += loss_fn(out.float(), yb, reduction="sum").double()
            correct += (out.argmax(1) == yb).sum()
    model.train(was)
    loss, acc = (torch.stack([loss_sum, correct.double()]) / max(1, len(y))).tolist()
    return {"loss": loss, "acc": acc}


def accuracies(model: nn.Module, x: torch.Tensor, labels: dict[str, torch.Tensor], batch_size: int = 1024,
               autocast: Callable | None = None) -> dict[str, float]:
    """``{name: accuracy}`` of one forward pass over ``x`` against each label set (e.g. the noisy and the
    clean labels of the training images); eval mode, restored afterwards; one host read."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros(len(labels), device=device, dtype=torch.int64)
    with torch.no_grad():
        for i, out in _batched_outputs(model, x, batch_size, autocast):
            pred = out.argmax(1)
            correct += torch.stack([(pred == y[i:i + batch_size].to(device)).sum() for y in labels.values()])
    model.train(was)
    return dict(zip(labels, (correct.double() / max(1, len(x))).tolist()))


def _check_data(name: str, data) -> Data:
    if not (isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        raise ValueError(f"{name} must be a pair (inputs, labels) of tensors")
    x, y = data
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} inputs but {len(y)} labels")
    return x, y


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, train: Data, *, epochs: int, batch_size: int,
        val: Data | None = None, test: Data | None = None, loss_fn: Callable = F.cross_entropy,
        micro_batches: int = 1, eval_every: int | None = None, scheduler=None, tracker=None,
        scaler: torch.amp.GradScaler | None = None, autocast: Callable | None = None,
        clip_grad_norm: float | None = None, sam_sync: bool | None = None, batch_transform: Callable | None = None,
        seed: int = 0, checkpoint=None, checkpoint_every: int = 500, resume: bool = False,
        progress: bool = True, desc: str = "", on_step: Callable[[int], None] | None = None,
        on_evaluate: Callable[[nn.Module], dict] | None = None, after_evaluation: Callable[[dict], None] | None = None,
        fingerprint: dict | None = None) -> FitResult:
    """Train ``model`` for ``epochs`` epochs of ``train`` (see the module docstring).

    ``micro_batches`` splits each batch for gradient accumulation (see :mod:`tensorsam.train.steps`
    for SAM's per-micro-batch ascent); ``batch_transform(x)`` augments a training batch (its random
    draws come from the global RNG, which checkpoints save); ``on_step(step)`` is called after each
    step (e.g. to stop a run in a test); ``on_evaluate(model)`` returns more metrics for each history
    row (e.g. :func:`accuracies` on the training images); ``after_evaluation(row)`` sees each finished
    row (e.g. to prune a search trial by raising).  ``fingerprint`` goes to the :class:`~tensorsam.run.Loop`: a
    checkpoint made with another one is not resumed from.  ``sam_sync`` (see
    :mod:`tensorsam.train.steps`) defaults to ``False`` (per-replica SAM under DDP) and is ``True``
    on a sharded model, where ``False`` is refused.
    """
    x, y = _check_data("train", train)
    val = None if val is None else _check_data("val", val)
    test = None if test is None else _check_data("test", test)
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("micro_batches", micro_batches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if batch_size % micro_batches:
        raise ValueError(f"batch_size {batch_size} is not a multiple of micro_batches {micro_batches}")
    sharded = is_sharded(model)
    if sharded and sam_sync is False:
        raise ValueError("sam_sync=False (each replica perturbs its own copy of w) needs whole replicas; under "
                         "FSDP2 the weights are sharded: leave sam_sync unset (True), or use DDP")
    sam_sync = sharded if sam_sync is None else sam_sync
    rank, world = rank_and_world()
    per_rank = len(y) // world
    steps_per_epoch = per_rank // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(y)} training examples over {world} process(es) make no batch of {batch_size}")
    total = epochs * steps_per_epoch
    every = eval_every or steps_per_epoch
    device = next(model.parameters()).device

    best = _Best()
    state = {"best": best}
    for name, obj in (("scheduler", scheduler), ("scaler", scaler), ("tracker", tracker)):
        if obj is not None:
            state[name] = obj
    loop = make_loop(total, model=model, optimizer=optimizer, state=state, checkpoint=checkpoint,
                     every=checkpoint_every, resume=resume, desc=desc, progress=progress, fingerprint=fingerprint)
    if not loop.resumed:
        loop.extra = {"history": [], "best_val_acc": -math.inf, "best_step": None, "test_at_best": None,
                      "loss_sum": torch.zeros((), device=device), "block": [], "block_steps": 0}
    ex = loop.extra
    ex["loss_sum"] = ex["loss_sum"].to(device)
    tolerant = scaler is not None or bool(getattr(optimizer, "skip_nonfinite", False))
    divergence = Divergence(ex, device, tolerant=tolerant)
    ex.setdefault("diverged_at", None)
    order, order_epoch, t_block = None, -1, time.perf_counter()
    model.train()
    for step in loop:
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            # on the data's device once per epoch, so that indexing a batch never copies an index to the GPU
            order, order_epoch = perm[rank::world][:per_rank].to(x.device), epoch
        idx = order[pos * batch_size:(pos + 1) * batch_size]
        xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        if batch_transform is not None:
            xb = batch_transform(xb)
        micro = list(zip(xb.chunk(micro_batches), yb.chunk(micro_batches)))
        loss = train_step(model, optimizer, loss_fn, micro, scaler=scaler, autocast=autocast,
                          clip_grad_norm=clip_grad_norm, sam_sync=sam_sync)
        if scheduler is not None:
            scheduler.step()
        if tracker is not None:
            tracker.record(step)
        done = step + 1
        divergence.update(loss, done)
        ex["loss_sum"] += loss
        ex["block_steps"] += 1
        loop.log(loss=loss)
        if done % every == 0 or done == total:
            ex["block"].append((time.perf_counter() - t_block) / ex["block_steps"])
            ex["diverged_at"] = divergence.read(done)
            if ex["diverged_at"] is not None:
                break
            row = _evaluation(model, val, test, done, epoch, ex, optimizer, autocast)
            if on_evaluate is not None:
                row.update(on_evaluate(model))
            if not tolerant and not all(math.isfinite(row.get(f"{k}_loss", 0.0)) for k in ("val", "test")):
                ex["history"].pop()           # weights made non-finite by the last step
                ex["diverged_at"] = done + 1
                break
            if val is not None and _improved(row["val_acc"] > ex["best_val_acc"], sharded):
                ex["best_val_acc"], ex["best_step"], ex["test_at_best"] = row["val_acc"], done, row.get("test_acc")
                best.state = full_state_dict(model)
            loop.log(loss=row["train_loss"], **({"val_acc": row["val_acc"]} if val is not None else {}))
            if after_evaluation is not None:
                after_evaluation(row)
            t_block = time.perf_counter()
        if on_step is not None:
            on_step(step)
    history, diverged = ex["history"], ex["diverged_at"]
    return FitResult(history=history, final=history[-1] if history and diverged is None else {},
                     best_val_acc=None if val is None or not history else ex["best_val_acc"],
                     best_step=ex["best_step"], test_acc_at_best_val=ex["test_at_best"], best_state=best.state,
                     seconds_per_step=statistics.median(ex["block"]) if ex["block"] else None, steps=total,
                     status="ok" if diverged is None else "diverged", diverged_at=diverged)


def _improved(better: bool, sharded: bool) -> bool:
    """Rank 0's verdict on a sharded model (gathering the best state is a collective every rank must
    join), this rank's otherwise."""
    return on_rank0(lambda: better) if sharded else better


def _evaluation(model, val, test, done: int, epoch: int, ex: dict, optimizer, autocast) -> dict:
    """One history row: the mean training loss since the last one, validation and test metrics."""
    row = {"step": done, "epoch": epoch + 1, "train_loss": (ex["loss_sum"] / ex["block_steps"]).item(),
           "lr": float(optimizer.param_groups[0]["lr"])}
    ex["loss_sum"].zero_()
    ex["block_steps"] = 0
    for name, data in (("val", val), ("test", test)):
        if data is not None:
            m = evaluate(model, data, autocast=autocast)
            row[f"{name}_loss"], row[f"{name}_acc"] = m["loss"], m["acc"]
    ex["history"].append(row)
    return row
