"""Tensorized layers: both forward modes agree with each other and with a dense layer built
from ``reconstruct()`` by the documented permutation; gradients; from_dense; tensorize; init."""

import math
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tensorsam.nn import TensorizedConv2d, TensorizedLinear, default_modes, tensorize
from tensorsam.nn import auto as auto_mod

FORMATS = ("cp", "tucker", "tt", "tr", "ttm")
F64 = torch.float64


def weight_from_reconstruct(layer) -> torch.Tensor:
    """The dense weight, independently of the layer's own einsum: reconstruct() in the
    documented layout, then a permutation to (out, in[, k_h, k_w])."""
    ft = layer.weight_factors
    kh, kw = getattr(layer, "kernel_size", (1, 1))
    conv = isinstance(layer, TensorizedConv2d)
    if layer.format == "ttm":  # (rows = out modes, cols = in modes [, k]) matrix
        w = ft.to_matrix()
        return w.reshape(layer.out_size, layer.in_size, kh, kw) if conv else w
    t = ft.reconstruct()
    if conv:  # (in modes, k_h*k_w, out modes) -> (C_out, C_in, k_h, k_w)
        return t.reshape(layer.in_size, kh, kw, layer.out_size).permute(3, 0, 1, 2)
    return t.reshape(layer.in_size, layer.out_size).t()


modes = st.lists(st.integers(1, 3), min_size=1, max_size=2)


@settings(max_examples=25)
@given(fmt=st.sampled_from(FORMATS), in_modes=modes, out_modes=modes, rank=st.integers(1, 3),
       batch=st.integers(1, 3))
