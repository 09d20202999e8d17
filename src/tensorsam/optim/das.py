"""DAS: Deviation-Aware Scaling (Algorithm 2, Eq. 9 of the DAS paper; SPEC §3)."""

from __future__ import annotations

import torch

from tensorsam.optim.base import (
    GroupPlan,
    MaybeCompiled,
    WrappedOptimizer,
    acc_dtype,
    acc_like,
    check_alpha,
    check_compile,
    lr_alpha_per_core,
    resolve_groups,
    segment_sum,
    single_bucket,
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


def das_scale_(cores: list[torch.Tensor], grads: list[torch.Tensor], eta_alpha: torch.Tensor,
               seg: torch.Tensor, counts: torch.Tensor, normalization: str, divisor: str) -> None:
    """Algorithm 2, lines 3-5 on tensors only: G_k <- (1 + lambda_k) G_k in place, lambda_k from
    :func:`das_lambda` with s_k = ||G_k||^2 and gamma_k = ||g_k||^2 (half and bfloat16 reduced
    in float32).  Compiled as one function by ``DAS(compile=True)``."""
    n = torch.stack([torch.linalg.vector_norm(t, dtype=acc_dtype(t.dtype)) for t in [*cores, *grads]])
    k = len(cores)
    lam = das_lambda(n[:k].square(), n[k:].square(), seg, counts, eta_alpha, normalization, divisor)
    for core, f in zip(cores, (1.0 + lam).unbind()):
        core.mul_(f)


_das_scale_compiled = MaybeCompiled(das_scale_)


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
        compile: run the scaling (norms -> lambda -> G_k *= 1 + lambda_k, :func:`das_scale_`) as
            one ``torch.compile``'d function when every grouped core has a gradient and all share
            one device and dtype (else the eager path).  Compilation costs seconds once per
            process; a step then costs one call instead of ~20 small ops, which matters for
            small models (E1 completion: 4 cores).  Eager on compiler failure, with a warning.

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
        self.compile = check_compile(compile)
        params = None if params is None else list(params)
        super().__init__(params, base_optimizer, {"alpha": check_alpha(alpha)}, foreach=foreach,
                         skip_nonfinite=skip_nonfinite, **kwargs)
        owned = [p for g in self.param_groups for p in g["params"]]
        self.plan = GroupPlan(resolve_groups(groups, owned), self.param_groups)
        self._like: dict = {}   # (device, dtype) -> 0-dim tensor giving eta_alpha's device and dtype

    def alpha_factor(self) -> float:
        """The schedule's factor alpha_t / alpha_0 at the current python step counter."""
        return self.schedule(1.0, self._step, self.total_steps)

    def scaling_args(self) -> tuple | None:
        """The arguments after ``(cores, grads)`` of :func:`das_scale_` for the coming step,
        ``(eta_alpha, seg, counts, normalization, divisor)``, or ``None`` unless the grouped cores
        share one device and dtype.

        For fusing the scaling into a compiled gradient function: compute the gradients g_k at
        G_k (of every grouped core, same device and dtype), call ``das_scale_(self.plan.cores, g,
        *args)`` in the same graph, put g_k in ``.grad`` and call ``step(prescaled=True)``.
        Builds no host copy and reads no device value.
        """
        cores = self.plan.cores
        if not single_bucket(cores):
            return None
        seg, counts = self.plan.seg_counts(cores[0].device)
        eta_alpha = lr_alpha_per_core(self.param_groups, self.plan.group_index, self.alpha_factor(),
                                      acc_like(self._like, cores[0]))
        return eta_alpha, seg, counts, self.normalization, "squared" if self.variant == "paper" else "norm"

    @torch.no_grad()
    def step(self, closure=None, *, prescaled: bool = False):
        """A DAS step (see :class:`DAS`); ``prescaled=True`` skips the scaling, which the caller
        has applied to the cores with :func:`das_scale_` and :meth:`scaling_args` (no closure then)."""
        if not prescaled:
            return super().step(closure)
        if closure is not None:
            raise ValueError("step(prescaled=True) takes no closure: the gradients were computed with the scaling")
        if not self._skip_this_step():
            self.base_optimizer.step()
            self._step += 1
        return None

    @torch.no_grad()
    def before_base_step(self) -> None:
        """G_k <- (1 + lambda_k) G_k for every core whose group has gradients (no host sync)."""
        plan = self.plan.with_grads()
        if plan is None:
            return
        if self.compile and plan is self.plan and single_bucket(plan.cores + [p.grad for p in plan.cores]):
            args = self.scaling_args()
            if args is not None:
                _das_scale_compiled(plan.cores, [p.grad for p in plan.cores], *args)
                return
        cores = plan.cores
        grads = [p.grad for p in cores]
        both = plan.norms(cores + grads, self.foreach)   # one multi-tensor call
        n, gamma = both[:len(cores)], both[len(cores):].square()
        seg, counts = plan.seg_counts(n.device)
        eta_alpha = lr_alpha_per_core(self.param_groups, plan.group_index, self.alpha_factor(), n)
        divisor = "squared" if self.variant == "paper" else "norm"
        lam = das_lambda(n.square(), gamma, seg, counts, eta_alpha, self.normalization, divisor)
        plan.scale_cores_(1.0 + lam, self.foreach)
