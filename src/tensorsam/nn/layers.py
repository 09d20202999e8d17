"""Tensorized Linear and Conv2d layers, generic over every factorized-tensor format.

Tensor layout (the modes are genuine sub-axes of the weight; they are reached by a
permutation, never by a ``view`` of the wrong axis order):

* ``TensorizedLinear``: ``(in modes..., out modes...)``; for TTM the column modes are the
  input modes and the row modes the output modes.
* ``TensorizedConv2d``: ``(in modes..., k_h*k_w, out modes...)`` (the DAS paper's appendix Table 2).

Forward modes (``forward_mode``):

* ``'factorized'``: contract the input with the cores along one cached opt_einsum
  expression (convolutions contract the im2col patches of ``F.unfold``);
* ``'reconstructed'``: build the weight with one einsum whose output labels are already in
  ``F.linear``/``F.conv2d`` order, then call the dense op;
* ``'auto'`` (the default): the cheaper of the two for each input shape.  When the FLOP and
  memory estimates are close (factorized between 1/:data:`AUTO_TIMING_MARGIN` and
  ``timing_margin_above`` times the reconstructed one; convolutions trust a factorized
  estimate above :data:`CONV_TIMING_MARGIN` at once), both modes are timed
  once (forward and, when gradients are on, backward via ``torch.autograd.grad`` on detached
  inputs, so ``.grad`` and the graph are untouched); timings within :data:`AUTO_TIE` of
  each other keep the estimate's choice.  The choice is cached per layer configuration
  (format, core shapes, conv settings), input shape, dtype, device and grad mode, so identical
  layers are timed once (on every DDP rank alike: both modes use the same parameters, so
  ranks may even differ in their choice).  Under ``torch.compile``/``torch.jit`` tracing, or with the environment
  variable ``TENSORSAM_AUTO_TIMING=0``, the estimate alone decides.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..tensors import FactorizedTensor, get_format
from ..tensors.shapes import balanced_factors
from .contraction import Contraction, compile_contraction
from .init import kaiming_variance

FORWARD_MODES = ("auto", "factorized", "reconstructed")
# the choice of forward_mode='auto', keyed by layer signature and input (see choose_mode)
_MODE_CACHE: dict[tuple, str] = {}
AUTO_TIMING_ENV = "TENSORSAM_AUTO_TIMING"
AUTO_TIMING_MARGIN = 16.0  # estimates further apart than this are trusted without timing
# a factorized conv estimated this many times dearer than the dense conv is never timed: its
# estimate is a lower bound (below), and 3x3 convs measured 1.5-40x slower factorized whenever
# their estimate was over 2x (2-core CPU, ResNet-20/32 and benchmark shapes, every format)
CONV_TIMING_MARGIN = 2.0
AUTO_TIMING_REPEATS = 3
AUTO_CLEAR_WIN = 2.0
# timings closer than this are a tie (noise, or a cold allocator: on a fresh process the first
# few calls of any mode can take 10-40x their steady time, hiding a 25x faster factorized linear)
AUTO_TIE = 1.10
# cost units per im2col element of the factorized conv: F.unfold forward plus its col2im
# backward are memory-bound scatters, measured at a few hundred multiply-adds per element on CPU
UNFOLD_WEIGHT = 256.0
# the contraction over the im2col buffer runs as permute+bmm steps on a k_h*k_w times larger
# operand, at a small fraction of the FLOP rate of the direct (mkldnn/cuDNN) conv it competes with
IM2COL_GEMM_PENALTY = 4.0
# formats whose default tensorization keeps the natural (in, [k*k], out) modes
NATURAL_MODE_FORMATS = ("cp", "tucker")


def default_modes(n: int, format: str) -> tuple[int, ...]:
    """Balanced factorisation of one layer side into about log2(n)/3 modes (sizes near 8).

    CP and Tucker keep ``(n,)``: Tucker's core grows with the order, and the paper's CP
    layers are third order ``(C_in, k*k, C_out)``.
    """
    if format in NATURAL_MODE_FORMATS or n < 8:
        return (n,)
    k = max(1, round(math.log2(n) / 3))
    return tuple(f for f in balanced_factors(n, k) if f > 1)


def _split_shape(shape, in_size: int, out_size: int, kernel: int | None) -> tuple[tuple, tuple]:
    """``shape`` -> (in modes, out modes).

    Accepts a pair ``(in_modes, out_modes)`` or the full tensor shape ``(in modes..., [k*k],
    out modes...)``; a shape whose products differ from the layer's sizes is a ValueError.
    """
    expected = (f"(in modes with product {in_size}, " + (f"{kernel}, " if kernel is not None else "")
                + f"out modes with product {out_size})")
    try:
        if len(shape) == 2 and not isinstance(shape[0], int) and not isinstance(shape[1], int):
            ins, outs = (tuple(int(s) for s in shape[0]), tuple(int(s) for s in shape[1]))
            if math.prod(ins) == in_size and math.prod(outs) == out_size and all(ins) and all(outs):
                return ins, outs
            raise ValueError(f"shape {shape!r} does not match the layer: expected {expected}")
        flat = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of positive ints, got {shape!r}") from None
    if any(s <= 0 for s in flat):
        raise ValueError(f"shape must contain positive ints, got {shape!r}")
    for i in range(1, len(flat)):
        rest = flat[i:] if kernel is None else flat[i + 1:]
        if (math.prod(flat[:i]) == in_size and rest and math.prod(rest) == out_size
                and (kernel is None or flat[i] == kernel)):
            return flat[:i], rest
    raise ValueError(f"shape {shape!r} does not match the layer: expected {expected}")


def _auto_timing_allowed() -> bool:
    if os.environ.get(AUTO_TIMING_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling())


class _TensorizedLayer(nn.Module):
    """What Linear and Conv2d share: the factorized weight, its labels and the mode choice."""

    in_size: int  # in_features, or C_in
    # auto times both modes only when factorized is estimated at most this many times dearer
    timing_margin_above: float = AUTO_TIMING_MARGIN
    out_size: int
    kernel_numel: int | None  # k_h*k_w for a convolution, None for a linear layer

    def _init_factors(self, format: str, rank, shape, bias: bool, forward_mode: str, dtype, device):
        self.forward_mode = forward_mode  # validated by the property
        self.format = get_format(format).format  # ValueError naming an unknown format
        if shape is None:
            in_modes = default_modes(self.in_size, self.format)
            out_modes = default_modes(self.out_size, self.format)
        else:
            in_modes, out_modes = _split_shape(shape, self.in_size, self.out_size, self.kernel_numel)
        self.in_modes, self.out_modes = in_modes, out_modes
        factors = self._make_factors(rank, dtype=dtype, device=device)
        self._set_factors(factors)
        self.bias = nn.Parameter(torch.empty(self.out_size, dtype=dtype, device=device)) if bias else None
        self.reset_parameters()

    @property
    def forward_mode(self) -> str:
        """``'auto'``, ``'factorized'`` or ``'reconstructed'``; may be changed after construction."""
        return self._forward_mode

    @forward_mode.setter
    def forward_mode(self, mode: str) -> None:
        if mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {mode!r}")
        self._forward_mode = mode

    # -- the factorized weight -------------------------------------------------------------
    @property
    def tensor_shape(self) -> tuple[int, ...]:
        k = () if self.kernel_numel is None else (self.kernel_numel,)
        return (*self.in_modes, *k, *self.out_modes)

    def _make_factors(self, rank, dtype=None, device=None) -> FactorizedTensor:
        cls = get_format(self.format)
        if self.format != "ttm":
            return cls(self.tensor_shape, rank, dtype=dtype, device=device)
        rows, cols = self._ttm_modes()
        return cls(rows, cols, rank, dtype=dtype, device=device)

    def _ttm_modes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """TTM pairs row (output) and column (input) modes; the kernel mode joins the columns
        and the shorter side is padded with modes of size 1."""
        rows = self.out_modes
        cols = self.in_modes + (() if self.kernel_numel is None else (self.kernel_numel,))
        n = max(len(rows), len(cols))
        return rows + (1,) * (n - len(rows)), cols + (1,) * (n - len(cols))

    def _set_factors(self, factors: FactorizedTensor) -> None:
        """Install ``factors`` and read the labels of the in/kernel/out modes off it."""
        if tuple(factors.shape) != self.tensor_shape and self.format != "ttm":
            raise ValueError(f"factors of shape {tuple(factors.shape)} do not match the layer's "
                             f"tensor shape {self.tensor_shape}")
        self.weight_factors = factors
        n_in, n_out = len(self.in_modes), len(self.out_modes)
        if self.format == "ttm":
            rows, cols = tuple(factors.row_labels), tuple(factors.col_labels)
            self._in_labels, self._out_labels = cols[:n_in], rows[:n_out]
            self._k_labels = cols[n_in:n_in + 1] if self.kernel_numel is not None else ()
        else:
            labels = factors.subscripts()[1]
            n_k = 0 if self.kernel_numel is None else 1
            self._in_labels = labels[:n_in]
            self._k_labels = labels[n_in:n_in + n_k]
            self._out_labels = labels[n_in + n_k:]
        self._free_label = 1 + max(max(s) for s in factors.subscripts()[0])
        self._contractions: dict = {}

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

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        mode = self.forward_mode if self.forward_mode != "auto" else self.choose_mode(x)
        if mode == "factorized":
            return self.forward_factorized(x)
        return self.forward_reconstructed(x)

    def _input_contraction(self, x: torch.Tensor) -> Contraction:
        raise NotImplementedError

    def _dense_cost(self, x: torch.Tensor) -> float:
        raise NotImplementedError

    def estimated_costs(self, x: torch.Tensor) -> dict[str, float]:
        """FLOP + weighted memory estimates of both modes for an input like ``x``."""
        w = self._weight_contraction()
        return {"factorized": self._input_contraction(x).cost, "reconstructed": w.cost + self._dense_cost(x)}

    def choose_mode(self, x: torch.Tensor) -> str:
        """The cheaper mode for ``x``'s shape: estimated, or timed once when close (cached)."""
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        key = (self._signature(), tuple(x.shape), x.dtype, x.device, grad)
        mode = _MODE_CACHE.get(key)
        if mode is not None:
            return mode
        est = self.estimated_costs(x)
        mode = min(est, key=est.get)
        timing = _auto_timing_allowed()
        ratio = est["factorized"] / est["reconstructed"]
        if timing and 1.0 / AUTO_TIMING_MARGIN <= ratio <= self.timing_margin_above:
            times = self.time_modes(x, grad)
            fast, slow = sorted(times, key=times.get)
            if times[slow] > AUTO_TIE * times[fast]:  # a tie keeps the estimate's choice
                mode = fast
        if timing:  # under compile/tracing the cache is left alone
            _MODE_CACHE[key] = mode
        return mode

    def _signature(self) -> tuple:
        """What determines the cost of both modes, besides the input: layers that agree on it
        (e.g. the repeated blocks of a ResNet) share one cached choice."""
        conv = tuple(getattr(self, a, None) for a in ("kernel_size", "stride", "padding", "dilation"))
        return (type(self).__name__, self.format, tuple(self.weight_factors.core_shapes()), self.tensor_shape,
                self.bias is not None, conv)

    def time_modes(self, x: torch.Tensor, grad: bool, repeats: int = AUTO_TIMING_REPEATS) -> dict[str, float]:
        """Fastest of ``repeats`` interleaved runs of each mode (forward, plus backward when
        ``grad``), in seconds, after one untimed warm-up run each; when one mode's first timed
        run already takes over :data:`AUTO_CLEAR_WIN` times the other's, those are returned.

        The warm-up is not timed because first calls pay one-time costs (allocator growth,
        library set-up) that once made a 25x faster factorized linear lose on a cold process.
        Runs on a detached copy of ``x`` and takes gradients with ``torch.autograd.grad``, so
        no ``.grad`` is accumulated and the caller's graph is not touched.
        """
        x = x.detach().requires_grad_(grad and x.requires_grad)
        params = [p for p in self.parameters() if p.requires_grad] + ([x] if x.requires_grad else [])
        fns = {"factorized": self.forward_factorized, "reconstructed": self.forward_reconstructed}
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

        def once(fn) -> float:
            sync()
            t0 = time.perf_counter()
            with torch.set_grad_enabled(grad):
                y = fn(x)
                if grad and params:
                    torch.autograd.grad(y, params, torch.ones_like(y))
            sync()
            return time.perf_counter() - t0

        for fn in fns.values():
            once(fn)  # warm-up
        times = {m: [once(fn)] for m, fn in fns.items()}
        first = sorted(t[0] for t in times.values())
        if first[1] > AUTO_CLEAR_WIN * first[0]:  # a clear win needs no repeats
            return {m: t[0] for m, t in times.items()}
        for _ in range(repeats - 1):
            for m, fn in fns.items():
                times[m].append(once(fn))
        return {m: min(t) for m, t in times.items()}

    def _check_input(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"{self.in_size}, {self.out_size}, format={self.format!r}, rank={self.rank}, "
                f"shape={self.tensor_shape}, bias={self.bias is not None}, forward_mode={self.forward_mode!r}")

    # -- construction from a dense layer ------------------------------------------------------
    def _dense_to_tensor(self, weight: torch.Tensor) -> torch.Tensor:
        """Dense ``F.linear``/``F.conv2d`` weight -> the layer's tensor, by permutation."""
        raise NotImplementedError

    def _decompose(self, dense: nn.Module, rank, **kwargs) -> None:
        weight = dense.weight.detach()
        if self.format == "ttm":
            rows, cols = self._ttm_modes()
            t = self._dense_to_tensor(weight)  # (cols..., rows...) with padded modes of size 1
            matrix = t.reshape(math.prod(cols), math.prod(rows)).t()
            factors = get_format("ttm").from_matrix(matrix, rows, cols, rank, **kwargs)
        else:
            factors = get_format(self.format).from_dense(self._dense_to_tensor(weight), rank, **kwargs)
        self._set_factors(factors)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(dense.bias)


