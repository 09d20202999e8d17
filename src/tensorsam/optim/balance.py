"""Exact rebalancing (a baseline beyond the papers): rescale every core of a group to the
group's geometric-mean norm (:func:`tensorsam.formulas.rebalance_factors`), so that Q = 0 while
the composed tensor is unchanged."""

from __future__ import annotations

import torch

from tensorsam.norms import local_tensors
from tensorsam.optim import functional as F
from tensorsam.optim.plan import GroupPlan, resolve_groups
from tensorsam.optim.wrapper import WrappedOptimizer, check_flag, resolve_foreach

# Power p of the rescaling of each per-parameter state entry, entry <- entry * c^(-p), per base
# optimizer class.  Why: after G_k -> c_k G_k the gradient w.r.t. the new core at the rebalanced
# point is g_k / c_k (Phi is linear in G_k and the product of the other cores' factors is 1/c_k).
# Mapping the state "as if every past gradient had been taken in the new coordinates" replaces
# each g by g/c: state linear in g (SGD momentum, Adam's exp_avg, Adamax's exp_inf, RMSprop's
# grad_avg) scales by 1/c, state quadratic in g (exp_avg_sq, max_exp_avg_sq, Adagrad's sum,
# RMSprop's square_avg) by 1/c^2, and state that is already scale-free (RMSprop's momentum
# buffer holds g/sqrt(v)) stays.  Keys not listed (step counters, ...) are left alone.
_ADAM = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}
STATE_POWERS: dict[type, dict[str, int]] = {
    torch.optim.SGD: {"momentum_buffer": 1},
    torch.optim.Adam: _ADAM, torch.optim.AdamW: _ADAM, torch.optim.NAdam: _ADAM, torch.optim.RAdam: _ADAM,
    torch.optim.Adamax: {"exp_avg": 1, "exp_inf": 1},
    torch.optim.Adagrad: {"sum": 2},
    torch.optim.RMSprop: {"square_avg": 2, "grad_avg": 1, "momentum_buffer": 0},
}


def state_powers(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """The :data:`STATE_POWERS` entry for ``optimizer`` (or a wrapper's base optimizer), looked
    up along its class's MRO; a ``ValueError`` for an optimizer whose state is not mapped."""
    optimizer = getattr(optimizer, "base_optimizer", optimizer)
    for cls in type(optimizer).__mro__:
        if cls in STATE_POWERS:
            return STATE_POWERS[cls]
    names = sorted(c.__name__ for c in STATE_POWERS)
    raise ValueError(f"cannot rescale the state of {type(optimizer).__name__} consistently; supported: "
                     f"{names} (or use rescale_state=False / no optimizer)")


def _rescale_state(optimizer: torch.optim.Optimizer, cores, c: torch.Tensor) -> None:
    """Rescale the optimizer's per-parameter state of ``cores`` by ``c^-p`` (see STATE_POWERS)."""
    powers = {k: p for k, p in state_powers(optimizer).items() if p}
    optimizer = getattr(optimizer, "base_optimizer", optimizer)
    inv = c.reciprocal().unbind()
    for p, f in zip(cores, inv):
        st = optimizer.state.get(p)
        if not st:
            continue
        for key, power in powers.items():
            t = st.get(key)
            if isinstance(t, torch.Tensor) and t.shape == p.shape:
                local_tensors([t])[0].mul_(f if power == 1 else f * f)   # a DTensor's shard in place


@torch.no_grad()
def rebalance_(groups, optimizer: torch.optim.Optimizer | None = None, foreach: bool | None = None) -> None:
    """Rebalance every group in place (see :func:`tensorsam.formulas.rebalance_factors`).

    It reads no device value, but builds the group index anew on every call (one small
    host-to-device copy on a GPU); :class:`Rebalance` builds it once.

    ``groups`` is a model or a list of parameter lists.  With ``optimizer`` (a torch optimizer
    or a tensorsam wrapper), its state of the rescaled cores is rescaled consistently
    (``STATE_POWERS``: momentum buffer and Adam's exp_avg by 1/c, exp_avg_sq by 1/c^2); a
    ``ValueError`` for a base optimizer whose state is not mapped there.

    Example::

        for step, (x, y) in enumerate(loader):
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
            if step % 100 == 99:
                rebalance_(model, opt)
    """
    groups = resolve_groups(groups, None, need_grad=False)
    if optimizer is not None:
        state_powers(optimizer)   # refuse an unsupported optimizer before touching anything
    plan = GroupPlan(groups, group_index=[0] * sum(len(g) for g in groups))
    _rebalance_plan(plan, optimizer, resolve_foreach(foreach))


def _rebalance_plan(plan: GroupPlan, optimizer, foreach: bool) -> None:
    if not plan.cores:
        return
    seg, counts = plan.seg_counts(plan.cores[0].device)
    c = F.rebalance_(plan.cores, seg, counts, foreach, layout=plan.layout(plan.cores) if foreach else None,
                     buffer=plan.factor_buffer(plan.cores[0]) if foreach else None,
                     sharding=plan.sharding(plan.cores))
    if optimizer is not None:
        _rescale_state(optimizer, plan.cores, c)


class Rebalance(WrappedOptimizer):
    r"""Any base optimizer, plus exact rebalancing of every group after every ``every``-th step.

    Rebalancing changes no function value; it only moves along the scale symmetry.  Under FSDP2
    (DTensor cores) the norms of all cores take one all-reduce per rebalancing, and the factors
    scale the local shards (and their optimizer state).  What it does to the base optimizer's state:

    - ``rescale_state=False`` (default): momentum buffers and Adam moments are left as they
      are, i.e. in the coordinates of the previous scale.  A core scaled up by c then keeps a
      momentum c times larger than the gradient it now receives (g/c), and Adam's update
      m/sqrt(v) is unchanged until the moments decay.
    - ``rescale_state=True``: the state is mapped to the new coordinates as if the whole
      gradient history had been taken there.  After G_k -> c G_k the gradient w.r.t. the new
      core is g_k/c (the other cores' factors multiply to 1/c), so every past gradient becomes
      g/c: SGD's momentum buffer and Adam's exp_avg scale by 1/c, exp_avg_sq and
      max_exp_avg_sq by 1/c^2 (Adamax, Adagrad, RMSprop likewise, see ``STATE_POWERS``).
      Adam's next update m/sqrt(v) is then unchanged (up to eps), and SGD's momentum equals
      the momentum of the gradients the rebalanced model would have received.  Step counters
      are untouched.  Weight decay is not scale-invariant, so with it the map is only the
      consistent choice for the loss part.  Other base optimizers raise a ``ValueError``.

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
        self.every, self.rescale_state = every, check_flag(rescale_state, "rescale_state")
        params = None if params is None else list(params)
        super().__init__(params, base_optimizer, {}, foreach=foreach, skip_nonfinite=skip_nonfinite,
                         **kwargs)
        if rescale_state:
            state_powers(self.base_optimizer)
        owned = [p for g in self.param_groups for p in g["params"]]
        self.plan = GroupPlan(resolve_groups(groups, owned), self.param_groups)

    def after_base_step(self) -> None:
        """After every ``every``-th base step, rebalance all groups (no host sync)."""
        if self.step_count % self.every == 0:
            _rebalance_plan(self.plan, self.base_optimizer if self.rescale_state else None, self.foreach)
