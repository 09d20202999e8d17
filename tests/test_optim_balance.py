"""Exact rebalancing (SPEC §3): Q = 0 afterwards, the composed tensor unchanged, zero-norm groups
left alone, optimizer state rescaled consistently, every k steps."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_optim_common import toy
from torch import nn

from tensorsam.formulas import rebalance_factors
from tensorsam.optim import Rebalance, rebalance_
from tensorsam.tensors import TR, Tucker


def q_of(cores):
    s = torch.stack([c.detach().pow(2).sum() for c in cores])
    return ((s - s.mean()) ** 2).sum()


@settings(max_examples=20)
@given(seed=st.integers(0, 10_000), log_scales=st.lists(st.floats(-4, 4), min_size=7, max_size=7),
       foreach=st.booleans())
def test_rebalance_zeroes_q_and_keeps_every_tensor(seed, log_scales, foreach):
    torch.manual_seed(seed)
    fts = [Tucker((3, 4, 5), rank=(2, 3, 2), dtype=torch.float64), TR((3, 2, 4), rank=2, dtype=torch.float64)]
    cores = [c for ft in fts for c in ft.cores]
    with torch.no_grad():
        for c, ls in zip(cores, log_scales):
            c.mul_(2.0 ** ls)
    dense = [ft.reconstruct().detach() for ft in fts]
    rebalance_(nn.ModuleList(fts), foreach=foreach)
    for ft, d in zip(fts, dense):
        torch.testing.assert_close(ft.reconstruct().detach(), d, rtol=1e-10, atol=1e-12 * d.abs().max())
        norms = torch.stack([c.detach().norm() for c in ft.cores])
        torch.testing.assert_close(norms, norms.mean().expand_as(norms), rtol=1e-10, atol=0)
        assert q_of(ft.cores) <= 1e-18 * norms.max() ** 4 * len(norms)


def test_factors_multiply_to_one_and_zero_norm_group_is_left_alone():
    n = torch.tensor([2.0, 8.0, 1.0, 0.0, 3.0, 5.0], dtype=torch.float64)
    seg, counts = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    c = rebalance_factors(n, seg, counts)
    torch.testing.assert_close(c[:3].prod(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(c[:3] * n[:3], torch.full((3,), 16.0 ** (1 / 3) * 1.0, dtype=torch.float64))
    assert torch.equal(c[3:5], torch.ones(2, dtype=torch.float64))     # group with a zero-norm core
    assert c[5] == 1.0                                                  # a single core is balanced


def test_group_with_zero_core_unchanged_in_place():
    a, b = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.randn(2, 4))
    b0 = b.detach().clone()
    rebalance_([[a, b]])
    assert torch.equal(b, b0) and torch.equal(a, torch.zeros(3, 2))


@pytest.mark.parametrize("base,keys", [(torch.optim.SGD, {"momentum_buffer": 1}),
                                       (torch.optim.Adam, {"exp_avg": 1, "exp_avg_sq": 2})])
def test_rescale_state_maps_moments_to_the_new_coordinates(base, keys):
    """Core scaled by c: momentum / exp_avg by 1/c, exp_avg_sq by 1/c^2; other params untouched."""
    params, groups, loss_fn = toy()
    kw = {"lr": 0.01, "momentum": 0.9} if base is torch.optim.SGD else {"lr": 0.01}
    opt = Rebalance(params, base, groups=groups, every=100, rescale_state=True, **kw)
    for _ in range(2):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    norms = {id(p): p.detach().norm() for p in params}
    saved = {id(p): {k: opt.base_optimizer.state[p][k].clone() for k in keys} for p in params}
    rebalance_(groups, opt)            # a wrapper is accepted: its base optimizer's state is rescaled
    for p in params:
        c = p.detach().norm() / norms[id(p)]
        for k, power in keys.items():
            torch.testing.assert_close(opt.base_optimizer.state[p][k], saved[id(p)][k] / c ** power,
                                       rtol=1e-12, atol=0)
    assert not torch.allclose(params[1].detach().norm(), norms[id(params[1])])


TINY = 1e-300   # eps small enough that no state entry depends on it


@pytest.mark.parametrize("base,kw", [
    (torch.optim.SGD, {"momentum": 0.9}),
    (torch.optim.Adam, {"amsgrad": True, "eps": TINY}),
    (torch.optim.AdamW, {"eps": TINY}),
    (torch.optim.Adamax, {"eps": TINY}),
    (torch.optim.Adagrad, {"eps": TINY}),
    (torch.optim.RMSprop, {"momentum": 0.9, "centered": True, "eps": TINY}),
], ids=lambda v: getattr(v, "__name__", ""))
def test_rescaled_state_equals_the_state_built_at_the_rebalanced_point(base, kw):
    """The state's meaning: rebalancing it must give exactly the state the base optimizer would
    have built from the same gradient history taken at the rebalanced point (lr=0 keeps the
    point fixed while the state accumulates)."""
    states = []
    for rebalance_first in (False, True):
        params, groups, loss_fn = toy()
        opt = base(params, lr=0.0, **kw)
        if rebalance_first:
            rebalance_(groups)
        for _ in range(3):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
        if not rebalance_first:
            rebalance_(groups, opt)
        states.append([opt.state[p] for p in params])
    for a, b in zip(*states):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-300)


def test_rescale_state_refuses_an_unmapped_optimizer():
    params, groups, _ = toy()
    with pytest.raises(ValueError, match="cannot rescale the state of Adadelta"):
        Rebalance(params, torch.optim.Adadelta, groups=groups, rescale_state=True)
    with pytest.raises(ValueError, match="Adadelta"):
        rebalance_(groups, torch.optim.Adadelta(params))
    Rebalance(params, torch.optim.Adadelta, groups=groups)       # no state rescaling: fine


def test_wrapper_equals_base_step_then_rebalance():
    results = []
    for use_wrapper in (True, False):
        params, groups, loss_fn = toy()
        if use_wrapper:
            opt = Rebalance(params, torch.optim.Adam, groups=groups, every=1, rescale_state=True, lr=0.01)
        else:
            opt = torch.optim.Adam(params, lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
            if not use_wrapper:
                rebalance_(groups, opt)
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_rebalance_every_k_steps_only():
    params, groups, loss_fn = toy()
    opt = Rebalance(params, torch.optim.SGD, groups=groups, every=3, lr=0.001)
    qs = []
    for _ in range(6):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        qs.append(float(q_of(groups[0]) + q_of(groups[1])))
    assert qs[2] < 1e-20 and qs[5] < 1e-20
    assert qs[0] > 1e-3 and qs[3] > 1e-12
    with pytest.raises(ValueError, match="every"):
        Rebalance(params, torch.optim.SGD, groups=groups, every=0, lr=0.1)
