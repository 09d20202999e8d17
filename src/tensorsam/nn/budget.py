"""Per-layer ranks that meet a compression target: ``tensorize(..., ratio=)`` or ``rel_error=``.

**Candidate ranks (the ladder).**  Each layer's weight is the tensor of its layout
(:class:`~tensorsam.nn.layout.Layout`: modes ``(in..., k_h*k_w, out...)`` on the real channel axes,
reached from the ``(out, in, k_h, k_w)`` weight by a permutation, never by a ``view``).  Rung ``t``
is the uniform rank ``t``, capped exactly where the format's decomposition caps it, so that every
rung is a valid rank that ``from_dense`` returns unchanged (:func:`rank_at`):

* TT, TT-matrix: ``r_k = min(t, r_{k-1} I_k, prod_{j>k} I_j)`` (the unfolding sizes of TT-SVD;
  for TTM, ``I_k = m_k n_k``);
* TR: ``r_0 r_1 <= m = min(I_0, prod_{j>0} I_j)`` (TR-SVD's first unfolding), split as
  ``r_0 = min(t, s)``, ``r_1 = min(t, m // s)`` with ``s`` the largest divisor of ``m`` that is
  ``<= sqrt(m)``, then ``r_{k+1} = min(t, r_k I_k, r_0 prod_{j>k} I_j)`` (rotated to the
  decomposition's starting ``mode``);
* Tucker: ``R_k = min(t, I_k, prod_{j!=k} I_j)``;
* CP: ``R = t``, up to ``min_k prod_{j!=k} I_j``, a bound on the CP rank of every such tensor.

The ladder runs from ``t = 1`` to the ``t`` beyond which nothing changes (TT, TTM, TR and Tucker
are then exact); values of ``t`` with equal capped ranks are one rung, so parameters grow strictly
along it.  A rung's parameters are counted from shapes (factors built on the meta device: no
memory, no random numbers).  Its relative error ``e = ||W_hat - W||_F / ||W||_F`` comes from the
format's ``from_dense`` (tensorly: TT-SVD, TR-SVD, Tucker HOOI or HOSVD, CP-ALS, TTM-SVD), is
computed only when the search needs it, and is cached per (layer, rung).

**ratio=** (the whole model's parameters before / after): a greedy allocation on a thinned ladder
(every ``t`` up to :data:`THIN_FROM`, then ``t`` grows by :data:`THIN_STEP` per rung).  Every
layer starts at its lowest rung; if the model is still too large, the target is unreachable (the
error names the largest reachable ratio).  Then the move (layer, rung ``i`` -> rung ``j > i``)
with the largest ``(e_i^2 - e_j^2) / (p_j - p_i)``, squared error removed per added parameter, is
taken, among the moves that keep the ratio >= the target, until no move that lowers an error fits.
``j`` looks :data:`WINDOW` rungs ahead, and up to :data:`WINDOW_MAX` while none of them lowers the
error, so a flat or non-monotone stretch of errors does not stall a layer.  No layer grows: rungs with
more parameters than the dense layer are left out (its lowest rung stays).  This greedily
minimises the sum of squared *relative* errors: BatchNorm after a conv makes its scale irrelevant,
so every layer weighs the same.

**rel_error=** (a bound on every layer's ``e``): per layer, the lowest rung whose measured error
meets the bound: rungs 0, 1, 3, 7, ... are tried (galloping, so a high and expensive rank is only
decomposed when needed) up to the first that meets it, then bisection between it and the last that
did not.  The HOSVD's error cannot grow with the ranks (nested projections); TT-SVD, TR-SVD and
HOOI errors shrink with the ranks in practice.  CP-ALS is a local method whose error need not fall
as ``R`` grows.  For every format the rank returned has a *measured* error within the bound (an
error is never assumed); where the errors are not monotone, a lower rank might meet it too.  A
layer that misses the bound even at its highest rung (CP-ALS not converging, or a bound below the
weights' rounding) is a ValueError naming the layer and its best error.  In the greedy, CP's
non-monotone errors are what the look-ahead window is for: a move must lower the error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..tensors import TTM, FactorizedTensor
from .layers import layer_sizes
from .layout import Layout

WINDOW = 3        # rungs the greedy looks ahead of a layer's current rung
WINDOW_MAX = 16   # ... and at most this far while none of them lowers the error
THIN_FROM = 16    # the greedy's ladder keeps every t up to here,
THIN_STEP = 1.125  # then t grows by this factor per rung
BUDGET_FORMATS = ("cp", "tr", "tt", "ttm", "tucker")


# -- the ranks of rung t, per format --------------------------------------------------------------
def _chain_ranks(sizes, t: int) -> tuple[int, ...]:
    """TT-SVD's inner ranks at uniform rank t: r_k = min(t, r_{k-1} I_k, prod_{j>k} I_j)
    (the row and column counts of the k-th unfolding, tensorly's ``tensor_train``)."""
    ranks, r = [], 1
    for k in range(len(sizes) - 1):
        r = min(t, r * sizes[k], math.prod(sizes[k + 1:]))
        ranks.append(r)
    return tuple(ranks)


def _largest_divisor_below_sqrt(m: int) -> int:
    return max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)


