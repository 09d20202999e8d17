"""The resumable clock shared by every task.

A task writes its training loop as ``for it in Loop(total, state=..., checkpoint=..., resume=...)``.
The loop saves every object in ``state`` (anything with ``state_dict``/``load_state_dict``), the
torch/numpy/python RNG states, the iteration counter and a user dict ``loop.extra`` atomically
every ``every`` iterations, at the end, and on SIGINT/SIGTERM.  Resuming continues to a
bit-identical result on the CPU, because the process state that decides the next step
(parameters, optimizer moments, RNG streams) is exactly what was saved at an iteration boundary.

:class:`Divergence` is the clock's companion for training loops: it keeps the first step with a
non-finite loss on the device, without a host sync in the step, and is read at the loop's
evaluation (logging) cadence only.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tensorsam.run.io import atomic_torch_save, load_checkpoint, to_jsonable
from tensorsam.run.meta import rng_state, set_rng_state

CHECKPOINT_FORMAT = "tensorsam-loop-1"


def _plain(obj: Any) -> Any:
    """numpy scalars and arrays in ``loop.extra`` become python numbers and tensors."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    return obj


def _rate_column():
    """A progress-bar column showing iterations per second."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text("-- it/s" if not speed else f"{speed:,.0f} it/s", style="progress.data.speed")

    return RateColumn()


def _fmt_metric(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().cpu().item() if v.numel() == 1 else v.detach().cpu().tolist()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fingerprint_changes(old: dict, new: dict) -> str:
    """``lr: 0.001 -> 0.01, rank: [8, 6, 8] -> [4, 4, 4]``: the fields of two fingerprints that differ
    (a field only one of them has shows as ``<absent>``)."""
    absent = "<absent>"
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k, absent) != new.get(k, absent)]
    return ", ".join(f"{k}: {old.get(k, absent)!r} -> {new.get(k, absent)!r}" for k in keys)


class Divergence:
    """The first step whose loss is non-finite, kept on the device and read only at evaluation points.

    Each step, :meth:`update` folds that step's loss into a 0-dim int64 tensor with
    ``torch.where`` (no ``.item()``, no Python branch on a device value); :meth:`read`, called at
    the evaluation or logging cadence, is the one host read.  The rule (the loss counts, nothing
    else):

    - **plain steps** (``tolerant=False``): the run has diverged at the first step (1-based, the
      ``step`` passed to :meth:`update`) whose loss at w, the forward of the step's first pass, is
      non-finite;
    - **steps that skip non-finite updates on purpose** (``tolerant=True``: a ``GradScaler``, or an
      optimizer with ``skip_nonfinite=True``): such a step leaves the weights untouched, so one
      non-finite loss is a skipped step, not a divergence.  The run has diverged when the non-finite
      losses persist: at a read, the losses of at least the last two steps were non-finite, every one
      since the first of the streak, which is the step reported.  A finite loss ends a streak.
      (Non-finite *gradients* with a finite loss, the scaler's usual skip, never count.)

    Under ``torch.distributed`` a read takes the earliest step over the ranks (one all-reduce), so
    every rank stops at the same read.  The tensor lives in ``store[key]`` (e.g. a
    :class:`Loop`'s ``extra``), so checkpoints keep it and a resumed run continues the count.
    """

    NONE = torch.iinfo(torch.int64).max   # no non-finite loss (yet)

    def __init__(self, store: dict, device, *, tolerant: bool = False, key: str = "first_nonfinite"):
        first = store.get(key)
        first = torch.full((), self.NONE, dtype=torch.int64) if first is None else first
        self.first = store[key] = first.to(device)
        self.tolerant = bool(tolerant)

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Fold the loss of ``step`` (1-based) in; no host sync."""
        bad = ~torch.isfinite(loss.detach()).all()
        seen = self.first.clamp(max=step)               # the streak's first step, or this one
        self.first.copy_(torch.where(bad, seen, self.NONE if self.tolerant else self.first))

    def read(self, done: int) -> int | None:
        """After ``done`` steps: the step at which the run diverged, or ``None`` (one host read)."""
        first = self.first.clone()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = int(first.item())
        if first == self.NONE or (self.tolerant and first >= done):
            return None
        return first


class _LineProgress:
    """Progress for a log that is not a terminal: one plain line (under 100 columns) every
    ``seconds`` and at the end, instead of a bar redrawn in place."""

    def __init__(self, desc: str, total: int, start: int, seconds: float = 30.0):
        self.desc, self.total, self.seconds = desc or "run", total, seconds
        self.t0, self.start, self.next = time.perf_counter(), start, time.perf_counter() + seconds

    def update(self, done: int, metrics: dict) -> None:
        now = time.perf_counter()
        if now < self.next and done < self.total:
            return
        self.next = now + self.seconds
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        line = f"{self.desc} {done}/{self.total} ({100 * done / self.total:.0f}%) {rate:,.1f} it/s"
        for k, v in metrics.items():      # whole metrics only, while the line fits in 100 columns
            item = f" {k}={_fmt_metric(v)}"
            if len(line) + len(item) > 100:
                break
            line += item
        print(line, file=sys.stderr, flush=True)


class Loop:
    """Iterate ``start .. total-1`` with atomic checkpoints, resume, signals and a progress bar.

    ``state`` maps names to objects with ``state_dict()``/``load_state_dict()`` (modules,
    optimizers, schedulers, trackers).  With ``resume=True`` and an existing ``checkpoint``,
    their states, ``extra`` and the iteration counter are restored here and the RNG states
    when iteration starts, so the loop continues exactly where the saved run stopped.
    Without ``resume`` an existing checkpoint is overwritten by the new run.

    ``fingerprint`` (a dict: the config fields that change the run's results and the run's grid
    coordinates, e.g. :meth:`tensorsam.run.Sweep.fingerprint`) is saved with every checkpoint;
    resuming from a checkpoint whose fingerprint differs is refused with a ``ValueError`` naming the
    fields that differ, so a run never continues under settings other than those it started with.

    A checkpoint is saved after every ``every``-th iteration and after the last one.  On
    SIGINT/SIGTERM the loop finishes the current iteration, saves, restores the previous
    handlers and raises ``KeyboardInterrupt``; a second signal interrupts at once.
    """

    def __init__(
        self,
        total: int,
        *,
        state: dict,
        checkpoint=None,
        every: int = 1000,
        resume: bool = False,
        desc: str = "",
        progress: bool = True,
        fingerprint: dict | None = None,
    ):
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be a non-negative int, got {total!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        for name, obj in state.items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise ValueError(f"state entry {name!r} has no state_dict()/load_state_dict()")
        self.total = total
        self.state = dict(state)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.every = every
        self.desc = desc
        self.progress = progress
        self.fingerprint = None if fingerprint is None else to_jsonable(dict(fingerprint))
        self.extra: dict = {}
        self.metrics: dict = {}
        self.start = 0
        self.iteration = 0
        self.resumed = False
        self._rng: dict | None = None
        self._signal: int | None = None
        self._verified = False
        if resume and self.checkpoint is not None and self.checkpoint.exists():
            self._restore(load_checkpoint(self.checkpoint))
        self.iteration = self.start

    # ---- checkpoint content
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "total": self.total,
            "state": {name: obj.state_dict() for name, obj in self.state.items()},
            "rng": rng_state(),
            "extra": _plain(self.extra),
            "fingerprint": None if self.fingerprint is None else json.dumps(self.fingerprint, sort_keys=True),
        }

    def _restore(self, ckpt: dict) -> None:
        where = self.checkpoint
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{where} is not a tensorsam loop checkpoint (format {ckpt.get('format')!r})")
        if self.fingerprint is not None:
            saved = ckpt.get("fingerprint")
            saved = None if saved is None else json.loads(saved)
            if saved != self.fingerprint:
                raise ValueError(f"cannot resume from {where}: " + (
                    "it was saved without a fingerprint of its settings" if saved is None else
                    f"it was made with other settings ({fingerprint_changes(saved, self.fingerprint)})")
                    + "; use the same settings, or another output dir (or no --resume) to start afresh")
        saved = set(ckpt["state"])
        if saved != set(self.state):
            raise ValueError(
                f"checkpoint {where} holds state {sorted(saved)}, but this run has {sorted(self.state)}"
            )
        if ckpt["iteration"] > self.total:
            raise ValueError(
                f"checkpoint {where} is at iteration {ckpt['iteration']}, beyond this run's total {self.total}"
            )
        for name, obj in self.state.items():
            try:
                obj.load_state_dict(ckpt["state"][name])
            except (RuntimeError, KeyError, TypeError) as err:
                lines = str(err).strip().splitlines()
                raise ValueError(f"checkpoint {where} does not fit this run's {name}: "
                                 f"{type(err).__name__}: {' '.join(x.strip() for x in lines[:3])}") from None
        self.extra = dict(ckpt.get("extra") or {})
        self._rng = ckpt["rng"]
        self.start = int(ckpt["iteration"])
        self.resumed = True

    def save(self) -> None:
        """Write a checkpoint of the current state now (no-op without a checkpoint path).

        Under ``torch.distributed`` rank 0 writes and every rank waits for it (a barrier); the RNG
        states saved are rank 0's.  The first save of a loop reads the file back with ``weights_only=True`` before it
        replaces anything, so state that could not be resumed from (an arbitrary Python object
        in a ``state_dict`` or in ``extra``) is reported at once, not at resume time.
        """
        if self.checkpoint is None:
            return
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized()
        if not distributed or dist.get_rank() == 0:
            atomic_torch_save(self.state_dict(), self.checkpoint, verify=not self._verified)
        self._verified = True
        if distributed:
            dist.barrier()          # every rank resumes from the file rank 0 has finished writing

    # ---- metrics
    def log(self, **metrics) -> None:
        """Remember metrics to show in the progress bar; tensors are only read at refresh time."""
        self.metrics.update(metrics)

    # ---- signals
    def _handler(self, signum, frame):
        if self._signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self._signal = signum

    def _install(self) -> dict:
        if self.checkpoint is None or threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, self._handler)
        return old

    # ---- iteration
    def __iter__(self) -> Iterator[int]:
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
        old = self._install()
        bar = task = lines = None
        try:
            tty = sys.stderr.isatty()
            if self.progress and self.start < self.total and not tty:
                lines = _LineProgress(self.desc, self.total, self.start)
            if self.progress and self.start < self.total and tty:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                bar = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    _rate_column(),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    TextColumn("{task.fields[metrics]}"),
                    console=Console(stderr=True, width=min(100, shutil.get_terminal_size().columns)),
                    auto_refresh=False,
                    transient=False,
                )
                bar.start()
                task = bar.add_task(self.desc, total=self.total, completed=self.start, metrics="")
            next_refresh = 0.0
            for i in range(self.start, self.total):
                yield i
                self.iteration = i + 1
                if lines is not None:
                    lines.update(self.iteration, self.metrics)
                if bar is not None:
                    now = time.perf_counter()
                    if now >= next_refresh or self.iteration == self.total:
                        text = " ".join(f"{k}={_fmt_metric(v)}" for k, v in self.metrics.items())
                        bar.update(task, completed=self.iteration, metrics=text)
                        bar.refresh()
                        next_refresh = now + 0.2
                if self._signal is not None:
                    self.save()
                    raise KeyboardInterrupt(
                        f"stopped by signal {signal.Signals(self._signal).name} after iteration "
                        f"{self.iteration}; checkpoint saved to {self.checkpoint}"
                    )
                if self.iteration % self.every == 0 or self.iteration == self.total:
                    self.save()
            if self.start == self.total and self.checkpoint is not None and not self.resumed:
                self.save()  # a zero-length run still leaves a checkpoint
        finally:
            if bar is not None:
                bar.stop()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self._signal = None


