"""DAS: Deviation-Aware Scaling (Algorithm 2, Eq. 9 of the DAS paper) over any base optimizer."""

from __future__ import annotations

from typing import NamedTuple

import torch

from tensorsam.optim import functional as F
from tensorsam.optim.plan import GroupPlan, acc_like, resolve_groups, single_bucket
from tensorsam.optim.schedules import get_schedule, schedule_table
from tensorsam.optim.wrapper import WrappedOptimizer, check_flag, check_strength

NORMALIZATIONS = ("global", "group")
VARIANTS = ("paper", "authors")


class DASArgs(NamedTuple):
    """The arguments of :func:`~tensorsam.optim.functional.das_scale_` for the coming step, after
    the gradients: ``das_scale_(args.cores, grads, *args[1:])``."""

    cores: list
    eta_alpha: torch.Tensor
    seg: torch.Tensor
    counts: torch.Tensor
    normalization: str
    divisor: str


class DAS(WrappedOptimizer):
    r"""Deviation-Aware Scaling (Algorithm 2): SAM's implicit norm regulation with one gradient.

    .. code-block:: text

        g_k = grad L w.r.t. core G_k                        (one pass)
        lambda_k = eta alpha_t u (gamma_k - gamma_bar) / s_k   (Eq. 9; s_k = ||G_k||^2, gamma_k = ||g_k||^2)
        G_k <- (1 + lambda_k) G_k                           for every core of every group
        w <- base_step(w, g)                                with the same gradients

    eta is the core's current (scheduled) ``lr``; alpha_t is ``alpha`` (per param group) times
    ``alpha_schedule`` at the step count.  Parameters outside the groups only get the base step.

    Args:
        params, base_optimizer, \*\*kwargs: the base optimizer (class or instance).
        groups: a model (its scale-invariant groups) or a list of parameter lists.
        alpha, alpha_schedule, total_steps: strength, and its ``'constant'``, ``'linear'`` or
            ``'cosine'`` decay to 0 over ``total_steps`` (the t-th step uses alpha f(t/T)).
        normalization: ``'global'`` (one u over all groups, the paper's multi-layer u_D) or
            ``'group'`` (u per group, as in Algorithm 2).
        variant: ``'paper'`` (Eq. 9) or ``'authors'`` (divide by ||G_k||, u per group, as the
            authors' code does, so that alpha tuned there can be reused).  alpha does not transfer
            between variants or normalizations.
        foreach, skip_nonfinite: see :class:`~tensorsam.optim.wrapper.WrappedOptimizer`.
        compile: run the scaling as one ``torch.compile``'d function when every grouped core has a
            gradient and all share one device and dtype (not on sharded cores).

    **FSDP2 (DTensor cores).**  s_k and gamma_k are partial sums over each rank's shard, completed
    for every core of every group by one all-reduce per step; lambda_k is then applied to the local
    shards, so every rank takes the step one process would take with the same global batch.
    Cores sharded by FSDP2 and plain (replicated) cores may share a model and a group.

    Example::

        model = tensorsam.models.resnet(32, "tr", 15)
        opt = DAS(model.parameters(), torch.optim.SGD, groups=model, alpha=0.1, lr=0.1, momentum=0.9)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()            # scale the cores, then SGD with the same gradients
    """

    def __init__(self, params, base_optimizer, *, groups, alpha: float,
                 alpha_schedule: str = "constant", total_steps: int | None = None,
                 normalization: str | None = None, variant: str = "paper",
                 skip_nonfinite: bool = False, foreach: bool | None = None, compile: bool = False,
                 **kwargs):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}")
        if normalization is None:
            normalization = "global" if variant == "paper" else "group"
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; expected one of {list(NORMALIZATIONS)}")
        if variant == "authors" and normalization != "group":
            raise ValueError("variant='authors' computes u per group; leave normalization unset or 'group'")
        self.schedule = get_schedule(alpha_schedule, total_steps)
        self.alpha_schedule, self.total_steps = alpha_schedule, total_steps
        self.normalization, self.variant = normalization, variant
        self.divisor = "squared" if variant == "paper" else "norm"
        self.compile = check_flag(compile, "compile")
        params = None if params is None else list(params)
        super().__init__(params, base_optimizer, {"alpha": check_strength(alpha)}, foreach=foreach,
                         skip_nonfinite=skip_nonfinite, **kwargs)
        owned = [p for g in self.param_groups for p in g["params"]]
        self.plan = GroupPlan(resolve_groups(groups, owned), self.param_groups)
        self._like: dict = {}
        self._tables: dict = {}

    def alpha_factor(self) -> float:
        """alpha_t / alpha at the current step count."""
        return self.schedule(1.0, self.step_count, self.total_steps)

    def eta_alpha0(self) -> torch.Tensor:
        """eta_k * alpha_k per core of every group before the schedule's factor, in the cores'
        accumulation dtype: the same tensor while every ``lr`` and ``alpha`` keeps its value (a
        tensor ``lr`` gives a new one each call).  Do not modify it."""
        return self.plan.eta_alpha(self.param_groups, 1.0, acc_like(self._like, self.plan.cores[0]))

    def alpha_table(self) -> torch.Tensor:
        """The alpha schedule's :func:`~tensorsam.optim.schedules.schedule_table` (alpha_t / alpha
        for t = 0..total_steps), like :meth:`eta_alpha0`; built once."""
        like = acc_like(self._like, self.plan.cores[0])
        key = (like.device, like.dtype)
        if key not in self._tables:
            self._tables[key] = schedule_table(self.schedule, self.total_steps, like)
        return self._tables[key]

    def functional_args(self, plan: GroupPlan | None = None) -> DASArgs:
        """:class:`DASArgs` of the coming step for ``plan`` (default: every group); no host copy."""
        plan = self.plan if plan is None else plan
        like = acc_like(self._like, plan.cores[0])
        seg, counts = plan.seg_counts(like.device)
        return DASArgs(plan.cores, plan.eta_alpha(self.param_groups, self.alpha_factor(), like), seg, counts,
                       self.normalization, self.divisor)

    @torch.no_grad()
    def before_base_step(self) -> None:
        """G_k <- (1 + lambda_k) G_k for every core whose group has gradients (no host sync)."""
        plan = self.plan.with_grads()
        if plan is None:
            return
        args = self.functional_args(plan)
        grads = [p.grad for p in plan.cores]
        tensors = plan.cores + grads
        sharding = plan.sharding(tensors)    # None on one process (decided once, in the plan)
        if self.compile and sharding is None and plan is self.plan and single_bucket(tensors):
            F.compiled(F.das_scale_)(plan.cores, grads, *args[1:])
            return
        F.das_scale_(plan.cores, grads, *args[1:], foreach=self.foreach,
                     layout=plan.layout(tensors) if self.foreach else None,
                     buffer=plan.factor_buffer(args.eta_alpha) if self.foreach else None, sharding=sharding)
