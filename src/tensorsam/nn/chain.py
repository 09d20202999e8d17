"""Factorized convolutions run as a chain of standard convolutions (``forward_mode='chain'``).

* CP (Lebedev et al., ICLR 2015): a 1x1 conv C_in -> R, a depthwise k_h x k_w conv on the R
  channels (``groups=R``), a 1x1 conv R -> C_out: about (C_in + k_h k_w + C_out) R multiply-adds
  per output pixel against the dense conv's C_in k_h k_w C_out.
* Tucker-2 (Kim et al., ICLR 2016): a 1x1 conv C_in -> R_in, a k_h x k_w conv R_in -> R_out whose
  weight is the core contracted with the kernel mode's factor, a 1x1 conv R_out -> C_out.  A 1x1
  stage that would not reduce the channels (its rank equals the channel count) is folded into the
  core conv.
* TT (Garipov et al., 2016) and TR (Wang et al., CVPR 2018): the cores lie along the train (ring)
  as in modes, kernel, out modes.  A 1x1 conv contracts C_in with the in-mode cores into the bond
  that leaves them towards the kernel core, r_a (TR: times the ring-closing bond r_0); the kernel
  core makes a k_h x k_w conv r_a -> r_b (TR: the r_0 channels pass through it: the same map for
  each of the r_0 channel blocks, run as one conv r_a -> r_b on a batch r_0 times larger, the blocks
  folded into the batch by a view); a 1x1 conv contracts
  the bonds with the out-mode cores into C_out.  About (C_in r_a + r_a k_h k_w r_b + r_b C_out) r_0
  multiply-adds per pixel (r_0 = 1 for TT).  Of this chain and the two that fold a 1x1 stage into
  the kernel stage (a dense conv), the fewest multiply-adds (and activations) per pixel is run.

Several in (out) modes act as one channel axis: their factors are joined (Khatri-Rao for CP,
Kronecker for Tucker, the train's contraction for TT/TR) into the 1x1 conv's weight.  Every
stage's weight is built from its cores by one small cached contraction per call (a weight-sized
cost, never an activation-sized one).

Stride, padding and dilation go on the stage that holds the kernel factor: zero padding commutes
with the 1x1 stages before it (no bias), and the bias goes on the last stage, so the result is
the dense conv's exactly, up to rounding.  A 1x1 kernel leaves no spatial work: its factor is folded
into a 1x1 stage (CP, Tucker: leaving two 1x1 convs; TT/TR: two or three, the cheapest as above),
and the first stage takes the stride (it subsamples before any work is done).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..tensors import FactorizedTensor
from .contraction import MEMORY_WEIGHT, Contraction, compile_contraction

CHAIN_FORMATS = ("cp", "tucker", "tt", "tr")
# cost units of one more conv call (dispatch, and a pass over memory the FLOP count misses), so that
# tiny inputs, where the calls dominate, are not estimated far cheaper than one dense conv
STAGE_OVERHEAD = 5e4


def supports(format: str) -> bool:
    """Whether convolutions of ``format`` have a chain."""
    return format in CHAIN_FORMATS


@dataclass(frozen=True)
class _Rearrange:
    """The weight of a stage built from a single core: a permutation and a reshape (a view where
    possible; the core's labels of size 1 that the weight lacks go last and vanish in the reshape),
    with the interface of :class:`.contraction.Contraction` that a stage uses."""

    perm: tuple[int, ...]
    out_shape: tuple[int, ...]
    cost: float = 0.0

    def __call__(self, core: torch.Tensor) -> torch.Tensor:
        return core.permute(self.perm).reshape(self.out_shape)


@dataclass(frozen=True)
class Stage:
    """One ``F.conv2d`` of the chain: its weight is ``weight(*cores[i] for i in cores)``.  The
    channels are ``groups`` groups; the first axis of ``fold`` blocks of them share one map (TR's
    ring-closing bond passing the kernel stage), so the conv runs on the blocks folded into the
    batch, ``(N, fold * C, H, W) -> (N * fold, C, H, W)``, a view, with ``groups // fold`` groups."""

    cores: tuple[int, ...]
    weight: Contraction | _Rearrange
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, int]  # (1, 1) except on the spatial stage
    spatial: bool  # takes the layer's stride, padding and dilation
    fold: int = 1


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
            n = x.shape[0]
            if s.fold > 1:
                x = x.reshape(n * s.fold, -1, *x.shape[2:])
            if s.spatial:
                x = F.conv2d(x, w, b, stride, padding, dilation, s.groups // s.fold)
            else:
                x = F.conv2d(x, w, b, 1, 0, 1, s.groups // s.fold)
            if s.fold > 1:
                x = x.reshape(n, -1, *x.shape[2:])
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
    """A linear map between channel axes, before it becomes a :class:`Stage`: it maps the channels
    labelled ``(*shared, *src)`` to ``(*shared, *dst)``, separately for each value of the ``shared``
    labels (a grouped conv, ``groups`` their size).  CP's depthwise step shares its rank label and
    maps () to (); TR's kernel step shares the ring-closing bond, which its core does not hold."""

    cores: tuple[int, ...]
    src: tuple[int, ...]
    dst: tuple[int, ...]
    shared: tuple[int, ...] = ()

    @property
    def inputs(self) -> tuple[int, ...]:
        return (*self.shared, *self.src)

    @property
    def outputs(self) -> tuple[int, ...]:
        return (*self.shared, *self.dst)

    def then(self, other: _Step) -> _Step:
        """This step followed by ``other``, as one (dense) conv."""
        return _Step(self.cores + other.cores, self.inputs, other.outputs)


def plan(factors: FactorizedTensor, in_labels: Sequence[int], k_labels: Sequence[int], out_labels: Sequence[int],
         kernel_size: tuple[int, int]) -> ConvChain | None:
    """The chain of a conv whose weight ``factors`` has these (in, kernel, out) mode labels, or
    None for a format without one (:data:`CHAIN_FORMATS`) or a TT/TR whose cores do not lie along
    the train as in modes, kernel, out modes."""
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
        steps = [_Step(in_cores, tuple(in_labels), (rho,)), _Step((k_core,), (), (), shared=(rho,)),
                 _Step(out_cores, (rho,), tuple(out_labels))]
        if one_by_one:
            steps = [steps[0].then(steps[1]), steps[2]]
    elif factors.format == "tucker":  # the core G is the one core holding no mode label
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
    else:
        steps = _train_steps(core_labels, in_cores, k_core, out_cores, in_labels, k_labels, out_labels,
                             kernel_size, numel)
        if steps is None:
            return None
    spatial = 0 if one_by_one else next(i for i, s in enumerate(steps) if k_core in s.cores)
    stages = tuple(_stage(s, i == spatial, k_core, tuple(k_labels), tuple(kernel_size), core_labels,
                          factors.core_shapes(), size) for i, s in enumerate(steps))
    return ConvChain(stages, spatial)


def _train_steps(core_labels, in_cores, k_core, out_cores, in_labels, k_labels, out_labels, kernel_size,
                 numel) -> list[_Step] | None:
    """TT/TR: 1x1 (in cores) -> kernel core, grouped over the bonds from the in to the out cores
    (TR's ring-closing bond) -> 1x1 (out cores), or that chain with one 1x1 stage folded into the
    kernel stage, whichever costs least per pixel; None unless the in-mode, kernel and out-mode
    cores are the three segments of the train (ring) that this needs."""
    modes = {*in_labels, *k_labels, *out_labels}
    if {*in_cores} & {*out_cores, k_core}:
        return None

    def bonds(cores) -> tuple[int, ...]:
        """The bond labels joining ``cores`` to the other cores (size-1 boundary bonds of a TT dangle)."""
        inside = [lab for i in cores for lab in core_labels[i] if lab not in modes]
        elsewhere = {lab for i, c in enumerate(core_labels) if i not in cores for lab in c}
        return tuple(lab for lab in dict.fromkeys(inside) if inside.count(lab) == 1 and lab in elsewhere)

    k_bonds = set(core_labels[k_core]) - modes
    to_in = bonds(in_cores)
    a = tuple(lab for lab in to_in if lab in k_bonds)  # into the kernel core
    ring = tuple(lab for lab in to_in if lab not in k_bonds)  # past it, to the out cores (TR's r_0)
    b = tuple(lab for lab in core_labels[k_core] if lab in k_bonds and lab not in a)
    if not a or not b or set(bonds(out_cores)) != {*ring, *b} or len(k_bonds) != len(core_labels[k_core]) - 1:
        return None
    first, core, last = (_Step(in_cores, tuple(in_labels), (*ring, *a)), _Step((k_core,), a, b, shared=ring),
                         _Step(out_cores, (*ring, *b), tuple(out_labels)))
    chains = [[first.then(core), last], [first, core.then(last)], [first, core, last]]
    k = math.prod(kernel_size)

    def per_pixel(steps) -> float:  # the units of ConvChain.cost, at one resolution
        macs = sum(numel(s.outputs) * numel(s.inputs) // numel(s.shared) * (k if k_core in s.cores else 1)
                   for s in steps)
        return 2.0 * macs + MEMORY_WEIGHT * sum(numel(s.outputs) for s in steps[:-1])

    return min(chains, key=lambda steps: (per_pixel(steps), len(steps)))


def _stage(step: _Step, spatial: bool, k_core: int, k_labels, kernel_size, core_labels, core_shapes,
           size) -> Stage:
    def numel(labels) -> int:
        return math.prod(size[lab] for lab in labels)

    has_k = k_core in step.cores
    kernel = kernel_size if has_k else (1, 1)
    held = {lab for i in step.cores for lab in core_labels[i]}
    repeat = tuple(lab for lab in step.shared if lab not in held)  # the same map for each of their values
    assert step.shared[:len(repeat)] == repeat, "the shared labels no core holds come first"
    own = step.shared[len(repeat):]  # shared labels a core holds: each group has its own map (CP)
    labels = (*own, *step.dst, *step.src, *(k_labels if has_k else ()))
    out_shape = (numel(own) * numel(step.dst), numel(step.src), *kernel)
    operands = [core_labels[i] for i in step.cores]
    dropped = [lab for lab in operands[0] if lab not in labels]
    if len(operands) == 1 and set(labels) <= set(operands[0]) and all(size[lab] == 1 for lab in dropped):
        weight = _Rearrange(tuple(operands[0].index(lab) for lab in (*labels, *dropped)), out_shape,
                            MEMORY_WEIGHT * math.prod(out_shape))
    else:
        weight = compile_contraction(operands, [core_shapes[i] for i in step.cores], labels, out_shape)
    return Stage(step.cores, weight, numel(step.inputs), numel(step.outputs), numel(step.shared), kernel,
                 spatial, numel(repeat))
