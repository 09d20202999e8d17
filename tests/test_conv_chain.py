"""CP, Tucker, TT and TR convolutions as a chain of standard convolutions (forward_mode='chain'): the
output and gradients equal the reconstructed-weight path, and ``auto`` has the chain as a candidate."""

import pytest
import torch
import torch.nn.functional as F

from tensorsam.nn import TensorizedConv2d, TensorizedLinear
from tensorsam.nn import auto as auto_mod
from tensorsam.nn import chain as chain_mod

F64 = torch.float64

# (C_in, C_out, kernel, stride, padding, dilation, rank, shape)
CASES = [
    (4, 6, 3, 1, 1, 1, 1, None),
    (4, 6, 3, 2, 1, 1, 2, None),
    (6, 4, 3, 1, 0, 1, 3, None),
    (6, 4, 3, 2, 0, 1, 2, None),
    (5, 3, 1, 1, 0, 1, 2, None),
    (5, 3, 1, 2, 1, 1, 3, None),
    (3, 7, 1, 2, 0, 1, 1, None),
    (4, 6, (2, 3), 2, 1, 2, 2, None),     # non-square kernel, dilation
    (8, 6, 3, 1, 1, 1, 3, ((2, 4), (3, 2))),  # several in and out modes
    (3, 8, 3, 1, 1, 1, 4, None),          # Tucker: rank capped at C_in, the first 1x1 folded
]
TRAIN_CASES = [  # TT and TR
    (4, 6, 3, 1, 1, 1, 1, None),
    (4, 6, 3, 2, 1, 1, 2, None),
    (6, 4, 3, 1, 0, 1, 3, None),
    (5, 3, 1, 1, 0, 1, 2, None),
    (5, 3, 1, 2, 1, 1, 3, None),
    (8, 12, 1, 2, 0, 1, 2, ((2, 2, 2), (3, 4))),   # 1x1, several in and out modes
    (4, 6, (2, 3), 2, 1, 2, 2, None),              # non-square kernel, dilation
    (8, 6, 3, 1, 1, 1, 3, ((2, 4), (3, 2))),       # several in and out modes
    (8, 6, 3, 2, 2, 2, 2, ((2, 2, 2), (6,))),      # several in modes, one out mode
    (3, 16, 3, 1, 1, 1, 4, ((3,), (4, 4))),        # TR: r_0 r_a >= C_in, the first 1x1 folded
    (16, 3, 3, 2, 1, 1, 4, ((4, 4), (3,))),        # TR: the last 1x1 folded
]
FORMAT_CASES = [(f, c) for f in ("cp", "tucker") for c in CASES] + [(f, c) for f in ("tt", "tr") for c in TRAIN_CASES]


@pytest.fixture
def one_thread():
    """Gradchecks run thousands of tiny convs: on a busy CPU two intra-op threads make them 15x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def check_equal(layer, x):
    """The chain's output equals the reconstructed weight's and F.conv2d's with the dense weight."""
    ref = layer.forward_reconstructed(x)
    y = layer.forward_chain(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, F.conv2d(x, layer.dense_weight(), layer.bias, layer.stride, layer.padding,
                                           layer.dilation), rtol=1e-10, atol=1e-12)


def _layer(fmt, c_in, c_out, k, stride, padding, dilation, rank, shape, **kw):
    return TensorizedConv2d(c_in, c_out, k, format=fmt, rank=rank, shape=shape, stride=stride, padding=padding,
                            dilation=dilation, dtype=F64, **kw)


@pytest.mark.parametrize("fmt, case", FORMAT_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_chain_equals_reconstructed(fmt, case, bias):
    torch.manual_seed(0)
    layer = _layer(fmt, *case, bias=bias)
    if bias:
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, case[0], 7, 6, dtype=F64)
    check_equal(layer, x)
    layer.forward_mode = "chain"
    torch.testing.assert_close(layer(x), layer.forward_reconstructed(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt, c_in, rank, shape", [
    ("cp", 5, 3, None), ("tucker", 5, (2, 3, 4), None),
    ("tt", 8, (2, 3, 4, 5), ((2, 4), (3, 2))), ("tr", 8, (2, 3, 4, 5, 3), ((2, 4), (3, 2)))])
def test_rank_per_mode_and_chain_gradients_match(fmt, c_in, rank, shape):
    """Gradients of the chain equal those of the reconstructed path (input, cores and bias)."""
    torch.manual_seed(1)
    layer = TensorizedConv2d(c_in, 6, 3, format=fmt, rank=rank, shape=shape, stride=2, padding=1, dtype=F64)
    x = torch.randn(2, c_in, 8, 7, dtype=F64, requires_grad=True)
    g = torch.randn_like(layer.forward_reconstructed(x))
    params = [x, *layer.parameters()]
    ref = torch.autograd.grad(layer.forward_reconstructed(x), params, g)
    got = torch.autograd.grad(layer.forward_chain(x), params, g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "tr"])
