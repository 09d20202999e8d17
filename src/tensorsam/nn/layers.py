"""Tensorized Linear and Conv2d layers, generic over every factorized-tensor format.

Tensor layout (the modes are genuine sub-axes of the weight; they are reached by a
permutation, never by a ``view`` of the wrong axis order; see :mod:`.layout`):

* ``TensorizedLinear``: ``(in modes..., out modes...)``; for TTM the column modes are the
  input modes and the row modes the output modes.
* ``TensorizedConv2d``: ``(in modes..., k_h*k_w, out modes...)`` (the DAS paper's appendix Table 2).

Forward modes (``forward_mode``):

* ``'factorized'``: contract the input with the cores along one cached opt_einsum
  expression (convolutions contract the im2col patches of ``F.unfold``);
* ``'reconstructed'``: build the weight with one einsum whose output labels are already in
  ``F.linear``/``F.conv2d`` order, then call the dense op;
* ``'chain'`` (CP, Tucker, TT and TR convolutions only): a chain of standard convolutions, 1x1 ->
  depthwise (CP), core (Tucker), kernel-core (TT) or grouped kernel-core (TR) k_h x k_w -> 1x1,
  each weight built from its cores (:mod:`.chain`);
* ``'auto'`` (the default): the cheapest of the layer's modes for each input shape, by the policy
  of :mod:`.auto` (an estimate, timed once when close; convolutions do not time a factorized or
  chain conv estimated above :data:`CONV_TIMING_MARGIN` times the cheapest mode).  Each layer's
  choices are part of its ``state_dict`` (extra state), so a resumed process replays them
  without timing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..tensors import FactorizedTensor
from . import auto, chain, contraction, dispatch
from .contraction import Contraction, compile_contraction
from .init import kaiming_variance
from .layout import Layout
from .modes import CHAIN_MODE, FORWARD_MODES, ModeDispatch, check_forward_mode  # noqa: F401 (re-exported)

# a factorized conv estimated this many times dearer than the cheapest mode is never timed: its
# estimate is a lower bound (below), and 3x3 convs measured 1.5-40x slower factorized whenever
# their estimate was over 2x (2-core CPU, ResNet-20/32 and benchmark shapes, every format).  The
# chain's estimate is optimistic too (its depthwise conv is memory-bound: a CP 16->16 chain on
# 32x32 inputs estimated at 0.3x the dense conv measured 1.3x), so the same margin applies to it
CONV_TIMING_MARGIN = 2.0
# cost units per im2col element of the factorized conv: F.unfold forward plus its col2im
# backward are memory-bound scatters, measured at a few hundred multiply-adds per element on CPU
UNFOLD_WEIGHT = 256.0
# the contraction over the im2col buffer runs as permute+bmm steps on a k_h*k_w times larger
# operand, at a small fraction of the FLOP rate of the direct (mkldnn/cuDNN) conv it competes with
IM2COL_GEMM_PENALTY = 4.0


class _TensorizedLayer(ModeDispatch):
    """What Linear and Conv2d share: the factorized weight, its labels and the modes' forwards."""

    in_size: int  # in_features, or C_in
    out_size: int
    kernel_numel: int | None  # k_h*k_w for a convolution, None for a linear layer

    def _init_factors(self, format: str, rank, shape, bias: bool, forward_mode: str, dtype, device,
                      factors: FactorizedTensor | None):
        check_forward_mode(forward_mode)
        self.layout = Layout.of(format, self.in_size, self.out_size, self.kernel_numel, shape)
        self.format = self.layout.format
        self.forward_mode = forward_mode  # validated by the property, for this format too
        self._auto = auto.AutoChoices()
        fresh = factors is None
        self._set_factors(self.layout.build(rank, dtype=dtype, device=device) if fresh else factors)
        self.bias = nn.Parameter(torch.zeros(self.out_size, dtype=dtype, device=device)) if bias else None
        if fresh:
            self.reset_parameters()

    # -- the factorized weight -------------------------------------------------------------
    in_modes = property(lambda self: self.layout.in_modes)
    out_modes = property(lambda self: self.layout.out_modes)

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        return self.layout.tensor_shape

    def _set_factors(self, factors: FactorizedTensor) -> None:
        """Install ``factors`` and read the labels of the in/kernel/out modes off it."""
        if factors.format != self.format or tuple(factors.shape) != self.layout.factor_shape:
            raise ValueError(f"{factors.format} factors of shape {tuple(factors.shape)} do not match the "
                             f"layer's {self.format} tensor of shape {self.layout.factor_shape}")
        self.weight_factors = factors
        self._in_labels, self._k_labels, self._out_labels = self.layout.labels(factors)
        self._free_label = 1 + max(max(s) for s in factors.subscripts()[0])
        self._contractions: dict = {}
        dispatch.reset(self)

    @property
    def rank(self):
        return self.weight_factors.rank

    @property
    def cores(self) -> nn.ParameterList:
        return self.weight_factors.cores

    def _contraction(self, key, extra_labels=(), extra_shapes=(), out_labels=(), out_shape=None) -> Contraction:
        c = self._contractions.get(key)
        if c is None:
            core_labels = self.weight_factors.subscripts()[0]
            c = compile_contraction([*core_labels, *extra_labels],
                                    [*self.weight_factors.core_shapes(), *extra_shapes], out_labels, out_shape)
            self._contractions[key] = c
        return c

    def _weight_contraction(self) -> Contraction:
        """One einsum from the cores straight to the dense op's weight order (out, in, [k])."""
        return self._contraction("weight", out_labels=(*self._out_labels, *self._in_labels, *self._k_labels),
                                 out_shape=self.dense_weight_shape)

    def dense_weight(self) -> torch.Tensor:
        """The weight in ``F.linear``/``F.conv2d`` layout, built by one cached einsum."""
        return self._weight_contraction()(*self.weight_factors.cores)

    @torch.no_grad()
    def reset_parameters(self, target_variance: float | None = None) -> None:
        """Unified init (Pan et al., ICML 2022): Var(reconstructed weight) = ``target_variance``, by default
        Kaiming's 2/fan_in; the bias as in torch's dense layers, U(±1/sqrt(fan_in))."""
        fan_in = self.in_size * (self.kernel_numel or 1)
        self.weight_factors.reset_parameters(
            kaiming_variance(fan_in) if target_variance is None else target_variance)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            self.bias.uniform_(-bound, bound)

    def _check_input(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _check_dtype(self, x: torch.Tensor) -> None:
        """Refuse an integer input, and (outside autocast, which mixes dtypes on purpose) one whose
        dtype differs from the cores', before torch fails inside the contraction."""
        want = self.weight_factors.cores[0].dtype
        if not x.is_floating_point():
            raise ValueError(f"input has dtype {x.dtype}; a tensorized layer takes floating-point input "
                             f"(e.g. x.to({want}))")
        if x.dtype != want and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"input has dtype {x.dtype} but the layer's cores are {want}; convert one "
                             f"(x.to({want}) or layer.to({x.dtype}))")

    def extra_repr(self) -> str:
        return (f"{self.in_size}, {self.out_size}, format={self.format!r}, rank={self.rank}, "
                f"shape={self.tensor_shape}, bias={self.bias is not None}, forward_mode={self.forward_mode!r}")

    # -- construction from a dense layer ------------------------------------------------------
    @classmethod
    def _around_dense(cls, dense: nn.Module, sizes: tuple, format: str, rank, shape, forward_mode: str,
                      decompose_kwargs: dict, **conv) -> _TensorizedLayer:
        """Decompose ``dense``'s weight first, then build the layer around the factors (no random
        initialisation runs, so the global RNG is untouched) and copy the bias."""
        check_forward_mode(forward_mode)
        w = dense.weight.detach()
        kernel = math.prod(w.shape[2:]) if w.ndim > 2 else None
        factors = Layout.of(format, w.shape[1], w.shape[0], kernel, shape).decompose(w, rank, **decompose_kwargs)
        new = cls(*sizes, format=format, rank=rank, shape=shape, bias=dense.bias is not None,
                  forward_mode=forward_mode, dtype=w.dtype, device=w.device, factors=factors, **conv)
        if new.bias is not None:
            with torch.no_grad():
                new.bias.copy_(dense.bias)
        return new


