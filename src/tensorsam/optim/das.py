"""DAS: Deviation-Aware Scaling (Algorithm 2, Eq. 9 of the DAS paper; SPEC §3)."""

from __future__ import annotations

import torch

from tensorsam.optim.base import (
    GroupPlan,
    WrappedOptimizer,
    check_alpha,
    lr_alpha_per_core,
    resolve_groups,
    segment_sum,
)
from tensorsam.optim.schedules import get_schedule

NORMALIZATIONS = ("global", "group")
VARIANTS = ("paper", "authors")


def sam_u(total: torch.Tensor) -> torch.Tensor:
    """SAM's normalisation u = (sum_j gamma_j)^(-1/2) (Theorem 2; Algorithm 1 divides by ||g||).

    ``total`` is the sum of squared gradient norms; over every core of every group it gives the
    multi-layer u_D (appendix Theorems A.1/A.2).  A zero total (no gradient) gives u = 0.
    """
    return torch.where(total > 0, total.rsqrt(), torch.zeros_like(total))


def das_lambda(s: torch.Tensor, gamma: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor,
               eta_alpha: torch.Tensor, normalization: str = "global",
               divisor: str = "squared") -> torch.Tensor:
    """Eq. 9 / Algorithm 2, line 4: lambda_k = eta * alpha * u * (gamma_k - gamma_bar) / s_k.

    All arguments are per core (1-D, groups concatenated; ``seg[k]`` is core k's group and
    ``counts`` the group sizes K): ``s`` = ||G_k||_F^2, ``gamma`` = ||g_k||_F^2, ``eta_alpha``
    = eta_k * alpha_k.  gamma_bar is the mean of gamma over core k's group.

    - ``normalization='global'``: u = (sum of gamma over every core of every group)^(-1/2),
      the multi-layer u_D of appendix Theorems A.1/A.2;
      ``'group'``: u = (K * gamma_bar)^(-1/2) of core k's own group, as in Algorithm 2.
    - ``divisor='squared'`` divides by s_k = ||G_k||^2 (Eq. 9); ``'norm'`` by ||G_k|| (the
      authors' code, SPEC §3 "Known deviations").

    A zero-norm core, or all-zero gradients (u undefined), give lambda = 0, never NaN.
    """
    group_sum = segment_sum(gamma, seg, counts.numel())
    gamma_bar = (group_sum / counts)[seg]
    total = group_sum.sum() if normalization == "global" else group_sum[seg]
    u = sam_u(total)
    denom = s if divisor == "squared" else s.sqrt()
    ok = denom > 0
    lam = eta_alpha * u * (gamma - gamma_bar) / torch.where(ok, denom, torch.ones_like(denom))
    return torch.where(ok, lam, torch.zeros_like(lam))


class DAS(WrappedOptimizer):
    r"""Deviation-Aware Scaling around any base optimizer (Algorithm 2).

    Each step, with the gradients g_k already computed at the current point, every core of
    every group is scaled, G_k <- (1 + lambda_k) G_k with lambda_k from :func:`das_lambda`
    (Eq. 9), and then the base optimizer steps with the *same* g_k.  There is no second
    gradient.  eta is the current (scheduled) ``lr`` of the core's param group; alpha is
    ``alpha`` (stored per param group, like ``lr``) times ``alpha_schedule`` at the step count.
    Parameters outside the groups (bias, BatchNorm, dense) only get the base step.

    Args:
        params: parameters (or param-group dicts) for the base optimizer.
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``**kwargs``) or instance.
        groups: a model (groups found by :func:`tensorsam.groups.scale_invariant_groups`) or a
            list of parameter lists; every grouped parameter must be in ``params``.
        alpha: strength of the scaling.
        alpha_schedule: ``'constant'``, ``'linear'`` or ``'cosine'`` decay to 0 over ``total_steps``
            (T): the step taken after t earlier steps uses alpha * f(t/T), so the first uses alpha,
            the T-th alpha/T (linear), and every step past T uses 0.  Steps skipped for
            non-finite gradients do not count.  ``total_steps`` is required by the decays.
        normalization: ``'global'`` (default; one u for all groups, the paper's u_D) or
            ``'group'`` (u per group).
        variant: ``'paper'`` (Eq. 9) or ``'authors'``: a compatibility switch reproducing the
            authors' public code, which divides by ||G_k|| instead of ||G_k||^2 and computes u per
            group, so that alpha values tuned with their code can be reused.  alpha values do
            **not** transfer between variants or normalizations: under ``'global'`` u shrinks by
            about sqrt(number of groups) relative to ``'group'``, and the divisor changes the units.
        skip_nonfinite: check the gradients once per step (one host sync) and skip the step,
            touching nothing, when one is non-finite.  With a ``GradScaler`` use
            ``scaler.step(opt)`` instead: its single check skips the whole step.
        foreach: multi-tensor (``True``/``None``) or per-tensor (``False``) implementation.

    Example::

        model = tensorsam.models.resnet(32, "tr", 15)
        opt = DAS(model.parameters(), torch.optim.SGD, groups=model, alpha=0.1,
                  lr=0.1, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)  # also moves DAS's eta
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()            # scale the cores, then SGD with the same gradients

        # mixed precision: scaler.step unscales, and skips the whole step on inf/NaN
        scaler.scale(loss_fn(model(x), y)).backward(); scaler.step(opt); scaler.update()
    """

    def __init__(self, params, base_optimizer, *, groups, alpha: float,
                 alpha_schedule: str = "constant", total_steps: int | None = None,
                 normalization: str | None = None, variant: str = "paper",
                 skip_nonfinite: bool = False, foreach: bool | None = None, **kwargs):
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
        params = None if params is None else list(params)
        super().__init__(params, base_optimizer, {"alpha": check_alpha(alpha)}, foreach=foreach,
                         skip_nonfinite=skip_nonfinite, **kwargs)
        owned = [p for g in self.param_groups for p in g["params"]]
        self.plan = GroupPlan(resolve_groups(groups, owned), self.param_groups)

    def alpha_factor(self) -> float:
        """The schedule's factor alpha_t / alpha_0 at the current python step counter."""
        return self.schedule(1.0, self._step, self.total_steps)

    @torch.no_grad()
    def before_base_step(self) -> None:
        """G_k <- (1 + lambda_k) G_k for every core whose group has gradients (no host sync)."""
        plan = self.plan.with_grads()
        if plan is None:
            return
        cores = plan.cores
        both = plan.norms(cores + [p.grad for p in cores], self.foreach)   # one multi-tensor call
        n, gamma = both[:len(cores)], both[len(cores):].square()
        seg, counts = plan.seg_counts(n.device)
        eta_alpha = lr_alpha_per_core(self.param_groups, plan.group_index, self.alpha_factor(), n)
        if self.variant == "paper":
            lam = das_lambda(n.square(), gamma, seg, counts, eta_alpha, self.normalization, "squared")
        else:
            lam = das_lambda(n.square(), gamma, seg, counts, eta_alpha, "group", "norm")
        plan.scale_cores_(1.0 + lam, self.foreach)
