"""What every tensorsam optimizer shares: wrapping a base ``torch.optim`` optimizer.

A wrapper is a real :class:`torch.optim.Optimizer` whose ``param_groups`` and ``state`` *are* the
base optimizer's (the same objects): LR schedulers attached to the wrapper move the base learning
rate, tools that walk ``optimizer.state`` reach the momentum buffers and moments, and the
wrapper's hyperparameters (``rho``, ``alpha``) live in the param groups next to ``lr``.

``state_dict()`` has torch's layout, ``{"state", "param_groups"}``, with per-parameter state
keyed by integer index.  The wrapper's counters and the base optimizer's class name are entries
of every param group (:data:`GROUP_KEYS`), so tools that keep only those two keys
(``torch.distributed.checkpoint``, FSDP's optimizer-state helpers) keep them too.  State dicts of
the first layout (the base optimizer's state under ``"base"``, counters under ``"wrapper"``)
still load.
"""

from __future__ import annotations

import math

import torch

from tensorsam.norms import Sharding, dtensor_class, local_tensors

STEP, SKIPPED, BASE = "wrapper_step", "wrapper_skipped_steps", "base_optimizer"
GROUP_KEYS = (STEP, SKIPPED, BASE)
STRENGTHS = ("rho", "alpha")    # per-group hyperparameters checked by :func:`check_strength`


