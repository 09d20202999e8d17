"""The functional API: one implementation of each algorithm's update, on lists of tensors.

As in ``torch.optim``, an optimizer's ``step`` gathers its tensors and hyperparameters and calls
one function here; that function takes the single-tensor path (``foreach=False``: a loop of
per-tensor ops, which is also what ``torch.compile`` traces) or the multi-tensor path
(``foreach=True``: ``torch._foreach_*``, norms through a :class:`~tensorsam.norms.StackedLayout`).
:func:`compiled` gives the ``torch.compile``'d single-tensor path.  The maths comes from
:mod:`tensorsam.formulas`; nothing here reads a device value.

- :func:`sam_perturb_` / :func:`sam_restore_`: SAM and ASAM's ascent step and its undoing
  (Algorithm 1);
- :func:`das_scale_`: DAS's scaling of the cores (Algorithm 2, Eq. 9); :func:`das_factors` its
  factors 1 + lambda_k, for a compiled caller that scales out of place;
- :func:`bar_scale_`: nBAR / oBAR's scaling of (x, y) pairs (BAR, Algorithms 2 and 3);
- :func:`rebalance_`: exact rebalancing of every group;
- :func:`adam_step`: ``torch.optim.Adam``'s step out of place, for a graph that takes the base
  step too (:func:`adam_fits_graph` says when it is the optimizer's own).

**Sharded parameters (DTensor, FSDP2).**  Every function takes ``sharding``, a
:class:`~tensorsam.norms.Sharding` of its norm list (``None`` on one process, where nothing else
changes).  With it, the functions work on the local tensors (``DTensor._local_tensor``): squared
norms are partial sums over each rank's shard, completed by ONE all-reduce of the stacked vector
(:func:`~tensorsam.norms.norms`), and the factors (lambda_k, BAR's and rebalancing's scalings,
SAM's e) are then applied to the local shards.  Every rank holds the same complete norms, so every
rank applies the same factors: the result is that of one process on the unsharded tensors.

**Fused steps.**  A caller that computes the gradients itself, e.g. in one compiled function, may
run these functions in that same graph and then let the optimizer take only the base step:
``opt.functional_args()`` (:class:`~tensorsam.optim.DAS`, :class:`~tensorsam.optim.SAM`) gives
the tensors and settings of the coming step, ``opt.base_step()`` takes the base step and counts
it.  For example, DAS inside a compiled gradient function::

    args = opt.functional_args()          # cores, eta_alpha, seg, counts, normalization, divisor

    @torch.compile
    def grads_and_scale(cores, eta_alpha, seg, counts):
        grads = torch.func.grad(loss_fn)(cores)
        das_scale_(cores, grads, eta_alpha, seg, counts, args.normalization, args.divisor)
        return grads

    ... put the gradients in .grad ...
    opt.base_step()
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from tensorsam.formulas import (
    bar_factors,
    das_lambda,
    nbar_sign,
    obar_sign,
    rebalance_factors,
    sam_perturbation_factor,
)
from tensorsam.norms import Sharding, StackedLayout, local_tensors, norms

__all__ = ["bar_scale_", "compiled", "das_factors", "das_scale_", "nan_unless", "rebalance_", "sam_perturb_", "sam_perturbation",
           "sam_restore_", "scale_"]


def scale_(tensors: Sequence[torch.Tensor], factors: torch.Tensor, foreach: bool = False,
           buffer: tuple[torch.Tensor, list[torch.Tensor]] | None = None) -> None:
    """tensors[k] *= factors[k] in place.  ``buffer`` (a persistent 1-D tensor and its 0-dim
    views) saves splitting ``factors`` anew each step on the multi-tensor path."""
    if not foreach:
        for t, f in zip(tensors, factors.unbind()):
            t.mul_(f)
        return
    if buffer is None:
        views = list(factors.unbind())
    else:
        buf, views = buffer
        buf.copy_(factors)
    torch._foreach_mul_(list(tensors), views)


def nan_unless(finite: torch.Tensor) -> torch.Tensor:
    """0 if ``finite`` else NaN: added to a gradient, it marks the step non-finite."""
    zero = torch.zeros((), device=finite.device)
    return torch.where(finite, zero, torch.full((), float("nan"), device=finite.device))


def _each(op: str, foreach: bool, xs: list, *args):
    """``torch._foreach_<op>(xs, *args)`` or the loop ``x.<op>(...)``; a list argument is taken per
    tensor, anything else (a 0-dim tensor) is shared."""
    if foreach:
        out = getattr(torch, f"_foreach_{op}")(xs, *args)
        return None if out is None else list(out)
    return [getattr(x, op)(*(a[i] if isinstance(a, list) else a for a in args)) for i, x in enumerate(xs)]


# -- SAM / ASAM ---------------------------------------------------------------------------------
def sam_perturbation(params: list[torch.Tensor], grads: list[torch.Tensor], rho: torch.Tensor,
                     adaptive: Sequence[bool], foreach: bool = False,
                     sharding: Sharding | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Algorithm 1, step 2: e_i = rho_i g_i / ||g|| with the norm over all tensors; for an adaptive
    (ASAM) tensor e_i = rho_i w_i^2 g_i / || |w| g ||.  ``rho`` holds each tensor's rho (1-D).

    Returns (e, whether the gradient was finite); a non-finite gradient gives e = 0.  With
    ``sharding``, e is the local shard of e (||g|| global, from one all-reduce).
    """
    if sharding is not None:
        params, grads = local_tensors(params), local_tensors(grads)
    weighted = list(grads)
    ada = [i for i, a in enumerate(adaptive) if a]
    if ada:
        absw = _each("abs", foreach, [params[i] for i in ada])
        for i, t in zip(ada, _each("mul", foreach, [grads[i] for i in ada], absw)):
            weighted[i] = t
    inv, finite = sam_perturbation_factor(norms(weighted, foreach, squared=True, sharding=sharding).sum().sqrt()
                                          if sharding is not None else
                                          torch.linalg.vector_norm(norms(weighted, foreach)))
    e = _each("mul", foreach, list(grads), list((inv * rho).unbind()))
    if ada:
        w2 = _each("mul", foreach, [params[i] for i in ada], [params[i] for i in ada])
        for i, t in zip(ada, _each("mul", foreach, [e[i] for i in ada], w2)):
            e[i] = t
    # e = 0 unless finite, in place (e is ours): one masked_fill_ per tensor, the flag moved once per device
    bad = {finite.device: ~finite}
    for t in e:
        mask = bad.get(t.device)
        if mask is None:
            mask = bad[t.device] = bad[finite.device].to(t.device)
        t.masked_fill_(mask, 0)
    return e, finite


