"""Every formula of the papers, once, on per-core norm tensors.

Notation (DAS paper): a group is an ordered list of cores G_1..G_K composed multilinearly;
s_k = ||G_k||_F^2, gamma_k = ||g_k||_F^2 with g_k the gradient of core k; bars are means over the
group.  Cores of several groups lie end to end in one 1-D tensor, ``seg[k]`` is the group of core
k and ``counts`` the group sizes (:func:`tensorsam.norms.segments`).

Every function is pure tensor code: no host sync, no Python branch on a tensor value, and
traceable by ``torch.compile``.  Degenerate inputs have defined results (zero norms give
factors of 0 or 1, never NaN).  ``dynamics`` and ``optim`` both take their maths from here.
"""

from __future__ import annotations

import torch


def segment_sum(values: torch.Tensor, seg: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per-group sums of per-core ``values``.

    Inside ``torch.compile`` the sum is a one-hot product: torch 2.13's inductor CPU codegen
    fails an internal assertion on the scatter-add of ``index_add_`` for some sizes."""
    if torch.compiler.is_compiling():
        groups = torch.arange(n_groups, device=seg.device)
        return ((groups.unsqueeze(1) == seg.unsqueeze(0)).to(values.dtype) * values).sum(1)
    return torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, seg, values)


def group_mean(values: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-core mean of ``values`` over the core's group (e.g. s_bar, gamma_bar)."""
    return (segment_sum(values, seg, counts.numel()) / counts)[seg]


def sam_u(total: torch.Tensor) -> torch.Tensor:
    """SAM's normalisation u = (sum_j gamma_j)^(-1/2) (Theorem 2), from the sum ``total`` of squared
    gradient norms; over every core of every group it is the multi-layer u_D (appendix Theorems
    A.1/A.2).  A zero total (no gradient) gives u = 0."""
    return torch.where(total > 0, total.rsqrt(), torch.zeros_like(total))


def sam_perturbation_factor(grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1, step 2: the factor 1/||g|| of e = rho * g / ||g|| (ASAM: 1/|| |w| g ||), and
    whether the gradient was finite.  A zero or non-finite norm gives 0: no perturbation."""
    finite = torch.isfinite(grad_norm)
    ok = finite & (grad_norm > 0)
    inv = torch.where(ok, 1.0 / torch.where(ok, grad_norm, torch.ones_like(grad_norm)),
                      torch.zeros_like(grad_norm))
    return inv, finite


def norm_deviation(s: torch.Tensor, seg: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """Norm deviation Q = sum_k (s_k - s_bar)^2 (Definition 1, Eq. 5), equal to
    (1/2K) sum_{i,j} (s_i - s_j)^2 (Eq. 6).  One value, or one per group with ``seg``/``counts``."""
    if seg is None:
        return (s - s.mean()).square().sum()
    return segment_sum((s - group_mean(s, seg, counts)).square(), seg, counts.numel())


def norm_grad_covariance(s: torch.Tensor, gamma: torch.Tensor, seg: torch.Tensor | None = None,
                         counts: torch.Tensor | None = None) -> torch.Tensor:
    """Cov(s, gamma) = (1/K) sum_k (s_k - s_bar)(gamma_k - gamma_bar) (Theorem 3).

    Under SAM's gradient flow dQ/dt = 4 rho u K Cov + O(rho^2); one SGD step changes Q by
    2 eta^2 K Cov + eta^4 sum_k (gamma_k - gamma_bar)^2 (Theorem 1, discrete form).  One value,
    or one per group with ``seg``/``counts``."""
    if seg is None:
        return ((s - s.mean()) * (gamma - gamma.mean())).mean()
    ds = s - group_mean(s, seg, counts)
    dg = gamma - group_mean(gamma, seg, counts)
    return segment_sum(ds * dg, seg, counts.numel()) / counts


def das_lambda(s: torch.Tensor, gamma: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor,
               eta_alpha: torch.Tensor, normalization: str = "global",
               divisor: str = "squared") -> torch.Tensor:
    """DAS's scaling (Eq. 9; Algorithm 2, line 4): lambda_k = eta alpha u (gamma_k - gamma_bar) / s_k.

    ``eta_alpha`` is eta_k * alpha_k per core.  ``normalization='global'``: u = (sum of gamma over
    every core of every group)^(-1/2), the multi-layer u_D; ``'group'``: u of core k's own group,
    as in Algorithm 2.  ``divisor='squared'`` divides by s_k = ||G_k||^2 (Eq. 9), ``'norm'`` by
    ||G_k|| (the authors' code).  A zero-norm core or all-zero gradients give lambda = 0.
    """
    group_sum = segment_sum(gamma, seg, counts.numel())
    gamma_bar = (group_sum / counts)[seg]
    u = sam_u(group_sum.sum() if normalization == "global" else group_sum[seg])
    denom = s if divisor == "squared" else s.sqrt()
    ok = denom > 0
    lam = eta_alpha * u * (gamma - gamma_bar) / torch.where(ok, denom, torch.ones_like(denom))
    return torch.where(ok, lam, torch.zeros_like(lam))


def nbar_sign(grad_x_norm: torch.Tensor, grad_y_norm: torch.Tensor) -> torch.Tensor:
    """nBAR (BAR paper, Algorithm 2): sigma = +1 if ||g_x|| >= ||g_y||, else -1, so that the factor
    with the larger gradient grows, as under SAM (BAR's Theorem 2)."""
    return torch.where(grad_x_norm >= grad_y_norm, 1.0, -1.0).to(grad_x_norm.dtype)


def obar_sign(x_norm: torch.Tensor, y_norm: torch.Tensor) -> torch.Tensor:
    """oBAR (BAR paper, Algorithm 3): sigma = -1 if ||x|| >= ||y||, else +1, so that the larger factor
    shrinks, following the regulariser alpha |x^T x - y^T y|."""
    return torch.where(x_norm >= y_norm, -1.0, 1.0).to(x_norm.dtype)


def bar_factors(sigma: torch.Tensor, eta_alpha: torch.Tensor) -> torch.Tensor:
    """BAR's scalings (Algorithms 2 and 3): x <- (1 + sigma eta alpha) x, y <- (1 - sigma eta alpha) y.

    ``sigma`` has one sign per pair, ``eta_alpha`` one value per core (x_1, y_1, x_2, ...); the
    result has one factor per core in that order."""
    signs = torch.stack([sigma, -sigma], dim=1).reshape(-1)
    return 1.0 + signs * eta_alpha


def rebalance_factors(core_norms: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Exact rebalancing: c_k = (prod_j ||G_j||)^(1/K) / ||G_k||, in log space.

    The c_k of a group multiply to 1, so the composed tensor is unchanged, and every ||c_k G_k||
    is the geometric mean, so Q = 0.  A group with a zero-norm or non-finite core gets c = 1.
    """
    n_groups = counts.numel()
    ok = (core_norms > 0) & torch.isfinite(core_norms)
    log_n = torch.where(ok, core_norms, torch.ones_like(core_norms)).log()
    log_mean = (segment_sum(log_n, seg, n_groups) / counts)[seg]
    group_ok = segment_sum((~ok).to(core_norms.dtype), seg, n_groups)[seg] == 0
    c = torch.exp(log_mean - log_n)
    return torch.where(group_ok, c, torch.ones_like(c))