class TensorizedLinear(_TensorizedLayer):
    """``y = x W^T + b`` with W stored in a factorized format of shape (in modes..., out modes...).

    ``shape`` is ``(in_modes, out_modes)`` or the flat tensor shape; by default a balanced
    factorisation (:func:`.layout.default_modes`).  ``rank`` follows the format's convention.
    ``factors=`` (keyword only) wraps prebuilt factors of the layer's format and tensor shape instead
    of drawing random ones (``rank`` is then theirs; a bias starts at zero).

    Example::

        >>> layer = TensorizedLinear(1024, 512, format="tt", rank=8)   # shape (16, 8, 8, 8, 8, 8)
        >>> layer(torch.randn(32, 1024)).shape
        torch.Size([32, 512])
        >>> small = TensorizedLinear.from_dense(nn.Linear(64, 32), "tucker", rank=8)
    """

    def __init__(self, in_features: int, out_features: int, format: str = "tr", rank=8, shape=None,
                 bias: bool = True, forward_mode: str = "auto", dtype=None, device=None, *,
                 factors: FactorizedTensor | None = None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_size, self.out_size, self.kernel_numel = int(in_features), int(out_features), None
        self._init_factors(format, rank, shape, bias, forward_mode, dtype, device, factors)

    in_features = property(lambda self: self.in_size)
    out_features = property(lambda self: self.out_size)

    @property
    def dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_size, self.in_size)

    def _check_input(self, x):
        if x.ndim == 0 or x.shape[-1] != self.in_size:
            raise ValueError(f"input has shape {tuple(x.shape)}; expected (..., {self.in_size})")

    def _input_contraction(self, x):
        """The opt_einsum path of the input with the cores, or the format's chain of matrix
        products (:meth:`.layout.Layout.linear_chain`) where it needs no more FLOPs (at equal
        FLOPs the chain is faster: no permute copies of its intermediates) and the path would
        not run single-threaded (:data:`.contraction.SINGLE_THREAD_MAX_FLOPS`)."""
        b = self._free_label
        n = x.numel() // self.in_size
        path = self._contraction(("input", n), [(b, *self._in_labels)], [(n, *self.in_modes)],
                                 (b, *self._out_labels))
        key = ("linear chain", n)
        if key not in self._contractions:
            chain = self.layout.linear_chain(self.weight_factors, n)
            use = (chain is not None and chain.flops <= path.flops
                   and path.flops > contraction.SINGLE_THREAD_MAX_FLOPS)
            self._contractions[key] = chain if use else None
        return self._contractions[key] or path

    def _dense_cost(self, x):
        n = x.numel() // self.in_size
        return 2.0 * n * self.in_size * self.out_size + 2.0 * n * self.out_size

    @dispatch.standard
    def forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        return self._prepare_factorized(x)(self, x)

    @dispatch.standard
    def forward_reconstructed(self, x: torch.Tensor) -> torch.Tensor:
        return self._prepare_reconstructed(x)(self, x)

    def _prepare_factorized(self, x: torch.Tensor):
        contract, cores = self._input_contraction(x), dispatch.core_getter(len(self.cores))
        in_shape, out_shape = (-1, *self.in_modes), (*x.shape[:-1], self.out_size)

        def run(layer, x):
            y = contract(*cores(layer.weight_factors.cores), x.reshape(in_shape)).reshape(out_shape)
            bias = layer.bias
            return y if bias is None else y + bias.to(y.dtype)  # y may be autocast

        return run

    def _prepare_reconstructed(self, x: torch.Tensor):
        weight, cores = self._weight_contraction(), dispatch.core_getter(len(self.cores))

        def run(layer, x):
            return F.linear(x, weight(*cores(layer.weight_factors.cores)), layer.bias)

        return run

    @classmethod
    def from_dense(cls, layer: nn.Linear, format: str, rank, shape=None, forward_mode: str = "auto",
                   **kwargs) -> TensorizedLinear:
        """Decompose a trained ``nn.Linear`` with the format's ``from_dense`` (tensorly);
        extra ``kwargs`` go to the decomposition.  The bias is copied; the global RNG is untouched."""
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"expected an nn.Linear, got {type(layer).__name__}")  # noqa: TRY004
        return cls._around_dense(layer, (layer.in_features, layer.out_features), format, rank, shape,
                                 forward_mode, kwargs)


