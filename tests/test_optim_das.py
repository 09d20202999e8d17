"""DAS (Algorithm 2 / Eq. 9): one step equals (1 + lambda_k) G_k - eta g_k exactly."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_optim_common import toy
from torch import nn

from tensorsam.formulas import das_lambda
from tensorsam.optim import DAS
from tensorsam.tensors import TT


def random_setup(seed, scales):
    """Groups of 3, 2 and 4 cores of varied norms, random gradients, and a free bias."""
    g = torch.Generator().manual_seed(seed)
    shapes = [[(3, 4), (4, 2), (2, 5)], [(6, 2), (2, 3)], [(2, 3), (3, 3), (3, 2), (2, 2)]]
    groups, i = [], 0
    for grp in shapes:
        ps = []
        for shape in grp:
            p = nn.Parameter(scales[i % len(scales)] * torch.randn(*shape, generator=g, dtype=torch.float64))
            p.grad = scales[(i + 1) % len(scales)] * torch.randn(*shape, generator=g, dtype=torch.float64)
            ps.append(p)
            i += 1
        groups.append(ps)
    bias = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    bias.grad = torch.randn(5, generator=g, dtype=torch.float64)
    return groups, bias


def expected_das(groups, eta, alpha, normalization, variant):
    """(1 + lambda_k) G_k - eta g_k with lambda_k from Eq. 9, in plain python floats (the total
    of gamma is over the given groups, so pass only groups with gradients)."""
    s = [[(p.detach() ** 2).sum().tolist() for p in grp] for grp in groups]
    gam = [[(p.grad ** 2).sum().tolist() for p in grp] for grp in groups]
    total = sum(sum(gs) for gs in gam)
    out = []
    for grp, ss, gs in zip(groups, s, gam):
        gbar = sum(gs) / len(gs)
        if normalization == "global" and variant == "paper":
            u = total ** -0.5
        else:
            u = (len(gs) * gbar) ** -0.5
        for p, sk, gk in zip(grp, ss, gs):
            div = sk if variant == "paper" else sk ** 0.5
            lam = 0.0 if div == 0 else eta * alpha * u * (gk - gbar) / div   # zero core: lambda = 0
            out.append((1 + lam) * p.detach() - eta * p.grad)
    return out


@settings(max_examples=20)
@given(seed=st.integers(0, 10_000), eta=st.floats(1e-3, 0.5), alpha=st.floats(0.0, 2.0),
       scales=st.lists(st.floats(0.1, 10.0), min_size=1, max_size=4),
       mode=st.sampled_from([("global", "paper"), ("group", "paper"), (None, "authors")]))
def test_one_step_is_eq9(seed, eta, alpha, scales, mode):
    normalization, variant = mode
    groups, bias = random_setup(seed, scales)
    want = expected_das(groups, eta, alpha, normalization or "group", variant)
    bias_want = bias.detach() - eta * bias.grad
    params = [p for grp in groups for p in grp] + [bias]
    opt = DAS(params, torch.optim.SGD, groups=groups, alpha=alpha, normalization=normalization,
              variant=variant, lr=eta, momentum=0.0)
    opt.step()
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bias.detach(), bias_want, rtol=1e-15, atol=1e-15)


def test_global_and_group_u_differ_and_global_is_smaller():
    groups, _ = random_setup(0, [1.0, 3.0])
    params = [p for grp in groups for p in grp]
    lam = {}
    for norm in ("global", "group"):
        before = [p.detach().clone() for p in params]
        opt = DAS(params, torch.optim.SGD, groups=groups, alpha=1.0, normalization=norm, lr=0.1)
        opt.before_base_step()
        lam[norm] = torch.stack([(p.detach() / b).flatten()[0] - 1 for p, b in zip(params, before)])
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
    assert (lam["global"].abs() <= lam["group"].abs() + 1e-15).all()
    assert not torch.allclose(lam["global"], lam["group"])


def test_zero_norm_core_and_zero_gradients_give_zero_lambda():
    seg, counts = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([3, 2])
    s = torch.tensor([0.0, 2.0, 3.0, 1.0, 1.0], dtype=torch.float64)
    gamma = torch.tensor([1.0, 2.0, 5.0, 0.0, 0.0], dtype=torch.float64)
    ea = torch.full((5,), 0.1, dtype=torch.float64)
    for norm in ("global", "group"):
        for div in ("squared", "norm"):
            lam = das_lambda(s, gamma, seg, counts, ea, norm, div)
            assert torch.isfinite(lam).all()
            assert lam[0] == 0 and lam[3] == 0 and lam[4] == 0
            assert lam[2] > 0 > lam[1]
    lam = das_lambda(s, torch.zeros(5, dtype=torch.float64), seg, counts, ea)
    assert torch.equal(lam, torch.zeros(5, dtype=torch.float64))


def test_alpha_schedule_and_scheduled_lr_enter_lambda():
    groups, _ = random_setup(1, [1.0, 2.0])
    params = [p for grp in groups for p in grp]
    opt = DAS(params, torch.optim.SGD, groups=groups, alpha=0.8, alpha_schedule="linear", total_steps=4,
              lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    opt.step()
    sched.step()                     # now eta = 0.05 and alpha_t = 0.8 * (1 - 2/4)
    want = expected_das(groups, 0.05, 0.4, "global", "paper")
    opt.step()
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("schedule,total", [("linear", 5), ("cosine", 3), ("constant", None)])
def test_alpha_table_and_eta_alpha0_give_functional_args_eta_alpha_at_every_step(schedule, total):
    """eta_alpha0 * table[min(t, T)] (the compiled completion step's lookup) is functional_args'
    eta alpha_t at every step, past T too; eta_alpha0 is the same tensor until lr changes."""
    from tensorsam.optim.schedules import table_lookup

    groups, _ = random_setup(1, [1.0, 2.0])
    params = [p for grp in groups for p in grp]
    opt = DAS(params, torch.optim.SGD, groups=groups, alpha=0.8, alpha_schedule=schedule, total_steps=total,
              lr=0.2)
    table, first = opt.alpha_table(), opt.eta_alpha0()
    assert table.numel() == (total or 0) + 1 and opt.alpha_table() is table
    for t in range((total or 2) + 3):
        got = opt.eta_alpha0() * table_lookup(table, torch.tensor(t))
        torch.testing.assert_close(got, opt.functional_args().eta_alpha, rtol=1e-12, atol=0)
        assert opt.eta_alpha0() is first
        opt.step()
    opt.param_groups[0]["lr"] = 0.1
    changed = opt.eta_alpha0()
    assert changed is not first and torch.allclose(changed, first / 2)


def test_per_core_values_cache_keeps_the_tensor_while_values_hold():
    from tensorsam.optim.plan import per_core_values

    groups, cache, like = [{"v": 0.5}, {"v": 2.0}], {}, torch.empty((), dtype=torch.float64)
    a = per_core_values(groups, [0, 0, 1], lambda g: g["v"], like, cache)
    assert per_core_values(groups, [0, 0, 1], lambda g: g["v"], like, cache) is a
    assert a.tolist() == [0.5, 0.5, 2.0] and a.dtype == torch.float64
    groups[1]["v"] = 3.0
    b = per_core_values(groups, [0, 0, 1], lambda g: g["v"], like, cache)
    assert b is not a and b.tolist() == [0.5, 0.5, 3.0] and a.tolist() == [0.5, 0.5, 2.0]
    groups[0]["v"] = torch.tensor(1.5)      # a tensor value may change in place: never cached
    c = per_core_values(groups, [0, 0, 1], lambda g: g["v"], like, cache)
    assert per_core_values(groups, [0, 0, 1], lambda g: g["v"], like, cache) is not c


def test_groups_from_a_model_and_grouped_params_without_grad():
    model = nn.ModuleDict({"w": TT((4, 3, 5), rank=2, dtype=torch.float64), "v": nn.Linear(3, 2)})
    opt = DAS(model.parameters(), torch.optim.SGD, groups=model, alpha=0.1, lr=0.1)
    assert [id(p) for p in opt.plan.cores] == [id(p) for p in model["w"].cores]
    model["v"](torch.randn(1, 3)).sum().backward()     # no gradient reaches the TT cores
    before = [p.detach().clone() for p in model["w"].cores]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model["w"].cores))


def test_bad_arguments_are_refused():
    params, groups, _ = toy()
    with pytest.raises(ValueError, match="not among"):
        DAS(params[:3], torch.optim.SGD, groups=groups, alpha=0.1, lr=0.1)
    with pytest.raises(ValueError, match="normalization"):
        DAS(params, torch.optim.SGD, groups=groups, alpha=0.1, normalization="layer", lr=0.1)
    with pytest.raises(ValueError, match="per group"):
        DAS(params, torch.optim.SGD, groups=groups, alpha=0.1, variant="authors", normalization="global",
            lr=0.1)
    with pytest.raises(ValueError, match="variant"):
        DAS(params, torch.optim.SGD, groups=groups, alpha=0.1, variant="code", lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        DAS(params, torch.optim.SGD, groups=groups, alpha=0.1, alpha_schedule="cosine", lr=0.1)
    with pytest.raises(ValueError, match="alpha"):
        DAS(params, torch.optim.SGD, groups=groups, alpha=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="groups is required"):
        DAS(params, torch.optim.SGD, groups=None, alpha=0.1, lr=0.1)
    with pytest.raises(ValueError, match="another group"):
        DAS(params, torch.optim.SGD, groups=[groups[0], groups[0][:2]], alpha=0.1, lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        DAS(params, torch.optim.SGD, groups=[[]], alpha=0.1, lr=0.1)


def test_zero_core_zero_grads_and_partly_missing_grads_in_a_full_step():
    groups, bias = random_setup(2, [1.0])
    params = [p for grp in groups for p in grp] + [bias]
    with torch.no_grad():
        groups[0][1].zero_()
    groups[1][0].grad.zero_()
    groups[1][1].grad.zero_()                 # group 1: all-zero gradient
    groups[2][0].grad = None                  # group 2: skipped (a core without gradient)
    want = expected_das(groups[:2], 0.1, 1.0, "global", "paper")
    opt = DAS(params, torch.optim.SGD, groups=groups, alpha=1.0, lr=0.1)
    opt.step()
    for p, w in zip([p for grp in groups[:2] for p in grp], want):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


def test_add_param_group_gets_the_base_step_and_the_groups_keep_eq9():
    groups, bias = random_setup(2, [1.0])
    cores = [p for grp in groups for p in grp]
    want = expected_das(groups, 0.1, 1.0, "global", "paper")
    opt = DAS(cores, torch.optim.SGD, groups=groups, alpha=1.0, lr=0.1)
    opt.add_param_group({"params": [bias], "lr": 0.01})
    assert opt.param_groups[1]["alpha"] == 1.0 and len(opt.base_optimizer.param_groups) == 2
    b0, gb = bias.detach().clone(), bias.grad.clone()
    opt.step()
    torch.testing.assert_close(bias.detach(), b0 - 0.01 * gb, rtol=1e-14, atol=0)
    for p, w in zip(cores, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_steps_past_total_steps_are_plain_base_steps(schedule):
    groups, bias = random_setup(3, [1.0, 2.0])
    params = [p for grp in groups for p in grp] + [bias]
    opt = DAS(params, torch.optim.SGD, groups=groups, alpha=1.0, alpha_schedule=schedule, total_steps=2, lr=0.1)
    factors = []
    for t in range(4):
        factors.append(opt.alpha_factor())
        before = [(p.detach().clone(), p.grad.clone()) for p in params]
        opt.step()
        if t >= 2:
            for p, (w, g) in zip(params, before):
                torch.testing.assert_close(p.detach(), w - 0.1 * g, rtol=1e-14, atol=0)
    assert factors[0] == 1.0 and 0 < factors[1] < 1 and factors[2:] == [0.0, 0.0]


def test_param_group_dicts_give_each_core_its_own_lr_and_alpha():
    """Cores spread over two param-group dicts, with their own lr and alpha (u per group so that
    each group's expectation is independent of the others)."""
    groups, bias = random_setup(4, [1.0, 0.5, 2.0])
    want = (expected_das([groups[0]], 0.1, 0.5, "group", "paper")
            + expected_das([groups[1]], 0.02, 2.0, "group", "paper")
            + expected_das([groups[2]], 0.02, 2.0, "group", "paper"))
    opt = DAS([{"params": groups[0], "lr": 0.1, "alpha": 0.5}, {"params": groups[1] + groups[2] + [bias]}],
              torch.optim.SGD, groups=[groups[1], groups[0], groups[2]], alpha=2.0, normalization="group",
              lr=0.02)
    opt.step()
    for p, w in zip([p for grp in groups for p in grp], want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)
