"""Tensor-Ring (TR) format."""

from __future__ import annotations

import math

from tensorly.decomposition import tensor_ring
from tensorly.tr_tensor import TRTensor

from .base import (
    FactorizedTensor,
    bond_subscripts,
    check_dense,
    register,
    tensorly_pytorch,
    validate_rank,
    validate_shape,
)

TR_RANK_FORM = "the N ring ranks r_0..r_{N-1}; core k is (r_k, I_k, r_{k+1 mod N})"


@register("tr")
class TR(FactorizedTensor):
    """T[i_1..i_N] = trace(G_1[:, i_1, :] G_2[:, i_2, :] ... G_N[:, i_N, :]).

    ``rank`` is the N ring ranks (r_0..r_{N-1}), or an int for all of them.  Core k has shape
    (r_k, I_k, r_{(k+1) mod N}), as in tensorly's ``tr_to_tensor`` (whose rank lists repeat r_0
    at the end).  Phi = prod_k r_k.
    """

    def __init__(self, shape, rank, dtype=None, device=None):
        super().__init__()
        self.shape = validate_shape(shape)
        n = len(self.shape)
        self.rank = validate_rank(rank, n, form=TR_RANK_FORM)
        self._build([(self.rank[k], i, self.rank[(k + 1) % n]) for k, i in enumerate(self.shape)],
                    dtype=dtype, device=device)

    @property
    def num_rank_combinations(self) -> int:
        return math.prod(self.rank)

    def subscripts(self):
        n = self.order
        return bond_subscripts([(k,) for k in range(n)], n, ring=True), tuple(range(n))

    @classmethod
    def from_dense(cls, tensor, rank, mode: int = 0, svd: str = "truncated_svd", random_state=None) -> TR:
        """TR-SVD by tensorly's ``tensor_ring`` (starting at ``mode``).  Ranks the unfoldings cannot
        support are capped, so the result's ``rank`` may be smaller than asked; tensorly refuses
        r_mode * r_{mode+1} larger than the first unfolding."""
        tensor = check_dense(tensor)
        ranks = validate_rank(rank, tensor.ndim, form=TR_RANK_FORM)
        with tensorly_pytorch():
            cores = list(tensor_ring(tensor, [*ranks, ranks[0]], mode=mode, svd=svd, random_state=random_state))
        return cls.around(cores, tensor.shape, tuple(int(c.shape[0]) for c in cores), dtype=tensor.dtype,
                          device=tensor.device)

    def _to_tensorly(self, cores):
        return TRTensor(cores)