def _ring_ranks(sizes, t: int, mode: int = 0) -> tuple[int, ...]:
    """TR-SVD's ring ranks at uniform rank t (tensorly's ``tensor_ring`` from ``mode``): the first
    unfolding (I_mode by the rest) gives r_0 r_1 <= m singular vectors, split as evenly as m's
    divisors allow; each later unfolding (r_k I_k by r_0 prod_{j>k} I_j) caps r_{k+1}."""
    n = len(sizes)
    rot = list(sizes[mode:]) + list(sizes[:mode])
    m = min(rot[0], math.prod(rot[1:]))
    s = _largest_divisor_below_sqrt(m)
    r = [min(t, s), min(t, m // s)]
    for k in range(1, n - 1):
        r.append(min(t, r[k] * rot[k], r[0] * math.prod(rot[k + 1:])))
    return tuple(r[(j - mode) % n] for j in range(n))


def _tucker_ranks(sizes, t: int) -> tuple[int, ...]:
    """Multilinear ranks at uniform rank t: R_k <= I_k and <= the other modes' product (the
    mode-k unfolding's size)."""
    total = math.prod(sizes)
    return tuple(min(t, i, total // i) for i in sizes)


def _cp_max_rank(sizes) -> int:
    """min_k prod_{j!=k} I_j: the sum of that many rank-one terms (one per fibre of the largest
    mode) represents any tensor of this shape."""
    total = math.prod(sizes)
    return total // max(sizes)


def rank_at(layout: Layout, t: int, decompose_kwargs: dict | None = None):
    """The rank of rung ``t`` for ``layout``, in its format's convention (see the module doc)."""
    fmt, shape = layout.format, layout.factor_shape
    if fmt == "tt":
        return _chain_ranks(shape, t)
    if fmt == "ttm":
        rows, cols = layout.rows_cols
        return _chain_ranks([m * c for m, c in zip(rows, cols)], t)
    if fmt == "tr":
        return _ring_ranks(shape, t, int((decompose_kwargs or {}).get("mode", 0)) % len(shape))
    if fmt == "tucker":
        return _tucker_ranks(shape, t)
    if fmt == "cp":
        return min(t, _cp_max_rank(shape))
    raise ValueError(f"ratio= and rel_error= choose ranks for the formats {BUDGET_FORMATS}, not {fmt!r}")


def ladder(layout: Layout, decompose_kwargs: dict | None = None, thin: bool = False) -> list:
    """The distinct ranks of rungs t = 1, 2, ... up to the highest useful one (every t, or with
    ``thin`` every t up to :data:`THIN_FROM` and then ``t * THIN_STEP`` per rung)."""
    top = rank_at(layout, math.prod(layout.factor_shape), decompose_kwargs)
    rungs, t = [], 1
    while True:
        r = rank_at(layout, t, decompose_kwargs)
        if not rungs or r != rungs[-1]:
            rungs.append(r)
        if r == top:
            return rungs
        t = t + 1 if not thin or t < THIN_FROM else max(t + 1, round(t * THIN_STEP))


# -- one layer --------------------------------------------------------------------------------------
def relative_error(layout: Layout, weight: torch.Tensor, factors: FactorizedTensor) -> float:
    """||W_hat - W||_F / ||W||_F, both in the layout's (in..., [k], out...) order (0 for W = 0 = W_hat)."""
    w = weight.detach()
    target = w.permute(*range(1, w.ndim), 0).reshape(layout.tensor_shape)
    with torch.no_grad():
        hat = factors.to_matrix().t() if isinstance(factors, TTM) else factors.reconstruct()
        diff = torch.linalg.vector_norm((hat.reshape(layout.tensor_shape) - target).double())
        norm = torch.linalg.vector_norm(target.double())
    return float(diff / norm) if norm > 0 else float(diff)


@dataclass(frozen=True)
class Choice:
    """The rank chosen for a layer, its measured relative error and its parameters (bias included)."""

    rank: object
    rel_error: float
    params: int


class LayerBudget:
    """One layer's ladder, with its parameter counts and lazily computed, cached errors.
    ``grow=False`` drops the rungs with more parameters than the dense layer (the lowest rung stays)."""

    def __init__(self, layer: torch.nn.Module, format: str, shape=None, decompose_kwargs: dict | None = None,
                 thin: bool = False, grow: bool = True):
        fin, fout, k = layer_sizes(layer)
        self.layout = Layout.of(format, fin, fout, None if k is None else math.prod(k), shape)
        self.weight = layer.weight.detach()
        self.bias = 0 if layer.bias is None else layer.bias.numel()
        self.dense_params = sum(p.numel() for p in layer.parameters())
        self.kwargs = dict(decompose_kwargs or {})
        self._params: dict = {}   # rank -> parameters
        self._errors: dict = {}   # rank -> relative error
        rungs = ladder(self.layout, self.kwargs, thin)
        self.rungs = rungs if grow else rungs[:1] + [r for r in rungs[1:] if self._count(r) <= self.dense_params]

    def _count(self, rank) -> int:
        if rank not in self._params:   # factors on the meta device: shapes only (and a validity check)
            self._params[rank] = self.layout.build(rank, device="meta").dof() + self.bias
        return self._params[rank]

    def params(self, i: int) -> int:
        """Parameters of the layer at rung ``i`` (cores and bias), from shapes."""
        return self._count(self.rungs[i])

    def error(self, i: int) -> float:
        """Relative reconstruction error of the format's ``from_dense`` at rung ``i`` (cached)."""
        rank = self.rungs[i]
        if rank not in self._errors:
            factors = self.layout.decompose(self.weight, rank, **self.kwargs)
            self._errors[rank] = relative_error(self.layout, self.weight, factors)
        return self._errors[rank]

    def choice(self, i: int) -> Choice:
        return Choice(self.rungs[i], self.error(i), self.params(i))

    def best_move(self, i: int, room: float) -> tuple[float, int, int] | None:
        """(error^2 removed per added parameter, rung j, added parameters) of the best move up from
        rung ``i`` that adds at most ``room`` parameters and lowers the error; None if there is none."""
        best, e2 = None, self.error(i) ** 2
        for j in range(i + 1, min(len(self.rungs), i + 1 + WINDOW_MAX)):
            dp = self.params(j) - self.params(i)
            if dp > room or (best is not None and j > i + WINDOW):
                break   # parameters grow along the ladder: no later rung fits either
            gain = e2 - self.error(j) ** 2
            if gain > 0 and (best is None or gain / dp > best[0]):
                best = (gain / dp, j, dp)
        return best


# -- the two targets --------------------------------------------------------------------------------
def allocate_ratio(budgets: dict[str, LayerBudget], params_before: int, ratio: float,
                   format: str = "") -> dict[str, Choice]:
    """Greedy allocation (module doc): ranks whose model ratio ``params_before / params_after`` is
    >= ``ratio`` with the least summed squared relative error the greedy finds.  The layers not in
    ``budgets`` keep their parameters."""
    rung = dict.fromkeys(budgets, 0)
    total = params_before - sum(b.dense_params - b.params(0) for b in budgets.values())
    if params_before / total < ratio:
        raise ValueError(
            f"ratio={ratio:g} is unreachable: the most this model compresses in format {format!r} is "
            f"{params_before / total:.2f}x ({params_before:,} -> {total:,} parameters, every one of the "
            f"{len(budgets)} tensorized layers at its lowest rank; "
            f"{params_before - sum(b.dense_params for b in budgets.values()):,} parameters stay dense)")
    limit = params_before / ratio
    while True:
        best = None
        for name, b in budgets.items():
            move = b.best_move(rung[name], limit - total)
            if move is not None and (best is None or move[0] > best[1][0]):
                best = (name, move)
        if best is None:
            break
        name, (_, j, dp) = best
        rung[name], total = j, total + dp
    return {name: b.choice(rung[name]) for name, b in budgets.items()}


def smallest_rung(b: LayerBudget, bound: float) -> int:
    """The lowest rung whose measured error is <= ``bound``, by galloping then bisection
    (module doc); a ValueError if even the highest rung misses it."""
    n, failing, i = len(b.rungs), -1, 0
    while i < n - 1 and b.error(i) > bound:
        failing, i = i, 2 * i + 1
    i = min(i, n - 1)
    if b.error(i) > bound:
        raise ValueError(f"rel_error={bound:g} is unreachable: its smallest error is {b.error(i):.3g}, at "
                         f"rank {b.rungs[i]} (the highest rank tried)")
    passing = i
    while passing - failing > 1:
        mid = (failing + passing) // 2
        if b.error(mid) <= bound:
            passing = mid
        else:
            failing = mid
    return passing


# -- after decomposition ----------------------------------------------------------------------------
@torch.no_grad()
def balance_cores_(factors: FactorizedTensor) -> torch.Tensor:
    """Rescale the cores to equal Frobenius norms, in place, and return the factors c_k:
    :func:`tensorsam.formulas.rebalance_factors`, c_k = (prod_j ||G_j||)^(1/K) / ||G_k||, through
    :func:`tensorsam.optim.functional.rebalance_`.  Exact: the reconstruction is multilinear in the
    cores and prod_k c_k = 1.  Every core of the library's formats is in the group (CP has no weights
    vector, Tucker's core G is the first core), so no scale is left outside it."""
    from ..optim.functional import rebalance_  # the optimizers' import chain stays out of tensorsam.nn's

    cores = list(factors.cores)
    seg = torch.zeros(len(cores), dtype=torch.long, device=cores[0].device)
    return rebalance_(cores, seg, torch.tensor([len(cores)], device=cores[0].device))