def test_linear_modes_agree(fmt, in_modes, out_modes, rank, batch):
    in_f, out_f = math.prod(in_modes), math.prod(out_modes)
    layer = TensorizedLinear(in_f, out_f, format=fmt, rank=rank, shape=(in_modes, out_modes), dtype=F64)
    x = torch.randn(batch, 2, in_f, dtype=F64)
    yf, yr = layer.forward_factorized(x), layer.forward_reconstructed(x)
    ref = F.linear(x, weight_from_reconstruct(layer), layer.bias)
    torch.testing.assert_close(yf, yr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(yr, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer(x), yr, rtol=1e-10, atol=1e-12)


@settings(max_examples=25)
@given(fmt=st.sampled_from(FORMATS), c_in=st.sampled_from([1, 2, 4, 6]), c_out=st.sampled_from([1, 3, 4]),
       k=st.sampled_from([(1, 1), (3, 3), (2, 3)]), stride=st.integers(1, 2), padding=st.integers(0, 2),
       dilation=st.integers(1, 2), rank=st.integers(1, 3))
def test_conv_modes_agree(fmt, c_in, c_out, k, stride, padding, dilation, rank):
    layer = TensorizedConv2d(c_in, c_out, k, format=fmt, rank=rank, shape=((c_in,), (c_out,)) if c_in < 4
                             else None, stride=stride, padding=padding, dilation=dilation, dtype=F64)
    x = torch.randn(2, c_in, 7, 6, dtype=F64)
    yf, yr = layer.forward_factorized(x), layer.forward_reconstructed(x)
    ref = F.conv2d(x, weight_from_reconstruct(layer), layer.bias, stride, padding, dilation)
    assert yf.shape == ref.shape
    torch.testing.assert_close(yf, yr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(yr, ref, rtol=1e-10, atol=1e-12)


def test_table2_shape_maps_channel_axes():
    """A flat (in modes, 9, out modes) shape is accepted and the modes are the real axes."""
    layer = TensorizedConv2d(32, 16, 3, format="tr", rank=2, shape=(4, 4, 2, 9, 4, 2, 2), padding=1, dtype=F64)
    assert layer.in_modes == (4, 4, 2) and layer.out_modes == (4, 2, 2)
    w = layer.dense_weight()
    t = layer.weight_factors.reconstruct()  # (i1, i2, i3, k, o1, o2, o3)
    # input channel 13 = (1, 2, 1) in modes (4, 4, 2); output channel 11 = (2, 1, 1) in (4, 2, 2); tap (2, 0) = 6
    torch.testing.assert_close(w[11, 13, 2, 0], t[1, 2, 1, 6, 2, 1, 1])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["factorized", "reconstructed"])
def test_gradcheck(fmt, mode):
    torch.manual_seed(0)
    lin = TensorizedLinear(6, 4, format=fmt, rank=2, shape=((3, 2), (2, 2)), forward_mode=mode, dtype=F64)
    conv = TensorizedConv2d(4, 3, 3, format=fmt, rank=2, shape=((2, 2), (3,)), padding=1, stride=2,
                            forward_mode=mode, dtype=F64)
    for layer, x in ((lin, torch.randn(3, 6, dtype=F64)), (conv, torch.randn(1, 4, 4, 4, dtype=F64))):
        params = list(layer.parameters())
        assert 10 < sum(p.numel() for p in params) + x.numel() <= 250
        x.requires_grad_(True)

        names = [n for n, _ in layer.named_parameters()]

        def f(x, *ps, layer=layer, names=names):
            return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

        inputs = (x, *[p.detach().clone().requires_grad_(True) for p in params])
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.fixture
def two_threads(monkeypatch):
    """Two intra-op threads with the (opt-in) single-threaded small-contraction path switched on."""
    from tensorsam.nn import contraction

    monkeypatch.setattr(contraction, "SINGLE_THREAD_MAX_FLOPS", 5e7)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_small_contraction_single_threaded_same_gradients(two_threads, monkeypatch):
    """Small CPU contractions run on one thread (forward and backward) and give plain autograd's
    gradients, also over a repeated backward; the thread count is restored, on errors too."""
    torch.manual_seed(0)
    layer = TensorizedConv2d(8, 8, 3, format="tr", rank=3, padding=1, forward_mode="reconstructed", dtype=F64)
    x = torch.randn(2, 8, 5, 5, dtype=F64)
    seen = []
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n) or set_threads(n))
    loss = layer(x).square().sum()
    loss.backward(retain_graph=True)
    assert 1 in seen and torch.get_num_threads() == 2
    grads = [p.grad.clone() for p in layer.cores]
    layer.zero_grad()
    loss.backward()  # the inner graph is kept for a repeated backward
    plain = torch.func.functional_call(layer, dict(layer.named_parameters()), (x,))  # no single thread
    ref = torch.autograd.grad(plain.square().sum(), list(layer.cores))
    for a, b, c in zip(grads, (p.grad for p in layer.cores), ref):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12)
    bad = [torch.zeros(3, 3, dtype=F64) for _ in layer.cores]
    with pytest.raises((IndexError, RuntimeError)):  # raised inside the single-threaded region
        layer._weight_contraction()(*bad)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("mode", ["factorized", "reconstructed"])
def test_double_backward_and_torch_func_with_threads(two_threads, mode):
    """Second derivatives and torch.func transforms work through the single-threaded small
    contractions (its first version gave a silently wrong double backward and broke torch.func)."""
    torch.manual_seed(0)
    layer = TensorizedLinear(6, 4, format="tr", rank=2, shape=((3, 2), (2, 2)), forward_mode=mode, dtype=F64)
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: layer(x), (x,))
    params = {n: p.detach() for n, p in layer.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x.detach(),)).square().sum())(params)
    layer(x.detach()).square().sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt", FORMATS)
