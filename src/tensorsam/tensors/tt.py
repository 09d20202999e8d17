"""Tensor-Train (TT, a.k.a. MPS) format."""

from __future__ import annotations

import math

from tensorly.decomposition import tensor_train
from tensorly.tt_tensor import TTTensor

from .base import (
    FactorizedTensor,
    bond_subscripts,
    check_dense,
    register,
    tensorly_pytorch,
    validate_rank,
    validate_shape,
)

TT_RANK_FORM = "the N-1 inner TT ranks r_1..r_{N-1}; the boundary ranks r_0 = r_N = 1 are implicit"


def inner_ranks(cores) -> tuple[int, ...]:
    """The inner bond sizes of a chain of cores (each core's last dimension but the last)."""
    return tuple(int(c.shape[-1]) for c in cores[:-1])


@register("tt")
class TT(FactorizedTensor):
    """T[i_1..i_N] = G_1[:, i_1, :] G_2[:, i_2, :] ... G_N[:, i_N, :].

    ``rank`` is the N-1 *inner* ranks (r_1..r_{N-1}), or an int used for all of them; the
    boundary ranks r_0 = r_N = 1 are not given.  Core k has shape (r_{k-1}, I_k, r_k), as in
    tensorly's ``tt_to_tensor``.  Phi = prod of the inner ranks.
    """

    def __init__(self, shape, rank, dtype=None, device=None):
        super().__init__()
        self.shape = validate_shape(shape)
        self.rank = validate_rank(rank, len(self.shape) - 1, form=TT_RANK_FORM)
        r = (1, *self.rank, 1)
        self._build([(r[k], i, r[k + 1]) for k, i in enumerate(self.shape)], dtype=dtype, device=device)

    @property
    def num_rank_combinations(self) -> int:
        return math.prod(self.rank)

    def subscripts(self):
        n = self.order
        return bond_subscripts([(k,) for k in range(n)], n), tuple(range(n))

    @classmethod
    def from_dense(cls, tensor, rank, svd: str = "truncated_svd", random_state=None) -> TT:
        """TT-SVD by tensorly's ``tensor_train``.  Ranks that exceed what an unfolding
        supports are capped by the SVD, so the result's ``rank`` may be smaller than asked."""
        tensor = check_dense(tensor)
        ranks = validate_rank(rank, tensor.ndim - 1, form=TT_RANK_FORM)
        if tensor.ndim == 1:  # a single core; tensorly's TT-SVD needs two modes
            return cls.around([tensor.reshape(1, -1, 1)], tensor.shape, (), dtype=tensor.dtype,
                              device=tensor.device)
        with tensorly_pytorch():
            cores = tensor_train(tensor, [1, *ranks, 1], svd=svd, random_state=random_state).factors
        return cls.around(cores, tensor.shape, inner_ranks(cores), dtype=tensor.dtype, device=tensor.device)

    def _to_tensorly(self, cores):
        return TTTensor(cores)