@pytest.mark.parametrize("c_in, c_out, k, stride, padding, rank, shape", [
    (4, 3, 3, 2, 1, 2, None), (3, 4, 3, 1, 0, 1, None), (4, 3, 1, 2, 1, 2, None), (3, 5, (1, 3), 1, 1, 3, None),
    (4, 6, 3, 1, 0, 2, ((2, 2), (3, 2))), (4, 3, 1, 2, 1, 2, ((2, 2), (3,)))])
def test_chain_gradcheck(one_thread, fmt, c_in, c_out, k, stride, padding, rank, shape):
    torch.manual_seed(0)
    layer = TensorizedConv2d(c_in, c_out, k, format=fmt, rank=rank, shape=shape, stride=stride, padding=padding,
                             forward_mode="chain", dtype=F64)
    x = torch.randn(1, c_in, 4, 3, dtype=F64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


def test_chain_stages():
    """CP: 1x1 -> depthwise on the R channels -> 1x1; a 1x1 kernel leaves two 1x1 convs, the first
    strided.  Tucker: 1x1 -> core conv -> 1x1, a 1x1 that would not reduce the channels folded."""
    def shape(layer):
        return [(s.in_channels, s.out_channels, s.groups, s.kernel, s.spatial) for s in layer._conv_chain().stages]

    cp = TensorizedConv2d(32, 16, 3, format="cp", rank=5, padding=1)
    assert shape(cp) == [(32, 5, 1, (1, 1), False), (5, 5, 5, (3, 3), True), (5, 16, 1, (1, 1), False)]
    cp1 = TensorizedConv2d(32, 16, 1, format="cp", rank=5, stride=2)
    assert shape(cp1) == [(32, 5, 1, (1, 1), True), (5, 16, 1, (1, 1), False)]
    tk = TensorizedConv2d(32, 16, 3, format="tucker", rank=(6, 9, 4), padding=1)
    assert shape(tk) == [(32, 6, 1, (1, 1), False), (6, 4, 1, (3, 3), True), (4, 16, 1, (1, 1), False)]
    folded = TensorizedConv2d(3, 16, 3, format="tucker", rank=(3, 9, 4), padding=1)
    assert shape(folded) == [(3, 4, 1, (3, 3), True), (4, 16, 1, (1, 1), False)]
    full = TensorizedConv2d(3, 4, 3, format="tucker", rank=(3, 9, 4), padding=1, forward_mode="chain")
    assert len(full._conv_chain().stages) == 1 and "chain" not in full.modes  # the dense conv itself
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(full(x), full.forward_reconstructed(x), rtol=1e-5, atol=1e-6)
    tk1 = TensorizedConv2d(32, 16, 1, format="tucker", rank=(6, 1, 4))
    assert shape(tk1) == [(32, 4, 1, (1, 1), True), (4, 16, 1, (1, 1), False)]


def test_chain_cost_counts_multiply_adds():
    """The estimate is ~2 (C_in + k^2 + C_out) R FLOPs per output pixel for CP (Lebedev et al.), far
    below the dense conv's 2 C_in k^2 C_out for 32->32 3x3 at R = 15."""
    layer = TensorizedConv2d(32, 32, 3, format="cp", rank=15, padding=1, bias=False)
    x = torch.empty(128, 32, 16, 16)
    est = layer.estimated_costs(x)
    pixels = 128 * 16 * 16
    flops = 2 * (32 + 9 + 32) * 15 * pixels
    assert flops <= est["chain"] <= 1.5 * flops
    assert est["chain"] < est["reconstructed"] / 4


def test_chain_is_a_mode_of_cp_tucker_tt_and_tr_convs_only():
    for fmt in ("cp", "tucker", "tt", "tr"):
        conv = TensorizedConv2d(8, 8, 3, format=fmt, rank=2, padding=1)
        assert conv.has_chain and "chain" in conv.modes
        assert "chain" in conv.estimated_costs(torch.empty(2, 8, 6, 6))
    for fmt in ("ttm",):
        conv = TensorizedConv2d(8, 8, 3, format=fmt, rank=2, padding=1)
        assert not conv.has_chain and "chain" not in conv.modes
        assert "chain" not in conv.estimated_costs(torch.empty(2, 8, 6, 6))
        with pytest.raises(ValueError, match="CP, Tucker, TT and TR convolutions only"):
            conv.forward_mode = "chain"
        with pytest.raises(ValueError, match="CP, Tucker, TT and TR convolutions only"):
            TensorizedConv2d(8, 8, 3, format=fmt, rank=2, forward_mode="chain")
    lin = TensorizedLinear(8, 8, format="cp", rank=2)
    assert "chain" not in lin.modes and "chain" not in lin.estimated_costs(torch.empty(2, 8))
    with pytest.raises(ValueError, match="CP, Tucker, TT and TR convolutions only"):
        lin.forward_mode = "chain"
    assert chain_mod.plan(lin.weight_factors, lin._in_labels, lin._k_labels, lin._out_labels, (1, 1)) is None


def test_auto_picks_chain_from_the_estimate(monkeypatch):
    """A CP/Tucker conv whose chain is estimated far cheaper than every other mode takes it untimed."""
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "1")
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    for fmt in ("cp", "tucker"):
        layer = TensorizedConv2d(64, 64, 3, format=fmt, rank=4, padding=1)

        def boom(*a, **k):
            raise AssertionError("timed although the chain is far cheaper by the estimate")

        monkeypatch.setattr(layer, "time_modes", boom)
        x = torch.randn(4, 64, 8, 8)
        with torch.no_grad():
            assert layer.choose_mode(x) == "chain"
            torch.testing.assert_close(layer(x), layer.forward_reconstructed(x), rtol=1e-4, atol=1e-5)


