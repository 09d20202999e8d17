"""CIFAR ResNets: the paper's parameter counts and compression ratios (SPEC §6)."""

import pytest
import torch

from tensorsam.models import conv_shape, parameter_report, resnet
from tensorsam.nn import TensorizedConv2d, count_parameters


def test_tr_resnet32_rank15_parameter_count():
    assert count_parameters(resnet(32, "tr", 15)) == 202_272  # BN and FC included
    assert count_parameters(resnet(32)) == 464_154
    assert count_parameters(resnet(20)) == 269_722


@pytest.mark.parametrize("fmt, ranks, ratios", [
    ("cp", (10, 20, 50, 100, 200), (15.97, 8.50, 3.53, 1.79, 0.90)),
    ("tr", (5, 7, 12, 17, 23), (17.43, 9.50, 3.39, 1.71, 0.94)),
])
def test_resnet20_compression_ratios(fmt, ranks, ratios):
    got = tuple(round(parameter_report(20, fmt, r)["compression_ratio"], 2) for r in ranks)
    assert got == ratios


def test_layout_and_forward(monkeypatch):
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "0")  # the estimate picks the modes; no timing runs
    model = resnet(20, "tr", 3)
    convs = [m for m in model.modules() if isinstance(m, TensorizedConv2d)]
    assert len(convs) == 19
    assert convs[0].tensor_shape == (3, 9, 4, 2, 2)
    assert convs[-1].tensor_shape == (4, 4, 4, 9, 4, 4, 4)
    assert conv_shape("cp", 16, 32) == (16, 9, 32)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 0  # all convs tensorized
    for fmt, rank in ((None, None), ("cp", 4), ("tt", 3), ("tucker", 4), ("tr", 3)):
        out = resnet(20, fmt, rank, num_classes=7)(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_option_a_shortcut_has_no_parameters():
    model = resnet(20)
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert n_conv == 19  # no 1x1 projection convs


def test_per_layer_rank_and_bad_input():
    ranks = list(range(2, 21))
    model = resnet(20, "tr", ranks)
    convs = [m for m in model.modules() if isinstance(m, TensorizedConv2d)]
    assert [c.rank[0] for c in convs] == ranks
    with pytest.raises(ValueError, match="19 convs"):
        resnet(20, "tr", [3] * 5)
    with pytest.raises(ValueError, match="depth"):
        resnet(44)
    with pytest.raises(ValueError, match="needs a rank"):
        resnet(20, "tr")
    with pytest.raises(ValueError, match="unknown tensor format 'xx'"):
        resnet(20, "xx", 3)
    with pytest.raises(ValueError, match="rank"):
        resnet(20, "cp", 0)


@pytest.mark.parametrize("fmt", [None, "tr", "tt", "cp", "tucker"])
@pytest.mark.parametrize("size", [28, 32])
def test_grayscale_resnet_takes_one_input_channel_at_28_or_32_pixels(fmt, size):
    model = resnet(20, fmt, None if fmt is None else 3, in_channels=1)
    assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    if fmt in ("tr", "tt"):
        assert model.conv1.tensor_shape == (1, 9, 4, 2, 2)      # one input mode, as RGB's (3,) in Table 2


def test_bad_in_channels_is_refused():
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        resnet(20, in_channels=0)
