"""TT and TR convolutions as a chain of standard convolutions (forward_mode='chain'): 1x1 (in-mode
cores) -> kernel core k x k (TR: grouped by the ring-closing bond) -> 1x1 (out-mode cores).  The
output and gradients equal the reconstructed-weight path, and ``auto`` costs the chain correctly."""

import pytest
import torch
import torch.nn.functional as F
from test_conv_chain import F64, _layer, check_equal, one_thread  # noqa: F401 (one_thread: a fixture)

from tensorsam.nn import TensorizedConv2d
from tensorsam.nn import auto as auto_mod
from tensorsam.nn import chain as chain_mod
from tensorsam.tensors import TR, TT

FORMATS = ["tt", "tr"]
# unequal ranks: TT's N-1 inner ranks, TR's N ring ranks for shape (2, 4, 9, 3, 2)
RANKS = {"tt": (2, 3, 4, 5), "tr": (2, 3, 4, 5, 3)}


def stages(layer):
    return [(s.in_channels, s.out_channels, s.groups, s.kernel, s.spatial) for s in layer._conv_chain().stages]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k, stride, padding", [(3, 1, 1), (3, 2, 0), (1, 2, 1)])
def test_chain_with_unequal_ranks(fmt, k, stride, padding):
    torch.manual_seed(0)
    layer = _layer(fmt, 8, 6, k, stride, padding, 1, RANKS[fmt], ((2, 4), (3, 2)), bias=True)
    torch.nn.init.normal_(layer.bias)
    check_equal(layer, torch.randn(2, 8, 7, 6, dtype=F64))


@pytest.mark.usefixtures("one_thread")
def test_tr_chain_double_backward():
    torch.manual_seed(0)
    layer = TensorizedConv2d(2, 2, 3, format="tr", rank=2, padding=1, stride=2, forward_mode="chain", dtype=F64)
    cores = [c.detach().clone().requires_grad_(True) for c in layer.cores]
    x = torch.randn(1, 2, 3, 3, dtype=F64, requires_grad=True)
    conv_chain = layer._conv_chain()

    def f(x, *cores):
        return conv_chain(x, cores, None, layer.stride, layer.padding, layer.dilation)

    assert torch.autograd.gradgradcheck(f, (x, *cores))


def test_chain_stages():
    """TT: 1x1 C_in -> r_a, dense k x k r_a -> r_b, 1x1 r_b -> C_out.  TR: r_0 r_a channels, the
    kernel conv grouped by r_0, one kernel core for every group (the groups folded into the batch).  A 1x1 stage is folded into
    the kernel conv where that costs fewer multiply-adds, and a 1x1 kernel's first stage is strided."""
    tt = TensorizedConv2d(32, 16, 3, format="tt", rank=4, padding=1)
    assert tt.tensor_shape == (8, 4, 9, 16)
    assert stages(tt) == [(32, 4, 1, (1, 1), False), (4, 4, 1, (3, 3), True), (4, 16, 1, (1, 1), False)]
    tt_ranks = TensorizedConv2d(32, 16, 3, format="tt", rank=(2, 3, 5), padding=1)
    assert stages(tt_ranks) == [(32, 3, 1, (1, 1), False), (3, 5, 1, (3, 3), True), (5, 16, 1, (1, 1), False)]
    tr = TensorizedConv2d(32, 32, 3, format="tr", rank=(2, 3, 4, 5, 6), padding=1)
    assert stages(tr) == [(32, 8, 1, (1, 1), False), (8, 10, 2, (3, 3), True), (10, 32, 1, (1, 1), False)]
    kernel_stage = tr._conv_chain().stages[1]
    assert kernel_stage.fold == 2   # the same kernel core for both ring groups: folded into the batch
    assert kernel_stage.weight(tr.cores[2]).shape == (5, 4, 3, 3)
    folded_in = TensorizedConv2d(3, 16, 3, format="tr", rank=4, shape=((3,), (4, 4)), padding=1)
    assert stages(folded_in) == [(3, 16, 1, (3, 3), True), (16, 16, 1, (1, 1), False)]
    folded_out = TensorizedConv2d(16, 3, 3, format="tr", rank=4, shape=((4, 4), (3,)), padding=1)
    assert stages(folded_out) == [(16, 16, 1, (1, 1), False), (16, 3, 1, (3, 3), True)]
    one = TensorizedConv2d(32, 16, 1, format="tt", rank=4, stride=2)
    assert stages(one) == [(32, 4, 1, (1, 1), True), (4, 16, 1, (1, 1), False)]
    tr_one = TensorizedConv2d(32, 16, 1, format="tr", rank=2, stride=2)
    assert stages(tr_one) == [(32, 4, 1, (1, 1), True), (4, 16, 1, (1, 1), False)]


