"""Tucker format."""

from __future__ import annotations

import math
import numbers

from tensorly.decomposition import tucker
from tensorly.tucker_tensor import TuckerTensor

from .base import FactorizedTensor, check_dense, register, tensorly_pytorch, validate_rank, validate_shape


def tucker_rank(shape: tuple[int, ...], rank) -> tuple[int, ...]:
    """Per-mode Tucker ranks: an int is capped at each mode size; an explicit rank larger
    than its mode raises a ``ValueError`` naming the mode."""
    ranks = validate_rank(rank, len(shape), form="the multilinear ranks R_1..R_N")
    if isinstance(rank, numbers.Integral):
        return tuple(min(r, i) for r, i in zip(ranks, shape))
    for k, (r, i) in enumerate(zip(ranks, shape)):
        if r > i:
            raise ValueError(f"rank R_{k + 1} = {r} exceeds the size {i} of mode {k}")
    return ranks


@register("tucker")
class Tucker(FactorizedTensor):
    """T = G x_1 U_1 x_2 ... x_N U_N.

    ``rank`` is the multilinear rank (R_1..R_N), or an int used for every mode (capped at the
    mode size).  ``cores`` are ``[G (R_1..R_N), U_1 (I_1, R_1), ..., U_N (I_N, R_N)]``: the
    core first, K = N + 1 cores in the group.  Phi = prod_k R_k.
    """

    def __init__(self, shape, rank, dtype=None, device=None):
        super().__init__()
        self.shape = validate_shape(shape)
        self.rank = tucker_rank(self.shape, rank)
        self._build([self.rank, *zip(self.shape, self.rank)], dtype=dtype, device=device)

    @property
    def num_rank_combinations(self) -> int:
        return math.prod(self.rank)

    def subscripts(self):
        n = self.order
        core = tuple(range(n, 2 * n))
        return [core, *((k, n + k) for k in range(n))], tuple(range(n))

    @classmethod
    def from_dense(cls, tensor, rank, method: str = "hooi", n_iter_max: int = 100, tol: float = 1e-4,
                   init: str = "svd", random_state=None, **kwargs) -> Tucker:
        """Tucker by tensorly's ``tucker``: ``method="hooi"`` (higher-order orthogonal iteration,
        up to ``n_iter_max`` sweeps) or ``"hosvd"`` (the truncated HOSVD, no sweeps)."""
        tensor = check_dense(tensor)
        ranks = tucker_rank(tuple(tensor.shape), rank)
        if method not in ("hooi", "hosvd"):
            raise ValueError(f"method must be 'hooi' or 'hosvd', got {method!r}")
        if method == "hosvd":
            n_iter_max, init = 0, "svd"
        with tensorly_pytorch():
            core, factors = tucker(tensor, list(ranks), n_iter_max=n_iter_max, tol=tol, init=init,
                                   random_state=random_state, **kwargs)
        return cls.around([core, *factors], tensor.shape, ranks, dtype=tensor.dtype, device=tensor.device)

    def _to_tensorly(self, cores):
        return TuckerTensor((cores[0], list(cores[1:])))