def check_strength(value, name: str = "alpha") -> float:
    """``value`` as a float, or a ``ValueError`` unless it is a finite non-negative number (a NaN
    or inf strength would turn every weight into NaN on the first step)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return float(value)


def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")  # noqa: TRY004
    return value


def resolve_foreach(foreach: bool | None) -> bool:
    """``None`` means the multi-tensor path: it runs on every device and saves Python loops."""
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"foreach must be True, False or None, got {foreach!r}")
    return True if foreach is None else foreach


def _param_ids(params) -> set[int]:
    out = set()
    for item in params:
        if isinstance(item, dict):
            ps = item["params"]
            out.update(id(p) for p in ([ps] if isinstance(ps, torch.Tensor) else ps))
        else:
            out.add(id(item))
    return out


# The per-parameter state keys of torch's optimizers, by class name: a state holding keys of
# another one was saved with another base optimizer (an unlisted base optimizer is not checked).
STATE_KEYS = {
    "SGD": frozenset({"momentum_buffer"}),
    "Muon": frozenset({"momentum_buffer"}),
    "Adam": frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    "AdamW": frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    "SparseAdam": frozenset({"step", "exp_avg", "exp_avg_sq"}),
    "RAdam": frozenset({"step", "exp_avg", "exp_avg_sq"}),
    "NAdam": frozenset({"step", "mu_product", "exp_avg", "exp_avg_sq"}),
    "Adamax": frozenset({"step", "exp_avg", "exp_inf"}),
    "Adagrad": frozenset({"step", "sum"}),
    "Adadelta": frozenset({"step", "square_avg", "acc_delta"}),
    "RMSprop": frozenset({"step", "square_avg", "momentum_buffer", "grad_avg"}),
    "Rprop": frozenset({"step", "prev", "step_size"}),
    "ASGD": frozenset({"step", "eta", "mu", "ax"}),
    "Adafactor": frozenset({"step", "row_var", "col_var", "variance"}),
    "LBFGS": frozenset({"func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag",
                        "prev_flat_grad", "prev_loss", "al"}),
}
ALL_STATE_KEYS = frozenset().union(*STATE_KEYS.values())
# state keys that are always shaped like their parameter
PARAM_SHAPED = frozenset({"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "sum",
                          "square_avg", "acc_delta", "grad_avg", "prev", "step_size", "ax"})


def _known_state_keys(base: torch.optim.Optimizer) -> frozenset | None:
    """The state keys :data:`STATE_KEYS` lists for ``base``'s class (or the nearest listed base
    class, for a subclass of a torch optimizer), or ``None``."""
    for cls in type(base).__mro__:
        if cls.__name__ in STATE_KEYS:
            return STATE_KEYS[cls.__name__]
    return None


def _upgrade(state_dict: dict, base_name: str) -> dict:
    """A state dict of the first layout (``"base"`` + ``"wrapper"``, no base class name) in torch's
    layout, taken to be of base optimizer ``base_name``."""
    base, counters = state_dict["base"], state_dict.get("wrapper", {})
    groups = []
    for mine, theirs in zip(state_dict.get("param_groups", []), base["param_groups"]):
        groups.append({**mine, **theirs, STEP: int(counters.get("step", 0)),
                       SKIPPED: int(counters.get("skipped_steps", 0)), BASE: base_name})
    return {"state": base["state"], "param_groups": groups or base["param_groups"]}


def _none_on_any_rank(count: torch.Tensor, sharding: Sharding) -> bool:
    """Whether ``count`` (this rank's, a 1-element tensor) sums to 0 over the ranks of every
    process group in ``sharding``: one all-reduce per group and one host read, the same answer on
    every rank."""
    import torch.distributed as dist

    for group, _ in sharding.reductions:
        dist.all_reduce(count, group=group)
    return bool((count == 0).item())


class _OfBase:
    """``param_groups`` / ``state`` of a wrapper: the base optimizer's, read through on every access,
    so they stay its objects even after ``base_optimizer.load_state_dict()`` replaces them (an lr
    scheduler on the wrapper still reaches the base step).  While torch's ``Optimizer.__init__``
    runs inside the wrapper's, they are a list (dict) of its own, ``_init_<name>``."""

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.init = name, f"_init_{name}"

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return getattr(obj, self.init) if obj._initialising else getattr(obj.base_optimizer, self.name)

    def __set__(self, obj, value) -> None:
        if obj._initialising:
            obj.__dict__[self.init] = value
        else:
            setattr(obj.base_optimizer, self.name, value)


class WrappedOptimizer(torch.optim.Optimizer):
    """Base class: wraps ``base_optimizer``, a class built on ``params`` with ``**kwargs``, or an
    instance (``params`` then ``None`` or the same parameters).

    ``defaults`` are the wrapper's own per-group hyperparameters.  ``skip_nonfinite=True`` checks
    the gradients once per step (one host sync) and, if one is non-finite, leaves every parameter
    and all state untouched; :attr:`skipped_steps` counts such steps.  A subclass adds its work in
    :meth:`before_base_step` / :meth:`after_base_step`::

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
            if params is not None and _param_ids(params) != _param_ids(base.param_groups):
                raise ValueError("params differ from the parameters of the given base_optimizer "
                                 "instance; pass params=None or the same parameters")
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            if params is None:
                raise ValueError("params is required when base_optimizer is a class")
            base = base_optimizer(params, **kwargs)
        else:
            msg = f"base_optimizer must be a torch.optim.Optimizer subclass or instance, got {base_optimizer!r}"
            raise ValueError(msg)  # noqa: TRY004
        self.base_optimizer = base
        self.foreach = resolve_foreach(foreach)
        self.skip_nonfinite = check_flag(skip_nonfinite, "skip_nonfinite")
        self._initialising = True
        super().__init__(base.param_groups, defaults)  # adds our defaults to the shared dicts
        self._initialising = False      # from here on param_groups and state are the base's
        del self._init_param_groups, self._init_state
        for g in self.param_groups:
            self._check_group(g)
            g.update({STEP: 0, SKIPPED: 0, BASE: type(base).__name__})
        self.defaults.update({k: v for k, v in base.defaults.items() if k not in self.defaults})

    param_groups = _OfBase()
    state = _OfBase()

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles only defaults/state/param_groups; a wrapper needs all of it
        return self.__dict__.copy()

    # -- counters, kept in every param group ---------------------------------------------------
    @property
    def step_count(self) -> int:
        """Base steps taken (steps skipped for non-finite gradients do not count)."""
        return self.param_groups[0][STEP]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (``skip_nonfinite=True``)."""
        return self.param_groups[0][SKIPPED]

    def _advance(self, key: str) -> None:
        for g in self.param_groups:
            g[key] += 1

    # -- param groups and state ---------------------------------------------------------------
    def _check_group(self, group: dict) -> None:
        for name in self.defaults:
            if name in STRENGTHS:
                check_strength(group[name], name)

    def add_param_group(self, param_group: dict) -> None:
        """Adds the group to the base optimizer (with the wrapper's defaults and counters).  Its
        parameters get the base step (and SAM's perturbation); they join no scale-invariant group
        of DAS, BAR or Rebalance, whose groups are fixed at construction."""
        if getattr(self, "_initialising", True):
            return super().add_param_group(param_group)
        if isinstance(param_group, dict):
            for name in STRENGTHS:
                if name in self.defaults and name in param_group:
                    check_strength(param_group[name], name)
        counters = {k: self.param_groups[0][k] for k in GROUP_KEYS}
        self.base_optimizer.add_param_group(param_group)
        for k, v in self.defaults.items():
            self.param_groups[-1].setdefault(k, v)
        self.param_groups[-1].update(counters)
        return None

    def state_dict(self) -> dict:
        """torch's layout: ``{"state": {index: {...}}, "param_groups": [...]}``."""
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load :meth:`state_dict`, or a state dict of the first layout.  Refused, with nothing
        changed, are: a state dict of a plain optimizer, or of a wrapper around another base
        optimizer (by its recorded class name or, in the first layout, by its hyperparameters and
        state keys, e.g. Adam's ``exp_avg`` in an SGD wrapper); and per-parameter state shaped
        unlike the parameters (a state dict of a differently shaped model)."""
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict: expected the keys 'state' and 'param_groups'")
        mine = type(self.base_optimizer).__name__
        first_layout = "base" in state_dict
        if first_layout:
            state_dict = _upgrade(state_dict, mine)
        for g in state_dict["param_groups"]:
            if BASE not in g:
                raise ValueError(f"not a tensorsam optimizer state dict: its param groups lack {BASE!r} "
                                 "(a plain optimizer's state dict loads into base_optimizer)")
            if g[BASE] != mine:
                raise ValueError(f"this state dict was saved with base optimizer {g[BASE]}, but this "
                                 f"{type(self).__name__} wraps {mine}")
        params = self._saved_index_to_param(state_dict["param_groups"])
        if first_layout:
            self._check_hyperparameters(state_dict["param_groups"])
        for index, entry in state_dict.get("state", {}).items():
            if index in params and isinstance(entry, dict):
                self._check_param_state(index, entry, params[index])
        self.base_optimizer.load_state_dict(state_dict)
        for g in self.param_groups:
            for k, v in {**self.defaults, STEP: 0, SKIPPED: 0, BASE: mine}.items():
                g.setdefault(k, v)

    # -- load_state_dict's checks, made before anything is loaded --------------------------------
    def _saved_index_to_param(self, saved_groups: list) -> dict:
        """The parameter each saved state index stands for (torch pairs them in group order)."""
        sizes = [len(g["params"]) for g in saved_groups]
        mine = [len(g["params"]) for g in self.param_groups]
        if sizes != mine:
            raise ValueError(f"this state dict has param groups of {sizes} parameters, but this "
                             f"{type(self).__name__} has {mine}: it was saved for another model")
        return dict(zip((i for g in saved_groups for i in g["params"]),
                        (p for g in self.param_groups for p in g["params"])))

    def _check_hyperparameters(self, saved_groups: list) -> None:
        """A first-layout state dict records no base class name: one whose groups both lack
        hyperparameters of this base optimizer and have others was saved with another one."""
        for k, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            extra, missing = set(saved) - set(group), set(group) - set(saved) - set(GROUP_KEYS)
            if extra and missing:
                raise ValueError(f"param group {k} of this state dict has hyperparameters {sorted(extra)} and "
                                 f"lacks {sorted(missing)} of {type(self.base_optimizer).__name__}: it was "
                                 "saved with another base optimizer")

    def _check_param_state(self, index, entry: dict, param: torch.Tensor) -> None:
        """The state of one parameter: keys this base optimizer keeps, tensors of the right shape
        (the parameter's for buffers like momentum; the current state's for other keys)."""
        mine = type(self.base_optimizer).__name__
        known = _known_state_keys(self.base_optimizer)
        foreign = sorted((set(entry) & ALL_STATE_KEYS) - known) if known is not None else []
        if foreign:
            owners = sorted(n for n, keys in STATE_KEYS.items() if set(entry) & ALL_STATE_KEYS <= keys)
            raise ValueError(f"the state of parameter {index} holds {foreign}, which {mine} does not keep: "
                             f"this state dict was saved with another base optimizer "
                             f"({' or '.join(owners) or 'unknown'})")
        live = self.state.get(param, {})
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            now = live.get(key)
            want = now.shape if isinstance(now, torch.Tensor) else param.shape if key in PARAM_SHAPED else None
            if want is not None and value.shape != want:
                own = "" if want == param.shape else f" (the parameter's is {tuple(param.shape)})"
                raise ValueError(f"state {key!r} of parameter {index} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(want)}{own}: this state dict was saved for a differently shaped model")

    # -- the step ---------------------------------------------------------------------------------
    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def grads_finite(self) -> bool:
        """True when every gradient is finite: the ONE host sync of ``skip_nonfinite=True`` (one
        ``.item()`` per step).  Max-norms propagate NaN and inf without overflowing."""
        grads = [p.grad for p in self._params_with_grad()]
        if not grads:
            return True
        sharding = Sharding.of(grads) if dtensor_class() is not None else None
        if sharding is not None:
            return self._sharded_grads_finite(grads, sharding)
        if self.foreach:
            peaks = torch._foreach_norm(grads, ord=math.inf)
        else:
            peaks = [torch.linalg.vector_norm(t, ord=math.inf) for t in grads]
        dev = peaks[0].device
        return bool(torch.isfinite(torch.stack([t.to(dev) for t in peaks])).all().item())

    @staticmethod
    def _sharded_grads_finite(grads: list[torch.Tensor], sharding: Sharding) -> bool:
        """:meth:`grads_finite` on DTensor gradients (FSDP2): each rank counts its non-finite local
        tensors (an empty shard is finite), and one all-reduce of that count tells every rank
        whether any rank saw one, so that all ranks skip the same steps."""
        local = [t for t in local_tensors(grads) if t.numel()]
        dev = grads[0].device
        bad = torch.zeros(1, device=dev)
        if local:
            peaks = [torch.linalg.vector_norm(t, ord=math.inf) for t in local]
            bad += (~torch.isfinite(torch.stack([t.to(dev) for t in peaks]))).sum()
        return _none_on_any_rank(bad, sharding)

    def _skip_this_step(self) -> bool:
        if self.skip_nonfinite and not self.grads_finite():
            self._advance(SKIPPED)
            return True
        return False

    def initialising_state(self) -> bool:
        """True for the call ``torch.distributed.checkpoint`` makes to create optimizer state
        (torch's ``_init_optim_state``): ``step()`` with no state yet, lr 0 in every param group
        and a zero gradient on every parameter that requires one.  Such a step runs only the base
        step (creating its state, moving nothing) and counts nothing.  The gradients are read (one
        host sync; one all-reduce when sharded) only when the first two hold: at most on a first
        step taken at lr 0 (a warm-up from 0), which, with any non-zero gradient, is a real step."""
        def zero(lr) -> bool:   # a device tensor lr is never read (that would sync): not this call
            return not (isinstance(lr, torch.Tensor) and lr.device.type != "cpu") and float(lr) == 0.0

        if self.state or not all(zero(g.get("lr", 0.0)) for g in self.param_groups):
            return False
        return self._grads_all_zero()

    @torch.no_grad()
    def _grads_all_zero(self) -> bool:
        """Whether every parameter that requires a gradient has one and all of them are zero."""
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if any(p.grad is None for p in params):
            return False
        grads = [p.grad for p in params]
        if not grads:
            return True
        dev = grads[0].device
        nonzero = torch.zeros(1, device=dev)
        local = [t for t in local_tensors(grads) if t.numel()]
        if local:
            nonzero += torch.stack([t.count_nonzero().to(dev) for t in local]).sum()
        sharding = Sharding.of(grads) if dtensor_class() is not None else None
        if sharding is None:
            return bool((nonzero == 0).item())
        return _none_on_any_rank(nonzero, sharding)

    def _base_step(self) -> None:
        """The base step and the step counter: the one place either happens."""
        self.base_optimizer.step()
        self._advance(STEP)

    def base_step(self) -> bool:
        """Only the base step, with the gradients in ``.grad``, counted; honours ``skip_nonfinite``.
        For fused steps (see :mod:`tensorsam.optim.functional`).  Returns whether it was taken."""
        self._opt_called = True   # tells LR schedulers that the optimizer stepped
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)   # torch.no_grad(), without its Python cost on tiny steps
        try:
            if self._skip_this_step():
                return False
            self._base_step()
            return True
        finally:
            torch._C._set_grad_enabled(enabled)

    def count_step(self) -> None:
        """Count a base step that a compiled caller took on the base optimizer's state itself (see
        :func:`~tensorsam.optim.functional.adam_step`): what :meth:`base_step` counts."""
        self._opt_called = True
        self._advance(STEP)

    def before_base_step(self) -> None:
        """Work done with the current gradients before the base step (DAS and BAR scale here)."""

    def after_base_step(self) -> None:
        """Work done after the base step and the counter update (Rebalance)."""

    @torch.no_grad()
    def step(self, closure=None):
        """``closure`` (optional) recomputes the gradients; then :meth:`before_base_step`, the base
        step with those same gradients, and :meth:`after_base_step`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        elif self.initialising_state():
            self.base_optimizer.step()
            return None
        if self._skip_this_step():
            return loss
        self.before_base_step()
        self._base_step()
        self.after_base_step()
        return loss