def test_plan_follows_the_train_not_the_label_order():
    """The chain is read off the bonds: in-mode cores that are not adjacent in the train still give
    a chain where the kernel core separates the in from the out cores; a kernel core between two
    in-mode cores has none (plan returns None)."""
    torch.manual_seed(0)
    tt = TT((2, 4, 9, 3), 2, dtype=F64)  # in modes 0 and 3 (C_in 6), kernel 2, out mode 1 (C_out 4)
    conv_chain = chain_mod.plan(tt, (0, 3), (2,), (1,), (3, 3))
    assert conv_chain is not None
    w = tt.reconstruct().permute(1, 0, 3, 2).reshape(4, 6, 3, 3)
    x = torch.randn(2, 6, 6, 5, dtype=F64)
    bias = torch.randn(4, dtype=F64)
    y = conv_chain(x, list(tt.cores), bias, (2, 1), (1, 0), (1, 1))
    torch.testing.assert_close(y, F.conv2d(x, w, bias, (2, 1), (1, 0)), rtol=1e-10, atol=1e-12)
    tr = TR((2, 9, 3, 4), 2, dtype=F64)  # the kernel core (1) between the in cores 0 and 2
    assert chain_mod.plan(tr, (0, 2), (1,), (3,), (3, 3)) is None


def test_chain_is_a_mode_of_tt_and_tr_convs():
    for fmt in FORMATS:
        conv = TensorizedConv2d(8, 8, 3, format=fmt, rank=2, padding=1)
        assert conv.has_chain and "chain" in conv.modes
        assert "chain" in conv.estimated_costs(torch.empty(2, 8, 6, 6))
        conv.forward_mode = "chain"
        assert conv(torch.randn(2, 8, 6, 6)).shape == (2, 8, 6, 6)
    ttm = TensorizedConv2d(8, 8, 3, format="ttm", rank=2, padding=1)
    assert not ttm.has_chain and "chain" not in ttm.modes


@pytest.mark.parametrize("fmt, rank, cheaper", [("tt", 4, True), ("tt", 15, True), ("tr", 5, True),
                                                ("tr", 15, False)])
def test_chain_cost_ranks_against_the_dense_conv(fmt, rank, cheaper):
    """32->32 3x3 on 128x32x16x16: TT rank 4 or 15 and TR rank 5 run fewer multiply-adds as a chain;
    TR rank 15 runs more (32*225 + 15*225*9 + 225*32 per pixel against 9216), so auto neither
    picks nor times its chain."""
    layer = TensorizedConv2d(32, 32, 3, format=fmt, rank=rank, padding=1, bias=False)
    x = torch.empty(128, 32, 16, 16)
    est = layer.estimated_costs(x)
    assert (est["chain"] < est["reconstructed"]) == cheaper
    if fmt == "tr":
        r0, ra = rank, rank  # (r_0 r_a)(C_in + k^2 r_b + C_out) multiply-adds per pixel
        flops = 2 * r0 * ra * (32 + 9 * rank + 32) * 128 * 16 * 16
        assert flops <= est["chain"] <= 1.5 * flops
    if not cheaper:
        assert "chain" not in auto_mod.contenders(est, layer.timing_margin_above)


def test_auto_leaves_the_tr_rank_15_chain_alone(monkeypatch):
    """The TR 32->32 3x3 conv at rank 15 (the shape of the benchmarks' goal) keeps the reconstructed
    conv: the chain is estimated far dearer and is not timed."""
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "1")
    monkeypatch.setattr(auto_mod, "_MODE_CACHE", {})
    layer = TensorizedConv2d(32, 32, 3, format="tr", rank=15, shape=(4, 4, 2, 9, 4, 4, 2), padding=1)
    monkeypatch.setattr(layer, "time_modes", lambda *a, **k: pytest.fail("timed a mode the estimate rules out"))
    with torch.no_grad():
        assert layer.choose_mode(torch.empty(128, 32, 16, 16)) == "reconstructed"
