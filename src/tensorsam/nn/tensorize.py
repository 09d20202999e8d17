"""Replace the Linear/Conv2d layers of an existing model by tensorized ones, in place: at a given rank,
or at ranks chosen for a compression ratio or a reconstruction error (:mod:`.budget`)."""

from __future__ import annotations

import fnmatch
import math
import numbers
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..dynamics import norm_deviation
from ..tensors import get_format
from .budget import Choice, LayerBudget, allocate_ratio, balance_cores_, smallest_rung
from .layers import TENSORIZED_LAYERS, check_convertible_conv, layer_sizes


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (each shared tensor once)."""
    return sum(p.numel() for p in module.parameters())


@dataclass
class LayerRow:
    """One replaced layer.  ``rel_error`` is ||W_hat - W||_F / ||W||_F of the dense weight's
    decomposition at ``rank`` (with ``decompose=False`` the cores are fresh: it is what the rank can
    represent; ``None`` when no decomposition ran).  ``q_decompose``/``q_balance``: the norm
    deviation Q of the cores after decomposition (or initialisation) and after ``balance=True``."""

    name: str
    kind: str
    params_before: int
    params_after: int
    rank: object = None
    rel_error: float | None = None
    q_decompose: float | None = None
    q_balance: float | None = None

    @property
    def ratio(self) -> float:
        """Compression ratio of this layer: dense parameters / tensorized parameters."""
        return self.params_before / self.params_after


@dataclass
class TensorizeSummary:
    """What :func:`tensorize` did: per-layer rows, skipped layers, whole-model counts, the target
    (``target_ratio`` or ``target_rel_error``; both None for a given ``rank``) and the summed Q."""

    format: str
    layers: list[LayerRow] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    params_before: int = 0
    params_after: int = 0
    target_ratio: float | None = None
    target_rel_error: float | None = None
    decompose: bool = False
    balance: bool = False
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """Whole-model compression ratio (all parameters, dense and tensorized)."""
        return self.params_before / self.params_after

    @property
    def ranks(self) -> dict[str, object]:
        """Each replaced layer's rank, in its format's convention."""
        return {r.name: r.rank for r in self.layers}

    @property
    def q_after_decompose(self) -> float | None:
        """Q summed over the replaced layers, after decomposition (or initialisation)."""
        qs = [r.q_decompose for r in self.layers]
        return None if not qs or None in qs else float(sum(qs))

    @property
    def q_after_balance(self) -> float | None:
        """Q summed over the replaced layers after ``balance=True`` (None without it)."""
        qs = [r.q_balance for r in self.layers]
        return None if not qs or None in qs else float(sum(qs))

    def to_dict(self) -> dict:
        """A JSON-ready record: targets, achieved ratio, summed Q and one entry per layer."""
        return {"format": self.format, "target_ratio": self.target_ratio, "target_rel_error": self.target_rel_error,
                "achieved_ratio": self.ratio, "params_before": self.params_before, "params": self.params_after,
                "decompose": self.decompose, "balance": self.balance, "q_after_decompose": self.q_after_decompose,
                "q_after_balance": self.q_after_balance, "seconds": self.seconds,
                "layers": [{"name": r.name, "kind": r.kind, "rank": _plain(r.rank), "rel_error": r.rel_error,
                            "params_before": r.params_before, "params_after": r.params_after,
                            "q_decompose": r.q_decompose, "q_balance": r.q_balance} for r in self.layers],
                "skipped": [list(s) for s in self.skipped]}

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.layers] + [5])
        rw = max([len(str(r.rank)) for r in self.layers] + [4])
        target = ("" if self.target_ratio is None and self.target_rel_error is None else
                  f", target {'ratio' if self.target_ratio is not None else 'rel_error'}="
                  f"{self.target_ratio if self.target_ratio is not None else self.target_rel_error:g}")
        head = (f"tensorize: format={self.format}{target}, achieved ratio {self.ratio:.2f}x, "
                f"{len(self.layers)} layers replaced, {len(self.skipped)} skipped"
                + (", cores balanced" if self.balance else "") + f" ({self.seconds:.1f} s)")
        lines = [head, f"{'layer':<{w}}  {'kind':<6} {'rank':<{rw}} {'rel.err':>9} {'before':>10} {'after':>10} "
                       f"{'ratio':>8} {'Q decomp':>10}" + (f" {'Q balance':>10}" if self.balance else "")]
        for r in self.layers:
            lines.append(f"{r.name:<{w}}  {r.kind:<6} {r.rank!s:<{rw}} {_num(r.rel_error, '9.2e')} "
                         f"{r.params_before:>10,} {r.params_after:>10,} {r.ratio:>7.2f}x {_num(r.q_decompose, '10.3g')}"
                         + (f" {_num(r.q_balance, '10.3g')}" if self.balance else ""))
        lines += [f"{name:<{w}}  skipped: {why}" for name, why in self.skipped]
        lines.append(f"{'model':<{w}}  {'':<6} {'':<{rw}} {'':>9} {self.params_before:>10,} {self.params_after:>10,} "
                     f"{self.ratio:>7.2f}x {_num(self.q_after_decompose, '10.3g')}"
                     + (f" {_num(self.q_after_balance, '10.3g')}" if self.balance else ""))
        return "\n".join(lines)


def _num(v, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if v is None else format(v, spec)


def _plain(rank):
    return list(rank) if isinstance(rank, tuple) else rank


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):  # one pattern, not a sequence of one-character patterns
        patterns = (patterns,)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def tensorize(model: nn.Module, format: str, rank=None, decompose: bool = False, include: Sequence[str] | None = None,
              exclude: Sequence[str] = (), min_params: int = 0, shape: Mapping[str, object] | None = None,
              forward_mode: str = "auto", *, ratio: float | None = None, rel_error: float | None = None,
              balance: bool = False, **decompose_kwargs) -> TensorizeSummary:
    """Replace ``model``'s ``nn.Linear``/``nn.Conv2d`` layers by tensorized ones, in place.

    Exactly one target:

    * ``rank``: an int for every layer, or a mapping from layer name to rank (the format's convention);
    * ``ratio``: the whole model's parameters before / after (BatchNorm, the head and every layer kept
      dense included), > 1;
    * ``rel_error``: a bound in (0, 1) on each layer's ||W_hat - W||_F / ||W||_F.

    ``ratio`` and ``rel_error`` choose each layer's rank from the dense weights' decompositions
    (:mod:`.budget` says how), with or without ``decompose``.

    * ``decompose``: initialise from the trained weights via the format's ``from_dense``
      (tensorly: TT-SVD, TR-SVD, Tucker HOOI, CP-ALS; extra keyword arguments go to it); otherwise
      the unified initialisation is used.
    * ``balance``: rescale each layer's cores to equal Frobenius norms afterwards (exact: the cores
      compose multilinearly and the factors multiply to 1; :func:`tensorsam.formulas.rebalance_factors`),
      so the norm deviation Q becomes 0.  The summary records Q before and after.
    * ``include``/``exclude``: fnmatch patterns on qualified module names (``include=None``
      takes every layer); layers with fewer than ``min_params`` weight entries are skipped.
    * ``shape``: optional mapping from layer name to its tensorized shape.

    All or nothing: a layer that cannot be replaced, or a target that cannot be met, is a
    ValueError and leaves the model untouched.  Returns a :class:`TensorizeSummary`.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 30 * 30, 10))
        >>> summary = tensorize(model, "tt", rank=4, exclude=["3"])    # keep the classifier dense
        >>> print(summary)                                             # per-layer table, model ratio
        >>> tensorize(trained, "tucker", rank=16, decompose=True)      # start from trained weights
        >>> tensorize(trained, "tt", ratio=2.5, decompose=True, balance=True, exclude=["fc"])
    """
    started = time.perf_counter()
    fmt = get_format(format).format
    _check_target(rank, ratio, rel_error)
    if not isinstance(balance, bool):
        raise ValueError(f"balance must be True or False, got {balance!r}")  # noqa: TRY004
    ranks = None
    if isinstance(rank, Mapping):
        ranks = dict(rank)
    elif rank is not None and not (isinstance(rank, numbers.Integral) and not isinstance(rank, bool)):
        raise ValueError(f"rank must be an int or a mapping from layer name to rank, got {rank!r}")
    shapes = dict(shape or {})
    summary = TensorizeSummary(fmt, params_before=count_parameters(model), target_ratio=ratio,
                               target_rel_error=rel_error, decompose=bool(decompose), balance=balance)
    targets = [(n, m) for n, m in model.named_modules() if type(m) in TENSORIZED_LAYERS]
    if not targets:
        raise ValueError(f"nothing to tensorize: {type(model).__name__} has no nn.Linear or nn.Conv2d layer "
                         f"({summary.params_before:,} parameters)")
    unknown = set(ranks or ()) - {n for n, _ in targets}
    if unknown:  # checked before anything is replaced
        raise ValueError(f"rank given for unknown layers {sorted(unknown)}")
    selected = [(n, m) for n, m in targets
                if (include is None or _matches(n, include)) and not _matches(n, exclude)]
    if not selected:
        raise ValueError(f"no layer matches include={include!r}, exclude={exclude!r}; the Linear/Conv2d "
                         f"layers are {[n for n, _ in targets]}")
    kept = []
    for name, layer in selected:
        reason = _skip_reason(layer, min_params, ranks is not None and name not in ranks)
        if reason:
            summary.skipped.append((name, reason))
        else:
            kept.append((name, layer))
    if not kept and rank is None:
        raise ValueError(f"no layer left to compress to {'ratio' if ratio is not None else 'rel_error'}= "
                         f"(skipped: {summary.skipped})")
    chosen = {}
    if rank is None:    # ratio= or rel_error=: ranks from the dense weights' decompositions
        chosen = _choose_ranks(kept, summary.params_before, fmt, shapes, ratio, rel_error, decompose_kwargs)
    # build every replacement first: a layer that cannot be replaced leaves the model untouched
    replacements = []
    for name, layer in kept:
        r = (rank if ranks is None else ranks[name]) if rank is not None else chosen[name].rank
        new = _layer(_replacement, [(name, layer)], fmt, r, decompose, shapes.get(name), forward_mode,
                     decompose_kwargs)
        row = LayerRow(name, type(layer).__name__.replace("Conv2d", "Conv"), count_parameters(layer),
                       count_parameters(new), new.rank)
        if decompose:
            row.rel_error = _weight_error(new, layer)
        elif name in chosen:
            row.rel_error = chosen[name].rel_error
        row.q_decompose = float(norm_deviation(new.weight_factors))
        if balance:
            balance_cores_(new.weight_factors)
            row.q_balance = float(norm_deviation(new.weight_factors))
        replacements.append((name, layer, new, r))
        summary.layers.append(row)
    _swap(model, replacements)
    for row, (name, _, _, r) in zip(summary.layers, replacements):
        if row.params_after > row.params_before:
            warnings.warn(f"tensorize: layer {name!r} grows from {row.params_before:,} to {row.params_after:,} "
                          f"parameters (ratio {row.ratio:.2f}x < 1) at format={fmt!r}, rank={r!r}",
                          stacklevel=2)
    summary.params_after = count_parameters(model)
    summary.seconds = time.perf_counter() - started
    return summary


def _check_target(rank, ratio, rel_error) -> None:
    """Exactly one of rank / ratio / rel_error, each in its range."""
    given = [n for n, v in (("rank", rank), ("ratio", ratio), ("rel_error", rel_error)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one target: rank= (per layer), ratio= (the model's parameters before / "
                         "after) or rel_error= (each layer's relative reconstruction error); got "
                         + (" and ".join(f"{n}=" for n in given) if given else "none"))
    for name, v in (("ratio", ratio), ("rel_error", rel_error)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if ratio is not None and ratio <= 1:
        raise ValueError(f"ratio must be > 1 (the model's parameters before / after compression), got {ratio!r}")
    if rel_error is not None and not 0 < rel_error < 1:
        raise ValueError(f"rel_error must be in (0, 1) (||W_hat - W|| / ||W|| of each layer), got {rel_error!r}")


def _choose_ranks(kept, params_before, fmt, shapes, ratio, rel_error, decompose_kwargs) -> dict[str, Choice]:
    budgets = {name: _layer(LayerBudget, [(name, layer)], fmt, shapes.get(name), decompose_kwargs,
                            thin=ratio is not None, grow=ratio is None) for name, layer in kept}
    if ratio is not None:
        return allocate_ratio(budgets, params_before, ratio, fmt)
    return {name: _layer(lambda b: b.choice(smallest_rung(b, rel_error)), [(name, b)]) for name, b in budgets.items()}


def _layer(fn, named, *args, **kwargs):
    """``fn(obj, *args, **kwargs)`` for the one (name, obj) in ``named``, its errors naming the layer."""
    ((name, obj),) = named
    try:
        return fn(obj, *args, **kwargs)
    except ValueError as err:
        raise ValueError(f"layer {name!r} cannot be tensorized ({err}); the model is left unchanged") from err
    except Exception as err:
        err.add_note(f"while tensorizing layer {name!r}; the model is left unchanged")
        raise


def _weight_error(new, dense) -> float:
    """||W_hat - W||_F / ||W||_F of a decomposed layer, in the dense op's weight layout."""
    with torch.no_grad():
        w = dense.weight.detach().double()
        diff = torch.linalg.vector_norm(new.dense_weight().double() - w)
        norm = torch.linalg.vector_norm(w)
    return float(diff / norm) if norm > 0 else float(diff)


