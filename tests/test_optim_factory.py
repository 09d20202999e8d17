"""build_optimizer: every method over SGD with momentum and over Adam keeps torch's state_dict
layout, resumes bit for bit, survives torch.distributed.checkpoint's state initialisation; the
cost-matched SAM baselines reduce to SAM and to the base optimizer; first-wave checkpoints load."""

import copy
from pathlib import Path

import pytest
import torch
from test_optim_common import toy, train
from torch import nn

from tensorsam.optim import SAM, WrappedOptimizer, build_optimizer
from tensorsam.optim.wrapper import BASE, GROUP_KEYS, SKIPPED, STEP

METHODS = ["sgd", "adam", "adamw", "base", "sam", "asam", "das", "nbar", "obar", "rebalance", "sam-every-2",
           "sam-random-0.5"]
BASES = {"sgd_momentum": ("sgd", {"lr": 0.01, "momentum": 0.9}), "adam": ("adam", {"lr": 0.01})}


def effective(method, base):
    """The base optimizer that runs: the method itself for sgd/adam/adamw."""
    return method if method in ("sgd", "adam", "adamw") else BASES[base][0]


def build(method, params, groups, base):
    name = effective(method, base)
    kw = BASES["sgd_momentum" if name == "sgd" else "adam"][1]
    opts = {"das": {"alpha": 0.5, "alpha_schedule": "cosine"}, "nbar": {"alpha": 0.5}, "obar": {"alpha": 0.5},
            "rebalance": {"every": 2, "rescale_state": True}}.get(method, {})
    grp = [groups[1]] if method in ("nbar", "obar") else groups
    return build_optimizer(method, params, groups=grp, base=name, total_steps=10, **opts, **kw)


