"""Tensorization helpers: factor a layer dimension into small modes, and move between a
``(out, in)`` weight matrix and its ``(in modes..., out modes...)`` tensor by permutation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def balanced_factors(n: int, k: int) -> tuple[int, ...]:
    """Split ``n`` into ``k`` integer factors whose product is ``n``, as equal as possible.

    Primes are dealt, largest first, to the currently smallest factor; the result is sorted
    in decreasing order (e.g. ``balanced_factors(32, 3) == (4, 4, 2)``).  Factors of 1 appear
    when ``n`` has fewer than ``k`` prime factors.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k (number of factors) must be a positive int, got {k!r}")
    buckets = [1] * k
    for p in sorted(_prime_factors(n), reverse=True):
        i = min(range(k), key=buckets.__getitem__)
        buckets[i] *= p
    return tuple(sorted(buckets, reverse=True))


def _check_modes(weight: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int]) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D (out, in) matrix, got shape {tuple(weight.shape)}")
    if math.prod(in_modes) != weight.shape[1] or math.prod(out_modes) != weight.shape[0]:
        raise ValueError(
            f"modes do not match the weight: in_modes {tuple(in_modes)} (product {math.prod(in_modes)}) "
            f"and out_modes {tuple(out_modes)} (product {math.prod(out_modes)}) vs weight (out, in) = "
            f"{tuple(weight.shape)}"
        )


def matrix_to_tensor(weight: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int]) -> torch.Tensor:
    """``(out, in)`` weight -> tensor of shape ``(*in_modes, *out_modes)``.

    The matrix is transposed first, so that each tensor mode is a genuine sub-axis of the
    input (or output) features, and only then reshaped.
    """
    _check_modes(weight, in_modes, out_modes)
    return weight.t().reshape(*in_modes, *out_modes)


def tensor_to_matrix(tensor: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`matrix_to_tensor`: ``(*in_modes, *out_modes)`` -> ``(out, in)``."""
    n_in, n_out = math.prod(in_modes), math.prod(out_modes)
    if tuple(tensor.shape) != (*in_modes, *out_modes):
        raise ValueError(f"tensor shape {tuple(tensor.shape)} != in_modes + out_modes "
                         f"{(*in_modes, *out_modes)}")
    return tensor.reshape(n_in, n_out).t()
