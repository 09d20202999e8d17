"""What every tensorsam optimizer shares: no host syncs, foreach == plain, state_dict round
trips bit for bit, schedulers, zero_grad, skip_nonfinite, base optimizer handling, schedules.

The toy problem (``toy``) is imported by the other optimizer test files."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from tensorsam.optim import BAR, DAS, SAM, Rebalance, get_schedule
from tensorsam.optim.schedules import constant, cosine, linear
from tensorsam.optim.wrapper import GROUP_KEYS


def toy(dtype=torch.float64, seed=0, n=16):
    """Two scale-invariant groups, a 3-core chain (A, B, C) and a pair (D, E), plus a bias.

    Returns (params, groups, loss_fn)."""
    g = torch.Generator().manual_seed(seed)

    def P(*shape, scale=1.0):
        return nn.Parameter(scale * torch.randn(*shape, generator=g, dtype=dtype))

    A, B, C = P(4, 3), P(3, 3, scale=2.0), P(3, 5, scale=0.5)
    D, E = P(4, 2, scale=3.0), P(2, 5)
    bias = P(5)
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    y = torch.randn(n, 5, generator=g, dtype=dtype)

    def loss_fn(rows=slice(None)):
        xs = x[rows]
        return ((xs @ A @ B @ C + xs @ D @ E + bias - y[rows]) ** 2).mean()

    return [A, B, C, D, E, bias], [[A, B, C], [D, E]], loss_fn


def make(kind, params, groups, base=torch.optim.SGD, foreach=None, compile=False, **base_kw):
    """One wrapper of each kind over ``base`` (kwargs default to SGD lr 0.05 momentum 0.9);
    ``compile`` goes to SAM and DAS."""
    base_kw = base_kw or ({"lr": 0.05, "momentum": 0.9} if base is torch.optim.SGD else {"lr": 0.01})
    if kind == "sam":
        return SAM(params, base, rho=0.05, foreach=foreach, compile=compile, **base_kw)
    if kind == "asam":
        return SAM(params, base, rho=0.5, adaptive=True, foreach=foreach, **base_kw)
    if kind.startswith("das"):
        norm = {"das": "global", "das_group": "group", "das_authors": None}[kind]
        variant = "authors" if kind == "das_authors" else "paper"
        return DAS(params, base, groups=groups, alpha=0.5, normalization=norm, variant=variant,
                   alpha_schedule="cosine", total_steps=10, foreach=foreach, compile=compile, **base_kw)
    if kind in ("nbar", "obar"):
        return BAR(params, base, pairs=[groups[1]], mode=kind[0], alpha=0.5, total_steps=10,
                   foreach=foreach, **base_kw)
    if kind == "rebalance":
        return Rebalance(params, base, groups=groups, every=2, rescale_state=True, foreach=foreach,
                         **base_kw)
    raise AssertionError(kind)


def train(opt, loss_fn, steps):
    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


KINDS = ["sam", "asam", "das", "das_group", "das_authors", "nbar", "obar", "rebalance"]


# -- no host-device synchronisation ------------------------------------------------------------
class SyncError(AssertionError):
    pass


@pytest.fixture
def forbid_sync(monkeypatch):
    """Patch item/tolist/__bool__/__float__ to raise while ``state['on']``."""
    state = {"on": False}
    for name in ("item", "tolist", "__bool__", "__float__"):
        orig = getattr(torch.Tensor, name)

        def guarded(self, *a, _orig=orig, _name=name, **k):
            if state["on"]:
                raise SyncError(f"host sync: Tensor.{_name}")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, guarded)
    return state


def test_forbid_sync_fixture_catches_a_sync(forbid_sync):
    forbid_sync["on"] = True
    with pytest.raises(SyncError):
        torch.ones(()).item()
    with pytest.raises(SyncError):
        bool(torch.ones(()) > 0)


def guarded_steps(opt, kind, loss_fn, guard, steps=2):
    """Steps whose optimizer work runs with the sync guard on (forward/backward with it off);
    the second step runs with momentum buffers / moments present."""
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        guard["on"] = True
        if kind in ("sam", "asam"):
            opt.first_step(zero_grad=True)
            guard["on"] = False
            loss_fn().backward()
            guard["on"] = True
            opt.second_step()
        else:
            opt.step()
        guard["on"] = False


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kind", ["sam", "asam", "das", "das_group", "nbar", "obar", "rebalance"])
def test_no_host_sync_in_step_over_sgd_momentum(kind, foreach, forbid_sync):
    params, groups, loss_fn = toy(torch.float32)
    opt = make(kind, params, groups, foreach=foreach, lr=0.05, momentum=0.9)
    guarded_steps(opt, kind, loss_fn, forbid_sync)


@pytest.mark.parametrize("kind", ["sam", "das", "nbar", "rebalance"])
def test_no_host_sync_in_wrapper_work_over_adam(kind, forbid_sync):
    """torch's Adam reads its CPU step counter with .item(), so only the wrapper's own work is
    checked: the base step runs with the guard lifted, everything else under it."""
    params, groups, loss_fn = toy(torch.float32)
    opt = make(kind, params, groups, base=torch.optim.Adam, lr=0.01)
    base_step = opt.base_optimizer.step

    def unguarded_base_step(*a, **k):
        forbid_sync["on"] = False
        try:
            return base_step(*a, **k)
        finally:
            forbid_sync["on"] = True

    opt.base_optimizer.step = unguarded_base_step
    guarded_steps(opt, kind, loss_fn, forbid_sync)


# -- foreach and plain paths agree -----------------------------------------------------------------
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("kind", KINDS)
def test_foreach_and_plain_paths_agree(kind, dtype, rtol):
    results = []
    for foreach in (False, True):
        params, groups, loss_fn = toy(dtype)
        opt = make(kind, params, groups, foreach=foreach)
        train(opt, loss_fn, 2)
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * 1e-2)


# -- state_dict round trip -------------------------------------------------------------------------
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam], ids=["sgd_momentum", "adam"])
@pytest.mark.parametrize("kind", ["sam", "das", "nbar", "rebalance"])
def test_state_dict_round_trip_is_bit_exact(kind, base):
    params, groups, loss_fn = toy()
    opt = make(kind, params, groups, base=base)
    train(opt, loss_fn, 5)
    straight = [p.detach().clone() for p in params]

    params, groups, loss_fn = toy()
    opt = make(kind, params, groups, base=base)
    train(opt, loss_fn, 3)
    saved_params = [p.detach().clone() for p in params]
    saved = opt.state_dict()

    params2, groups2, loss_fn2 = toy(seed=0)          # a fresh model ...
    with torch.no_grad():
        for p, s in zip(params2, saved_params):        # ... holding the saved weights
            p.copy_(s)
    opt2 = make(kind, params2, groups2, base=base)
    opt2.load_state_dict(saved)
    assert opt2.step_count == opt.step_count
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.state is opt2.base_optimizer.state and set(saved) == {"state", "param_groups"}
    train(opt2, loss_fn2, 2)
    for a, b in zip(straight, params2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["sam", "das", "nbar", "rebalance"])
def test_base_optimizers_own_load_state_dict_keeps_the_wrapper_in_step(kind):
    """``opt.base_optimizer.load_state_dict(...)`` replaces the base optimizer's ``state`` and
    ``param_groups`` objects; the wrapper reads through to them (an lr scheduler built on the wrapper
    still reaches the base step, and the restored momentum is the one used), so the result equals
    loading through the wrapper."""
    results = []
    for through_base in (False, True):
        params, groups, loss_fn = toy()
        opt = make(kind, params, groups)
        train(opt, loss_fn, 3)
        saved = opt.state_dict()
        train(opt, loss_fn, 2)                       # move on, then go back to the saved state
        (opt.base_optimizer if through_base else opt).load_state_dict(saved)
        assert opt.param_groups is opt.base_optimizer.param_groups
        assert opt.state is opt.base_optimizer.state
        for g in opt.param_groups:
            g["lr"] = 0.01                           # what a scheduler on the wrapper does
        train(opt, loss_fn, 2)
        assert opt.base_optimizer.param_groups[0]["lr"] == 0.01
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_load_state_dict_refuses_a_foreign_dict():
    params, groups, _ = toy()
    opt = make("das", params, groups)
    with pytest.raises(ValueError, match="base"):
        opt.load_state_dict(torch.optim.SGD(params, lr=0.1).state_dict())


def test_lr_scheduler_on_wrapper_moves_base_lr():
    params, groups, loss_fn = toy()
    opt = make("das", params, groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(opt, loss_fn, 1)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.param_groups[0]["alpha"] == 0.5      # wrapper hyperparameters live in the same dicts


# -- zero_grad, base optimizer handling, param groups ----------------------------------------------
def test_zero_grad_and_base_instance():
    params, groups, loss_fn = toy()
    base = torch.optim.SGD(params, lr=0.1)
    opt = DAS(None, base, groups=groups, alpha=0.1)
    assert opt.base_optimizer is base and opt.param_groups is base.param_groups
    loss_fn().backward()
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    with pytest.raises(ValueError, match="already an instance"):
        DAS(None, base, groups=groups, alpha=0.1, lr=0.2)
    with pytest.raises(ValueError, match="differ"):
        DAS(params[:2], base, groups=[params[:2]], alpha=0.1)
    with pytest.raises(ValueError, match="base_optimizer"):
        DAS(params, "sgd", groups=groups, alpha=0.1)
    with pytest.raises(ValueError, match="foreach"):
        SAM(params, torch.optim.SGD, lr=0.1, foreach="yes")


def test_add_param_group_reaches_base_with_wrapper_defaults():
    params, _, _ = toy()
    opt = SAM(params[:-1], torch.optim.SGD, rho=0.1, lr=0.1)
    opt.add_param_group({"params": [params[-1]], "lr": 0.01})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.base_optimizer.param_groups[1]["rho"] == 0.1


# -- non-finite gradients --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_skip_nonfinite_leaves_params_and_state_untouched(kind):
    params, groups, loss_fn = toy()
    opt = make(kind, params, groups, base=torch.optim.Adam)
    opt.skip_nonfinite = True
    train(opt, loss_fn, 2)
    before = [p.detach().clone() for p in params]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.base_optimizer.state.items()}
    step = opt.step_count

    def bad_closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        params[1].grad[0, 0] = float("nan")
        return loss

    if kind in ("sam", "asam"):
        opt.step(bad_closure)                 # NaN in the first pass
        opt.zero_grad()
        loss_fn().backward()
        opt.first_step(zero_grad=True)
        loss_fn().backward()
        params[4].grad[0, 0] = float("inf")   # inf in the second pass
        opt.second_step()
        skipped = 2
    else:
        opt.step(bad_closure)
        skipped = 1
    assert opt.skipped_steps == skipped and opt.step_count == step
    for a, b in zip(before, params):
        assert torch.equal(a, b)
    for k, s in opt.base_optimizer.state.items():
        for n, v in s.items():
            assert torch.equal(v, state[k][n])


# -- schedules ---------------------------------------------------------------------------------------
def test_schedules():
    assert constant(0.3, 7, None) == 0.3
    assert linear(0.4, 5, 10) == pytest.approx(0.2)
    assert linear(0.4, 15, 10) == 0.0
    assert cosine(0.4, 5, 10) == pytest.approx(0.2)
    assert cosine(0.4, 0, 10) == pytest.approx(0.4)
    assert cosine(0.4, 12, 10) == pytest.approx(0.0, abs=1e-15)
    assert cosine(1.0, 2, 8) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="constant"):
        get_schedule("exponential")
    with pytest.raises(ValueError, match="total_steps"):
        get_schedule("linear", None)
    assert get_schedule("constant") is constant


@pytest.mark.parametrize("kind", ["das", "nbar", "obar", "rebalance"])
def test_grad_scaler_skips_a_step_with_inf(kind):
    params, groups, loss_fn = toy(torch.float32)
    opt = make(kind, params, groups)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for bad in (False, True):
        before = [p.detach().clone() for p in params]
        opt.zero_grad()
        scaler.scale(loss_fn()).backward()
        if bad:
            params[3].grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        same = all(torch.equal(a, p) for a, p in zip(before, params))
        assert same is bad
    assert opt.step_count == 1 and scaler.get_scale() == 2.0 ** 7


@pytest.mark.parametrize("kind", ["sam", "das", "nbar", "rebalance"])
def test_deepcopy_keeps_the_wrapper(kind):
    params, groups, loss_fn = toy()
    opt = make(kind, params, groups)
    train(opt, loss_fn, 1)
    clone = copy.deepcopy(opt)
    assert type(clone.base_optimizer) is torch.optim.SGD and clone.step_count == opt.step_count
    assert clone.param_groups is clone.base_optimizer.param_groups
    counters = [{k: g[k] for k in GROUP_KEYS} for g in opt.state_dict()["param_groups"]]
    assert [{k: g[k] for k in GROUP_KEYS} for g in clone.state_dict()["param_groups"]] == counters


# -- bad strengths and groups ----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_non_finite_or_negative_strengths_are_refused_also_per_group(bad):
    params, groups, _ = toy()
    with pytest.raises(ValueError, match="rho must be a finite non-negative"):
        SAM(params, torch.optim.SGD, rho=bad, lr=0.1)
    with pytest.raises(ValueError, match="alpha must be a finite non-negative"):
        DAS(params, torch.optim.SGD, groups=groups, alpha=bad, lr=0.1)
    with pytest.raises(ValueError, match="alpha must be a finite non-negative"):
        BAR([{"params": params[:3]}, {"params": params[3:], "alpha": bad}], torch.optim.SGD,
            pairs=[groups[1]], alpha=0.1, total_steps=5, lr=0.1)
    sam = SAM(params[:-1], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho must be a finite non-negative"):
        sam.add_param_group({"params": [params[-1]], "rho": bad})


@pytest.mark.parametrize("kind", ["das", "nbar", "rebalance"])
def test_empty_groups_and_frozen_cores_are_refused(kind):
    params, groups, _ = toy()
    key = "pairs" if kind == "nbar" else "groups"
    cls, kw = {"das": (DAS, {"alpha": 0.1}), "nbar": (BAR, {"alpha": 0.1, "total_steps": 5}),
               "rebalance": (Rebalance, {})}[kind]
    with pytest.raises(ValueError, match="empty"):
        cls(params, torch.optim.SGD, lr=0.1, **{key: []}, **kw)
    with pytest.raises(ValueError, match="no scale-invariant groups"):
        cls(params, torch.optim.SGD, lr=0.1, **{key: nn.Linear(2, 2)}, **kw)
    params[3].requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        cls(params, torch.optim.SGD, lr=0.1, **{key: [groups[1]]}, **kw)


@pytest.mark.parametrize("foreach", [False, True])
def test_skip_nonfinite_does_not_skip_a_large_finite_gradient(foreach):
    """A float32 gradient of 1e20 has a 2-norm that overflows to inf, but it is finite."""
    params, groups, loss_fn = toy(torch.float32)
    opt = make("nbar", params, groups, foreach=foreach, lr=1e-25, momentum=0.0)
    opt.skip_nonfinite = True
    loss_fn().backward()
    params[3].grad.fill_(1e20)
    before = params[3].detach().clone()
    opt.step()
    assert opt.skipped_steps == 0 and opt.step_count == 1
    assert torch.isfinite(params[3]).all() and not torch.equal(before, params[3])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sam", "das_authors"])
def test_compiled_fast_path_matches_the_eager_path(kind):
    """compile=True (one torch.compile'd function per step; das_authors: per-group u, ||G||
    divisor, two groups) takes the same steps as the eager path, cosine schedule included."""
    got = []
    for compile in (False, True):
        params, groups, loss_fn = toy()
        opt = make(kind, params, groups, compile=compile)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)   # a compiler fallback warns
            train(opt, loss_fn, 4)
        got.append([p.detach().clone() for p in params])
    for eager, compiled in zip(*got):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


def test_compile_must_be_a_bool():
    params, groups, _ = toy()
    with pytest.raises(ValueError, match="compile must be a bool"):
        DAS(params, torch.optim.SGD, groups=groups, alpha=0.1, compile="yes", lr=0.1)


def test_stacked_norms_match_per_tensor_norms_in_the_original_order():
    """A bucket by shape and dtype (interleaved here), shapes too rare to stack, an empty tensor
    and a large one, which go through ``_foreach_norm``: every norm lands at its position."""
    from tensorsam.norms import STACK_MAX_NUMEL, STACK_MIN_COUNT, StackedLayout, norms

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2,), (3, 4), (), (0, 3), (STACK_MAX_NUMEL + 1,), (2,), (3, 4), (3, 4), (3, 4)]
    doubles = {1, 3, 9}
    ts = [torch.randn(s, generator=g, dtype=torch.float64 if i in doubles else torch.float32)
          for i, s in enumerate(shapes)]
    stacked = StackedLayout(ts)
    assert STACK_MIN_COUNT == 4 and stacked.buckets == [[0, 2, 7, 8]]
    assert stacked.inverse is not None and len(stacked.rest) == 6
    want = torch.stack([torch.linalg.vector_norm(t.double()) for t in ts])
    got = norms([2.0 * t for t in ts], True, stacked)   # same layout, new values
    torch.testing.assert_close(got, 2.0 * want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_norms_are_reduced_in_float32(dtype):
    """bfloat16 norms carry ~3 digits, too few for gamma_k - gamma_bar; every path gives float32."""
    from tensorsam.norms import StackedLayout, norms

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g).to(dtype) for s in [(7, 9), (7, 9), (300,), (5,)]]
    want = torch.stack([torch.linalg.vector_norm(t.double()) for t in ts])
    for got in (norms(ts, True), norms(ts, False), norms(ts, True, StackedLayout(ts))):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)



@pytest.mark.parametrize("kind", ["sam", "das", "rebalance"])
def test_wrapper_state_is_the_base_state(kind):
    """``optimizer.state`` reaches the momentum buffers (tools walk it, e.g. to move the state to
    a device): writing through the wrapper changes what the base optimizer uses."""
    params, groups, loss_fn = toy()
    opt = make(kind, params, groups)
    train(opt, loss_fn, 1)
    assert opt.state is opt.base_optimizer.state
    assert set(opt.state[params[0]]) == {"momentum_buffer"}
    opt.state[params[0]]["momentum_buffer"] = torch.zeros_like(params[0])
    assert torch.equal(opt.base_optimizer.state[params[0]]["momentum_buffer"], torch.zeros_like(params[0]))
    clone = copy.deepcopy(opt)
    assert clone.state is clone.base_optimizer.state


# -- load_state_dict refuses, at load time and changing nothing, a state that does not fit ----------
def saved_and_fresh(kind="das", base=torch.optim.SGD, shapes=None):
    """A state dict after 2 steps, and a fresh wrapper (1 step taken) on a model whose parameter
    shapes are ``shapes(p.shape)`` (default: the same)."""
    params, groups, loss_fn = toy()
    opt = make(kind, params, groups, base=base)
    train(opt, loss_fn, 2)
    params2, groups2, loss_fn2 = toy(seed=1)
    if shapes is not None:
        index = {id(p): i for i, p in enumerate(params2)}
        params2 = [nn.Parameter(torch.randn(*shapes(p.shape), dtype=p.dtype)) for p in params2]
        groups2 = [[params2[index[id(p)]] for p in g] for g in groups2]
    opt2 = make(kind, params2, groups2)
    if shapes is None:
        train(opt2, loss_fn2, 1)
    return opt.state_dict(), opt2


def assert_refused_and_unchanged(opt, state_dict, match):
    before = copy.deepcopy(opt.state_dict())
    groups, state = opt.param_groups, opt.state
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    after = opt.state_dict()
    assert opt.param_groups is groups and opt.state is state
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for i, entry in before["state"].items():
        assert entry.keys() == after["state"][i].keys()
        assert all(torch.equal(v, after["state"][i][k]) for k, v in entry.items())


@pytest.mark.parametrize("kind", ["das", "sam", "rebalance"])
def test_optimizer_state_of_another_shape_is_refused_at_load(kind):
    """A DAS state from a differently shaped model loaded silently and failed at the next step."""
    saved, opt = saved_and_fresh(kind, shapes=lambda s: s[::-1])   # (4, 3) -> (3, 4), ...
    assert_refused_and_unchanged(opt, saved, r"'momentum_buffer' of parameter 0 has shape \(4, 3\), expected \(3, 4\)")


def test_optimizer_state_of_another_group_layout_is_refused_at_load():
    saved, opt = saved_and_fresh()
    saved["param_groups"][0]["params"] = saved["param_groups"][0]["params"][:-1]
    assert_refused_and_unchanged(opt, saved, r"param groups of \[5\] parameters.*has \[6\]")


def test_optimizer_state_of_another_base_optimizer_is_refused_at_load():
    """An Adam-based state in an SGD-based wrapper gave KeyError: 'momentum' (or ran on, silently)."""
    saved, opt = saved_and_fresh(base=torch.optim.Adam)
    assert_refused_and_unchanged(opt, saved, "saved with base optimizer Adam, but this DAS wraps SGD")
    for g in saved["param_groups"]:
        g["base_optimizer"] = "SGD"                 # a mislabelled state: its keys still tell
    assert_refused_and_unchanged(opt, saved, r"holds \['exp_avg', 'exp_avg_sq', 'step'\], which SGD does not keep")
    sgd_saved, _ = saved_and_fresh(base=torch.optim.SGD)
    adam = make("das", *toy()[:2], base=torch.optim.Adam)
    for g in sgd_saved["param_groups"]:
        g["base_optimizer"] = "Adam"
    assert_refused_and_unchanged(adam, sgd_saved, r"\['momentum_buffer'\], which Adam does not keep")


def test_first_layout_state_of_another_base_optimizer_is_refused_at_load():
    """A first-layout state dict names no base optimizer: its hyperparameters and keys tell."""
    from pathlib import Path

    v1 = torch.load(Path(__file__).parent / "data" / "optim_v1_state_dicts.pt", weights_only=True)
    adam_state = v1["rebalance-Adam"]["state_dict"]
    _, opt = saved_and_fresh("rebalance")
    assert_refused_and_unchanged(opt, adam_state, r"hyperparameters \[.*'betas'.*lacks \['dampening', 'momentum'")
    no_state = {**adam_state, "base": {**adam_state["base"], "state": {}}}
    assert_refused_and_unchanged(opt, no_state, "saved with another base optimizer")


def test_a_subclass_of_a_torch_optimizer_loads_its_own_state():
    class MomentumSGD(torch.optim.SGD):
        pass

    params, groups, loss_fn = toy()
    opt = make("das", params, groups, base=MomentumSGD, lr=0.05, momentum=0.9)
    train(opt, loss_fn, 2)
    opt2 = make("das", params, groups, base=MomentumSGD, lr=0.05, momentum=0.9)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.step_count == 2 and set(opt2.state[params[0]]) == {"momentum_buffer"}