def _pair(v, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t


class TensorizedConv2d(_TensorizedLayer):
    """A 2-D convolution whose weight is stored factorized with shape
    (in modes..., k_h*k_w, out modes...) (appendix Table 2).  Zero padding, ``groups=1``.
    ``factors=`` (keyword only) wraps prebuilt factors of the layer's format and tensor shape instead
    of drawing random ones (``rank`` is then theirs; a bias starts at zero).

    Example::

        >>> conv = TensorizedConv2d(32, 32, 3, format="tr", rank=15, shape=(4, 4, 2, 9, 4, 4, 2), padding=1)
        >>> conv(torch.randn(8, 32, 16, 16)).shape
        torch.Size([8, 32, 16, 16])
        >>> conv.dense_weight().shape                                  # (C_out, C_in, k_h, k_w)
        torch.Size([32, 32, 3, 3])
        >>> cp = TensorizedConv2d.from_dense(nn.Conv2d(16, 16, 3, padding=1), "cp", rank=20)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, format: str = "tr", rank=8,
                 shape=None, stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = True,
                 forward_mode: str = "auto", dtype=None, device=None, *, factors: FactorizedTensor | None = None):
        super().__init__()
        if groups != 1:
            raise ValueError(f"only groups=1 convolutions can be tensorized, got groups={groups!r}")
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        self.padding = _pair(padding, "padding")
        if min(self.kernel_size) <= 0 or min(self.stride) <= 0 or min(self.dilation) <= 0 or min(self.padding) < 0:
            raise ValueError(f"kernel_size, stride and dilation must be positive and padding >= 0, got "
                             f"{self.kernel_size}, {self.stride}, {self.dilation}, {self.padding}")
        self.in_size, self.out_size = int(in_channels), int(out_channels)
        self.kernel_numel = self.kernel_size[0] * self.kernel_size[1]
        self._init_factors(format, rank, shape, bias, forward_mode, dtype, device, factors)

    in_channels = property(lambda self: self.in_size)
    out_channels = property(lambda self: self.out_size)

    @property
    def has_chain(self) -> bool:
        """CP, Tucker, TT and TR convolutions run as a chain of standard convolutions (:mod:`.chain`)."""
        return chain.supports(self.format)

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes ``auto`` chooses among: ``'chain'`` too where the chain has two or more stages
        (a Tucker chain of one stage is the reconstructed conv)."""
        more = (CHAIN_MODE,) if self.has_chain and len(self._conv_chain().stages) > 1 else ()
        return ("factorized", "reconstructed", *more)

    def _conv_chain(self) -> chain.ConvChain:
        c = self._contractions.get(CHAIN_MODE)
        if c is None:
            c = chain.plan(self.weight_factors, self._in_labels, self._k_labels, self._out_labels, self.kernel_size)
            if c is None:
                raise ValueError(f"a {self.format} convolution has no chain")
            self._contractions[CHAIN_MODE] = c
        return c

    @property
    def dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_size, self.in_size, *self.kernel_size)

    def _check_input(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_size:
            raise ValueError(f"input has shape {tuple(x.shape)}; expected (N, {self.in_size}, H, W)")
        if min(self._out_hw(x)) <= 0:
            raise ValueError(f"input has spatial size {tuple(x.shape[2:])}, too small for kernel_size "
                             f"{self.kernel_size} with padding {self.padding} and dilation {self.dilation}")

    def _out_hw(self, x) -> tuple[int, int]:
        return tuple((x.shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
                     // self.stride[i] + 1 for i in range(2))

    def _input_contraction(self, x):
        b, l_ = self._free_label, self._free_label + 1
        ho, wo = self._out_hw(x)
        shape = (x.shape[0], *self.in_modes, self.kernel_numel, ho * wo)
        return self._contraction(("input", shape), [(b, *self._in_labels, *self._k_labels, l_)], [shape],
                                 (b, *self._out_labels, l_))

    def _dense_cost(self, x):
        ho, wo = self._out_hw(x)
        out = x.shape[0] * self.out_size * ho * wo
        return 2.0 * out * self.in_size * self.kernel_numel + 2.0 * out

    timing_margin_above = CONV_TIMING_MARGIN

    def estimated_costs(self, x):
        """The factorized conv pays for the im2col buffer (``F.unfold`` and its col2im backward)
        and runs its contraction on it at :data:`IM2COL_GEMM_PENALTY` times the dense conv's cost
        per FLOP; both are lower bounds, so a large ratio is trusted (``timing_margin_above``).
        The chain (CP, Tucker, TT, TR) costs its convolutions' FLOPs and intermediate activations
        (:meth:`.chain.ConvChain.cost`)."""
        ho, wo = self._out_hw(x)
        cols = x.shape[0] * self.in_size * self.kernel_numel * ho * wo
        est = {"factorized": IM2COL_GEMM_PENALTY * self._input_contraction(x).cost + UNFOLD_WEIGHT * cols,
               "reconstructed": self._weight_contraction().cost + self._dense_cost(x)}
        if CHAIN_MODE in self.modes:
            est[CHAIN_MODE] = self._conv_chain().cost(x.shape, (ho, wo))
        return est

    @dispatch.standard
    def forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        return self._prepare_factorized(x)(self, x)

    @dispatch.standard
    def forward_reconstructed(self, x: torch.Tensor) -> torch.Tensor:
        return self._prepare_reconstructed(x)(self, x)

    @dispatch.standard
    def forward_chain(self, x: torch.Tensor) -> torch.Tensor:
        """CP: 1x1 -> depthwise -> 1x1; Tucker: 1x1 -> core conv -> 1x1; TT/TR: 1x1 -> kernel-core
        conv (grouped by the ring-closing bond for TR) -> 1x1 (:mod:`.chain`)."""
        return self._prepare_chain(x)(self, x)

    def _prepare_factorized(self, x: torch.Tensor):
        ho, wo = self._out_hw(x)
        contract, cores = self._input_contraction(x), dispatch.core_getter(len(self.cores))
        cols_shape = (x.shape[0], *self.in_modes, self.kernel_numel, ho * wo)
        out_shape = (x.shape[0], self.out_size, ho, wo)
        kernel, dilation, padding, stride = self.kernel_size, self.dilation, self.padding, self.stride

        def run(layer, x):
            cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).reshape(cols_shape)
            y = contract(*cores(layer.weight_factors.cores), cols).reshape(out_shape)
            bias = layer.bias
            return y if bias is None else y + bias.to(y.dtype).view(1, -1, 1, 1)

        return run

    def _prepare_reconstructed(self, x: torch.Tensor):
        weight, cores = self._weight_contraction(), dispatch.core_getter(len(self.cores))
        stride, padding, dilation = self.stride, self.padding, self.dilation

        def run(layer, x):
            w = weight(*cores(layer.weight_factors.cores))
            return F.conv2d(x, w, layer.bias, stride, padding, dilation)

        return run

    def _prepare_chain(self, x: torch.Tensor):
        conv_chain, cores = self._conv_chain(), dispatch.core_getter(len(self.cores))
        stride, padding, dilation = self.stride, self.padding, self.dilation

        def run(layer, x):
            return conv_chain(x, cores(layer.weight_factors.cores), layer.bias, stride, padding, dilation)

        return run

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, format: str, rank, shape=None, forward_mode: str = "auto",
                   **kwargs) -> TensorizedConv2d:
        """Decompose a trained ``nn.Conv2d`` (zero padding, ``groups=1``) with the format's
        ``from_dense``; extra ``kwargs`` go to the decomposition.  The bias is copied; the global
        RNG is untouched."""
        if not isinstance(layer, nn.Conv2d):
            raise ValueError(f"expected an nn.Conv2d, got {type(layer).__name__}")  # noqa: TRY004
        check_convertible_conv(layer)
        return cls._around_dense(layer, (layer.in_channels, layer.out_channels, layer.kernel_size), format, rank,
                                 shape, forward_mode, kwargs, stride=layer.stride, padding=layer.padding,
                                 dilation=layer.dilation)


def check_convertible_conv(layer: nn.Conv2d) -> None:
    """Raise a ValueError naming what a :class:`TensorizedConv2d` cannot represent."""
    if layer.groups != 1:
        raise ValueError(f"only groups=1 convolutions can be tensorized, got groups={layer.groups}")
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise ValueError(f"only explicit zero padding is supported, got padding={layer.padding!r}, "
                         f"padding_mode={layer.padding_mode!r}")


TENSORIZED_LAYERS: dict[type, type] = {nn.Linear: TensorizedLinear, nn.Conv2d: TensorizedConv2d}


def layer_sizes(layer: nn.Module) -> tuple[int, int, Sequence[int] | None]:
    """(in, out, kernel_size or None) of a dense Linear/Conv2d."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels, layer.kernel_size
    return layer.in_features, layer.out_features, None
