"""What every tensorsam optimizer shares: wrapping a base ``torch.optim`` optimizer.

A wrapper is a real :class:`torch.optim.Optimizer` whose ``param_groups`` and ``state`` *are*
the base optimizer's (the same objects), so LR schedulers attached to the wrapper change the
base learning rate, tools that walk ``optimizer.state`` (e.g. to move it to a device) reach
the momentum buffers and moments, and hyperparameters of the wrapper (``rho``, ``alpha``) live
in those dicts next to ``lr``.  ``state_dict`` holds the param groups, the base optimizer's
state dict under ``"base"`` (the per-parameter state is saved there only) and python
counters under ``"wrapper"``.

Per-tensor work has a plain path (a python loop of per-tensor ops) and a multi-tensor path
(``torch._foreach_*``); ``foreach=None`` picks the multi-tensor path.  Neither reads a
tensor value on the host: branches are ``torch.where`` on device tensors.

Grouped scalings (DAS, BAR, Rebalance) see the groups as one flat list of cores plus a
segment index ``seg`` (core -> group) and the group sizes ``counts``, so every group is
handled in the same few vectorised ops instead of a python loop per group.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn


def resolve_foreach(foreach: bool | None) -> bool:
    """``None`` means the multi-tensor path: it runs on every device and saves python loops."""
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"foreach must be True, False or None, got {foreach!r}")
    return True if foreach is None else foreach


LOW_PRECISION = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """float32 for half and bfloat16 (their ~3 significant digits would swamp differences such
    as gamma_k - gamma_bar), else ``None`` (the tensor's own dtype)."""
    return torch.float32 if dtype in LOW_PRECISION else None


def norms(tensors: Sequence[torch.Tensor], foreach: bool) -> torch.Tensor:
    """1-D tensor of the Frobenius norms of ``tensors`` (on the first tensor's device); half and
    bfloat16 tensors are reduced and returned in float32 (:func:`acc_dtype`)."""
    tensors = list(tensors)
    if foreach and not any(t.dtype in LOW_PRECISION for t in tensors):
        out = torch._foreach_norm(tensors)
    else:
        out = [torch.linalg.vector_norm(t, dtype=acc_dtype(t.dtype)) for t in tensors]
    try:
        return torch.stack(out)
    except RuntimeError:  # tensors on several devices (or dtypes): gather on the first one
        return torch.stack([n.to(out[0]) for n in out])


# CPU tensors up to this size are normed by stacking equal-shaped ones (one reduction per shape);
# per-tensor dispatch, not arithmetic, is what costs on the CPU for small cores.  A shape shared
# by fewer than STACK_MIN_COUNT tensors is not worth a stack + reduction of its own: such
# tensors join the one ``_foreach_norm`` of the rest (4 Tucker cores and their gradients: 11
# ops -> 2)
STACK_MAX_NUMEL = 1 << 16
STACK_MIN_COUNT = 4


class StackedNorms:
    """Frobenius norms of lists laid out like ``like`` (same shapes, dtypes, devices per position).

    Small CPU tensors are bucketed by (shape, dtype) once; a call stacks each bucket and reduces
    it in one ``vector_norm``, which on a CPU is several times faster than ``_foreach_norm``
    over hundreds of small cores (TR-ResNet-32: 430 tensors, 0.7 ms -> 0.2 ms).  Other tensors
    (GPU, large, empty) go through :func:`norms`.  The result is on ``like[0]``'s device; half
    and bfloat16 are reduced in float32.
    """

    def __init__(self, like: Sequence[torch.Tensor]):
        buckets: dict = {}
        self.rest = []
        for i, t in enumerate(like):
            if t.device.type == "cpu" and 0 < t.numel() <= STACK_MAX_NUMEL:
                buckets.setdefault((tuple(t.shape), t.dtype), []).append(i)
            else:
                self.rest.append(i)
        for key in [k for k, b in buckets.items() if len(b) < STACK_MIN_COUNT]:
            self.rest.extend(buckets.pop(key))
        self.buckets = list(buckets.values())
        self.dtypes = [acc_dtype(dtype) for _, dtype in buckets]
        order = [i for b in self.buckets for i in b] + self.rest
        inverse = [0] * len(order)
        for pos, i in enumerate(order):
            inverse[i] = pos
        self.device = like[0].device
        self.inverse = None if order == sorted(order) else torch.tensor(inverse, device=self.device)

    def __call__(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = [torch.linalg.vector_norm(torch.stack([tensors[i] for i in b]).reshape(len(b), -1), dim=1,
                                          dtype=dt) for b, dt in zip(self.buckets, self.dtypes)]
        if self.rest:
            parts.append(norms([tensors[i] for i in self.rest], True))
        if len(parts) == 1:
            out = parts[0].to(self.device)
        else:
            out = torch.cat([t.to(self.device) for t in parts])
        return out if self.inverse is None else out[self.inverse]


def scale_(tensors: Sequence[torch.Tensor], factors: Sequence[torch.Tensor], foreach: bool) -> None:
    """tensors[i] *= factors[i], in place (``factors``: 0-dim tensors, e.g. views of a 1-D one)."""
    if foreach:
        torch._foreach_mul_(list(tensors), list(factors))
    else:
        for t, f in zip(tensors, factors):
            t.mul_(f)


def segment_sum(values: torch.Tensor, seg: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per-group sums of per-core ``values`` (``seg[k]`` is the group of core k).

    Inside ``torch.compile`` the sum is a one-hot product instead: torch 2.13's inductor CPU
    codegen fails an internal assertion on the scatter-add of ``index_add_`` for some sizes."""
    if torch.compiler.is_compiling():
        groups = torch.arange(n_groups, device=seg.device)
        return ((groups.unsqueeze(1) == seg.unsqueeze(0)).to(values.dtype) * values).sum(1)
    return torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, seg, values)


def _param_list(params) -> list[torch.Tensor]:
    out = []
    for item in params:
        if isinstance(item, dict):
            ps = item["params"]
            out.extend([ps] if isinstance(ps, torch.Tensor) else list(ps))
        else:
            out.append(item)
    return out


STRENGTHS = ("rho", "alpha")    # per-group hyperparameters checked by :func:`check_strength`


class WrappedOptimizer(torch.optim.Optimizer):
    """Base class: wraps ``base_optimizer`` (a class built on ``params`` with ``**kwargs``, or
    an instance, in which case ``params`` may be ``None`` or must be the same parameters).

    ``defaults`` are the wrapper's own per-group hyperparameters; they are added to every
    base param group that lacks them.  ``skip_nonfinite=True`` makes :meth:`step` check the
    gradients once (one host sync, see :meth:`grads_finite`) and, if any is non-finite, leave
    every parameter and all optimizer state untouched; ``skipped_steps`` counts such steps.

    A subclass adds its work in :meth:`before_base_step` / :meth:`after_base_step` (or
    overrides :meth:`step`, as SAM does)::

        class Shrink(WrappedOptimizer):
            def __init__(self, params, base_optimizer, factor=0.999, **kwargs):
                super().__init__(params, base_optimizer, {"factor": factor}, **kwargs)

            @torch.no_grad()
            def before_base_step(self):
                for g in self.param_groups:
                    torch._foreach_mul_(g["params"], g["factor"])

        opt = Shrink(model.parameters(), torch.optim.AdamW, lr=1e-3)
    """

    def __init__(self, params, base_optimizer, defaults: dict, *, foreach: bool | None = None,
                 skip_nonfinite: bool = False, **kwargs):
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if kwargs:
                raise ValueError(f"keyword arguments {sorted(kwargs)} are for building a base optimizer, "
                                 "but base_optimizer is already an instance")
            base = base_optimizer
            if params is not None:
                given = {id(p) for p in _param_list(params)}
                owned = {id(p) for g in base.param_groups for p in g["params"]}
                if given != owned:
                    raise ValueError("params differ from the parameters of the given base_optimizer "
                                     "instance; pass params=None or the same parameters")
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            if params is None:
                raise ValueError("params is required when base_optimizer is a class")
            base = base_optimizer(params, **kwargs)
        else:
            msg = f"base_optimizer must be a torch.optim.Optimizer subclass or instance, got {base_optimizer!r}"
            raise ValueError(msg)  # noqa: TRY004
        if not isinstance(skip_nonfinite, bool):
            raise ValueError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")  # noqa: TRY004
        self.base_optimizer = base
        self.foreach = resolve_foreach(foreach)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self._step = 0
        self._initialising = True
        super().__init__(base.param_groups, defaults)  # adds our defaults to the shared dicts
        self._initialising = False
        self.param_groups = base.param_groups
        self.state = base.state    # shared too: tools that walk optimizer.state see the moments
        for g in self.param_groups:
            self._check_group(g)
        self.defaults.update({k: v for k, v in base.defaults.items() if k not in self.defaults})

    # -- param groups and state ---------------------------------------------------------------
    def __getstate__(self) -> dict:
        # torch's Optimizer pickles only defaults/state/param_groups; a wrapper needs all of it
        return self.__dict__.copy()

    def _check_group(self, group: dict) -> None:
        """Per-group strengths (``rho``, ``alpha``, also when given in a param-group dict) must be
        finite and non-negative."""
        for name in self.defaults:
            if name in STRENGTHS:
                check_strength(group[name], name)

    def add_param_group(self, param_group: dict) -> None:
        """Adds the group to the base optimizer (with the wrapper's defaults).  Its parameters get
        the base step (and SAM's perturbation); they join no scale-invariant group of DAS, BAR
        or Rebalance, whose groups are fixed at construction."""
        if getattr(self, "_initialising", True):
            return super().add_param_group(param_group)
        if isinstance(param_group, dict):
            for name in STRENGTHS:
                if name in self.defaults and name in param_group:
                    check_strength(param_group[name], name)
        self.base_optimizer.add_param_group(param_group)
        for k, v in self.defaults.items():
            self.param_groups[-1].setdefault(k, v)
        return None

    def _extra_state(self) -> dict:
        """Python-side state saved under ``"wrapper"`` (counters)."""
        return {"step": self._step, "skipped_steps": self.skipped_steps}

    def _load_extra_state(self, extra: dict) -> None:
        self._step = int(extra.get("step", 0))
        self.skipped_steps = int(extra.get("skipped_steps", 0))

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["state"] = {}           # the (shared) per-parameter state is saved once, under "base"
        sd["base"] = self.base_optimizer.state_dict()
        sd["wrapper"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "base" not in state_dict:
            raise ValueError("not a tensorsam optimizer state dict: the 'base' entry (the base "
                             "optimizer's state) is missing")
        sd = dict(state_dict, state={})
        base_sd = sd.pop("base")
        extra = sd.pop("wrapper", {})
        self.base_optimizer.load_state_dict(base_sd)
        super().load_state_dict(sd)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._load_extra_state(extra)

    # -- helpers --------------------------------------------------------------------------------
    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def grads_finite(self) -> bool:
        """True when every gradient is finite.

        This is the ONE host-device synchronisation of ``skip_nonfinite=True`` (one ``.item()``
        on a single flag per step); nothing else in a step reads device values.
        """
        grads = [p.grad for p in self._params_with_grad()]
        if not grads:
            return True
        # max-norms: NaN and inf propagate, but a large finite gradient cannot overflow (the
        # 2-norm of a float32 gradient with entries ~1e20 is inf)
        if self.foreach:
            peaks = torch._foreach_norm(grads, ord=math.inf)
        else:
            peaks = [torch.linalg.vector_norm(t, ord=math.inf) for t in grads]
        dev = peaks[0].device
        return bool(torch.isfinite(torch.stack([t.to(dev) for t in peaks])).all().item())

    def _skip_this_step(self) -> bool:
        """With ``skip_nonfinite``: check the gradients once; count and report a skipped step."""
        if self.skip_nonfinite and not self.grads_finite():
            self.skipped_steps += 1
            return True
        return False

    def before_base_step(self) -> None:
        """Work done with the current gradients before the base step (DAS, BAR scale here)."""

    def after_base_step(self) -> None:
        """Work done after the base step and the step counter update (Rebalance)."""

    @torch.no_grad()
    def step(self, closure=None):
        """``closure`` (optional) recomputes the gradients; then :meth:`before_base_step`, the
        base step with those same gradients, and :meth:`after_base_step`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._skip_this_step():
            return loss
        self.before_base_step()
        self.base_optimizer.step()
        self._step += 1
        self.after_base_step()
        return loss

    def _mark_stepped(self) -> None:
        # tells LR schedulers that optimizer.step() ran (set by torch's own step wrapper too)
        self._opt_called = True


def check_strength(value, name: str = "alpha") -> float:
    """``value`` as a float, or a ``ValueError`` unless it is a finite non-negative number
    (a NaN or inf strength would turn every weight into NaN on the first step)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return float(value)


check_alpha = check_strength


def per_core_values(param_groups: list[dict], group_index: Sequence[int], value, like: torch.Tensor) -> torch.Tensor:
    """1-D tensor ``value(param_groups[group_index[k]])`` for each core k, built on ``like``'s
    device and dtype without host copies (runs of cores in one param group: one ``torch.full``)."""
    parts, start = [], 0
    n = len(group_index)
    while start < n:
        gi = group_index[start]
        end = start
        while end < n and group_index[end] == gi:
            end += 1
        v = value(param_groups[gi])
        if isinstance(v, torch.Tensor):
            parts.append(v.to(like).reshape(1).expand(end - start))
        else:
            parts.append(torch.full((end - start,), v, dtype=like.dtype, device=like.device))
        start = end
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def lr_alpha_per_core(param_groups: list[dict], group_index: Sequence[int], alpha_factor: float,
                      like: torch.Tensor) -> torch.Tensor:
    """1-D tensor eta_k * alpha_k(t) for each core (:func:`per_core_values`): eta_k is the current
    (scheduled) ``lr`` of core k's param group, alpha_k its ``alpha`` times the schedule's factor."""
    return per_core_values(param_groups, group_index, lambda g: g["lr"] * g["alpha"] * alpha_factor, like)


def single_bucket(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every tensor shares the first one's device and dtype (what the compiled fast
    paths of DAS and SAM handle; anything else takes the eager path)."""
    return bool(tensors) and all(t.device == tensors[0].device and t.dtype == tensors[0].dtype
                                 for t in tensors)


class MaybeCompiled:
    """``fn`` through ``torch.compile`` (``fullgraph``, static shapes), falling back to eager
    ``fn`` for good, with a warning, if compilation fails.

    ``fn`` must take tensors (and python constants that do not change between steps) only, so
    that changing step counts or learning rates cause no recompilation.  One instance per
    function is shared by every optimizer, so a new optimizer over same-shaped tensors reuses
    the compiled code.
    """

    def __init__(self, fn):
        self.fn = fn
        self.compiled = None
        self.failed = False

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, fullgraph=True, dynamic=False)
        try:
            return self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
            import warnings

            warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(err).__name__}: {err}); "
                          "using the eager path", stacklevel=2)
            self.failed = True
            return self.fn(*args)


def acc_like(cache: dict, t: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor on ``t``'s device in ``t``'s accumulation dtype (:func:`acc_dtype`), cached
    in ``cache``: the ``like`` of :func:`per_core_values` for the compiled fast paths."""
    key = (t.device, t.dtype)
    if key not in cache:
        cache[key] = torch.empty((), dtype=acc_dtype(t.dtype) or t.dtype, device=t.device)
    return cache[key]


def check_compile(compile) -> bool:
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be a bool, got {compile!r}")  # noqa: TRY004
    return compile


class GroupPlan:
    """The groups of one optimizer as flat cores + segment index (built once, reused).

    ``group_index[k]`` is the param group of core k.  The segment tensors are made on the
    cores' device at construction, so a step never copies from the host."""

    def __init__(self, groups: list[list[nn.Parameter]], param_groups: list[dict] | None = None,
                 group_index: list[int] | None = None):
        self.groups = groups
        self.cores = [p for grp in groups for p in grp]
        if group_index is None:
            where = {id(p): i for i, g in enumerate(param_groups) for p in g["params"]}
            group_index = [where[id(p)] for p in self.cores]
        self.group_index = group_index
        self.n_groups = len(groups)
        self._seg: dict = {}
        self._factor_buf: dict = {}
        self._subplans: dict = {}
        self._stacked: dict = {}
        if self.cores:
            self.seg_counts(self.cores[0].device)

    def seg_counts(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(seg, counts) on ``device``: cached, so the host copy happens once per device."""
        key = str(device)
        if key not in self._seg:
            seg = torch.tensor([i for i, grp in enumerate(self.groups) for _ in grp], device=device)
            counts = torch.tensor([len(grp) for grp in self.groups], device=device)
            self._seg[key] = (seg, counts)
        return self._seg[key]

    def norms(self, tensors: Sequence[torch.Tensor], foreach: bool) -> torch.Tensor:
        """:func:`norms` of the cores, their gradients or both concatenated (layouts fixed by
        the plan); the multi-tensor path uses a cached :class:`StackedNorms`."""
        if not foreach:
            return norms(tensors, False)
        key = (len(tensors), tensors[0].device, tensors[0].dtype)   # survives model.to(...)
        if key not in self._stacked:
            self._stacked[key] = StackedNorms(tensors)
        return self._stacked[key](tensors)

    def scale_cores_(self, factors: torch.Tensor, foreach: bool) -> None:
        """core_k *= factors[k] for every core, in place.

        The factors are copied into a persistent buffer whose per-core 0-dim views are made
        once, which saves re-splitting the vector every step."""
        key = (factors.dtype, str(factors.device))
        if key not in self._factor_buf:
            buf = torch.empty_like(factors)
            self._factor_buf[key] = (buf, list(buf.unbind()))
        buf, views = self._factor_buf[key]
        buf.copy_(factors)
        scale_(self.cores, views, foreach)

    def with_grads(self) -> GroupPlan | None:
        """This plan restricted to groups whose cores all have a gradient (``None`` if none).

        Restricted plans are cached per pattern of active groups."""
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
    optimizer).  Every grouped parameter must be one of ``params_owned`` (unless it is ``None``),
    appear in one group only and, with ``need_grad``, require gradients (a frozen core never has
    one, so its group would never be scaled); ``size`` (e.g. 2 for BAR pairs) fixes the number
    of cores per group.
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
    out = []
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
            if owned is not None and id(p) not in owned:
                raise ValueError(f"{what}[{i}] holds a parameter of shape {tuple(p.shape)} that is not "
                                 "among the optimizer's params")
            if need_grad and not p.requires_grad:
                raise ValueError(f"{what}[{i}] holds a parameter of shape {tuple(p.shape)} that does not "
                                 "require grad: a frozen core never gets a gradient, so its group would "
                                 "never be scaled; leave the group out")
            if id(p) in seen:
                raise ValueError(f"{what}[{i}] holds a parameter of shape {tuple(p.shape)} that is "
                                 "already in another group")
            seen.add(id(p))
        out.append(grp)
    return out
