"""nBAR and oBAR: balancedness-aware regularisation of (x, y) pairs such as LoRA's (A, B) (BAR
paper, Algorithms 2 and 3), over any base optimizer."""

from __future__ import annotations

import torch

from tensorsam.optim import functional as F
from tensorsam.optim.plan import GroupPlan, acc_like, resolve_groups
from tensorsam.optim.schedules import get_schedule
from tensorsam.optim.wrapper import WrappedOptimizer, check_strength

MODES = ("n", "o")


class BAR(WrappedOptimizer):
    r"""nBAR (``mode='n'``) or oBAR (``mode='o'``) around any base optimizer.

    .. code-block:: text

        sigma = +1 if ||g_x|| >= ||g_y|| else -1       (nBAR; oBAR: -1 if ||x|| >= ||y|| else +1)
        x <- (1 + sigma alpha_t eta) x,  y <- (1 - sigma alpha_t eta) y
        w <- base_step(w, g)                           with the same gradients

    eta is each factor's current ``lr``; alpha_t is ``alpha`` (per param group) times
    ``alpha_schedule`` (decreasing by default, as BAR advises).  No host sync.  Under FSDP2
    (DTensor factors) the norms of all pairs take one all-reduce per step.

    Args:
        pairs: a list of (x, y) parameter pairs, or a model whose scale-invariant groups are all
            pairs (e.g. a peft LoRA model).
        mode: ``'n'`` (non-overparametrised problems, LoRA) or ``'o'`` (overparametrised).
        alpha, alpha_schedule, total_steps: strength and its schedule.
        params, base_optimizer, foreach, skip_nonfinite, \*\*kwargs: as for :class:`~tensorsam.optim.DAS`.

    Example::

        model = get_peft_model(base_model, LoraConfig(r=8, target_modules=["query", "value"]))
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = BAR(trainable, torch.optim.AdamW, pairs=model, mode="n", alpha=0.1,
                  alpha_schedule="cosine", total_steps=num_steps, lr=1e-4)
    """

    def __init__(self, params, base_optimizer, *, pairs, mode: str = "n", alpha: float,
                 alpha_schedule: str = "linear", total_steps: int | None = None,
                 skip_nonfinite: bool = False, foreach: bool | None = None, **kwargs):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected 'n' (nBAR) or 'o' (oBAR)")
        self.schedule = get_schedule(alpha_schedule, total_steps)
        self.alpha_schedule, self.total_steps, self.mode = alpha_schedule, total_steps, mode
        params = None if params is None else list(params)
        super().__init__(params, base_optimizer, {"alpha": check_strength(alpha)}, foreach=foreach,
                         skip_nonfinite=skip_nonfinite, **kwargs)
        owned = [p for g in self.param_groups for p in g["params"]]
        self.plan = GroupPlan(resolve_groups(pairs, owned, "pairs", size=2), self.param_groups)
        self._like: dict = {}

    @torch.no_grad()
    def before_base_step(self) -> None:
        """Scale every pair that has gradients (:func:`~tensorsam.optim.functional.bar_scale_`)."""
        plan = self.plan.with_grads()
        if plan is None:
            return
        cores, grads = plan.cores, [p.grad for p in plan.cores]
        normed = grads if self.mode == "n" else cores
        eta_alpha = plan.eta_alpha(self.param_groups, self.schedule(1.0, self.step_count, self.total_steps),
                                   acc_like(self._like, normed[0]))
        F.bar_scale_(cores, grads, eta_alpha, self.mode, self.foreach,
                     layout=plan.layout(normed) if self.foreach else None,
                     buffer=plan.factor_buffer(eta_alpha) if self.foreach else None,
                     sharding=plan.sharding(normed))
