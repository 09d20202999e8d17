"""SAM's ascent after the fast-path changes: e zeroed in place on a non-finite gradient (masked_fill_
instead of a torch.where per tensor), and restore() using the buffers saved by first_step()."""

import copy

import pytest
import torch
from torch import nn

from tensorsam.formulas import sam_perturbation_factor
from tensorsam.optim import SAM
from tensorsam.optim import functional as F


def _reference_e(params, grads, rho, adaptive):
    """Algorithm 1 written out with torch.where (the previous formulation)."""
    weighted = [g * p.abs() if a else g for p, g, a in zip(params, grads, adaptive)]
    inv, finite = sam_perturbation_factor(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t) for t in weighted])))
    e = [g * s for g, s in zip(grads, (inv * rho).unbind())]
    e = [t * (p * p) if a else t for t, p, a in zip(e, params, adaptive)]
    return [torch.where(finite, t, torch.zeros((), dtype=t.dtype)) for t in e], finite


def _tensors(bad=None):
    torch.manual_seed(0)
    shapes = [(3, 4), (5,), (2, 3, 2), (1,)]
    params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
    if bad is not None:
        grads[1][2] = bad
    return params, grads


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
@pytest.mark.parametrize("adaptive", [(False,) * 4, (True, False, True, False)])
def test_perturbation_equals_where_formulation(foreach, bad, adaptive):
    params, grads = _tensors(bad)
    rho = torch.tensor([0.05, 0.05, 0.1, 0.2], dtype=torch.float64)
    e, finite = F.sam_perturbation(params, grads, rho, adaptive, foreach)
    ref, ref_finite = _reference_e(params, grads, rho, adaptive)
    assert bool(finite) == bool(ref_finite) == (bad is None)
    for a, b in zip(e, ref):
        assert torch.equal(a, b)
    if bad is not None:
        assert all(torch.equal(t, torch.zeros_like(t)) for t in e)


def test_perturbation_leaves_grads_untouched():
    params, grads = _tensors(float("nan"))
    before = [g.clone() for g in grads]
    F.sam_perturbation(params, grads, torch.full((4,), 0.05, dtype=torch.float64), (False,) * 4, True)
    for g, b in zip(grads, before):
        assert torch.equal(g.isnan(), b.isnan()) and torch.equal(g.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("foreach", [True, False])
def test_restore_puts_back_exactly_with_some_grads_missing(foreach):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    frozen = model[0].bias
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, foreach=foreach)
    x = torch.randn(5, 4, dtype=torch.float64)
    w0 = [p.detach().clone() for p in model.parameters()]
    model(x).square().sum().backward()
    frozen.grad = None                      # not perturbed, not saved
    opt.first_step(zero_grad=True)
    assert torch.equal(frozen, w0[1])
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    model(x).square().sum().backward()
    opt.restore()
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p, w)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("foreach", [True, False])
def test_nonfinite_first_pass_no_perturbation_and_poisoned_grad(foreach):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, foreach=foreach)
    w0 = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(5, 4, dtype=torch.float64)
    model(x).sum().backward()
    model[0].weight.grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True)
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p, w)            # e = 0
    model(x).sum().backward()
    opt.restore()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_two_optimizers_same_steps_foreach_and_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    models = {k: copy.deepcopy(model) for k in (True, False)}
    opts = {k: SAM(m.parameters(), torch.optim.SGD, rho=0.05, adaptive=True, lr=0.1, momentum=0.9, foreach=k)
            for k, m in models.items()}
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    for _ in range(3):
        for k, m in models.items():
            def closure(m=m, k=k):
                opts[k].zero_grad()
                loss = (m(x) - y).square().mean()
                loss.backward()
                return loss
            opts[k].step(closure)
    for a, b in zip(models[True].parameters(), models[False].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
