"""LoRETTA's tensor-trains: the shape rule, parameter counts, the default TT rank, and the module.

LoRETTA as the authors ran it (``loretta_rep``; Yang et al., NAACL 2024; DAS paper appendix B,
"Finetuning with LoRETTA") keeps LoRA's structure ΔW = s·B·A, s = α/r, but stores A (in→r) and
B (r→out) each as a tensor-train over the flattened matrix, TT ranks [1, R, …, R, 1].

**Shape rule.**  A's train has the modes ``factors(in) + factors(r)``, B's ``factors(out) +
factors(r)``, where ``factors(n)`` splits n into factors of at most 16, in decreasing order:

- 3 factors for n < 16³ = 4096, 4 for 4096 ≤ n ≤ 16⁴ (more beyond; fewer when n has fewer
  prime factors, one more when that many cannot all be ≤ 16), and ``factors(r) = (r,)`` for r ≤ 16;
- as many leading 16s as leave a feasible rest, then the rest split as evenly as possible.

So 384 → (16, 6, 4), 768 → (16, 16, 3), 1024 → (16, 16, 4), 4096 → (16, 16, 4, 4): with r = 8
OPT-6.7B's query gets the 5-core trains the authors report (modes [16, 16, 4, 4] and 8).  The
first core costs R·n₁ parameters and each later one R²·n_k, which is why large factors go first.
A size with a prime factor above 16 has no such split; pass ``tt_factors={n: [...]}``.

**Default TT rank**: the largest R at which A's and B's trains together have no more
parameters than LoRA of rank r, r·(in + out) (at least 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import opt_einsum
import torch
from torch import nn

from tensorsam.tensors.contract import contract, contraction_plan

MAX_FACTOR = 16


def _prime_count(n: int) -> int:
    """Number of prime factors of n, with multiplicity."""
    count, p = 0, 2
    while p * p <= n:
        while n % p == 0:
            n //= p
            count += 1
        p += 1
    return count + (n > 1)


@cache
def _balanced(n: int, k: int, cap: int) -> tuple[int, ...] | None:
    """n as k factors in [2, cap], decreasing, with the smallest first factor (then second, ...);
    None if there is none."""
    if k == 0:
        return () if n == 1 else None
    if k == 1:
        return (n,) if 2 <= n <= cap else None
    for f in range(max(2, math.ceil(n ** (1 / k) - 1e-9)), min(cap, n) + 1):
        if n % f == 0:
            rest = _balanced(n // f, k - 1, f)
            if rest is not None:
                return (f, *rest)
    return None


def tt_factors(n: int, k: int | None = None) -> tuple[int, ...]:
    """``n`` split by the shape rule (module docs): decreasing factors of at most 16, leading 16s
    first, the rest as even as possible.  ``k`` forces the number of factors; without it, 3 (or 4
    from 4096 on), or one more where that many cannot be at most 16 (4000 → (16, 10, 5, 5))."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"a layer size must be a positive int, got {n!r}")
    if n == 1:
        return (1,)
    primes = _prime_count(n)
    if k is None:
        k = 3 if n < MAX_FACTOR ** 3 else max(4, math.ceil(math.log(n, MAX_FACTOR) - 1e-12))
        candidates = range(min(k, primes), primes + 1)
    else:
        candidates = [k]
    for kk in candidates:
        for sixteens in range(kk, -1, -1):
            if n % MAX_FACTOR ** sixteens:
                continue
            rest = _balanced(n // MAX_FACTOR ** sixteens, kk - sixteens, MAX_FACTOR)
            if rest is not None:
                return (MAX_FACTOR,) * sixteens + rest
    raise ValueError(f"cannot split {n} into factors of at most {MAX_FACTOR} (a prime factor is larger); "
                     f"pass tt_factors={{{n}: [...]}} or leave the layer out (exclude_modules)")


def rank_factors(r: int) -> tuple[int, ...]:
    """The modes of the rank index: (r,) for r ≤ 16, else r split like a layer size (or (r,))."""
    if r <= MAX_FACTOR:
        return (r,)
    try:
        return tt_factors(r, max(2, math.ceil(math.log(r, MAX_FACTOR) - 1e-12)))
    except ValueError:
        return (r,)


def loretta_shapes(in_features: int, out_features: int, r: int,
                   overrides: dict[int, Sequence[int]] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The mode sizes of A's train (in-factors, then r-factors) and B's (out-factors, then r-factors)."""
    overrides = overrides or {}

    def split(n):
        if n in overrides:
            f = tuple(int(x) for x in overrides[n])
            if math.prod(f) != n or any(x <= 0 for x in f):
                raise ValueError(f"tt_factors[{n}] = {list(f)} does not multiply to {n}")
            return f
        return tt_factors(n)

    rf = rank_factors(r)
    return split(in_features) + rf, split(out_features) + rf


def tt_params(shape: Sequence[int], rank: int) -> int:
    """Parameters of a tensor-train with modes ``shape`` and ranks [1, R, …, R, 1]."""
    bonds = [1] + [rank] * (len(shape) - 1) + [1]
    return sum(bonds[k] * n * bonds[k + 1] for k, n in enumerate(shape))


def lora_params(in_features: int, out_features: int, r: int) -> int:
    """LoRA: A (r×in) and B (out×r)."""
    return r * (in_features + out_features)


def flora_params(in_features: int, out_features: int, r: int) -> int:
    """FLoRA: LoRA's A and B plus the r×r core G."""
    return r * (in_features + out_features) + r * r


def loretta_params(in_features: int, out_features: int, r: int, tt_rank: int,
                   overrides: dict[int, Sequence[int]] | None = None) -> int:
    """LoRETTA: the parameters of A's and B's trains at TT rank ``tt_rank``."""
    a, b = loretta_shapes(in_features, out_features, r, overrides)
    return tt_params(a, tt_rank) + tt_params(b, tt_rank)


def default_tt_rank(in_features: int, out_features: int, r: int,
                    overrides: dict[int, Sequence[int]] | None = None) -> int:
    """The largest TT rank R ≥ 1 whose two trains have no more parameters than LoRA of rank r."""
    a, b = loretta_shapes(in_features, out_features, r, overrides)
    budget = lora_params(in_features, out_features, r)
    rank = 1
    while tt_params(a, rank + 1) + tt_params(b, rank + 1) <= budget:
        rank += 1
    return rank


class TensorTrain(nn.Module):
    """A matrix stored as a tensor-train: modes ``shape``, the first ``split`` of them the row index.

    Core k (``core{k}``) has shape (R_{k-1}, n_k, R_k) with R_0 = R_d = 1; :meth:`matrix` contracts
    them along an opt_einsum path found once (``tensorsam.tensors.contract``), so only the
    (rows × cols) matrix is formed, never anything of the adapted layer's size.
    """

    def __init__(self, shape: Sequence[int], rank: int, split: int, dtype=None, device=None):
        super().__init__()
        self.shape, self.rank, self.split = tuple(int(n) for n in shape), int(rank), int(split)
        if not 0 < self.split < len(self.shape):
            raise ValueError(f"split must leave modes on both sides, got {split} for shape {self.shape}")
        bonds = [1] + [self.rank] * (len(self.shape) - 1) + [1]
        for k, n in enumerate(self.shape):
            self.register_parameter(f"core{k}", nn.Parameter(
                torch.zeros(bonds[k], n, bonds[k + 1], dtype=dtype, device=device)))
        d, sym = len(self.shape), opt_einsum.get_symbol
        ins = ",".join(sym(d + k) + sym(k) + sym(d + k + 1) for k in range(d))
        self._plan = contraction_plan(f"{ins}->{''.join(sym(k) for k in range(d))}",
                                      [(bonds[k], n, bonds[k + 1]) for k, n in enumerate(self.shape)])

    @property
    def cores(self) -> list[nn.Parameter]:
        return [getattr(self, f"core{k}") for k in range(len(self.shape))]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:self.split])

    def matrix(self) -> torch.Tensor:
        """The (prod of the first ``split`` modes) × (prod of the rest) matrix."""
        return contract(self.cores, self._plan).reshape(self.rows, -1)

    @torch.no_grad()
    def init_normal_(self, std: float, generator: torch.Generator | None = None) -> None:
        """Gaussian cores, then each scaled by the same factor so that the matrix's entries have
        root-mean-square exactly ``std`` (its entries share cores, so an unscaled draw's overall
        size varies a lot between draws)."""
        for core in self.cores:
            core.normal_(0.0, 1.0, generator=generator)
        rms = self.matrix().square().mean().sqrt()
        factor = (std / rms) ** (1 / len(self.shape)) if rms > 0 else 0.0
        for core in self.cores:
            core.mul_(factor)

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, rank={self.rank}, split={self.split}"
