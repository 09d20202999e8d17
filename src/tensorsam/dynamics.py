"""Norm dynamics of scale-invariant groups: per-core norms, Q, Cov, balancedness, u.

Notation (the DAS paper): a group is an ordered list of cores G_1..G_K that compose multilinearly;
s_k = ||G_k||_F^2, gamma_k = ||g_k||_F^2 with g_k the gradient of core k, and bars are means
over the group.

Every public function takes either **one group** (a sequence of tensors, an object with a
``.cores`` attribute such as a :class:`~tensorsam.tensors.base.FactorizedTensor`, or a
:class:`tensorsam.groups.Group`) or **a list of groups**, and then returns one value per group.  All norms are taken with a single
``torch._foreach_norm`` over every tensor involved and reduced with segment sums, so nothing
here synchronises with the host; only :class:`NormTracker` syncs, once per recorded step, when
it copies its numbers out.

Sharded cores (DTensor, FSDP2) give the same numbers as one process: local squared norms are
completed by one all-reduce (:class:`tensorsam.norms.Sharding`), which every rank must then call
together (the tracker: one all-reduce per recorded step, for s and gamma together).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tensorsam import formulas
from tensorsam.formulas import sam_u, segment_sum
from tensorsam.norms import Sharding, norms, segments
from tensorsam.run.io import atomic_save_figure, atomic_write_text

__all__ = [
    "NormTracker",
    "balancedness",
    "core_sq_norms",
    "covariance",
    "deviation",
    "global_u",
    "grad_sq_norms",
    "norm_deviation",
    "norm_grad_covariance",
    "normalizer",
    "plot",
    "read_history",
]


# -- input handling --------------------------------------------------------------------------
def _group(obj, where: str) -> list[torch.Tensor]:
    cores = getattr(obj, "cores", None)
    if cores is not None:
        obj = cores
    elif hasattr(obj, "params") and not isinstance(obj, torch.Tensor):
        obj = obj.params
    if isinstance(obj, torch.Tensor) or not isinstance(obj, Sequence | nn.ParameterList):
        raise ValueError(f"{where} must be a sequence of tensors, got {type(obj).__name__}")  # noqa: TRY004
    group = list(obj)
    if not group:
        raise ValueError(f"{where} is empty; a group needs at least one core")
    for k, t in enumerate(group):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}, core {k} is a {type(t).__name__}, not a torch.Tensor")  # noqa: TRY004
    return group


def _is_single(obj) -> bool:
    if isinstance(obj, nn.ParameterList) or getattr(obj, "cores", None) is not None:
        return True
    if not isinstance(obj, torch.Tensor) and getattr(obj, "params", None) is not None:
        return True  # a tensorsam.groups.Group
    if isinstance(obj, Sequence) and len(obj) > 0:
        return isinstance(obj[0], torch.Tensor)
    return False


def _as_groups(obj) -> tuple[list[list[torch.Tensor]], bool]:
    """``(groups, single)``: normalise one group or a list of groups to a list of groups."""
    if _is_single(obj):
        return [_group(obj, "group")], True
    if isinstance(obj, torch.Tensor) or not isinstance(obj, Sequence) or len(obj) == 0:
        raise ValueError("expected one group (a sequence of tensors) or a non-empty list of groups, "
                         f"got {type(obj).__name__}" + (" of length 0" if isinstance(obj, Sequence) else ""))
    return [_group(g, f"group {i}") for i, g in enumerate(obj)], False


def _grads_like(groups, grads) -> list[list[torch.Tensor]]:
    """The gradients of ``groups``: ``grads`` if given (same structure), else each core's ``.grad``.

    A core without a gradient counts as an all-zero gradient (gamma_k = 0).
    """
    if grads is None:
        return [[p.grad if p.grad is not None else torch.zeros_like(p) for p in g] for g in groups]
    gg, _ = _as_groups(grads)
    if [len(g) for g in gg] != [len(g) for g in groups]:
        raise ValueError(f"grads have group sizes {[len(g) for g in gg]}; "
                         f"expected {[len(g) for g in groups]}")
    for i, (g, c) in enumerate(zip(gg, groups)):
        for k, (a, b) in enumerate(zip(g, c)):
            if a.shape != b.shape:
                raise ValueError(f"group {i}, core {k}: grad shape {tuple(a.shape)} "
                                 f"!= core shape {tuple(b.shape)}")
    return gg


def _sq_norms(groups: list[list[torch.Tensor]], sharding: Sharding | None = None) -> torch.Tensor:
    """Squared Frobenius norm of every tensor of every group, flattened in order (no syncs).  Of
    DTensors (FSDP2) the global norms: local partial sums and one all-reduce (``sharding``, else
    found here)."""
    tensors = [t.detach() for g in groups for t in g]
    return norms(tensors, squared=True, sharding=sharding or Sharding.of(tensors))


def _segments(groups, device) -> tuple[torch.Tensor, torch.Tensor]:
    return segments([len(g) for g in groups], device)


def _split(values: torch.Tensor, groups, single: bool):
    parts = list(values.split([len(g) for g in groups]))
    return parts[0] if single else parts


# -- the formulas (each lives in tensorsam.formulas) ------------------------------------------
deviation = formulas.norm_deviation        # Q (Eq. 5), from squared core norms
covariance = formulas.norm_grad_covariance  # Cov(s, gamma) (Theorem 3)


def normalizer(gamma: torch.Tensor) -> torch.Tensor:
    """u = (sum_j gamma_j)^(-1/2) of the squared gradient norms ``gamma`` (Theorem 2,
    :func:`tensorsam.formulas.sam_u`); an all-zero gradient gives u = 0."""
    return sam_u(gamma.sum())


# -- public per-group API --------------------------------------------------------------------
def core_sq_norms(cores):
    """s_k = ||G_k||_F^2 for one group (a 1-D tensor of length K) or a list of groups (a list)."""
    groups, single = _as_groups(cores)
    return _split(_sq_norms(groups), groups, single)


def grad_sq_norms(cores, grads=None):
    """gamma_k = ||g_k||_F^2, from ``grads`` (same structure as ``cores``) or each core's ``.grad``."""
    groups, single = _as_groups(cores)
    return _split(_sq_norms(_grads_like(groups, grads)), groups, single)


