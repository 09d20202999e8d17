"""The paper's norm-dynamics results, checked numerically in float64 (SPEC §2).

Problem: a random linear regression f(T) = 1/2 ||M vec(T) - y||^2 whose weight T is a Tucker or
TT tensor with deliberately imbalanced cores (core 0 scaled by 4, core 1 by 1/4: Phi is unchanged,
Q is not).  Gradients come from autograd; SAM's perturbation e = rho g / ||g|| (Algorithm 1).
"""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from tensorsam import dynamics
from tensorsam.tensors import TT, Tucker

DT = torch.float64
RHOS = [0.04, 0.02, 0.01, 0.005]


def make_tensor(fmt: str, seed: int):
    torch.manual_seed(seed)
    shape = (4, 5, 3)
    t = Tucker(shape, (2, 3, 2), dtype=DT) if fmt == "tucker" else TT(shape, (3, 2), dtype=DT)
    with torch.no_grad():
        t.cores[0].mul_(4.0)
        t.cores[1].div_(4.0)
    return t


def regression(fmt: str, seed: int):
    """(cores, f): detached cores of an imbalanced tensor and the loss as a function of cores."""
    t = make_tensor(fmt, seed)
    n = math.prod(t.shape)
    gen = torch.Generator().manual_seed(seed + 1)
    m = torch.randn(2 * n, n, generator=gen, dtype=DT) / math.sqrt(2 * n)
    y = torch.randn(2 * n, generator=gen, dtype=DT)

    def f_dense(w):
        return 0.5 * (m @ w.reshape(-1) - y).square().sum()

    def f(cores):
        return f_dense(functional_call(t, {f"cores.{k}": c for k, c in enumerate(cores)}, ()))

    f.dense, f.tensor = f_dense, t
    return [c.detach().clone() for c in t.cores], f


def grad(f, cores):
    cores = [c.detach().requires_grad_(True) for c in cores]
    return [g.detach() for g in torch.autograd.grad(f(cores), cores)]


def inner(a, b):
    return torch.stack([(x * y).sum() for x, y in zip(a, b)])


def sam_grad(f, cores, rho, g=None):
    """g~ = grad f(G + rho g/||g||), the norm global over every core passed."""
    g = grad(f, cores) if g is None else g
    norm = torch.cat([x.reshape(-1) for x in g]).norm()
    return grad(f, [c + rho * x / norm for c, x in zip(cores, g)])


def flow_dq(cores, gt):
    """dQ/dt along -g~: dQ/dt = 2 sum_k (s_k - s_bar) ds_k/dt with ds_k/dt = -2 <G_k, g~_k>."""
    s = dynamics.core_sq_norms(cores)
    return -4.0 * ((s - s.mean()) * inner(cores, gt)).sum()


def step(cores, g, eta):
    return [c - eta * x for c, x in zip(cores, g)]


def assert_linear_decay(errors, label):
    """The relative error must shrink at least linearly in rho (ratio <= 0.6 per halving)."""
    for a, b in itertools.pairwise(errors):
        assert b <= 0.6 * a, f"{label}: relative errors {errors} do not shrink linearly as rho halves"
    assert errors[-1] < 0.05, f"{label}: relative error {errors[-1]:.3g} at the smallest rho"


# -- Lemma A.1 and Theorem 1 -----------------------------------------------------------------
@settings(max_examples=20)
@given(fmt=st.sampled_from(["tucker", "tt"]), seed=st.integers(0, 10_000))
def test_lemma_a1_inner_products_equal_across_cores(fmt, seed):
    """<G_k, g_k> = <T, grad_T f> for every core k (Lemma A.1: Phi is linear in each core)."""
    cores, f = regression(fmt, seed)
    g = grad(f, cores)
    ip = inner(cores, g)
    w = f.tensor.reconstruct().detach().requires_grad_(True)
    (gw,) = torch.autograd.grad(f.dense(w), w)
    ref = (w * gw).sum()
    torch.testing.assert_close(ip, ref.expand_as(ip), rtol=1e-10, atol=1e-12)


@settings(max_examples=20)
@given(fmt=st.sampled_from(["tucker", "tt"]), seed=st.integers(0, 10_000),
       eta=st.floats(1e-3, 0.3))
def test_theorem1_one_sgd_step_exact(fmt, seed, eta):
    """Delta Q = 2 eta^2 K Cov(s, gamma) + eta^4 sum_k (gamma_k - gamma_bar)^2, exactly."""
    cores, f = regression(fmt, seed)
    g = grad(f, cores)
    k = len(cores)
    gamma = dynamics.grad_sq_norms(cores, g)
    dq = dynamics.norm_deviation(step(cores, g, eta)) - dynamics.norm_deviation(cores)
    pred = (2 * eta**2 * k * dynamics.norm_grad_covariance(cores, g)
            + eta**4 * (gamma - gamma.mean()).square().sum())
    scale = dynamics.norm_deviation(cores) + pred.abs()
    assert abs(dq - pred) <= 1e-10 * scale
    # the eta^4 term is really there: dropping it breaks the identity whenever it is not negligible
    quartic = eta**4 * (gamma - gamma.mean()).square().sum()
    if quartic > 1e-6 * scale:
        assert abs(dq - (pred - quartic)) > 1e-10 * scale