def test_from_dense_exact_low_rank(fmt):
    torch.manual_seed(1)
    # tensorly's TR-SVD is exact only for a ring whose closing rank is 1
    rank, lin_rank = ((1, 2, 2), (1, 2, 2, 2)) if fmt == "tr" else (2, 2)
    src = TensorizedConv2d(4, 6, 3, format=fmt, rank=rank, shape=((4,), (6,)), padding=1, dtype=F64)
    dense = nn.Conv2d(4, 6, 3, padding=1).double()
    with torch.no_grad():
        dense.weight.copy_(src.dense_weight())
    kw = {"n_iter_max": 2000, "tol": 1e-14} if fmt == "cp" else {}
    layer = TensorizedConv2d.from_dense(dense, fmt, rank, shape=((4,), (6,)), **kw)
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-6, atol=1e-8)
    assert layer.stride == dense.stride and layer.padding == dense.padding

    # CP-ALS converges slowly on 4th-order tensors; its matrix case has an exact SVD start
    lshape = ((6,), (8,)) if fmt == "cp" else ((2, 3), (2, 4))
    lsrc = TensorizedLinear(6, 8, format=fmt, rank=lin_rank, shape=lshape, dtype=F64)
    lin = nn.Linear(6, 8).double()
    with torch.no_grad():
        lin.weight.copy_(lsrc.dense_weight())
    new = TensorizedLinear.from_dense(lin, fmt, lin_rank, shape=lshape, **kw)
    x = torch.randn(3, 6, dtype=F64)
    torch.testing.assert_close(new(x), lin(x), rtol=1e-6, atol=1e-8)


def test_auto_chooses_without_touching_grads(monkeypatch):
    monkeypatch.setattr(auto_mod, "AUTO_TIMING_MARGIN", float("inf"))  # always time
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    layer = TensorizedLinear(16, 16, format="tt", rank=2)
    x = torch.randn(4, 16, requires_grad=True)
    y = layer(x)
    assert all(p.grad is None for p in layer.parameters()) and x.grad is None
    torch.testing.assert_close(y, layer.forward_factorized(x), rtol=1e-5, atol=1e-6)
    assert len(auto_mod._MODE_CACHE) == 1
    y.sum().backward()  # the caller's graph is intact
    assert x.grad is not None and layer.cores[0].grad is not None


def test_time_modes_ignores_first_call_costs(monkeypatch):
    """A mode whose first call is slow (one-time set-up) but is faster afterwards wins."""
    layer = TensorizedLinear(16, 16, format="tt", rank=2)
    calls = []

    def factorized(x):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)
        return x @ x.new_ones(16, 16)

    def reconstructed(x):
        time.sleep(0.03)
        return x @ x.new_ones(16, 16)

    monkeypatch.setattr(layer, "forward_factorized", factorized)
    monkeypatch.setattr(layer, "forward_reconstructed", reconstructed)
    times = layer.time_modes(torch.randn(4, 16), grad=False)
    assert min(times, key=times.get) == "factorized"


@pytest.mark.parametrize("times, expected", [
    ({"factorized": 1.00, "reconstructed": 0.95}, "factorized"),  # a tie: the estimate decides
    ({"factorized": 1.00, "reconstructed": 0.50}, "reconstructed"),  # a clear timed win
])
def test_auto_timing_tie_keeps_estimate(monkeypatch, times, expected):
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "1")
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    layer = TensorizedLinear(1024, 1024, format="cp", rank=64)
    x = torch.empty(128, 1024)
    est = layer.estimated_costs(x)
    assert est["factorized"] < est["reconstructed"] / 10 and est["factorized"] > est["reconstructed"] / 16
    monkeypatch.setattr(layer, "time_modes", lambda x, grad: times)
    assert layer.choose_mode(x) == expected


def test_auto_uses_estimate_without_timing(monkeypatch):
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "0")
    monkeypatch.setattr(auto_mod, "AUTO_TIMING_MARGIN", float("inf"))
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    layer = TensorizedLinear(16, 16, format="tt", rank=2)

    def boom(*a, **k):
        raise AssertionError("timed although timing is disabled")

    monkeypatch.setattr(layer, "time_modes", boom)
    x = torch.randn(4, 16)
    est = layer.estimated_costs(x)
    assert layer.choose_mode(x) == min(est, key=est.get)


