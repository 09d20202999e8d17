"""CIFAR-style ResNet-20/32 (He et al. 2016, option-A shortcuts), dense or tensorized.

Every 3x3 convolution (the first one included) may be tensorized; BatchNorm and the final
FC stay dense.  Tensor layouts, all of the form (in modes..., 9, out modes...):

* ``tr`` and ``tt``: the appendix Table 2 tensorization, block counts corrected,
  e.g. 32->32 is (4, 4, 2, 9, 4, 4, 2).  TT reuses it with boundary ranks 1.
* ``cp`` and ``tucker``: third order (C_in, 9, C_out), the authors' CP layout; for Tucker
  this is a Tucker-2 of the channels plus a kernel factor (ranks capped at mode sizes).
* any other registered format: :func:`tensorsam.nn.default_modes`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import TensorizedConv2d, count_parameters

# Appendix Table 2: channel count -> its modes; any other input channel count (1 for grayscale
# images) is a single mode, following the table's pattern for the 3 RGB channels
TABLE2_MODES = {3: (3,), 16: (4, 2, 2), 32: (4, 4, 2), 64: (4, 4, 4)}


def channel_modes(c: int) -> tuple[int, ...]:
    """The modes of a channel axis of ``c`` channels (appendix Table 2, one mode if not listed)."""
    return TABLE2_MODES.get(c, (c,))
DEPTHS = (20, 32)


def conv_shape(format: str | None, c_in: int, c_out: int) -> tuple[int, ...] | None:
    """Tensor shape (in modes..., 9, out modes...) of a 3x3 conv of this ResNet."""
    if format in ("tr", "tt"):
        return (*channel_modes(c_in), 9, *channel_modes(c_out))
    if format in ("cp", "tucker"):
        return (c_in, 9, c_out)
    return None


class _ConvFactory:
    """Hands out the network's 3x3 convs in order, each with its own rank."""

    def __init__(self, format: str | None, rank, n_convs: int):
        self.format, self.i = format, 0
        if format is None:
            self.ranks = [None] * n_convs
        elif isinstance(rank, Sequence) and not isinstance(rank, str):
            if len(rank) != n_convs:
                raise ValueError(f"per-layer rank has {len(rank)} entries; this ResNet has {n_convs} convs")
            self.ranks = list(rank)
        else:
            self.ranks = [rank] * n_convs

    def __call__(self, c_in: int, c_out: int, stride: int = 1) -> nn.Module:
        rank = self.ranks[self.i]
        self.i += 1
        if self.format is None:
            return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        return TensorizedConv2d(c_in, c_out, 3, format=self.format, rank=rank,
                                shape=conv_shape(self.format, c_in, c_out), stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus an option-A shortcut (strided subsampling, zero-padded channels)."""

    def __init__(self, conv: _ConvFactory, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = conv(c_out, c_out), nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2): widths 16/32/64, n blocks per stage, for ``in_channels`` x 32x32 inputs (28x28 and
    other sizes work too: the head pools globally)."""

    def __init__(self, depth: int = 20, format: str | None = None, rank=None, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {DEPTHS}, got {depth!r}")
        if format is not None and rank is None:
            raise ValueError(f"format={format!r} needs a rank")
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        n = (depth - 2) // 6
        conv = _ConvFactory(format, rank, 6 * n + 1)
        self.depth, self.format = depth, format
        self.conv1, self.bn1 = conv(in_channels, 16), nn.BatchNorm2d(16)
        blocks, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(n):
                blocks.append(BasicBlock(conv, c_in, c_out, stride if b == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet(depth: int = 20, format: str | None = None, rank=None, num_classes: int = 10,
           in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-``depth`` (20 or 32); ``format=None`` is dense, else every conv is tensorized
    with ``rank`` (an int, or one rank per conv in network order: 6n+1 of them).  ``in_channels=1``
    for grayscale images such as Fashion-MNIST (28x28 works as well as 32x32).

    Example::

        >>> model = resnet(32, "tr", rank=15)       # 202,272 parameters
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> dense = resnet(20)                      # format=None: plain nn.Conv2d
    """
    return CifarResNet(depth, format, rank, num_classes, in_channels)


def parameter_report(depth: int = 20, format: str | None = None, rank=None, num_classes: int = 10,
                     in_channels: int = 3) -> dict:
    """Parameter counts (all parameters, BN and FC included) and the compression ratio versus
    the dense ResNet of the same depth, as in the paper's compression ratios."""
    dense = count_parameters(resnet(depth, None, None, num_classes, in_channels))
    params = count_parameters(resnet(depth, format, rank, num_classes, in_channels))
    return {"depth": depth, "format": format, "rank": rank, "params": params, "dense_params": dense,
            "compression_ratio": dense / params}
