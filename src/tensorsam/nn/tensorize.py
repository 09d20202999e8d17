"""Replace the Linear/Conv2d layers of an existing model by tensorized ones, in place."""

from __future__ import annotations

import fnmatch
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..tensors import get_format
from .layers import TENSORIZED_LAYERS, check_convertible_conv, layer_sizes


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (each shared tensor once)."""
    return sum(p.numel() for p in module.parameters())


@dataclass
class LayerRow:
    name: str
    kind: str
    params_before: int
    params_after: int

    @property
    def ratio(self) -> float:
        """Compression ratio of this layer: dense parameters / tensorized parameters."""
        return self.params_before / self.params_after


@dataclass
class TensorizeSummary:
    """What :func:`tensorize` did: per-layer rows, skipped layers and whole-model counts."""

    format: str
    layers: list[LayerRow] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    params_before: int = 0
    params_after: int = 0

    @property
    def ratio(self) -> float:
        """Whole-model compression ratio (all parameters, dense and tensorized)."""
        return self.params_before / self.params_after

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.layers] + [5])
        head = f"tensorize: format={self.format}, {len(self.layers)} layers replaced, {len(self.skipped)} skipped"
        lines = [head,
                 f"{'layer':<{w}}  {'kind':<6} {'before':>10} {'after':>10} {'ratio':>8}"]
        for r in self.layers:
            lines.append(f"{r.name:<{w}}  {r.kind:<6} {r.params_before:>10,} {r.params_after:>10,} {r.ratio:>7.2f}x")
        lines += [f"{name:<{w}}  skipped: {why}" for name, why in self.skipped]
        lines.append(f"{'model':<{w}}  {'':<6} {self.params_before:>10,} {self.params_after:>10,} "
                     f"{self.ratio:>7.2f}x")
        return "\n".join(lines)


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):  # one pattern, not a sequence of one-character patterns
        patterns = (patterns,)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def tensorize(model: nn.Module, format: str, rank, decompose: bool = False, include: Sequence[str] | None = None,
              exclude: Sequence[str] = (), min_params: int = 0, shape: Mapping[str, object] | None = None,
              forward_mode: str = "auto", **decompose_kwargs) -> TensorizeSummary:
    """Replace ``model``'s ``nn.Linear``/``nn.Conv2d`` layers by tensorized ones, in place.

    * ``rank``: an int for every layer, or a mapping from layer name to rank.
    * ``decompose``: initialise from the trained weights via the format's ``from_dense``
      (tensorly); otherwise the unified initialisation is used.
    * ``include``/``exclude``: fnmatch patterns on qualified module names (``include=None``
      takes every layer); layers with fewer than ``min_params`` weight entries are skipped.
    * ``shape``: optional mapping from layer name to its tensorized shape.

    Returns a :class:`TensorizeSummary` (parameters before and after, per-layer ratios).

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 30 * 30, 10))
        >>> summary = tensorize(model, "tt", rank=4, exclude=["3"])    # keep the classifier dense
        >>> print(summary)                                             # per-layer table, model ratio
        >>> tensorize(trained, "tucker", rank=16, decompose=True)      # start from trained weights
    """
    fmt = get_format(format).format
    if isinstance(rank, Mapping):
        ranks = dict(rank)
    elif isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
        ranks = None
    else:
        raise ValueError(f"rank must be an int or a mapping from layer name to rank, got {rank!r}")  # noqa: TRY004
    shapes = dict(shape or {})
    summary = TensorizeSummary(fmt, params_before=count_parameters(model))
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
    # build every replacement first: a layer that cannot be replaced leaves the model untouched
    replacements = []
    for name, layer in selected:
        reason = _skip_reason(layer, min_params, ranks is not None and name not in ranks)
        if reason:
            summary.skipped.append((name, reason))
            continue
        r = rank if ranks is None else ranks[name]
        try:
            new = _replacement(layer, fmt, r, decompose, shapes.get(name), forward_mode, decompose_kwargs)
        except ValueError as err:
            raise ValueError(f"layer {name!r} cannot be tensorized ({err}); the model is left unchanged") from err
        except Exception as err:
            err.add_note(f"while tensorizing layer {name!r}; the model is left unchanged")
            raise
        replacements.append((name, layer, new, r))
    _swap(model, replacements)
    for name, layer, new, r in replacements:
        row = LayerRow(name, type(layer).__name__.replace("Conv2d", "Conv"), count_parameters(layer),
                       count_parameters(new))
        summary.layers.append(row)
        if row.params_after > row.params_before:
            warnings.warn(f"tensorize: layer {name!r} grows from {row.params_before:,} to {row.params_after:,} "
                          f"parameters (ratio {row.ratio:.2f}x < 1) at format={fmt!r}, rank={r!r}",
                          stacklevel=2)
    summary.params_after = count_parameters(model)
    return summary


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