def sam_perturb_(params: list[torch.Tensor], grads: list[torch.Tensor], saved: list[torch.Tensor],
                 rho: torch.Tensor, adaptive: Sequence[bool], foreach: bool = False,
                 sharding: Sharding | None = None) -> torch.Tensor:
    """``saved`` <- w, then w <- w + e (:func:`sam_perturbation`); returns whether the gradient was
    finite (a 0-dim bool tensor, for :func:`sam_restore_`).  With ``sharding``, on local shards."""
    if sharding is not None:
        params, grads, saved = local_tensors(params), local_tensors(grads), local_tensors(saved)
    e, finite = sam_perturbation(params, grads, rho, adaptive, foreach, sharding)
    _each("copy_", foreach, list(saved), list(params))
    _each("add_", foreach, list(params), e)
    return finite


def sam_restore_(params: list[torch.Tensor], saved: list[torch.Tensor], finite: torch.Tensor,
                 grads: list[torch.Tensor], foreach: bool = False, sharding: Sharding | None = None) -> None:
    """w <- saved, exactly (a copy, not a subtraction).  If the first-pass gradient was not
    ``finite``, NaN is added to the first of ``grads`` on each device, so that a GradScaler or a
    finite check skips the step: a SAM step is non-finite if either pass is.  With ``sharding``
    (DTensors), on local shards; ``finite`` is then the same on every rank."""
    if sharding is not None:
        params, saved, grads = local_tensors(params), local_tensors(saved), local_tensors(grads)
    _each("copy_", foreach, list(params), list(saved))
    first_on_device: dict = {}
    for g in grads:
        first_on_device.setdefault(g.device, g)
    poison = nan_unless(finite)
    for g in first_on_device.values():
        g.add_(poison.to(g.device))


# -- DAS, BAR, rebalancing ------------------------------------------------------------------------
def das_scale_(cores: list[torch.Tensor], grads: list[torch.Tensor], eta_alpha: torch.Tensor,
               seg: torch.Tensor, counts: torch.Tensor, normalization: str = "global",
               divisor: str = "squared", foreach: bool = False, layout: StackedLayout | None = None,
               buffer=None, sharding: Sharding | None = None) -> None:
    """Algorithm 2, lines 3-5: G_k <- (1 + lambda_k) G_k in place, lambda_k from
    :func:`~tensorsam.formulas.das_lambda` (Eq. 9) with s_k = ||G_k||^2, gamma_k = ||g_k||^2.
    ``layout``/``buffer``/``sharding`` (a :class:`~tensorsam.norms.Sharding` of ``cores + grads``)
    are those of a :class:`~tensorsam.optim.plan.GroupPlan`: with DTensors, every s_k and gamma_k
    of every group in one all-reduce."""
    factors = das_factors(cores, grads, eta_alpha, seg, counts, normalization, divisor, foreach, layout, sharding)
    scale_(cores if sharding is None else local_tensors(cores), factors, foreach, buffer)


