"""nBAR and oBAR (BAR Algorithms 2 and 3): one step matches the algorithm, both branches."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tensorsam.optim import BAR
from tensorsam.tensors import CP, TT


def pairs_with_both_branches(seed):
    """Pairs whose x is larger / smaller than y, with larger / smaller gradients."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for sx, sy, gx, gy in [(3.0, 1.0, 0.2, 2.0), (0.5, 2.0, 3.0, 0.1), (1.0, 1.0, 1.0, 0.5)]:
        x = nn.Parameter(sx * torch.randn(4, 3, generator=g, dtype=torch.float64))
        y = nn.Parameter(sy * torch.randn(3, 5, generator=g, dtype=torch.float64))
        x.grad = gx * torch.randn(4, 3, generator=g, dtype=torch.float64)
        y.grad = gy * torch.randn(3, 5, generator=g, dtype=torch.float64)
        pairs.append([x, y])
    return pairs


def expected_bar(pairs, mode, alpha, eta):
    """The algorithm's branches in python floats, then the SGD step."""
    out = []
    for x, y in pairs:
        if mode == "n":
            x_grows = x.grad.norm().tolist() >= y.grad.norm().tolist()
        else:
            x_grows = not (x.detach().norm().tolist() >= y.detach().norm().tolist())
        fx, fy = (1 + alpha * eta, 1 - alpha * eta) if x_grows else (1 - alpha * eta, 1 + alpha * eta)
        out += [fx * x.detach() - eta * x.grad, fy * y.detach() - eta * y.grad]
    return out


@settings(max_examples=20)
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(["n", "o"]), alpha=st.floats(0.0, 5.0),
       eta=st.floats(1e-3, 0.1), foreach=st.booleans())
def test_one_step_matches_the_algorithm(seed, mode, alpha, eta, foreach):
    pairs = pairs_with_both_branches(seed)
    want = expected_bar(pairs, mode, alpha, eta)
    params = [p for pair in pairs for p in pair]
    opt = BAR(params, torch.optim.SGD, pairs=pairs, mode=mode, alpha=alpha, alpha_schedule="constant",
              foreach=foreach, lr=eta)
    opt.step()
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


def test_branches_really_differ_between_pairs_and_modes():
    pairs = pairs_with_both_branches(0)
    for mode in ("n", "o"):
        grows = []
        for x, y in pairs:
            x0 = x.detach().clone()
            opt = BAR([x, y], torch.optim.SGD, pairs=[[x, y]], mode=mode, alpha=1.0,
                      alpha_schedule="constant", lr=0.1)
            opt.before_base_step()                 # the scaling alone
            grows.append(bool(x.detach().norm() > x0.norm()))
        assert True in grows and False in grows


def test_linear_schedule_and_lr_of_each_factor():
    pairs = pairs_with_both_branches(1)[:1]
    x, y = pairs[0]
    opt = BAR([{"params": [x], "lr": 0.1}, {"params": [y], "lr": 0.02}], torch.optim.SGD, pairs=pairs,
              mode="o", alpha=2.0, alpha_schedule="linear", total_steps=4)
    for _ in range(3):
        opt.step()
    alpha_t = 2.0 * (1 - 3 / 4)
    x_grows = not (x.detach().norm() >= y.detach().norm()).item()
    sx = 1 if x_grows else -1
    want_x = (1 + sx * alpha_t * 0.1) * x.detach() - 0.1 * x.grad
    want_y = (1 - sx * alpha_t * 0.02) * y.detach() - 0.02 * y.grad
    opt.step()
    torch.testing.assert_close(x.detach(), want_x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(y.detach(), want_y, rtol=1e-12, atol=1e-14)
    opt.step()                               # alpha_t = 0 from step T on: plain SGD
    assert math.isclose(opt.schedule(2.0, opt.step_count, 4), 0.0)


def test_pairs_from_a_model_and_refusals():
    model = nn.ModuleDict({"a": CP((4, 5), rank=3), "b": CP((3, 6), rank=2)})
    opt = BAR(model.parameters(), torch.optim.SGD, pairs=model, alpha=0.1, total_steps=5, lr=0.1)
    assert len(opt.plan.groups) == 2
    with pytest.raises(ValueError, match="pair"):
        BAR(list(TT((2, 3, 4), rank=2).parameters()), torch.optim.SGD, pairs=TT((2, 3, 4), rank=2),
            alpha=0.1, total_steps=5, lr=0.1)
    tt = TT((2, 3, 4), rank=2)
    with pytest.raises(ValueError, match="expected 2"):
        BAR(tt.parameters(), torch.optim.SGD, pairs=tt, alpha=0.1, total_steps=5, lr=0.1)
    with pytest.raises(ValueError, match="mode"):
        BAR(model.parameters(), torch.optim.SGD, pairs=model, mode="x", alpha=0.1, total_steps=5, lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        BAR(model.parameters(), torch.optim.SGD, pairs=model, alpha=0.1, lr=0.1)


@pytest.mark.parametrize("mode", ["n", "o"])
def test_ties_take_the_first_branch(mode):
    """||g_x|| = ||g_y|| (nBAR) or ||x|| = ||y|| (oBAR): the '>=' branch, x grows under nBAR and
    shrinks under oBAR (bar-algorithms.md)."""
    w = torch.randn(3, 3, dtype=torch.float64)
    g = torch.randn(3, 3, dtype=torch.float64)
    x, y = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    x.grad, y.grad = g.clone(), g.clone()
    opt = BAR([x, y], torch.optim.SGD, pairs=[[x, y]], mode=mode, alpha=0.5, alpha_schedule="constant", lr=0.1)
    opt.step()
    sx = 1.0 if mode == "n" else -1.0
    torch.testing.assert_close(x.detach(), (1 + sx * 0.05) * w - 0.1 * g, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(y.detach(), (1 - sx * 0.05) * w - 0.1 * g, rtol=1e-14, atol=1e-15)