# -- Theorems 2 and 3 (one group) --------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["tucker", "tt"])
@pytest.mark.parametrize("seed", [0, 1])
def test_theorem3_flow_derivative_at_sam_gradient(fmt, seed):
    """dQ/dt = -4 sum_k (s_k - s_bar) <G_k, g~_k> -> 4 rho u K Cov(s, gamma) with error O(rho^2)."""
    cores, f = regression(fmt, seed)
    g = grad(f, cores)
    k = len(cores)
    u = dynamics.global_u(cores, g)
    cov = dynamics.norm_grad_covariance(cores, g)
    assert abs(cov) > 1e-3 * dynamics.core_sq_norms(cores).mean() * dynamics.grad_sq_norms(cores, g).mean()
    errors = []
    for rho in RHOS:
        pred = 4 * rho * u * k * cov
        # subtract the SGD flow (which is exactly 0 by Lemma A.1) to show only SAM's part
        sam = flow_dq(cores, sam_grad(f, cores, rho, g)) - flow_dq(cores, g)
        errors.append(float(abs(sam - pred) / abs(pred)))
    assert abs(float(flow_dq(cores, g))) < 1e-9 * float(dynamics.norm_deviation(cores))
    assert_linear_decay(errors, f"Theorem 3 flow ({fmt})")


@pytest.mark.parametrize("fmt", ["tucker", "tt"])
def test_theorem3_discrete_difference_of_steps(fmt):
    """(Delta Q_SAM - Delta Q_SGD) / eta at eta = rho^3 matches 4 rho u K Cov, error O(rho)."""
    cores, f = regression(fmt, 3)
    g = grad(f, cores)
    q0 = dynamics.norm_deviation(cores)
    pred_unit = 4 * dynamics.global_u(cores, g) * len(cores) * dynamics.norm_grad_covariance(cores, g)
    errors = []
    for rho in RHOS:
        eta = rho**3
        d_sam = dynamics.norm_deviation(step(cores, sam_grad(f, cores, rho, g), eta)) - q0
        d_sgd = dynamics.norm_deviation(step(cores, g, eta)) - q0
        errors.append(float(abs((d_sam - d_sgd) / eta - rho * pred_unit) / abs(rho * pred_unit)))
    assert_linear_decay(errors, f"Theorem 3 discrete ({fmt})")


@pytest.mark.parametrize("fmt", ["tucker", "tt"])
def test_theorem2_pairwise(fmt):
    """d/dt (s_i - s_j) = 2 rho u (gamma_i - gamma_j) + O(rho^2) for every pair i != j."""
    cores, f = regression(fmt, 4)
    g = grad(f, cores)
    gamma = dynamics.grad_sq_norms(cores, g)
    u = dynamics.global_u(cores, g)
    iu = torch.triu_indices(len(cores), len(cores), 1)
    errors = []
    for rho in RHOS:
        ds = -2 * inner(cores, sam_grad(f, cores, rho, g))  # ds_k/dt along -g~
        got = (ds[:, None] - ds[None, :])[iu[0], iu[1]]
        pred = (2 * rho * u * (gamma[:, None] - gamma[None, :]))[iu[0], iu[1]]
        errors.append(float((got - pred).norm() / pred.norm()))
    assert_linear_decay(errors, f"Theorem 2 ({fmt})")


# -- Theorems A.1 / A.2: two groups, one global u_D ------------------------------------------
def two_layer(seed: int):
    """x -> tanh(W1 x) -> W2 ., W1 (15x12) from a TT tensor, W2 (4x15) from a Tucker tensor."""
    torch.manual_seed(seed)
    t1, t2 = TT((3, 5, 12), (2, 3), dtype=DT), Tucker((4, 3, 5), (2, 2, 3), dtype=DT)
    with torch.no_grad():
        for t in (t1, t2):
            t.cores[0].mul_(3.0)
            t.cores[-1].div_(3.0)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 12, generator=gen, dtype=DT)
    y = torch.randn(32, 4, generator=gen, dtype=DT)

    def f(cores):
        c1, c2 = cores[:3], cores[3:]
        w1 = functional_call(t1, {f"cores.{k}": c for k, c in enumerate(c1)}, ()).reshape(15, 12)
        w2 = functional_call(t2, {f"cores.{k}": c for k, c in enumerate(c2)}, ()).reshape(4, 15)
        return 0.5 * (torch.tanh(x @ w1.T) @ w2.T - y).square().sum() / len(x)

    cores = [c.detach().clone() for c in [*t1.cores, *t2.cores]]
    return cores, f, [3, 4]


