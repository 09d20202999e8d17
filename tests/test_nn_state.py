"""Tensorized layers' state: auto's choices travel in the state_dict and are replayed on load;
construction from a dense layer leaves the global RNG alone; the layout hook of each format."""

import io

import pytest
import torch
from torch import nn

from tensorsam.nn import TensorizedConv2d, TensorizedLinear
from tensorsam.nn import auto as auto_mod
from tensorsam.nn.layout import Layout, TTMLayout
from tensorsam.tensors import TT, get_format

FORMATS = ("cp", "tucker", "tt", "tr", "ttm")


def _layers():
    return [(lambda: TensorizedLinear(16, 16, format="tt", rank=2), torch.randn(4, 16)),
            (lambda: TensorizedConv2d(4, 6, 3, format="cp", rank=2, padding=1), torch.randn(2, 4, 5, 5))]


def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _boom(*args, **kwargs):
    raise AssertionError("timed although the choice was saved")


@pytest.mark.parametrize("make, x", _layers(), ids=["linear", "conv"])
def test_auto_choice_is_saved_and_replayed_without_timing(monkeypatch, make, x):
    """The choice (here the timing's, against the estimate's) is in the state_dict; a fresh layer
    in a 'fresh process' (empty cache) that loads it takes the same path without timing."""
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "1")
    monkeypatch.setattr(auto_mod, "AUTO_TIMING_MARGIN", float("inf"))
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    layer = make()
    layer.timing_margin_above = float("inf")  # always time
    est = layer.estimated_costs(x)
    by_estimate = min(est, key=est.get)
    timed = "reconstructed" if by_estimate == "factorized" else "factorized"
    monkeypatch.setattr(layer, "time_modes", lambda x, grad: {timed: 1.0, by_estimate: 5.0})
    y = layer(x)
    assert layer.choose_mode(x) == timed

    saved = _round_trip(nn.Sequential(layer).state_dict())
    assert "0._extra_state" in saved and all(isinstance(v, torch.Tensor) for v in saved.values())
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    monkeypatch.setattr(auto_mod, "time_modes", _boom)
    fresh = nn.Sequential(make())
    fresh.load_state_dict(saved)  # strict
    monkeypatch.setattr(fresh[0], "time_modes", _boom)
    monkeypatch.setattr(fresh[0], f"forward_{by_estimate}", _boom)
    torch.testing.assert_close(fresh(x), y)
    assert fresh[0].choose_mode(x) == timed and auto_mod._MODE_CACHE == {}


def test_state_dict_without_extra_state_still_loads():
    """State dicts written before the choices were saved load, strict included, and keep the
    loading layer's own choices."""
    model = nn.Sequential(TensorizedLinear(16, 8, format="tr", rank=2), nn.ReLU(),
                          TensorizedConv2d(4, 4, 3, format="ttm", rank=2))
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert len(old) == len(model.state_dict()) - 2
    fresh = nn.Sequential(TensorizedLinear(16, 8, format="tr", rank=2), nn.ReLU(),
                          TensorizedConv2d(4, 4, 3, format="ttm", rank=2))
    fresh[0]._auto.modes[((3, 16), "torch.float32", "cpu", False)] = "factorized"
    loaded = _round_trip(old)
    result = fresh.load_state_dict(loaded)
    assert not result.missing_keys and not result.unexpected_keys
    for a, b in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fresh[0]._auto.modes == {((3, 16), "torch.float32", "cpu", False): "factorized"}
    assert set(loaded) == set(old)  # the caller's dict is not modified


def test_choices_recorded_only_when_cached(monkeypatch):
    """With timing off the estimate decides each call and nothing is recorded; a bad saved mode
    is refused."""
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "0")
    layer = TensorizedLinear(16, 16, format="tt", rank=2)
    layer(torch.randn(4, 16))
    assert layer._auto.modes == {}
    bad = torch.tensor(list(b'[[[4,16],"torch.float32","cpu",false,"fast"]]'), dtype=torch.uint8)
    with pytest.raises(ValueError, match="saved auto choice"):
        layer.set_extra_state(bad)


@pytest.mark.parametrize("fmt", FORMATS)
def test_from_dense_leaves_global_rng_untouched(fmt):
    torch.manual_seed(3)
    lin, conv = nn.Linear(64, 16), nn.Conv2d(4, 6, 3, padding=1)
    kw = {"n_iter_max": 20} if fmt == "cp" else {}
    state = torch.get_rng_state()
    new_lin = TensorizedLinear.from_dense(lin, fmt, 2, **kw)
    new_conv = TensorizedConv2d.from_dense(conv, fmt, 2, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(new_lin.bias, lin.bias, rtol=0, atol=0)
    torch.testing.assert_close(new_conv.bias, conv.bias, rtol=0, atol=0)
    assert new_conv.padding == (1, 1) and new_lin.forward_mode == "auto"
    again = TensorizedConv2d.from_dense(conv, fmt, 2, **kw)  # the decomposition does not depend on the RNG
    for a, b in zip(new_conv.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layer_around_given_factors():
    factors = TT((4, 3, 2, 4), 2)
    state = torch.get_rng_state()
    layer = TensorizedLinear(12, 8, format="tt", shape=(4, 3, 2, 4), factors=factors)
    assert torch.equal(torch.get_rng_state(), state)
    assert layer.weight_factors is factors and layer.rank == (2, 2, 2) and torch.all(layer.bias == 0)
    with pytest.raises(ValueError, match="do not match"):
        TensorizedLinear(12, 8, format="tt", shape=(3, 4, 2, 4), factors=factors)
    with pytest.raises(ValueError, match="do not match"):
        TensorizedLinear(12, 8, format="tr", shape=(4, 3, 2, 4), factors=factors)
    with pytest.raises(ValueError, match="forward_mode"):
        TensorizedLinear.from_dense(nn.Linear(4, 4), "tt", 2, forward_mode="fast")


def test_layout_hook_per_format():
    """TTM stores a (rows = out, cols = in [, kernel]) matrix padded with size-1 modes; the others
    the (in, [kernel], out) tensor itself."""
    ttm = Layout.of("ttm", 12, 8, 9, ((4, 3), (8,)))
    assert isinstance(ttm, TTMLayout) and ttm.tensor_shape == (4, 3, 9, 8)
    assert ttm.factor_shape == (8, 1, 1, 4, 3, 9)
    tt = Layout.of("TT", 12, 8, None, None)
    assert type(tt) is Layout and tt.format == "tt" and tt.factor_shape == tt.tensor_shape
    for layout in (ttm, tt):
        factors = layout.build(2)
        assert factors.format == layout.format and tuple(factors.shape) == layout.factor_shape
        ins, ks, outs = layout.labels(factors)
        assert (len(ins), len(ks), len(outs)) == (len(layout.in_modes), layout.kernel is not None,
                                                   len(layout.out_modes))
    with pytest.raises(ValueError, match="unknown tensor format"):
        Layout.of("nope", 4, 4, None)
    assert get_format("ttm").format == "ttm"