def _per_group(groups, single, fn, *vectors):
    if single:
        return fn(*vectors)
    index, sizes = _segments(groups, vectors[0].device)
    return fn(*vectors, index, sizes.to(vectors[0].dtype))


def norm_deviation(cores):
    """Q of one group (0-d tensor) or of each group of a list (1-D tensor); see :func:`deviation`."""
    groups, single = _as_groups(cores)
    return _per_group(groups, single, deviation, _sq_norms(groups))


def norm_grad_covariance(cores, grads=None):
    """Cov(s, gamma) of one group or of each group; see :func:`covariance`.

    Gradients come from ``grads`` or the cores' ``.grad`` (a missing grad counts as zero).
    """
    groups, single = _as_groups(cores)
    gamma = _sq_norms(_grads_like(groups, grads))
    return _per_group(groups, single, covariance, _sq_norms(groups), gamma)


def balancedness(x, y) -> torch.Tensor:
    """BAR's balancedness B = ||x||_F^2 - ||y||_F^2 of a pair (x, y).

    ``x`` and ``y`` are tensors (returns a 0-d tensor) or equal-length sequences of tensors, one
    entry per pair (returns a 1-D tensor).
    """
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        s = _sq_norms([[x, y]])
        return s[0] - s[1]
    xs, ys = _group(x, "x"), _group(y, "y")
    if len(xs) != len(ys):
        raise ValueError(f"x has {len(xs)} tensors but y has {len(ys)}; pairs must match")
    s = _sq_norms([xs, ys])
    return s[: len(xs)] - s[len(xs):]


def global_u(groups, grads=None) -> torch.Tensor:
    """u_D = (sum of gamma over every core of every group)^(-1/2) (Theorems A.1/A.2); a 0-d tensor."""
    gs, _ = _as_groups(groups)
    return normalizer(_sq_norms(_grads_like(gs, grads)))


# -- tracking --------------------------------------------------------------------------------
FIELDS = ["step", "group", "K", "Q", "cov", "s_mean", "gamma_mean", "u"]


