"""The groups of one optimizer as flat cores plus a segment index, built once and reused.

Grouped scalings (DAS, BAR, rebalancing) see their groups as one list of cores, ``seg`` (core ->
group) and ``counts`` (group sizes), so every group is handled by the same few vectorised ops
(:mod:`tensorsam.formulas`) instead of a Python loop per group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from tensorsam.norms import Sharding, StackedLayout, acc_dtype, dtensor_class, segments


def index_runs(group_index: Sequence[int]) -> list[tuple[int, int]]:
    """``group_index`` as runs ``(param group, number of consecutive cores)``."""
    runs: list[tuple[int, int]] = []
    for gi in group_index:
        if runs and runs[-1][0] == gi:
            runs[-1] = (gi, runs[-1][1] + 1)
        else:
            runs.append((gi, 1))
    return runs


def per_core_values(param_groups: list[dict], group_index: Sequence[int], value, like: torch.Tensor,
                    cache: dict | None = None, runs: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """1-D tensor ``value(param_groups[group_index[k]])`` for each core k, on ``like``'s device and
    dtype, without host copies (a run of cores in one param group is one ``torch.full``).

    ``runs``: :func:`index_runs` of ``group_index``, if known.  ``cache``: a dict that keeps the
    last result; while every value is the same Python number as in the last call, that tensor is
    returned again (no allocation; callers must not modify it).  Tensor values (a tensor ``lr``)
    are never cached: they may change in place."""
    values = [(value(param_groups[gi]), size) for gi, size in (runs or index_runs(group_index))]
    key = None
    if cache is not None and not any(isinstance(v, torch.Tensor) for v, _ in values):
        key = (tuple(values), like.device, like.dtype)
        if cache.get("key") == key:
            return cache["value"]
    parts = [v.to(like).reshape(1).expand(size) if isinstance(v, torch.Tensor)
             else torch.full((size,), v, dtype=like.dtype, device=like.device) for v, size in values]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if key is not None:
        cache["key"], cache["value"] = key, out
    return out


def acc_like(cache: dict, t: torch.Tensor) -> torch.Tensor:
    """A cached 0-dim tensor on ``t``'s device in its accumulation dtype: the ``like`` of
    :func:`per_core_values` when no norm tensor is at hand yet."""
    key = (t.device, t.dtype)
    if key not in cache:
        cache[key] = torch.empty((), dtype=acc_dtype(t.dtype) or t.dtype, device=t.device)
    return cache[key]


class GroupPlan:
    """Groups as flat ``cores`` with ``group_index[k]``, the param group of core k.

    ``seg``/``counts`` per device, the :class:`~tensorsam.norms.StackedLayout` of each list
    layout and the per-core factor buffers are cached, so a step makes no host copy.

    :attr:`sharded` says, once, whether a core is a DTensor (FSDP2); only then does
    :meth:`sharding` build (and cache) the :class:`~tensorsam.norms.Sharding` that makes norms
    global with one all-reduce."""

    def __init__(self, groups: list[list[nn.Parameter]], param_groups: list[dict] | None = None,
                 group_index: list[int] | None = None):
        self.groups = groups
        self.cores = [p for grp in groups for p in grp]
        if group_index is None:
            where = {id(p): i for i, g in enumerate(param_groups) for p in g["params"]}
            group_index = [where[id(p)] for p in self.cores]
        self.group_index = group_index
        self._runs = index_runs(group_index)
        self._seg: dict = {}
        self._buffers: dict = {}
        self._subplans: dict = {}
        self._layouts: dict = {}
        self._shardings: dict = {}
        self._eta_alpha: dict = {}     # the last eta_alpha, at factor 1 and not (see per_core_values)
        dt = dtensor_class()
        self.sharded = dt is not None and any(isinstance(p, dt) for p in self.cores)
        if self.cores:
            self.seg_counts(self.cores[0].device)

    def seg_counts(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(seg, counts) on ``device`` (copied from the host once per device)."""
        key = str(device)
        if key not in self._seg:
            self._seg[key] = segments([len(g) for g in self.groups], device)
        return self._seg[key]

    def layout(self, tensors: Sequence[torch.Tensor]) -> StackedLayout:
        """The cached :class:`StackedLayout` of lists laid out like ``tensors``."""
        key = (len(tensors), tensors[0].device, tensors[0].dtype)   # survives model.to(...)
        if key not in self._layouts:
            self._layouts[key] = StackedLayout(tensors)
        return self._layouts[key]

    def sharding(self, tensors: Sequence[torch.Tensor]) -> Sharding | None:
        """``None`` unless :attr:`sharded`; else the cached :class:`~tensorsam.norms.Sharding` of lists
        laid out like ``tensors`` (the cores, or the cores then their gradients)."""
        if not self.sharded:
            return None
        key = len(tensors)
        if key not in self._shardings:
            self._shardings[key] = Sharding(tensors)
        return self._shardings[key]

    def factor_buffer(self, like: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A persistent per-core buffer, in ``like``'s accumulation dtype, and its 0-dim views (see
        :func:`~tensorsam.optim.functional.scale_`)."""
        dtype = acc_dtype(like.dtype) or like.dtype
        key = (dtype, str(like.device))
        if key not in self._buffers:
            buf = torch.empty(len(self.cores), dtype=dtype, device=like.device)
            self._buffers[key] = (buf, list(buf.unbind()))
        return self._buffers[key]

    def eta_alpha(self, param_groups: list[dict], alpha_factor: float, like: torch.Tensor) -> torch.Tensor:
        """eta_k * alpha_k(t) per core: the current (scheduled) ``lr`` of core k's param group times
        its ``alpha`` times the schedule's factor."""
        cache = self._eta_alpha.setdefault(alpha_factor == 1.0, {})   # eta_alpha0 apart from the schedule's
        return per_core_values(param_groups, self.group_index, lambda g: g["lr"] * g["alpha"] * alpha_factor, like,
                               cache, self._runs)

    def with_grads(self) -> GroupPlan | None:
        """This plan restricted to the groups whose cores all have a gradient (``None`` if none),
        cached per pattern of active groups."""
        if all(p.grad is not None for p in self.cores):
            return self
        active = tuple(i for i, grp in enumerate(self.groups) if all(p.grad is not None for p in grp))
        if not active:
            return None
        if active not in self._subplans:
            starts = [0]
            for grp in self.groups:
                starts.append(starts[-1] + len(grp))
            index = [self.group_index[k] for i in active for k in range(starts[i], starts[i + 1])]
            self._subplans[active] = GroupPlan([self.groups[i] for i in active], group_index=index)
        return self._subplans[active]


