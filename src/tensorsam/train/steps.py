"""One training step per kind of method: a single pass (plain, DAS, BAR, rebalancing, and SAM's
steps without an ascent) or SAM's two passes.

``train_step`` takes the step's batch as a list of micro-batches and returns the mean loss at w as a
device tensor (nothing is read on the host).  What it does, in order:

1. **First pass** at w over every micro-batch (``loss / n`` each), under ``autocast`` when given
   and scaled by the ``GradScaler`` when given.  Under DDP every micro-batch but the last runs in
   ``no_sync``.
2. **SAM's ascent** (when ``optimizer.perturbs_this_step()``), per micro-batch: each micro-batch
   takes its own ascent step from its own gradient and adds the gradient at its own w + e to the
   step's gradient (m-sharpness with m = the micro-batch; this differs from full-batch SAM, which
   perturbs once with the whole batch's gradient).  BatchNorm running statistics are kept out of the
   perturbed pass.  Under DDP the first pass of SAM runs in ``no_sync`` (each replica perturbs with
   its own gradient: the paper's m-sharpness), unless ``sam_sync=True`` (one perturbation from the
   all-reduced gradient, as one process on the combined batch); the second pass is synchronised on
   the last micro-batch, so every replica takes the same update.
3. **Clipping** (``clip_grad_norm``) of the gradient the base step will use, after unscaling: for
   SAM the gradient at w + e, for DAS the gradient DAS scales with.
4. **The step**: ``scaler.step(optimizer)`` or ``optimizer.step()``; a GradScaler skips the whole
   step when either pass was non-finite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tensorsam.optim.sam import SAM, disable_running_stats

Batch = tuple[torch.Tensor, torch.Tensor]


def no_sync(model: nn.Module, skip: bool):
    """``model.no_sync()`` when ``skip`` and the model is DDP-wrapped, else a null context."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _backward(model, loss_fn, batch: Batch, n: int, scaler, autocast, sync: bool) -> torch.Tensor:
    x, y = batch
    with no_sync(model, not sync), (autocast() if autocast else contextlib.nullcontext()):
        loss = loss_fn(model(x), y)
    scaled = loss / n
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss.detach()


def sam_passes(model, optimizer: SAM, loss_fn, micro: Sequence[Batch], scaler, autocast,
               sam_sync: bool) -> list[torch.Tensor]:
    """SAM's two passes, per micro-batch: ascent from its own gradient, then its gradient at w + e added
    to the step's (the gradients gathered so far are stashed and put back); returns the losses at w.
    The base step is the caller's (``train_step`` here; the HF Trainer's ``optimizer.step()`` in
    :mod:`tensorsam.integrations.hf`)."""
    n, losses = len(micro), []
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, batch in enumerate(micro):
        step_grads = [p.grad for p in params]              # the perturbed gradients gathered so far
        for p in params:
            p.grad = None
        losses.append(_backward(model, loss_fn, batch, n, scaler, autocast, sync=sam_sync))
        optimizer.first_step(zero_grad=True)
        for p, g in zip(params, step_grads):
            p.grad = g
        with disable_running_stats(model):
            _backward(model, loss_fn, batch, n, scaler, autocast, sync=i == n - 1)
        optimizer.restore()
    return losses


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, micro: Sequence[Batch], *,
               scaler: torch.amp.GradScaler | None = None, autocast: Callable | None = None,
               clip_grad_norm: float | None = None, sam_sync: bool = False) -> torch.Tensor:
    """One step over the micro-batches ``micro`` (see the module docstring); returns the mean loss
    at w (a detached device tensor).  ``autocast`` is a zero-argument context factory, e.g.
    ``lambda: torch.autocast("cuda", torch.bfloat16)``."""
    if not micro:
        raise ValueError("train_step needs at least one micro-batch")
    n = len(micro)
    optimizer.zero_grad(set_to_none=True)
    if isinstance(optimizer, SAM) and optimizer.perturbs_this_step():
        losses = sam_passes(model, optimizer, loss_fn, micro, scaler, autocast, sam_sync)
    else:
        losses = [_backward(model, loss_fn, b, n, scaler, autocast, sync=i == n - 1) for i, b in enumerate(micro)]
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return torch.stack(losses).mean()
