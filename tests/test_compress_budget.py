"""Compression to a budget (issue 11, parts 1-2): ``tensorize(..., ratio= | rel_error=, balance=)``.

Small float64 networks where exactness matters; a ~20k-parameter float32 network for the ratio and
error targets.  The layouts are (in, k*k, out) on the real channel axes (a permutation, not a view).
"""

import warnings

import pytest
import torch
from torch import nn

from tensorsam.dynamics import norm_deviation
from tensorsam.models import resnet
from tensorsam.nn import TensorizedConv2d, TensorizedLinear, count_parameters, tensorize
from tensorsam.nn.budget import LayerBudget, ladder
from tensorsam.nn.layout import Layout

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many tiny SVDs: a second intra-op thread only spins, and on a loaded 2-core machine that made
    this file 4x slower (51 s against 13 s of wall time, measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def conv_net(dtype=F64, seed=0):
    """conv-BN-ReLU twice, a 3x3 conv with bias, global pooling and a linear head (eval mode)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5)).to(dtype)
    for bn in (net[1], net[4]):   # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def mid_net(seed=0):
    """~20k float32 parameters: enough rungs for a ratio to be met within a few percent."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 3),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 10)).eval()


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def full_ranks(net, fmt):
    """The top rung of every Linear/Conv2d: the exact representation in ``fmt``."""
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            fin, fout = m.weight.shape[1], m.weight.shape[0]
            kernel = m.weight[0, 0].numel() if m.weight.ndim == 4 else None
            out[name] = ladder(Layout.of(fmt, fin, fout, kernel))[-1]
    return out


def snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, snap):
    modules, state = snap
    assert snapshot(model)[0] == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# -- exactness ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["tt", "tucker", "tr"])
def test_full_rank_decomposition_reproduces_the_dense_network(fmt):
    net = conv_net()
    x = torch.randn(4, 3, 9, 9, dtype=F64)
    y = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # full-rank layers grow
        s = tensorize(net, fmt, full_ranks(net, fmt), decompose=True)
    assert len(s.layers) == 4 and all(r.rel_error < 1e-12 for r in s.layers)
    assert rel(net(x), y) < 1e-5


