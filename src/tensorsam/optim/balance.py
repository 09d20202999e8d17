"""Exact rebalancing (SPEC §3, beyond the papers): rescale every core of a group to the
group's geometric-mean norm, so that Q = 0 while the composed tensor is unchanged."""

from __future__ import annotations

import torch

from tensorsam.optim.base import GroupPlan, WrappedOptimizer, norms, resolve_foreach, resolve_groups
from tensorsam.optim.base import segment_sum as _segment_sum

# Power p of the rescaling of each optimizer-state entry: entry <- entry * c^(-p).  A core
# scaled by c has gradient g/c at the new point (the map is linear in each core and the other
# cores' product changes by 1/c), so gradient-like state (momentum, first moments) scales by
# 1/c and squared-gradient state (second moments) by 1/c^2.
STATE_POWERS = {"momentum_buffer": 1, "exp_avg": 1, "grad_avg": 1,
                "exp_avg_sq": 2, "max_exp_avg_sq": 2, "square_avg": 2, "sum": 2}


def rebalance_factors(core_norms: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """c_k = (prod_j ||G_j||)^(1/K) / ||G_k||, computed in log space (SPEC §3, exact rebalancing).

    The product of the c_k of a group is 1, so the composed tensor is unchanged, and every
    ||c_k G_k|| equals the geometric mean, so Q = 0.  A group with a zero-norm (or non-finite)
    core gets c = 1 for all its cores: it is left unchanged.
    """
    n_groups = counts.numel()
    ok = (core_norms > 0) & torch.isfinite(core_norms)
    log_n = torch.where(ok, core_norms, torch.ones_like(core_norms)).log()
    log_mean = (_segment_sum(log_n, seg, n_groups) / counts)[seg]
    group_ok = _segment_sum((~ok).to(core_norms.dtype), seg, n_groups)[seg] == 0
    c = torch.exp(log_mean - log_n)
    return torch.where(group_ok, c, torch.ones_like(c))


def _rescale_state(optimizer: torch.optim.Optimizer, cores, c: torch.Tensor) -> None:
    """Rescale the optimizer's per-parameter state of ``cores`` by ``c^-p`` (see STATE_POWERS)."""
    optimizer = getattr(optimizer, "base_optimizer", optimizer)
    inv = c.reciprocal().unbind()
    for p, f in zip(cores, inv):
        st = optimizer.state.get(p)
        if not st:
            continue
        for key, power in STATE_POWERS.items():
            t = st.get(key)
            if isinstance(t, torch.Tensor) and t.shape == p.shape:
                t.mul_(f if power == 1 else f * f)


@torch.no_grad()
def rebalance_(groups, optimizer: torch.optim.Optimizer | None = None, foreach: bool | None = None) -> None:
    """Rebalance every group in place (see :func:`rebalance_factors`); no host sync.

    ``groups`` is a model or a list of parameter lists.  With ``optimizer`` (a torch optimizer
    or a tensorsam wrapper), its state of the rescaled cores is rescaled consistently
    (``STATE_POWERS``: momentum buffer and Adam's exp_avg by 1/c, exp_avg_sq by 1/c^2).

    Example::

        for step, (x, y) in enumerate(loader):
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
            if step % 100 == 99:
                rebalance_(model, opt)
    """
    groups = resolve_groups(groups, None, need_grad=False)
    plan = GroupPlan(groups, group_index=[0] * sum(len(g) for g in groups))
    _rebalance_plan(plan, optimizer, resolve_foreach(foreach))


def _rebalance_plan(plan: GroupPlan, optimizer, foreach: bool) -> None:
    if not plan.cores:
        return
    n = norms(plan.cores, foreach)
    seg, counts = plan.seg_counts(n.device)
    c = rebalance_factors(n, seg, counts.to(n.dtype))
    plan.scale_cores_(c, foreach)
    if optimizer is not None:
        _rescale_state(optimizer, plan.cores, c)


class Rebalance(WrappedOptimizer):
    r"""Any base optimizer, plus exact rebalancing of every group after every ``every``-th step.

    Rebalancing changes no function value; it only moves along the scale symmetry.  What it does
    to the base optimizer's state:

    - ``rescale_state=False`` (default): momentum buffers and Adam moments are left as they
      are, i.e. in the coordinates of the previous scale.  A core scaled up by c then keeps a
      momentum c times larger than the gradient it now receives (g/c), and Adam's update
      m/sqrt(v) is unchanged until the moments decay.
    - ``rescale_state=True``: the state is mapped to the new coordinates as if the gradient
      history had been taken at the rebalanced point: momentum buffer and exp_avg by 1/c,
      exp_avg_sq (and max_exp_avg_sq, RMSprop/Adagrad accumulators) by 1/c^2.  Adam's step
      m/sqrt(v) is then unchanged in size, SGD's momentum keeps pointing the same way in
      function space.  Other state entries (step counters, unknown keys) are untouched.

    Example::

        opt = Rebalance(model.parameters(), torch.optim.SGD, groups=model, every=100,
                        lr=0.1, momentum=0.9)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """

    def __init__(self, params, base_optimizer, *, groups, every: int = 1, rescale_state: bool = False,
                 skip_nonfinite: bool = False, foreach: bool | None = None, **kwargs):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not isinstance(rescale_state, bool):
            raise ValueError(f"rescale_state must be a bool, got {rescale_state!r}")  # noqa: TRY004
        self.every, self.rescale_state = every, rescale_state
        params = None if params is None else list(params)
        super().__init__(params, base_optimizer, {}, foreach=foreach, skip_nonfinite=skip_nonfinite,
                         **kwargs)
        owned = [p for g in self.param_groups for p in g["params"]]
        self.plan = GroupPlan(resolve_groups(groups, owned), self.param_groups)

    def after_base_step(self) -> None:
        """After every ``every``-th base step, rebalance all groups (no host sync)."""
        if self._step % self.every == 0:
            _rebalance_plan(self.plan, self.base_optimizer if self.rescale_state else None, self.foreach)