def test_auto_times_the_chain_when_close(monkeypatch):
    """When the estimates are close the chain is timed beside the other contenders, and the
    timing decides (here against the estimate)."""
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "1")
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    monkeypatch.setattr(auto_mod, "AUTO_TIMING_MARGIN", float("inf"))
    layer = TensorizedConv2d(8, 8, 3, format="cp", rank=2, padding=1)
    layer.timing_margin_above = float("inf")
    x = torch.randn(2, 8, 6, 6)
    est = layer.estimated_costs(x)
    assert auto_mod.contenders(est, layer.timing_margin_above) == ("factorized", "reconstructed", "chain")
    by_estimate = min(est, key=est.get)
    expected = "chain" if by_estimate != "chain" else "reconstructed"  # the timing disagrees
    timed = []

    def fake_time_modes(fns, x, params, grad, repeats=3):
        timed.append(tuple(fns))
        return {m: 1.0 if m == expected else 5.0 for m in fns}

    monkeypatch.setattr(auto_mod, "time_modes", fake_time_modes)
    assert layer.choose_mode(x) == expected
    assert timed == [("factorized", "reconstructed", "chain")]


def test_contenders_leave_out_modes_far_above_the_cheapest():
    est = {"factorized": 100.0, "reconstructed": 10.0, "chain": 1.0}
    assert auto_mod.contenders(est, 2.0) == ("reconstructed", "chain")
    assert auto_mod.contenders(est, 200.0) == ("factorized", "reconstructed", "chain")
    assert auto_mod.contenders({"factorized": 1.0, "reconstructed": 20.0, "chain": 1.5}, 2.0) == (
        "factorized", "chain")


def test_saved_chain_choice_replays_and_is_refused_where_missing(monkeypatch):
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "1")
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    layer = TensorizedConv2d(64, 64, 3, format="cp", rank=4, padding=1)
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        layer(x)
    state = layer.get_extra_state()
    assert b'"chain"' in bytes(state.tolist())
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    fresh = TensorizedConv2d(64, 64, 3, format="cp", rank=4, padding=1)
    fresh.set_extra_state(state)
    monkeypatch.setattr(fresh, "estimated_costs", lambda x: pytest.fail("estimated a saved choice"))
    with torch.no_grad():
        assert fresh.choose_mode(x) == "chain"
    ttm = TensorizedConv2d(64, 64, 3, format="ttm", rank=4, padding=1)
    with pytest.raises(ValueError, match="saved auto choice"):
        ttm.set_extra_state(state)


@pytest.mark.parametrize("fmt", ["tucker", "tr"])
def test_chain_under_autocast(fmt):
    torch.manual_seed(0)
    layer = TensorizedConv2d(8, 8, 3, format=fmt, rank=3, padding=1, forward_mode="chain")
    x = torch.randn(2, 8, 5, 5)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())


def test_chain_double_backward(one_thread):
    torch.manual_seed(0)
    layer = TensorizedConv2d(2, 2, 3, format="cp", rank=2, padding=1, stride=2, forward_mode="chain", dtype=F64)
    x = torch.randn(1, 2, 3, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: layer(x), (x,))
