"""Where a layer's in, kernel and out modes sit in its factorized weight.

A layer's tensor has shape ``(in modes..., [k_h*k_w], out modes...)``.  :class:`Layout` maps
that onto a format: it builds or decomposes the factors and reads the einsum labels of each
group of modes off them.  Formats that store the weight differently override it
(:class:`TTMLayout`: a TT-matrix of row = out modes by column = in [and kernel] modes).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..tensors import TTM, FactorizedTensor, get_format
from ..tensors.base import validate_shape
from ..tensors.shapes import balanced_factors
from .contraction import TTMLinearChain, TuckerLinearChain

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


def split_shape(shape, in_size: int, out_size: int, kernel: int | None) -> tuple[tuple, tuple]:
    """``shape`` -> (in modes, out modes).

    Accepts a pair ``(in_modes, out_modes)`` or the full tensor shape ``(in modes..., [k*k],
    out modes...)``; a shape whose products differ from the layer's sizes is a ValueError.
    """
    expected = (f"(in modes with product {in_size}, " + (f"{kernel}, " if kernel is not None else "")
                + f"out modes with product {out_size})")
    try:
        pair = len(shape) == 2 and not isinstance(shape[0], numbers.Number) and not isinstance(shape[1], numbers.Number)
    except TypeError:
        raise ValueError(f"shape must be a sequence of positive ints, got {shape!r}") from None
    if pair:   # floats are refused, never truncated (validate_shape)
        ins, outs = validate_shape(shape[0], "shape (in modes)"), validate_shape(shape[1], "shape (out modes)")
        if math.prod(ins) == in_size and math.prod(outs) == out_size:
            return ins, outs
        raise ValueError(f"shape {shape!r} does not match the layer: expected {expected}")
    flat = validate_shape(shape)
    for i in range(1, len(flat)):
        rest = flat[i:] if kernel is None else flat[i + 1:]
        if (math.prod(flat[:i]) == in_size and rest and math.prod(rest) == out_size
                and (kernel is None or flat[i] == kernel)):
            return flat[:i], rest
    raise ValueError(f"shape {shape!r} does not match the layer: expected {expected}")


@dataclass(frozen=True)
class Layout:
    """The modes of one layer in one format; :meth:`of` picks the format's layout class."""

    format: str
    in_modes: tuple[int, ...]
    kernel: int | None  # k_h*k_w for a convolution, None for a linear layer
    out_modes: tuple[int, ...]

    @staticmethod
    def of(format: str, in_size: int, out_size: int, kernel: int | None, shape=None) -> Layout:
        """The layout of a layer with these sizes: ``shape`` as in :func:`split_shape`, or
        :func:`default_modes`.  Unknown formats and mismatched shapes are ValueErrors."""
        fmt = get_format(format).format
        if min(in_size, out_size) <= 0:
            raise ValueError(f"layer sizes must be positive, got {in_size}, {out_size}")
        if shape is None:
            in_modes, out_modes = default_modes(in_size, fmt), default_modes(out_size, fmt)
        else:
            in_modes, out_modes = split_shape(shape, in_size, out_size, kernel)
        return LAYOUTS.get(fmt, Layout)(fmt, in_modes, kernel, out_modes)

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        """``(in modes..., [k_h*k_w], out modes...)``."""
        k = () if self.kernel is None else (self.kernel,)
        return (*self.in_modes, *k, *self.out_modes)

    @property
    def factor_shape(self) -> tuple[int, ...]:
        """The ``shape`` of the factorized tensor that stores the weight."""
        return self.tensor_shape

    def build(self, rank, dtype=None, device=None) -> FactorizedTensor:
        """Fresh factors (the format's own random initialisation)."""
        return get_format(self.format)(self.tensor_shape, rank, dtype=dtype, device=device)

    def decompose(self, weight: torch.Tensor, rank, **kwargs) -> FactorizedTensor:
        """Factors of a dense ``F.linear``/``F.conv2d`` weight ``(out, in[, k_h, k_w])`` by the
        format's ``from_dense`` (``kwargs`` go to it).  The global RNG is left untouched."""
        w = weight.detach()
        tensor = w.permute(*range(1, w.ndim), 0).reshape(self.tensor_shape)  # (in, [k], out)
        return self._from_tensor(tensor, rank, **kwargs)   # from_dense draws no random initialisation

    def _from_tensor(self, tensor: torch.Tensor, rank, **kwargs) -> FactorizedTensor:
        return get_format(self.format).from_dense(tensor, rank, **kwargs)

    def labels(self, factors: FactorizedTensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The einsum labels of the (in, kernel, out) modes in ``factors``."""
        labels = factors.subscripts()[1]
        n_in, n_k = len(self.in_modes), 0 if self.kernel is None else 1
        return labels[:n_in], labels[n_in:n_in + n_k], labels[n_in + n_k:]

    def linear_chain(self, factors: FactorizedTensor, batch: int) -> TuckerLinearChain | TTMLinearChain | None:
        """A linear layer's forward as a chain of matrix products (:mod:`.contraction`) for
        ``batch`` rows of input, where the format has one; else None."""
        return None


class TuckerLayout(Layout):
    """Tucker: a linear layer runs as a chain of matrix products (:class:`.contraction.TuckerLinearChain`)."""

    def linear_chain(self, factors, batch):
        if self.kernel is not None:
            return None
        return TuckerLinearChain(self.tensor_shape, factors.rank, len(self.in_modes), batch)


class TTMLayout(Layout):
    """TTM pairs row (output) and column (input, then kernel) modes; the shorter side is padded
    with modes of size 1."""

    @property
    def rows_cols(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        rows = self.out_modes
        cols = self.in_modes + (() if self.kernel is None else (self.kernel,))
        n = max(len(rows), len(cols))
        return rows + (1,) * (n - len(rows)), cols + (1,) * (n - len(cols))

    @property
    def factor_shape(self) -> tuple[int, ...]:
        rows, cols = self.rows_cols
        return rows + cols

    def build(self, rank, dtype=None, device=None) -> FactorizedTensor:
        return TTM(*self.rows_cols, rank, dtype=dtype, device=device)

    def _from_tensor(self, tensor, rank, **kwargs):
        rows, cols = self.rows_cols
        matrix = tensor.reshape(math.prod(cols), math.prod(rows)).t()  # (out, in [* k])
        return TTM.from_matrix(matrix, rows, cols, rank, **kwargs)

    def labels(self, factors):
        rows, cols = tuple(factors.row_labels), tuple(factors.col_labels)
        n_in = len(self.in_modes)
        k = cols[n_in:n_in + 1] if self.kernel is not None else ()
        return cols[:n_in], k, rows[:len(self.out_modes)]

    def linear_chain(self, factors, batch):
        if self.kernel is not None or len(self.rows_cols[0]) < 2:
            return None
        return TTMLinearChain(factors.core_shapes(), batch)


LAYOUTS: dict[str, type[Layout]] = {"ttm": TTMLayout, "tucker": TuckerLayout}
