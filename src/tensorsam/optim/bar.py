"""nBAR and oBAR: balancedness-aware regularisation for (x, y) pairs such as LoRA's (A, B)
(BAR paper, Algorithms 2 and 3, restated in ``papers/bar-algorithms.md``; SPEC §3)."""

from __future__ import annotations

import torch

from tensorsam.optim.base import (
    GroupPlan,
    WrappedOptimizer,
    check_alpha,
    lr_alpha_per_core,
    resolve_groups,
)
from tensorsam.optim.schedules import get_schedule

MODES = ("n", "o")


def nbar_sign(grad_x_norm: torch.Tensor, grad_y_norm: torch.Tensor) -> torch.Tensor:
    """nBAR (BAR Algorithm 2): sigma = +1 if ||g_x|| >= ||g_y||, else -1.

    x <- (1 + sigma*alpha*eta) x and y <- (1 - sigma*alpha*eta) y: the factor with the larger
    gradient grows, mimicking SAM's dynamics (BAR's Theorem 2)."""
    return torch.where(grad_x_norm >= grad_y_norm, 1.0, -1.0).to(grad_x_norm.dtype)


def obar_sign(x_norm: torch.Tensor, y_norm: torch.Tensor) -> torch.Tensor:
    """oBAR (BAR Algorithm 3): sigma = -1 if ||x|| >= ||y||, else +1.

    x <- (1 + sigma*alpha*eta) x and y <- (1 - sigma*alpha*eta) y: the larger factor shrinks,
    following the regulariser alpha*|x^T x - y^T y|."""
    return torch.where(x_norm >= y_norm, -1.0, 1.0).to(x_norm.dtype)


class BAR(WrappedOptimizer):
    r"""nBAR (``mode='n'``) or oBAR (``mode='o'``) around any base optimizer.

    Each step, with the gradients already computed, every pair (x, y) is scaled, x by
    (1 + sigma*alpha_t*eta) and y by (1 - sigma*alpha_t*eta) with sigma from :func:`nbar_sign` or
    :func:`obar_sign`, "in the same manner as weight decay", and then the base optimizer steps
    with the same gradients.  eta is the current ``lr`` of each factor's param group; alpha_t is
    ``alpha`` (per param group) times ``alpha_schedule`` (decreasing by default, as BAR advises).
    The branch is a ``torch.where`` over all pairs at once: no host sync.

    Args:
        pairs: list of (x, y) parameter pairs, or a model (its scale-invariant groups, which
            must all be pairs, e.g. a peft LoRA model).
        mode: ``'n'`` (non-overparametrised problems, LoRA) or ``'o'`` (overparametrised).
        alpha, alpha_schedule, total_steps: strength and its schedule (``'linear'``,
            ``'cosine'`` or ``'constant'``).
        skip_nonfinite, foreach, base_optimizer, \*\*kwargs: as for :class:`~tensorsam.optim.DAS`.

    Example::

        model = get_peft_model(base_model, LoraConfig(r=8, target_modules=["query", "value"]))
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = BAR(trainable, torch.optim.AdamW, pairs=model, mode="n", alpha=0.1,
                  alpha_schedule="cosine", total_steps=num_steps, lr=1e-4)
        for batch in loader:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    """

    def __init__(self, params, base_optimizer, *, pairs, mode: str = "n", alpha: float,
                 alpha_schedule: str = "linear", total_steps: int | None = None,
                 skip_nonfinite: bool = False, foreach: bool | None = None, **kwargs):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected 'n' (nBAR) or 'o' (oBAR)")
        self.schedule = get_schedule(alpha_schedule, total_steps)
        self.alpha_schedule, self.total_steps, self.mode = alpha_schedule, total_steps, mode
        params = None if params is None else list(params)
        super().__init__(params, base_optimizer, {"alpha": check_alpha(alpha)}, foreach=foreach,
                         skip_nonfinite=skip_nonfinite, **kwargs)
        owned = [p for g in self.param_groups for p in g["params"]]
        self.plan = GroupPlan(resolve_groups(pairs, owned, "pairs", size=2), self.param_groups)

    @torch.no_grad()
    def before_base_step(self) -> None:
        """x <- (1 + sigma*alpha*eta) x, y <- (1 - sigma*alpha*eta) y for every pair with gradients."""
        plan = self.plan.with_grads()
        if plan is None:
            return
        cores = plan.cores                       # x_1, y_1, x_2, y_2, ...
        if self.mode == "n":
            n = plan.norms([p.grad for p in cores], self.foreach)
        else:
            n = plan.norms(cores, self.foreach)
        sigma = nbar_sign(n[0::2], n[1::2]) if self.mode == "n" else obar_sign(n[0::2], n[1::2])
        signs = torch.stack([sigma, -sigma], dim=1).reshape(-1)   # +sigma for x, -sigma for y
        eta_alpha = lr_alpha_per_core(self.param_groups, plan.group_index,
                                      self.schedule(1.0, self._step, self.total_steps), n)
        plan.scale_cores_(1.0 + signs * eta_alpha, self.foreach)