def resolve_groups(groups, params_owned: Iterable[torch.Tensor] | None, what: str = "groups",
                   size: int | None = None, need_grad: bool = True) -> list[list[nn.Parameter]]:
    """Check user groups: a model (discovered with ``scale_invariant_groups``) or lists of params.

    There must be at least one group (an optimizer over none would silently be its base
    optimizer).  Every grouped parameter must be one of ``params_owned`` (unless ``None``), be in
    one group only and, with ``need_grad``, require gradients (a frozen core never gets one);
    ``size`` (2 for BAR pairs) fixes the number of cores per group.
    """
    if groups is None:
        raise ValueError(f"{what} is required: pass a model (groups are then discovered) or a list "
                         "of parameter lists")
    if isinstance(groups, nn.Module):
        from tensorsam.groups import scale_invariant_groups

        model, groups = groups, scale_invariant_groups(groups)
        if not groups:
            raise ValueError(f"{what}: the model {type(model).__name__} has no scale-invariant groups "
                             "(no factorized tensor, tensorized layer or LoRA pair that requires grad)")
    try:
        groups = [list(g) for g in groups]
    except TypeError:
        raise ValueError(f"{what} must be a model or a list of parameter lists, got {groups!r}") from None
    if not groups:
        raise ValueError(f"{what} is empty: pass at least one group of parameters")
    owned = None if params_owned is None else {id(p) for p in params_owned}
    seen: set[int] = set()
    for i, grp in enumerate(groups):
        if not grp:
            raise ValueError(f"{what}[{i}] is empty")
        if size is not None and len(grp) != size:
            raise ValueError(f"{what}[{i}] has {len(grp)} parameters; expected {size} (an (x, y) pair)")
        for p in grp:
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"{what}[{i}] holds {type(p).__name__}, not a parameter tensor")  # noqa: TRY004
            shape = tuple(p.shape)
            if owned is not None and id(p) not in owned:
                raise ValueError(f"{what}[{i}] holds a parameter of shape {shape} that is not "
                                 "among the optimizer's params")
            if need_grad and not p.requires_grad:
                raise ValueError(f"{what}[{i}] holds a parameter of shape {shape} that does not "
                                 "require grad: a frozen core never gets a gradient, so its group would "
                                 "never be scaled; leave the group out")
            if id(p) in seen:
                raise ValueError(f"{what}[{i}] holds a parameter of shape {shape} that is "
                                 "already in another group")
            seen.add(id(p))
    return groups


def single_bucket(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every tensor shares the first one's device and dtype (what the compiled paths take)."""
    return bool(tensors) and all(t.device == tensors[0].device and t.dtype == tensors[0].dtype for t in tensors)