def test_estimate_prefers_factorized_for_tiny_rank_and_reconstructed_for_tr_conv():
    lin = TensorizedLinear(1024, 1024, format="cp", rank=2)
    est = lin.estimated_costs(torch.empty(128, 1024))
    assert est["factorized"] < est["reconstructed"]
    conv = TensorizedConv2d(32, 32, 3, format="tr", rank=15, shape=(4, 4, 2, 9, 4, 4, 2), padding=1)
    est = conv.estimated_costs(torch.empty(128, 32, 16, 16))
    assert est["reconstructed"] < est["factorized"]


@pytest.mark.parametrize("fmt, rank, c, hw, picks", [
    ("tr", 15, 32, 16, "reconstructed"), ("cp", 4, 64, 8, "chain"), ("tucker", 4, 64, 8, "chain"),
    ("tt", 4, 64, 8, "chain"), ("ttm", 16, 32, 16, "reconstructed")])
def test_auto_does_not_time_obviously_slower_factorized_conv(monkeypatch, fmt, rank, c, hw, picks):
    """3x3 convs of ResNet/benchmark sizes: the im2col-based factorized forward is far slower than
    the dense conv, and auto must see it from the estimate alone (timing cost seconds per shape);
    CP, Tucker and low-rank TT run as a chain of convs, estimated far cheaper than either; TR at
    rank 15 has a chain far dearer than the dense conv (its ring bond multiplies the channels)."""
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "1")
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    layer = TensorizedConv2d(c, c, 3, format=fmt, rank=rank, padding=1)

    def boom(*a, **k):
        raise AssertionError("timed a factorized conv the estimate already rules out")

    monkeypatch.setattr(layer, "time_modes", boom)
    with torch.no_grad():
        assert layer.choose_mode(torch.empty(32, c, hw, hw)) == picks


def test_auto_still_times_close_conv(monkeypatch):
    """A wide 1x1 conv at low rank is a close call (measured about even), so it is timed."""
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "1")
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    layer = TensorizedConv2d(256, 256, 1, format="cp", rank=8)
    calls = []
    monkeypatch.setattr(layer, "time_modes", lambda x, grad: calls.append(1) or {"factorized": 1.0,
                                                                                  "reconstructed": 2.0})
    assert layer.choose_mode(torch.empty(32, 256, 8, 8)) == "factorized" and calls == [1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_init_matches_kaiming_variance(fmt):
    torch.manual_seed(0)
    fan_in = 64 * 9
    vs = [TensorizedConv2d(64, 64, 3, format=fmt, rank=8).dense_weight().var().item() for _ in range(6)]
    assert sum(vs) / len(vs) == pytest.approx(2.0 / fan_in, rel=0.25)
    vs = [TensorizedLinear(256, 128, format=fmt, rank=8).dense_weight().var().item() for _ in range(6)]
    assert sum(vs) / len(vs) == pytest.approx(2.0 / 256, rel=0.25)


def test_default_modes_and_shapes():
    assert default_modes(1024, "tt") == (16, 8, 8)
    assert default_modes(64, "cp") == (64,)
    assert default_modes(5, "tr") == (5,)
    layer = TensorizedLinear(1024, 64, format="tr", rank=2)
    assert layer.tensor_shape == (16, 8, 8, 8, 8)


def test_tensorize_summary_and_decompose():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4))
    dense_params = sum(p.numel() for p in model.parameters())
    s = tensorize(model, "tt", 2, exclude=["6"], min_params=100)
    assert s.params_before == dense_params
    assert s.params_after == sum(p.numel() for p in model.parameters())
    assert [r.name for r in s.layers] == ["0", "4"]
    assert [n for n, _ in s.skipped] == ["2"]  # groups=2 cannot be tensorized; "6" excluded
    assert isinstance(model[0], TensorizedConv2d) and isinstance(model[4], TensorizedLinear)
    assert type(model[6]) is nn.Linear
    for r in s.layers:
        assert r.ratio == pytest.approx(r.params_before / r.params_after)
    assert s.layers[1].params_before == 128 * 16 + 16
    assert s.layers[1].params_after == model[4].weight_factors.dof() + 16
    text = str(s)
    assert "model" in text and f"{s.params_before:,}" in text and f"{s.layers[1].ratio:.2f}x" in text
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 4)

    # decompose=True at full Tucker rank (the 6x4 matrix has rank 4) keeps the function
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 6, dtype=F64)
    before = net(x)
    with pytest.warns(UserWarning, match="grows"):   # 28 dense parameters, 60 as Tucker
        s = tensorize(net, "tucker", 4, decompose=True, include=["0"])
    assert [r.name for r in s.layers] == ["0"]
    torch.testing.assert_close(net(x), before, rtol=1e-8, atol=1e-10)