class NormTracker:
    """Record per-group Q, Cov(s, gamma), mean s, mean gamma and the global u_D during training.

    ``source`` is a model (its groups come from :func:`tensorsam.groups.scale_invariant_groups`),
    one group, or a list of groups.  Call :meth:`step` once per training step (after
    ``backward`` so that the gradients are there, e.g. right after ``optimizer.step()`` and before
    ``zero_grad``), or :meth:`record` with an explicit step number.  Every ``every``-th step it

    - appends one row per group to :attr:`history` (dicts with the keys of :data:`FIELDS`),
    - appends the same rows to ``path`` as CSV or JSONL (``fmt``, else from the suffix),
    - logs ``Q/<group>`` etc. to TensorBoard when ``tensorboard`` is true (a log dir or ``True``
      for ``<path stem>_tb``) and the package is installed; otherwise it warns once and skips.

    Host synchronisation: computing the numbers is sync-free, but each *recorded* step copies them
    to the host once (one ``.tolist()``); steps that are not recorded cost nothing.

    The file: the header (or an empty JSONL file) is written atomically; each record then appends
    its rows in one write.  Recovery: a process killed mid-append can leave a torn last line, which
    :func:`read_history` drops; a run resumed through :class:`tensorsam.run.Loop` (which checkpoints
    the tracker) rewrites the file atomically from the checkpoint, so rows recorded after it are
    dropped, not duplicated.
    """

    def __init__(self, source, every: int = 1, path: str | os.PathLike | None = None,
                 fmt: str | None = None, tensorboard: bool | str = False,
                 names: Sequence[str] | None = None, append: bool = False):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if isinstance(source, nn.Module) and getattr(source, "cores", None) is None:
            from tensorsam.groups import named_scale_invariant_groups

            found = named_scale_invariant_groups(source)
            if not found:
                raise ValueError(f"{type(source).__name__} has no scale-invariant groups to track")
            source = [list(g.params) for g in found]
            if names is None:
                names = [g.module or f"g{i}" for i, g in enumerate(found)]
        self.groups, _ = _as_groups(source)
        self.names = list(names) if names is not None else [f"g{i}" for i in range(len(self.groups))]
        if len(self.names) != len(self.groups):
            raise ValueError(f"got {len(self.names)} names for {len(self.groups)} groups")
        self.every = every
        self.history: list[dict] = []
        self._t = 0
        self.path = Path(path) if path is not None else None
        self.fmt = None
        if self.path is not None:
            self.fmt = (fmt or self.path.suffix.lstrip(".")).lower()
            if self.fmt == "json":
                self.fmt = "jsonl"
            if self.fmt not in ("csv", "jsonl"):
                raise ValueError(f"fmt must be 'csv' or 'jsonl', got {fmt or self.path.suffix!r}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not append or not self.path.exists():
                atomic_write_text(self.path, ",".join(FIELDS) + "\n" if self.fmt == "csv" else "")
        elif fmt is not None:
            raise ValueError("fmt given without a path")
        self._tb = self._open_tensorboard(tensorboard)
        index, sizes = _segments(self.groups, self.groups[0][0].device)
        self._index, self._sizes = index, sizes
        flat = [t for g in self.groups for t in g]
        self._sharding = Sharding.of(flat + flat)    # cores then gradients; None without DTensors

    def _open_tensorboard(self, tensorboard):
        if not tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the tensorboard package is optional
            warnings.warn("tensorboard is not installed; NormTracker logs to files only", stacklevel=3)
            return None
        logdir = tensorboard if isinstance(tensorboard, str | os.PathLike) else (
            str(self.path.with_suffix("")) + "_tb" if self.path is not None else None)
        return SummaryWriter(log_dir=logdir)

    def compute(self) -> dict[str, torch.Tensor]:
        """Per-group tensors Q, cov, s_mean, gamma_mean (length = number of groups) and u (0-d);
        no host sync."""
        k = len(self._index)
        both = _sq_norms([*self.groups, *_grads_like(self.groups, None)], self._sharding)  # one all-reduce
        s, gamma = both[:k], both[k:]
        sizes = self._sizes.to(s.dtype)
        n = sizes.numel()
        return {
            "Q": deviation(s, self._index, sizes),
            "cov": covariance(s, gamma, self._index, sizes),
            "s_mean": segment_sum(s, self._index, n) / sizes,
            "gamma_mean": segment_sum(gamma, self._index, n) / sizes,
            "u": normalizer(gamma),
        }

    def record(self, step: int, force: bool = False) -> list[dict] | None:
        """Record at ``step`` if it is a multiple of ``every`` (or ``force``); returns the new rows."""
        if not force and step % self.every:
            return None
        vals = self.compute()
        u = vals.pop("u")
        packed = torch.cat([torch.stack(list(vals.values())), u.expand(1, len(self.groups))])
        table = packed.double().cpu().tolist()  # the one host sync of a recorded step
        rows = []
        for i, name in enumerate(self.names):
            row = {"step": int(step), "group": name, "K": len(self.groups[i])}
            row.update({key: table[j][i] for j, key in enumerate(vals)})
            row["u"] = table[-1][i]
            rows.append(row)
        self.history.extend(rows)
        self._write(rows)
        return rows

    def step(self) -> list[dict] | None:
        """Advance the internal step counter (starting at 0) and record when it is due."""
        rows = self.record(self._t)
        self._t += 1
        return rows

    def _write(self, rows: list[dict]) -> None:
        if self.path is not None:
            buf = io.StringIO(newline="")
            if self.fmt == "csv":
                csv.DictWriter(buf, FIELDS).writerows(rows)
            else:
                buf.writelines(json.dumps(r) + "\n" for r in rows)
            with self.path.open("a", newline="") as fh:
                fh.write(buf.getvalue())      # one write per record (see the class docstring)
        if self._tb is not None:
            for r in rows:
                for key in ("Q", "cov", "s_mean", "gamma_mean"):
                    self._tb.add_scalar(f"{key}/{r['group']}", r[key], r["step"])
            self._tb.add_scalar("u", rows[0]["u"], rows[0]["step"])

    def state_dict(self) -> dict:
        """The step counter and recorded rows (plain Python, so ``torch.load(weights_only=True)``
        reads it back); lets :class:`tensorsam.run.Loop` checkpoint a tracker."""
        return {"t": self._t, "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` and rewrite ``path`` from it, atomically, so rows recorded
        after that checkpoint by a run that was then killed are dropped, not duplicated."""
        self._t = int(state["t"])
        self.history = [dict(r) for r in state["history"]]
        if self.path is not None:
            buf = io.StringIO(newline="")
            if self.fmt == "csv":
                buf.write(",".join(FIELDS) + "\n")
                csv.DictWriter(buf, FIELDS).writerows(self.history)
            else:
                buf.writelines(json.dumps(r) + "\n" for r in self.history)
            atomic_write_text(self.path, buf.getvalue())

    def column(self, key: str, group: str | int = 0) -> list[float]:
        """The recorded values of ``key`` for one group (by name or position), in step order."""
        if key not in FIELDS:
            raise ValueError(f"unknown column {key!r}; expected one of {FIELDS}")
        name = self.names[group] if isinstance(group, int) else group
        if name not in self.names:
            raise ValueError(f"unknown group {group!r}; known groups: {self.names}")
        return [r[key] for r in self.history if r["group"] == name]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_history(path: str | os.PathLike) -> list[dict]:
    """Rows written by :class:`NormTracker` (CSV or JSONL), with numbers parsed.  A torn last line
    (no final newline: the writer was killed mid-append) is dropped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no norm-tracker file at {path}")
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        for r in rows:
            for key in FIELDS:
                if key != "group":
                    r[key] = int(r[key]) if key in ("step", "K") else float(r[key])
        return rows
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def plot(history: Sequence[dict] | str | os.PathLike, path: str | os.PathLike) -> Path:
    """Draw Q (log scale) and Cov(s, gamma) against step, one line per group, to ``path`` (Agg).

    ``history`` is :attr:`NormTracker.history` or a file it wrote.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_history(history) if isinstance(history, str | os.PathLike) else list(history)
    if not rows:
        raise ValueError("history is empty; nothing to plot")
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_q, ax_c = fig.subplots(1, 2)
    for name in dict.fromkeys(r["group"] for r in rows):
        sel = [r for r in rows if r["group"] == name]
        steps = [r["step"] for r in sel]
        ax_q.plot(steps, [r["Q"] for r in sel], label=str(name))
        ax_c.plot(steps, [r["cov"] for r in sel], label=str(name))
    if all(r["Q"] > 0 and math.isfinite(r["Q"]) for r in rows):
        ax_q.set_yscale("log")
    ax_q.set(xlabel="step", ylabel="norm deviation Q (Eq. 5)")
    ax_c.set(xlabel="step", ylabel="Cov(s, γ) (Theorem 3)")
    ax_c.axhline(0.0, color="grey", lw=0.5)
    if len({r["group"] for r in rows}) <= 12:
        ax_q.legend(fontsize="small")
    return atomic_save_figure(fig, path)