class TensorizedLinear(_TensorizedLayer):
    """``y = x W^T + b`` with W stored in a factorized format of shape (in modes..., out modes...).

    ``shape`` is ``(in_modes, out_modes)`` or the flat tensor shape; by default a balanced
    factorisation (:func:`default_modes`).  ``rank`` follows the format's convention.

    Example::

        >>> layer = TensorizedLinear(1024, 512, format="tt", rank=8)   # shape (16, 8, 8, 8, 8, 8)
        >>> layer(torch.randn(32, 1024)).shape
        torch.Size([32, 512])
        >>> small = TensorizedLinear.from_dense(nn.Linear(64, 32), "tucker", rank=8)
    """

    def __init__(self, in_features: int, out_features: int, format: str = "tr", rank=8, shape=None,
                 bias: bool = True, forward_mode: str = "auto", dtype=None, device=None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_size, self.out_size, self.kernel_numel = int(in_features), int(out_features), None
        self._init_factors(format, rank, shape, bias, forward_mode, dtype, device)

    in_features = property(lambda self: self.in_size)
    out_features = property(lambda self: self.out_size)

    @property
    def dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_size, self.in_size)

    def _check_input(self, x):
        if x.ndim == 0 or x.shape[-1] != self.in_size:
            raise ValueError(f"input has shape {tuple(x.shape)}; expected (..., {self.in_size})")

    def _input_contraction(self, x):
        b = self._free_label
        n = x.numel() // self.in_size
        return self._contraction(("input", n), [(b, *self._in_labels)], [(n, *self.in_modes)],
                                 (b, *self._out_labels))

    def _dense_cost(self, x):
        n = x.numel() // self.in_size
        return 2.0 * n * self.in_size * self.out_size + 2.0 * n * self.out_size

    def forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xt = x.reshape(-1, *self.in_modes)
        y = self._input_contraction(x)(*self.weight_factors.cores, xt).reshape(*lead, self.out_size)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # y may be autocast

    def forward_reconstructed(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def _dense_to_tensor(self, weight):
        pad_in = self._ttm_modes()[1] if self.format == "ttm" else self.in_modes
        pad_out = self._ttm_modes()[0] if self.format == "ttm" else self.out_modes
        return weight.t().reshape(*pad_in, *pad_out)

    @classmethod
    def from_dense(cls, layer: nn.Linear, format: str, rank, shape=None, forward_mode: str = "auto",
                   **kwargs) -> TensorizedLinear:
        """Decompose a trained ``nn.Linear`` with the format's ``from_dense`` (tensorly);
        extra ``kwargs`` go to the decomposition.  The bias is copied."""
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"expected an nn.Linear, got {type(layer).__name__}")  # noqa: TRY004
        w = layer.weight
        new = cls(layer.in_features, layer.out_features, format=format, rank=rank, shape=shape,
                  bias=layer.bias is not None, forward_mode=forward_mode, dtype=w.dtype, device=w.device)
        new._decompose(layer, rank, **kwargs)
        return new