def test_tensorize_accepts_a_single_pattern_string():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(8, 8))
    model.add_module("fc", nn.Linear(8, 4))
    s = tensorize(model, "tt", 2, exclude="fc")  # was read as the patterns 'f' and 'c'
    assert [r.name for r in s.layers] == ["body"] and type(model.fc) is nn.Linear
    s = tensorize(nn.Sequential(model), "tt", 2, include="*.fc")
    assert [r.name for r in s.layers] == ["0.fc"]


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kwargs", [
    {"rank": {"0": 2, "2": 2, "4": 0}},                       # the last layer's rank is invalid
    {"rank": 2, "shape": {"4": ((4, 4), (3, 2))}},             # its shape does not match it
    {"rank": 2, "decompose": True, "shape": {"2": ((4, 8), (5, 5))}},
])
def test_tensorize_leaves_the_model_untouched_when_one_layer_fails(kwargs):
    """Every replacement is built before any is swapped in: no half-tensorized model."""
    model = small_net()
    modules, weights = snapshot(model)
    layers = list(model)
    with pytest.raises(ValueError, match=r"layer '[24]'.*left unchanged"):
        tensorize(model, "tt", **kwargs)
    assert snapshot(model)[0] == modules and all(a is b for a, b in zip(model, layers))
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])


def test_tensorize_leaves_the_model_untouched_when_a_decomposition_raises(monkeypatch):
    model = small_net()
    real = TensorizedLinear.from_dense

    def from_dense(layer, *args, **kwargs):
        if layer.out_features == 4:
            raise RuntimeError("decomposition did not converge")
        return real(layer, *args, **kwargs)

    monkeypatch.setattr(TensorizedLinear, "from_dense", from_dense)
    with pytest.raises(RuntimeError, match="converge") as info:
        tensorize(model, "tt", 2, decompose=True)
    assert any("'4'" in note for note in info.value.__notes__)
    assert all(type(m) is not TensorizedLinear for m in model.modules())


@pytest.mark.parametrize("model", [nn.Sequential(nn.ReLU(), nn.Flatten()), nn.Sequential(nn.Embedding(10, 4)),
                                   nn.Module()], ids=["no_parameters", "no_linear_or_conv", "empty"])
def test_tensorize_of_a_model_with_nothing_to_tensorize_says_so(model):
    with pytest.raises(ValueError, match="nothing to tensorize.*no nn.Linear or nn.Conv2d"):
        tensorize(model, "tt", 2)   # was a ZeroDivisionError in the summary's ratio


def test_tensorize_with_patterns_matching_no_layer_says_so():
    model = small_net()
    with pytest.raises(ValueError, match=r"no layer matches include=\['head'\].*\['0', '2', '4'\]"):
        tensorize(model, "tt", 2, include=["head"])
    with pytest.raises(ValueError, match="no layer matches"):
        tensorize(model, "tt", 2, exclude="*")
    assert all(type(m) is nn.Linear for m in model if not isinstance(m, nn.ReLU))


