"""Factorized convolutions run as a chain of standard convolutions (``forward_mode='chain'``).

* CP (Lebedev et al., ICLR 2015): a 1x1 conv C_in -> R, a depthwise k_h x k_w conv on the R
  channels (``groups=R``), a 1x1 conv R -> C_out: about (C_in + k_h k_w + C_out) R multiply-adds
  per output pixel against the dense conv's C_in k_h k_w C_out.
* Tucker-2 (Kim et al., ICLR 2016): a 1x1 conv C_in -> R_in, a k_h x k_w conv R_in -> R_out whose
  weight is the core contracted with the kernel mode's factor, a 1x1 conv R_out -> C_out.  A 1x1
  stage that would not reduce the channels (its rank equals the channel count) is folded into the
  core conv.

Several in (out) modes act as one channel axis: their factors are joined (Khatri-Rao for CP,
Kronecker for Tucker) into the 1x1 conv's weight.  Every stage's weight is built from its cores by
one small cached contraction per call (a weight-sized cost, never an activation-sized one).

Stride, padding and dilation go on the stage that holds the kernel factor: zero padding commutes
with the 1x1 stages before it (no bias), and the bias goes on the last stage, so the result is
the dense conv's exactly, up to rounding.  A 1x1 kernel leaves no spatial work: its factor is folded
into a 1x1 stage, leaving two 1x1 convs, and the first one takes the stride (it subsamples before
any work is done).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..tensors import FactorizedTensor
from .contraction import MEMORY_WEIGHT, Contraction, compile_contraction

CHAIN_FORMATS = ("cp", "tucker")
# cost units of one more conv call (dispatch, and a pass over memory the FLOP count misses), so that
# tiny inputs, where the calls dominate, are not estimated far cheaper than one dense conv
STAGE_OVERHEAD = 5e4


def supports(format: str) -> bool:
    """Whether convolutions of ``format`` have a chain."""
    return format in CHAIN_FORMATS


@dataclass(frozen=True)
class _Rearrange:
    """The weight of a stage built from a single core: a permutation and a reshape (a view where
    possible), with the interface of :class:`.contraction.Contraction` that a stage uses."""

    perm: tuple[int, ...]
    out_shape: tuple[int, ...]
    cost: float = 0.0

    def __call__(self, core: torch.Tensor) -> torch.Tensor:
        return core.permute(self.perm).reshape(self.out_shape)


@dataclass(frozen=True)
class Stage:
    """One ``F.conv2d`` of the chain: its weight is ``weight(*cores[i] for i in cores)``."""

    cores: tuple[int, ...]
    weight: Contraction | _Rearrange
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, int]  # (1, 1) except on the spatial stage
    spatial: bool  # takes the layer's stride, padding and dilation


@dataclass(frozen=True)
class ConvChain:
    """The stages of one layer's chain; ``spatial`` is the index of the stage with the stride."""

    stages: tuple[Stage, ...]
    spatial: int

    def __call__(self, x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None,
                 stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
        last = len(self.stages) - 1
        for i, s in enumerate(self.stages):
            w = s.weight(*(cores[j] for j in s.cores))
            b = bias if i == last else None
            if s.spatial:
                x = F.conv2d(x, w, b, stride, padding, dilation, s.groups)
            else:
                x = F.conv2d(x, w, b, 1, 0, 1, s.groups)
        return x

    def cost(self, x_shape: Sequence[int], out_hw: tuple[int, int]) -> float:
        """FLOPs (2 per multiply-add) plus :data:`.contraction.MEMORY_WEIGHT` per element of the
        intermediate activations, the weights' construction and :data:`STAGE_OVERHEAD` per stage:
        the units of the layer's other estimates.  Stages before the spatial one run at the input's
        resolution, the others at the output's."""
        n, hw_in, hw_out = x_shape[0], x_shape[2] * x_shape[3], out_hw[0] * out_hw[1]
        total = 0.0
        for i, s in enumerate(self.stages):
            pixels = n * (hw_in if i < self.spatial else hw_out)
            macs = pixels * s.out_channels * (s.in_channels // s.groups) * s.kernel[0] * s.kernel[1]
            total += 2.0 * macs + s.weight.cost + STAGE_OVERHEAD
            if i < len(self.stages) - 1:
                total += MEMORY_WEIGHT * pixels * s.out_channels
        out = self.stages[-1].out_channels
        return total + 2.0 * n * hw_out * out  # the bias, as in the dense estimate


@dataclass(frozen=True)
class _Step:
    """A linear map between channel axes, before it becomes a :class:`Stage`: ``src`` and ``dst``
    are the labels of its input and output channels; a depthwise step maps ``dst`` to itself."""

    cores: tuple[int, ...]
    src: tuple[int, ...]
    dst: tuple[int, ...]
    depthwise: bool = False

    def then(self, other: _Step) -> _Step:
        """This step followed by ``other``, as one (dense) conv."""
        return _Step(self.cores + other.cores, self.src, other.dst)


def plan(factors: FactorizedTensor, in_labels: Sequence[int], k_labels: Sequence[int], out_labels: Sequence[int],
         kernel_size: tuple[int, int]) -> ConvChain | None:
    """The chain of a conv whose weight ``factors`` has these (in, kernel, out) mode labels, or
    None for a format without one (:data:`CHAIN_FORMATS`)."""
    if not supports(factors.format) or len(k_labels) != 1:
        return None
    core_labels = [tuple(c) for c in factors.subscripts()[0]]
    size = {}
    for labels, shape in zip(core_labels, factors.core_shapes()):
        size.update(zip(labels, shape))

    def holding(labels) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(core_labels) if set(c) & set(labels))

    def rank_labels(cores, modes) -> tuple[int, ...]:
        return tuple(next(lab for lab in core_labels[i] if lab not in modes) for i in cores)

    def numel(labels) -> int:
        return math.prod(size[lab] for lab in labels)

    in_cores, (k_core,), out_cores = holding(in_labels), holding(k_labels), holding(out_labels)
    one_by_one = tuple(kernel_size) == (1, 1)
    if factors.format == "cp":
        (rho,) = set(core_labels[k_core]) - set(k_labels)
        steps = [_Step(in_cores, tuple(in_labels), (rho,)), _Step((k_core,), (rho,), (rho,), depthwise=True),
                 _Step(out_cores, (rho,), tuple(out_labels))]
        if one_by_one:
            steps = [steps[0].then(steps[1]), steps[2]]
    else:  # tucker: the core G is the one core holding no mode label
        (g,) = set(range(len(core_labels))) - {*in_cores, k_core, *out_cores}
        r_in, r_out = rank_labels(in_cores, in_labels), rank_labels(out_cores, out_labels)
        first, core, last = (_Step(in_cores, tuple(in_labels), r_in), _Step((g, k_core), r_in, r_out),
                             _Step(out_cores, r_out, tuple(out_labels)))
        if one_by_one:  # two 1x1 convs through the fewer rank channels
            steps = [first.then(core), last] if numel(r_out) <= numel(r_in) else [first, core.then(last)]
        else:
            if numel(r_in) >= numel(in_labels):
                first, core = None, first.then(core)
            if numel(r_out) >= numel(out_labels):
                core, last = core.then(last), None
            steps = [s for s in (first, core, last) if s is not None]
    spatial = 0 if one_by_one else next(i for i, s in enumerate(steps) if k_core in s.cores)
    stages = tuple(_stage(s, i == spatial, k_core, tuple(k_labels), tuple(kernel_size), core_labels,
                          factors.core_shapes(), numel) for i, s in enumerate(steps))
    return ConvChain(stages, spatial)


def _stage(step: _Step, spatial: bool, k_core: int, k_labels, kernel_size, core_labels, core_shapes,
           numel) -> Stage:
    has_k = k_core in step.cores
    kernel = kernel_size if has_k else (1, 1)
    k = k_labels if has_k else ()
    if step.depthwise:
        labels, channels = (*step.dst, *k), (numel(step.dst), 1)
    else:
        labels, channels = (*step.dst, *step.src, *k), (numel(step.dst), numel(step.src))
    out_shape = (*channels, *kernel)
    operands = [core_labels[i] for i in step.cores]
    if len(operands) == 1 and sorted(operands[0]) == sorted(labels):
        weight = _Rearrange(tuple(operands[0].index(lab) for lab in labels), out_shape,
                            MEMORY_WEIGHT * math.prod(out_shape))
    else:
        weight = compile_contraction(operands, [core_shapes[i] for i in step.cores], labels, out_shape)
    groups = channels[0] if step.depthwise else 1
    in_channels = channels[0] if step.depthwise else channels[1]
    return Stage(step.cores, weight, in_channels, channels[0], groups, kernel, spatial)