def _pair(v, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t


class TensorizedConv2d(_TensorizedLayer):
    """A 2-D convolution whose weight is stored factorized with shape
    (in modes..., k_h*k_w, out modes...) (appendix Table 2).  Zero padding, ``groups=1``.

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
                 forward_mode: str = "auto", dtype=None, device=None):
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
        self._init_factors(format, rank, shape, bias, forward_mode, dtype, device)

    in_channels = property(lambda self: self.in_size)
    out_channels = property(lambda self: self.out_size)

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
        c = self._contraction(("input", shape), [(b, *self._in_labels, *self._k_labels, l_)], [shape],
                              (b, *self._out_labels, l_))
        return c

    def _dense_cost(self, x):
        ho, wo = self._out_hw(x)
        out = x.shape[0] * self.out_size * ho * wo
        return 2.0 * out * self.in_size * self.kernel_numel + 2.0 * out

    timing_margin_above = CONV_TIMING_MARGIN

    def estimated_costs(self, x):
        """The factorized conv pays for the im2col buffer (``F.unfold`` and its col2im backward)
        and runs its contraction on it at :data:`IM2COL_GEMM_PENALTY` times the dense conv's cost
        per FLOP; both are lower bounds, so a large ratio is trusted (``timing_margin_above``)."""
        ho, wo = self._out_hw(x)
        cols = x.shape[0] * self.in_size * self.kernel_numel * ho * wo
        return {"factorized": IM2COL_GEMM_PENALTY * self._input_contraction(x).cost + UNFOLD_WEIGHT * cols,
                "reconstructed": self._weight_contraction().cost + self._dense_cost(x)}

    def forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        ho, wo = self._out_hw(x)
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        cols = cols.reshape(x.shape[0], *self.in_modes, self.kernel_numel, ho * wo)
        y = self._input_contraction(x)(*self.weight_factors.cores, cols).reshape(x.shape[0], self.out_size, ho, wo)
        return y if self.bias is None else y + self.bias.to(y.dtype).view(1, -1, 1, 1)

    def forward_reconstructed(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation)

    def _dense_to_tensor(self, weight):
        t = weight.permute(1, 2, 3, 0)  # (C_in, k_h, k_w, C_out): in, kernel, out
        if self.format == "ttm":
            rows, cols = self._ttm_modes()
            return t.reshape(*cols, *rows)
        return t.reshape(self.tensor_shape)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, format: str, rank, shape=None, forward_mode: str = "auto",
                   **kwargs) -> TensorizedConv2d:
        """Decompose a trained ``nn.Conv2d`` (zero padding, ``groups=1``) with the format's
        ``from_dense``; extra ``kwargs`` go to the decomposition.  The bias is copied."""
        if not isinstance(layer, nn.Conv2d):
            raise ValueError(f"expected an nn.Conv2d, got {type(layer).__name__}")  # noqa: TRY004
        check_convertible_conv(layer)
        w = layer.weight
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, format=format, rank=rank,
                  shape=shape, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                  bias=layer.bias is not None, forward_mode=forward_mode, dtype=w.dtype, device=w.device)
        new._decompose(layer, rank, **kwargs)
        return new


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