def test_theorem_a2_multilayer_global_u():
    """dQ_l/dt = 4 rho u_D K_l Cov_l per layer, with u_D over all cores of all layers."""
    cores, f, sizes = two_layer(0)
    g = grad(f, cores)
    groups = [cores[:3], cores[3:]]
    ggroups = [g[:3], g[3:]]
    u_d = dynamics.global_u(groups, ggroups)
    # u_D is global: smaller than either group's own u
    for grp, gg in zip(groups, ggroups):
        assert u_d < dynamics.global_u(grp, gg)
    cov = dynamics.norm_grad_covariance(groups, ggroups)
    errors = {0: [], 1: []}
    pair_errors = []
    for rho in RHOS:
        gt = sam_grad(f, cores, rho, g)
        for layer, (grp, sl) in enumerate(zip(groups, (slice(0, 3), slice(3, 7)))):
            pred = 4 * rho * u_d * sizes[layer] * cov[layer]
            errors[layer].append(float(abs(flow_dq(grp, gt[sl]) - pred) / abs(pred)))
        # Theorem A.1, pairwise within layer 1
        ds = -2 * inner(groups[1], gt[3:])
        gamma = dynamics.grad_sq_norms(groups[1], ggroups[1])
        got, want = ds[0] - ds[1:], 2 * rho * u_d * (gamma[0] - gamma[1:])
        pair_errors.append(float((got - want).norm() / want.norm()))
    assert_linear_decay(errors[0], "Theorem A.2 layer 0")
    assert_linear_decay(errors[1], "Theorem A.2 layer 1")
    assert_linear_decay(pair_errors, "Theorem A.1")


# -- DAS reproduces SAM's Delta Q to first order (the match behind Eq. 9) ---------------------
def das_step_hand(cores, g, eta, alpha):
    """(1 + lambda_k) G_k - eta g_k with lambda_k = eta alpha u (gamma_k - gamma_bar) / s_k."""
    s, gamma = dynamics.core_sq_norms(cores), dynamics.grad_sq_norms(cores, g)
    lam = eta * alpha * dynamics.normalizer(gamma) * (gamma - gamma.mean()) / s
    return [(1 + lk) * c - eta * x for lk, c, x in zip(lam, cores, g)]


def das_step_real(cores, g, eta, alpha, sizes=None, normalization="global"):
    """One step of tensorsam.optim.DAS over SGD(lr=eta); ``sizes`` splits the cores into groups."""
    from tensorsam.optim import DAS

    params = [c.clone().requires_grad_(True) for c in cores]
    for p, x in zip(params, g):
        p.grad = x.clone()
    bounds = list(itertools.accumulate(sizes or [len(params)], initial=0))
    groups = [params[a:b] for a, b in itertools.pairwise(bounds)]
    opt = DAS(params, torch.optim.SGD, groups=groups, alpha=alpha, lr=eta, normalization=normalization)
    opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("das_step", [das_step_hand, das_step_real], ids=["hand", "tensorsam.optim.DAS"])
@pytest.mark.parametrize("fmt", ["tucker", "tt"])
def test_das_matches_sam_delta_q_first_order(fmt, das_step):
    """With alpha = rho, (Delta Q_DAS - Delta Q_SGD)/eta and (Delta Q_SAM - Delta Q_SGD)/eta agree
    up to a relative O(rho), both being 4 rho u K Cov to first order."""
    cores, f = regression(fmt, 5)
    g = grad(f, cores)
    q0 = dynamics.norm_deviation(cores)
    errors = []
    for rho in RHOS:
        eta = rho**3
        d_sgd = dynamics.norm_deviation(step(cores, g, eta)) - q0
        d_sam = dynamics.norm_deviation(step(cores, sam_grad(f, cores, rho, g), eta)) - q0
        d_das = dynamics.norm_deviation(das_step(cores, g, eta, rho)) - q0
        errors.append(float(abs((d_das - d_sgd) - (d_sam - d_sgd)) / abs(d_sam - d_sgd)))
    assert_linear_decay(errors, f"DAS vs SAM ({fmt})")


def test_das_global_u_matches_multilayer_sam():
    """On two groups, DAS with normalization='global' (u_D) reproduces each layer's Delta Q_SAM to
    first order (Theorem A.2); u per group ('group') does not: it is off by u_l / u_D."""
    cores, f, sizes = two_layer(1)
    g = grad(f, cores)
    slices = (slice(0, 3), slice(3, 7))
    q0 = [dynamics.norm_deviation(cores[sl]) for sl in slices]
    errors = {"global": [], "group": []}
    for rho in RHOS:
        eta = rho**3
        sgd, sam = step(cores, g, eta), step(cores, sam_grad(f, cores, rho, g), eta)
        for norm, errs in errors.items():
            das = das_step_real(cores, g, eta, rho, sizes, normalization=norm)
            worst = 0.0
            for sl, q in zip(slices, q0):
                d_sgd = dynamics.norm_deviation(sgd[sl]) - q
                d_sam = dynamics.norm_deviation(sam[sl]) - q
                d_das = dynamics.norm_deviation(das[sl]) - q
                worst = max(worst, float(abs(d_das - d_sam) / abs(d_sam - d_sgd)))
            errs.append(worst)
    assert_linear_decay(errors["global"], "DAS (global u) vs multi-layer SAM")
    assert min(errors["group"]) > 0.2, f"per-group u should not match SAM's global u_D: {errors['group']}"