def test_tensorize_warns_about_a_layer_that_grows():
    model = small_net()
    with pytest.warns(UserWarning, match=r"layer '4' grows from 132 to \d+ parameters \(ratio 0\.\d\dx"):
        s = tensorize(model, "tucker", 8)     # a 32x4 layer as a Tucker core of 8x4 plus factors
    assert [r.name for r in s.layers if r.ratio < 1] == ["4"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # compressing layers warn about nothing
        tensorize(small_net(), "tt", 2)


def test_auto_cache_distinguishes_kernel_shapes(monkeypatch):
    """(3, 3) and (1, 9) kernels have the same k_h*k_w but different outputs and costs."""
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    a = TensorizedConv2d(8, 8, (3, 3), format="tt", rank=2, padding=1)
    b = TensorizedConv2d(8, 8, (1, 9), format="tt", rank=2, padding=1)
    assert a._signature() != b._signature()


@pytest.mark.parametrize("mode", ["factorized", "reconstructed", "auto"])
def test_autocast_bfloat16(mode):
    """Under CPU autocast every mode returns the autocast dtype (the factorized conv once failed
    with 'both inputs should have same dtype')."""
    torch.manual_seed(0)
    conv = TensorizedConv2d(8, 8, 3, format="tr", rank=2, padding=1, forward_mode=mode)
    lin = TensorizedLinear(16, 8, format="tt", rank=2, shape=((4, 4), (2, 4)), forward_mode=mode)
    for layer, x in ((conv, torch.randn(2, 8, 5, 5)), (lin, torch.randn(3, 16))):
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
        y.float().sum().backward()
        assert all(p.grad.dtype == torch.float32 for p in layer.parameters())


def test_bad_input():
    with pytest.raises(ValueError, match="unknown tensor format 'foo'"):
        TensorizedLinear(8, 8, format="foo", rank=2)
    with pytest.raises(ValueError, match="does not match the layer"):
        TensorizedLinear(8, 8, format="tt", rank=2, shape=(2, 2, 3, 2))
    with pytest.raises(ValueError, match="does not match the layer"):
        TensorizedConv2d(4, 4, 3, format="tr", rank=2, shape=(2, 2, 8, 2, 2))
    with pytest.raises(ValueError, match="rank"):
        TensorizedLinear(8, 8, format="tt", rank=0)
    with pytest.raises(ValueError, match="rank"):
        TensorizedConv2d(8, 8, 3, format="cp", rank=-1)
    with pytest.raises(ValueError, match="rank"):
        TensorizedLinear(8, 8, format="tr", rank=(2, 2, 2), shape=((8,), (8,)))
    with pytest.raises(ValueError, match="forward_mode"):
        TensorizedLinear(8, 8, format="tt", rank=2, forward_mode="fast")
    layer = TensorizedLinear(8, 8, format="tt", rank=2)
    with pytest.raises(ValueError, match=r"input has shape \(2, 7\)"):
        layer(torch.randn(2, 7))
    conv = TensorizedConv2d(4, 4, 3, format="tt", rank=2)
    with pytest.raises(ValueError, match="expected \\(N, 4, H, W\\)"):
        conv(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown layers"):
        tensorize(nn.Sequential(nn.Linear(4, 4)), "tt", {"nope": 2})
    with pytest.raises(ValueError, match="unknown tensor format"):
        tensorize(nn.Sequential(nn.Linear(4, 4)), "nope", 2)
    with pytest.raises(ValueError, match="groups=1"):
        TensorizedConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), "tt", 2)
    with pytest.raises(ValueError, match="groups=1"):
        TensorizedConv2d(4, 4, 3, format="tt", rank=2, groups=2)
    with pytest.raises(ValueError, match=r"spatial size \(2, 2\), too small for kernel_size \(3, 3\)"):
        conv(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="forward_mode"):
        layer.forward_mode = "fast"  # was silently run as 'reconstructed'
    assert layer.forward_mode == "auto"
    layer.forward_mode = "factorized"
    assert "forward_mode='factorized'" in repr(layer)