def test_cp_at_the_weights_exact_cp_rank_reproduces_the_dense_network():
    """Weights exactly of CP rank 2 in the (in, k*k, out) layout: ALS recovers them, which it would
    not if the weight were reshaped by a view of (out, in, k, k)."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, 2, generator=g, dtype=F64) for n in (4, 9, 6))
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    lin = nn.Linear(6, 3).double()
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("ir,kr,or->oik", a, b, c).reshape(6, 4, 3, 3))
        lin.weight.copy_(torch.randn(3, 2, generator=g, dtype=F64) @ torch.randn(2, 6, generator=g, dtype=F64))
    net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)
    x = torch.randn(5, 4, 7, 7, dtype=F64)
    y = net(x)
    s = tensorize(net, "cp", rank=2, decompose=True)
    assert s.ranks == {"0": 2, "4": 2} and all(r.rel_error < 1e-7 for r in s.layers)
    assert rel(net(x), y) < 1e-5


# -- ratio= -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fmt", "ratio", "make"), [("tt", 2.5, mid_net), ("tt", 4.0, mid_net), ("tucker", 2.5, mid_net),
                                                   ("tr", 3.0, mid_net), ("cp", 2.0, conv_net)])
def test_chosen_ranks_hit_the_requested_ratio_and_are_valid(fmt, ratio, make):
    net = make()
    before = count_parameters(net)
    s = tensorize(net, fmt, ratio=ratio, decompose=True)
    assert s.params_before == before and s.params_after == count_parameters(net)
    assert ratio <= s.ratio <= 1.05 * ratio
    dtype = next(net.parameters()).dtype
    assert net(torch.randn(2, 3, 10, 10, dtype=dtype)).shape[0] == 2
    for row in s.layers:
        layer = net.get_submodule(row.name)
        assert layer.rank == row.rank and row.params_after <= row.params_before   # no layer grows
        assert 0 <= row.rel_error <= 1
        # the rank is valid: a fresh layer of the format builds at it and runs
        kw = {"format": fmt, "rank": row.rank, "bias": layer.bias is not None, "dtype": dtype}
        if row.kind == "Conv":
            fresh = TensorizedConv2d(layer.in_channels, layer.out_channels, 3, **kw)
            x = torch.randn(1, layer.in_channels, 5, 5, dtype=dtype)
        else:
            fresh = TensorizedLinear(layer.in_features, layer.out_features, **kw)
            x = torch.randn(1, layer.in_features, dtype=dtype)
        assert fresh.rank == row.rank and count_parameters(fresh) == row.params_after
        assert torch.isfinite(fresh(x)).all()
    text = str(s)
    assert f"achieved ratio {s.ratio:.2f}x" in text and f"target ratio={ratio:g}" in text
    assert all(str(row.rank) in text for row in s.layers)
    d = s.to_dict()
    assert d["achieved_ratio"] == s.ratio and d["target_ratio"] == ratio and len(d["layers"]) == 4


def test_ratio_without_decompose_chooses_the_same_ranks_and_initialises_fresh_cores():
    dec, fresh = mid_net(), mid_net()
    s_dec = tensorize(dec, "tt", ratio=3.0, decompose=True)
    s_fresh = tensorize(fresh, "tt", ratio=3.0)
    assert s_fresh.ranks == s_dec.ranks and s_fresh.ratio == s_dec.ratio
    assert [r.rel_error for r in s_fresh.layers] == pytest.approx([r.rel_error for r in s_dec.layers])
    w_dec, w_fresh = dec[2].dense_weight(), fresh[2].dense_weight()
    assert rel(w_fresh, w_dec) > 0.5     # not the decomposition: the unified initialisation


def test_the_greedy_counts_parameters_as_the_layers_do():
    layer = nn.Conv2d(16, 32, 3)
    for fmt in ("tt", "tr", "tucker", "cp", "ttm"):
        b = LayerBudget(layer, fmt, thin=True)
        for i in (0, len(b.rungs) // 2, len(b.rungs) - 1):
            built = TensorizedConv2d(16, 32, 3, format=fmt, rank=b.rungs[i])
            assert b.params(i) == count_parameters(built), (fmt, b.rungs[i])
        assert all(b.params(i) < b.params(i + 1) for i in range(len(b.rungs) - 1))


# -- rel_error= ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["tt", "tucker"])
def test_rel_error_bounds_every_layers_error_at_the_smallest_rank(fmt):
    net = mid_net()
    weights = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # Tucker's first conv grows a little at this bound
        s = tensorize(net, fmt, rel_error=0.4, decompose=True)
    for row in s.layers:
        measured = rel(net.get_submodule(row.name).dense_weight(), weights[row.name])
        assert measured == pytest.approx(row.rel_error, abs=1e-6) and measured <= 0.4
        budget = LayerBudget(_dense_like(row.name, weights), fmt)
        i = budget.rungs.index(row.rank)
        assert i == 0 or budget.error(i - 1) > 0.4      # the rung below misses the bound


def _dense_like(name, weights):
    w = weights[name]
    layer = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:]) if w.ndim == 4 else nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


# -- balance= -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fmt", "target"), [("tt", {"rank": 3}), ("tucker", {"rank": 3}), ("tr", {"rel_error": 0.5}),
                                             ("cp", {"rank": 4})])
def test_balance_keeps_the_outputs_and_sets_q_to_zero(fmt, target):
    plain, balanced = conv_net(), conv_net()
    x = torch.randn(4, 3, 9, 9, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s0 = tensorize(plain, fmt, decompose=True, **target)
        s1 = tensorize(balanced, fmt, decompose=True, balance=True, **target)
    y0 = plain(x)
    assert rel(balanced(x), y0) < 1e-6
    assert s1.q_after_decompose == pytest.approx(s0.q_after_decompose) and s0.q_after_balance is None
    for row in s1.layers:
        cores = balanced.get_submodule(row.name).cores
        s = torch.stack([c.detach().square().sum() for c in cores])
        assert torch.allclose(s, s.mean().expand_as(s), rtol=1e-10)      # equal norms
        assert row.q_balance <= 1e-20 * float(s.sum()) ** 2 + 1e-30
        assert row.q_balance == pytest.approx(float(norm_deviation(cores)))
    assert s1.q_after_balance == pytest.approx(sum(r.q_balance for r in s1.layers))
    if fmt == "tt":   # TT-SVD leaves the norm in the last core
        assert s1.q_after_decompose > 1.0


# -- bad input ----------------------------------------------------------------------------------------
def test_an_unreachable_ratio_names_the_maximum_and_leaves_the_model_untouched():
    model = resnet(20, None, in_channels=1)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"ratio=1000 is unreachable: the most this model compresses in "
                                         r"format 'tt' is \d+\.\d\dx \(269,434 -> "):
        tensorize(model, "tt", ratio=1000, decompose=True)
    assert_untouched(model, snap)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ratio": 1.0}, r"ratio must be > 1 \(the model's parameters before / after compression\), got 1\.0"),
    ({"ratio": 0.5}, r"ratio must be > 1"),
    ({"ratio": True}, r"ratio must be a finite number, got True"),
    ({"ratio": float("inf")}, r"ratio must be a finite number"),
    ({"rank": 2, "ratio": 2.0}, r"give exactly one target: .* got rank= and ratio="),
    ({"ratio": 2.0, "rel_error": 0.1}, r"give exactly one target: .* got ratio= and rel_error="),
    ({}, r"give exactly one target: .* got none"),
    ({"rel_error": 0.0}, r"rel_error must be in \(0, 1\)"),
    ({"rel_error": 1.0}, r"rel_error must be in \(0, 1\)"),
    ({"rel_error": -0.1}, r"rel_error must be in \(0, 1\)"),
    ({"rel_error": 1e-12}, (r"layer '0' cannot be tensorized \(rel_error=1e-12 is unreachable: its smallest "
                            r"error is .* at rank .*\); the model is left unchanged")),
])
def test_bad_targets_are_clear_errors_and_leave_the_model_untouched(kwargs, message):
    model = mid_net()     # float32: a 1e-12 error is below its rounding
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        tensorize(model, "tt", decompose=True, **kwargs)
    assert_untouched(model, snap)