def das_factors(cores: list[torch.Tensor], grads: list[torch.Tensor], eta_alpha: torch.Tensor, seg: torch.Tensor,
                counts: torch.Tensor, normalization: str = "global", divisor: str = "squared", foreach: bool = False,
                layout: StackedLayout | None = None, sharding: Sharding | None = None) -> torch.Tensor:
    """The factors 1 + lambda_k by which :func:`das_scale_` scales the cores (Eq. 9).  A compiled
    caller that scales out of place (``c * f_k``) and copies after the graph keeps inductor's
    fusion of the loss with its backward: a graph that mutates its inputs split it (completion)."""
    sq = norms([*cores, *grads], foreach, layout, squared=True, sharding=sharding)
    k = len(cores)
    return 1.0 + das_lambda(sq[:k], sq[k:], seg, counts, eta_alpha, normalization, divisor)


def bar_scale_(cores: list[torch.Tensor], grads: list[torch.Tensor], eta_alpha: torch.Tensor, mode: str,
               foreach: bool = False, layout: StackedLayout | None = None, buffer=None,
               sharding: Sharding | None = None) -> None:
    """BAR (Algorithms 2 and 3) on pairs laid out x_1, y_1, x_2, ...: x <- (1 + sigma eta alpha) x,
    y <- (1 - sigma eta alpha) y, sigma from the gradients' norms (``mode='n'``, nBAR) or the
    factors' norms (``'o'``, oBAR).  ``sharding``: of the normed list (DTensors, one all-reduce)."""
    n = norms(grads if mode == "n" else cores, foreach, layout, sharding=sharding)
    sigma = (nbar_sign if mode == "n" else obar_sign)(n[0::2], n[1::2])
    scale_(cores if sharding is None else local_tensors(cores), bar_factors(sigma, eta_alpha), foreach, buffer)


def rebalance_(cores: list[torch.Tensor], seg: torch.Tensor, counts: torch.Tensor, foreach: bool = False,
               layout: StackedLayout | None = None, buffer=None, sharding: Sharding | None = None) -> torch.Tensor:
    """Rescale every core to its group's geometric-mean norm
    (:func:`~tensorsam.formulas.rebalance_factors`); returns the factors c.  ``sharding``: of
    ``cores`` (DTensors, one all-reduce)."""
    n = norms(cores, foreach, layout, sharding=sharding)
    c = rebalance_factors(n, seg, counts.to(n.dtype))
    scale_(cores if sharding is None else local_tensors(cores), c, foreach, buffer)
    return c


# -- a base step inside a graph ------------------------------------------------------------------
def adam_fits_graph(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`adam_step` takes exactly the step ``optimizer`` would take on ``params``: a
    ``torch.optim.Adam`` (not a subclass) whose one param group holds exactly ``params``, without
    amsgrad, maximize, differentiable or capturable, and no step hooks (a graph would skip them)."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    if [id(q) for q in group["params"]] != [id(q) for q in params]:
        return False
    if any(group.get(flag) for flag in ("amsgrad", "maximize", "differentiable", "capturable")):
        return False
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
    return not (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or _global_optimizer_pre_hooks or _global_optimizer_post_hooks)


def adam_settings(group: dict) -> tuple:
    """``(betas, eps, weight_decay)`` of an Adam param group: :func:`adam_step`'s constants."""
    return tuple(group["betas"]), group["eps"], group["weight_decay"]


def adam_step(params, grads, exp_avgs, exp_avg_sqs, step: torch.Tensor, lr, betas: tuple[float, float],
              eps: float, weight_decay: float) -> tuple[list, list, list]:
    """``torch.optim.Adam``'s update (Kingma & Ba 2015, Algorithm 1; L2 weight decay added to the
    gradient), out of place for a compiled caller: (params, exp_avgs, exp_avg_sqs) after the step
    numbered ``step`` (the count including it)."""
    beta1, beta2 = betas
    bias1, bias2_sqrt = 1 - beta1 ** step, (1 - beta2 ** step).sqrt()
    out = [], [], []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if weight_decay:
            g = g + weight_decay * p
        m = m.lerp(g, 1 - beta1)
        v = v * beta2 + g * g * (1 - beta2)
        for lst, x in zip(out, (p - (lr / bias1) * m / (v.sqrt() / bias2_sqrt + eps), m, v)):
            lst.append(x)
    return out


# -- compiled paths -------------------------------------------------------------------------------
class _Compiled:
    """``fn`` through ``torch.compile`` (``fullgraph``, static shapes), eager for good, with a
    warning, if compilation fails.  ``fn`` must take tensors and constants that do not change
    between steps, so that new learning rates or step counts cause no recompilation."""

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
            warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(err).__name__}: {err}); "
                          "using the eager path", stacklevel=2)
            self.failed = True
            return self.fn(*args)


_COMPILED: dict = {}


def compiled(fn):
    """The compiled single-tensor path of a function of this module (one per process, shared by
    every optimizer, so a new optimizer over same-shaped tensors reuses the compiled code)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = _Compiled(fn)
    return _COMPILED[fn]