def test_float_layer_shape_is_refused_not_truncated():
    with pytest.raises(ValueError, match="2.9"):
        TensorizedLinear(64, 16, format="tt", rank=2, shape=(2.9, 4, 8, 4, 4))
    with pytest.raises(ValueError, match="2.0"):
        TensorizedLinear(64, 16, format="tt", rank=2, shape=((2.0, 4, 8), (4, 4)))


def _boom(*args, **kwargs):
    raise AssertionError("called on a prepared input signature")


@pytest.mark.parametrize("make, shape", [
    (lambda: TensorizedLinear(16, 12, format="tt", rank=2), (3, 16)),
    (lambda: TensorizedConv2d(4, 6, 3, format="cp", rank=2, padding=1), (2, 4, 5, 5)),
    (lambda: TensorizedConv2d(4, 6, 3, format="tr", rank=2, stride=2), (2, 4, 7, 7))], ids=["linear", "cp", "tr"])
def test_auto_runs_the_prepared_forward_of_its_choice(monkeypatch, make, shape):
    """Once decided, auto neither checks, estimates nor chooses again: it runs the same prepared
    forward as the forced mode, bit for bit, forward and backward."""
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "1")
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    mode = layer.choose_mode(x)
    layer.forward_mode = mode
    forced = layer(x)
    layer.forward_mode = "auto"
    for name in ("choose_mode", "estimated_costs", "time_modes", "_check_input", "_check_dtype"):
        monkeypatch.setattr(layer, name, _boom)
    again = layer(x)
    assert torch.equal(again, y) and torch.equal(forced, y)
    g = torch.randn_like(y)
    ref = torch.autograd.grad(getattr(layer, f"forward_{mode}")(x), [x, *layer.parameters()], g)
    for a, b in zip(torch.autograd.grad(again, [x, *layer.parameters()], g), ref):
        assert torch.equal(a, b)


def test_prepared_forwards_follow_copies_pickles_dtype_and_loads():
    """The prepared forwards read the parameters of the layer they are called on and are dropped
    when the dtype may change: copies, pickles, .double() and load_state_dict all behave as before."""
    import copy
    import io

    torch.manual_seed(0)
    layer = TensorizedConv2d(4, 6, 3, format="tucker", rank=2, padding=1)
    x = torch.randn(2, 4, 5, 5)
    y = layer(x)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.cores[0].mul_(2)
    assert not torch.allclose(twin(x), y) and torch.equal(layer(x), y)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    other = TensorizedConv2d(4, 6, 3, format="tucker", rank=2, padding=1)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))
    layer.double()
    with pytest.raises(ValueError, match="dtype"):
        layer(x)
    torch.testing.assert_close(layer(x.double()), other(x).double(), rtol=1e-5, atol=1e-6)
    layer.load_state_dict(other.state_dict(), assign=True)  # float32 again
    with pytest.raises(ValueError, match="dtype"):
        layer(x.double())
    assert torch.equal(layer(x), other(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x.bfloat16())  # allowed under autocast only
    with pytest.raises(ValueError, match="dtype"):
        layer(x.bfloat16())


def test_auto_follows_requires_grad_of_the_parameters(monkeypatch):
    """auto's choice is keyed by whether gradients are needed: freezing the parameters of a layer
    whose input needs none makes a new choice, it does not reuse the training one."""
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "1")
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    layer = TensorizedLinear(16, 12, format="tt", rank=2)
    x = torch.randn(3, 16)
    layer(x)
    layer.requires_grad_(False)
    layer(x)
    assert {k[3] for k in layer._auto.modes} == {True, False}