def _skip_reason(layer, min_params: int, no_rank: bool) -> str | None:
    """Why a selected layer is kept dense (``None``: it is replaced)."""
    if layer.weight.numel() < min_params:
        return f"{layer.weight.numel()} weights < min_params={min_params}"
    if no_rank:
        return "no rank given"
    if isinstance(layer, nn.Conv2d):
        try:
            check_convertible_conv(layer)
        except ValueError as err:
            return str(err)
    return None


def _swap(model: nn.Module, replacements) -> None:
    """Put each new layer in its old one's place; if any assignment fails, the old ones return."""
    done = []
    try:
        for name, old, new, _ in replacements:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, new)
            done.append((parent, attr, old))
    except BaseException:
        for parent, attr, old in reversed(done):
            setattr(parent, attr, old)
        raise


def _replacement(layer, fmt, rank, decompose, shape, forward_mode, decompose_kwargs) -> nn.Module:
    cls = TENSORIZED_LAYERS[type(layer)]
    if decompose:
        return cls.from_dense(layer, fmt, rank, shape=shape, forward_mode=forward_mode, **decompose_kwargs)
    fin, fout, k = layer_sizes(layer)
    w = layer.weight
    kw = {"format": fmt, "rank": rank, "shape": shape, "bias": layer.bias is not None,
          "forward_mode": forward_mode, "dtype": w.dtype, "device": w.device}
    if k is None:
        return cls(fin, fout, **kw)
    return cls(fin, fout, k, stride=layer.stride, padding=layer.padding, dilation=layer.dilation, **kw)
