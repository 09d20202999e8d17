"""SAM/ASAM (Algorithm 1): exact step, edge cases, gradient accumulation, BatchNorm statistics,
GradScaler."""

import pytest
import torch
from test_optim_common import toy
from torch import nn

from tensorsam.optim import SAM, disable_running_stats


def expected_sam_step(params, loss_fn, rho, lr, adaptive):
    """Algorithm 1 by hand in float64: g at w, e (global norm), g~ at w + e, w - lr g~."""
    w = [p.detach().clone() for p in params]
    g = torch.autograd.grad(loss_fn(), params)
    if adaptive:
        norm = torch.sqrt(sum(((wi.abs() * gi) ** 2).sum() for wi, gi in zip(w, g)))
        e = [rho * wi * wi * gi / norm for wi, gi in zip(w, g)]
    else:
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        e = [rho * gi / norm for gi in g]
    with torch.no_grad():
        for p, wi, ei in zip(params, w, e):
            p.copy_(wi + ei)
    g_tilde = torch.autograd.grad(loss_fn(), params)
    with torch.no_grad():
        for p, wi in zip(params, w):
            p.copy_(wi)
    return [wi - lr * gi for wi, gi in zip(w, g_tilde)]


@pytest.mark.parametrize("style", ["closure", "two_steps"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_one_step_matches_algorithm1(adaptive, style, foreach):
    params, _, loss_fn = toy(seed=3)
    want = expected_sam_step(params, loss_fn, 0.3, 0.1, adaptive)
    opt = SAM(params, torch.optim.SGD, rho=0.3, adaptive=adaptive, foreach=foreach, lr=0.1)
    if style == "closure":
        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        opt.step(closure)
    else:
        loss_fn().backward()
        opt.first_step(zero_grad=True)
        loss_fn().backward()
        opt.second_step(zero_grad=True)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


def test_step_returns_loss_at_unperturbed_point():
    params, _, loss_fn = toy()
    start = loss_fn().item()
    opt = SAM(params, torch.optim.SGD, rho=0.5, lr=0.0)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    assert opt.step(closure).item() == start
    assert loss_fn().item() == start      # lr 0: weights restored exactly


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_no_perturbation(adaptive):
    params, _, _ = toy()
    opt = SAM(params, torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.1)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.first_step()
    for a, p in zip(before, params):
        assert torch.equal(a, p)
    opt.second_step()


def test_phase_errors():
    params, _, loss_fn = toy()
    opt = SAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="no gradients"):
        opt.first_step()
    loss_fn().backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="still perturbed"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="between"):
        opt.state_dict()
    opt.second_step()
    opt.state_dict()
    with pytest.raises(ValueError, match="rho"):
        SAM(params, torch.optim.SGD, rho=-0.1, lr=0.1)


def test_gradient_accumulation_equals_full_batch():
    """Two micro-batches (mean losses halved) give the same step as the full batch, with the
    perturbation taken from the accumulated gradient and the weights restored once."""
    results = []
    for micro in (False, True):
        params, _, loss_fn = toy(n=16)
        opt = SAM(params, torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
        for _ in range(2):
            parts = [slice(0, 8), slice(8, 16)] if micro else [slice(None)]
            for rows in parts:
                (loss_fn(rows) / len(parts)).backward()
            opt.first_step(zero_grad=True)
            for rows in parts:
                (loss_fn(rows) / len(parts)).backward()
            opt.second_step(zero_grad=True)
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_batchnorm_statistics_untouched_by_the_perturbed_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    bn = model[1]
    nn.functional.mse_loss(model(x), y).backward()
    stats = {k: v.clone() for k, v in bn.named_buffers()}
    opt.first_step(zero_grad=True)
    with disable_running_stats(model):
        out = model(x)
        nn.functional.mse_loss(out, y).backward()
    for k, v in bn.named_buffers():
        assert torch.equal(v, stats[k]), k
    assert bn.track_running_stats is True
    opt.second_step(zero_grad=True)
    model(x)                                       # outside the block the statistics update again
    assert not torch.equal(bn.running_mean, stats["running_mean"])
    assert bn.num_batches_tracked.item() == stats["num_batches_tracked"].item() + 1


@pytest.mark.parametrize("bad_pass", ["first", "second", "none"])
def test_grad_scaler_skips_a_step_with_inf_in_either_pass(bad_pass):
    params, _, loss_fn = toy(dtype=torch.float32)
    opt = SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in params]

    scaler.scale(loss_fn()).backward()
    if bad_pass == "first":
        params[0].grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True)
    if bad_pass == "first":               # no perturbation from a non-finite gradient
        assert all(torch.equal(a, p) for a, p in zip(before, params))
    scaler.scale(loss_fn()).backward()
    if bad_pass == "second":
        params[3].grad[1, 1] = float("-inf")
    opt.restore()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    if bad_pass == "none":
        assert not torch.equal(before[0], params[0])
        assert scaler.get_scale() == 2.0 ** 10
    else:
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        assert opt.base_optimizer.state == {} or all(not s for s in opt.base_optimizer.state.values())
        assert scaler.get_scale() == 2.0 ** 9
    # the next step runs normally
    scaler.scale(loss_fn()).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(loss_fn()).backward()
    opt.restore()
    scaler.step(opt)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in params)


def test_lr_scheduler_with_two_step_style_does_not_warn(recwarn):
    params, _, loss_fn = toy()
    opt = SAM(params, torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss_fn().backward()
    opt.first_step(zero_grad=True)
    loss_fn().backward()
    opt.second_step(zero_grad=True)
    sched.step()
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.05


def test_closure_failing_in_the_perturbed_pass_leaves_the_weights_at_w():
    params, _, loss_fn = toy()
    opt = SAM(params, torch.optim.SGD, rho=0.5, lr=0.1)
    before = [p.detach().clone() for p in params]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    calls[:] = [1, 1]                 # the optimizer is usable again: a full step works
    opt.step(closure)
    assert opt.step_count == 1 and not all(torch.equal(a, p) for a, p in zip(before, params))