def counters(opt):
    return [{k: g[k] for k in GROUP_KEYS} for g in opt.param_groups] if isinstance(opt, WrappedOptimizer) else None


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method", METHODS)
def test_state_dict_layout_round_trip_and_resume(method, base):
    params, groups, loss_fn = toy()
    opt = build(method, params, groups, base)
    train(opt, loss_fn, 6)
    straight = [p.detach().clone() for p in params]

    params, groups, loss_fn = toy()
    opt = build(method, params, groups, base)
    train(opt, loss_fn, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd) == {"state", "param_groups"}                       # torch's layout, nothing else
    assert sd["state"] and all(isinstance(k, int) for k in sd["state"])
    want = {"momentum_buffer"} if effective(method, base) == "sgd" else {"step", "exp_avg", "exp_avg_sq"}
    assert all(want <= set(v) for v in sd["state"].values())
    if isinstance(opt, WrappedOptimizer):
        assert all(g[STEP] == 3 and g[SKIPPED] == 0 and g[BASE] == type(opt.base_optimizer).__name__
                   for g in sd["param_groups"])

    params2, groups2, loss_fn2 = toy()                                # a fresh model, given the saved weights
    opt2 = build(method, params2, groups2, base)
    with torch.no_grad():
        for p, q in zip(params2, params):
            p.copy_(q)
    opt2.load_state_dict(sd)
    again = opt2.state_dict()
    assert counters(opt2) == counters(opt)
    for i, st in sd["state"].items():                                # the round trip is bit-exact
        assert all(torch.equal(torch.as_tensor(st[k]), torch.as_tensor(again["state"][i][k])) for k in st)
    train(opt2, loss_fn2, 3)                                          # resuming = never stopping
    for a, b in zip(straight, params2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_initialisation_step_changes_nothing(method, base):
    """torch.distributed.checkpoint creates state with zero gradients and lr 0 through ``step()``:
    it must not raise, move a parameter or advance a counter."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    params, groups, _ = toy()
    opt = build(method, params, groups, base)
    before = [p.detach().clone() for p in params]
    _init_optim_state(opt)
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(p.grad is None for p in params)
    if isinstance(opt, WrappedOptimizer):
        assert opt.step_count == 0 and opt.skipped_steps == 0
    assert all(g["lr"] == 0.01 for g in opt.param_groups)


def test_distributed_checkpoint_state_dict_helpers_round_trip():
    """get/set_optimizer_state_dict (FQN-keyed, as DCP and FSDP save) carry the counters."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def model_and_opt(seed):
        params, groups, loss_fn = toy(seed=seed)
        model = nn.Module()
        for i, p in enumerate(params):
            model.register_parameter(f"p{i}", p)
        return model, build("das", params, groups, "adam"), loss_fn

    model, opt, loss_fn = model_and_opt(0)
    train(opt, loss_fn, 2)
    sd = get_optimizer_state_dict(model, opt)
    assert "p0" in sd["state"] and sd["param_groups"][0][STEP] == 2
    model2, opt2, _ = model_and_opt(0)
    set_optimizer_state_dict(model2, opt2, sd)
    assert opt2.step_count == 2 and torch.equal(opt2.state[model2.p0]["exp_avg"], opt.state[model.p0]["exp_avg"])


@pytest.mark.parametrize("base", list(BASES))
def test_sam_every_1_is_sam_and_sam_random_0_is_the_base(base):
    def run(method, steps=4):
        params, groups, loss_fn = toy()
        opt = build(method, params, groups, base)
        train(opt, loss_fn, steps)
        return [p.detach() for p in params]

    assert all(torch.equal(a, b) for a, b in zip(run("sam-every-1"), run("sam")))
    assert all(torch.equal(a, b) for a, b in zip(run("sam-random-0"), run(BASES[base][0])))
    assert not all(torch.equal(a, b) for a, b in zip(run("sam"), run(BASES[base][0])))


@pytest.mark.parametrize(("method", "pattern"), [("sam-every-3", [2, 1, 1, 2, 1, 1, 2]),
                                                 ("sam-random-1", [2] * 7), ("sam-random-0.0", [1] * 7)])
def test_cost_matched_sam_takes_sam_steps_when_due(method, pattern):
    params, _, loss_fn = toy()
    opt = build_optimizer(method, params, lr=0.05)
    calls = []
    for _ in pattern:
        n = [0]

        def closure(n=n):
            n[0] += 1
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        opt.step(closure)
        calls.append(n[0])
    assert calls == pattern and opt.step_count == len(pattern)


def test_sam_random_draws_are_seeded_and_resume():
    def draws(opt, n):
        out = []
        for _ in range(n):
            out.append(opt.perturbs_this_step())
            opt._advance(STEP)             # what a step does to the draw's counter
        return out

    params, _, _ = toy()
    a = draws(build_optimizer("sam-random-0.5", params, lr=0.1, seed=7), 40)
    assert 5 < sum(a) < 35 and a == draws(build_optimizer("sam-random-0.5", params, lr=0.1, seed=7), 40)
    assert a != draws(build_optimizer("sam-random-0.5", params, lr=0.1, seed=8), 40)
    opt = build_optimizer("sam-random-0.5", params, lr=0.1, seed=7)
    draws(opt, 25)
    resumed = build_optimizer("sam-random-0.5", params, lr=0.1, seed=0)
    resumed.load_state_dict(opt.state_dict())          # the seed travels in the state dict
    assert draws(resumed, 15) == a[25:]


def test_sam_two_step_style_on_an_off_step_takes_the_base_step():
    params, _, loss_fn = toy()
    opt = build_optimizer("sam-every-2", params, lr=0.05)
    for step in range(2):
        loss_fn().backward()
        assert opt.perturbs_this_step() is (step == 0)
        if opt.perturbs_this_step():
            opt.first_step(zero_grad=True)
            loss_fn().backward()
        opt.step()
        opt.zero_grad()
    assert opt.step_count == 2
    with pytest.raises(RuntimeError, match="needs first_step"):
        loss_fn().backward()
        opt.step()                        # step 2 is a SAM step again


def test_first_wave_checkpoints_still_load():
    """State dicts written by the first wave's code (``tests/data/make_optim_v1_state_dicts.py``)
    load, and two more steps give exactly what the old code gave."""
    saved = torch.load(Path(__file__).parent / "data" / "optim_v1_state_dicts.pt", weights_only=True)
    for key, rec in saved.items():
        kind, base = key.split("-")
        params, groups, loss_fn = toy()
        base_name = base.lower()
        opts = {"das": {"alpha": 0.5, "alpha_schedule": "cosine", "normalization": "global"},
                "nbar": {"alpha": 0.5}, "sam": {"rho": 0.05},
                "rebalance": {"every": 2, "rescale_state": True}}[kind]
        kw = {"lr": 0.05, "momentum": 0.9} if base == "SGD" else {"lr": 0.01}
        opt = build_optimizer(kind, params, groups=[groups[1]] if kind == "nbar" else groups, base=base_name,
                              total_steps=10, **opts, **kw)
        with torch.no_grad():
            for p, q in zip(params, rec["params"]):
                p.copy_(q)
        opt.load_state_dict(rec["state_dict"])
        assert opt.step_count == 3, key
        train(opt, loss_fn, 2)
        assert all(torch.equal(a, b) for a, b in zip(rec["expected"], params)), key


@pytest.mark.parametrize(("call", "message"), [
    (lambda p, g: build_optimizer("sgdd", p, lr=0.1), "unknown method 'sgdd'.*sam-every-K"),
    (lambda p, g: build_optimizer("sam-every-0", p, lr=0.1), "every must be a positive int"),
    (lambda p, g: build_optimizer("sam-random-1.5", p, lr=0.1), r"prob must be a number in \[0, 1\]"),
    (lambda p, g: build_optimizer("sam", p, lr=0.1, alpha=0.1), r"unknown option\(s\) \['alpha'\].*valid options"),
    (lambda p, g: build_optimizer("das", p, lr=0.1, alpha=0.1), "needs groups="),
    (lambda p, g: build_optimizer("das", p, groups=g, lr=0.1), "needs alpha="),
    (lambda p, g: build_optimizer("sam", p, base="lion", lr=0.1), "unknown base optimizer 'lion'"),
    (lambda p, g: build_optimizer("sam-every-2", p, every=3, lr=0.1), r"fixes \['every'\]"),
    (lambda p, g: build_optimizer("asam", p, adaptive=False, lr=0.1), r"fixes \['adaptive'\]"),
    (lambda p, g: build_optimizer("nbar", p, groups=g, alpha=0.1, total_steps=5, lr=0.1), "expected 2"),
])
def test_bad_methods_and_options_are_named(call, message):
    params, groups, _ = toy()
    with pytest.raises(ValueError, match=message):
        call(params, groups)


def test_factory_builds_what_it_says():
    params, _, _ = toy()
    assert type(build_optimizer("adamw", params, lr=0.1)) is torch.optim.AdamW
    assert type(build_optimizer("base", params, base=torch.optim.RMSprop, lr=0.1)) is torch.optim.RMSprop
    opt = build_optimizer("asam", params, base="adam", rho=0.5, lr=0.1)
    assert isinstance(opt, SAM) and opt.param_groups[0]["adaptive"] and opt.param_groups[0]["rho"] == 0.5
    assert type(opt.base_optimizer) is torch.optim.Adam
    sam = build_optimizer("sam-every-4", params, momentum=0.9, lr=0.1)
    assert sam.every == 4 and sam.param_groups[0]["momentum"] == 0.9
