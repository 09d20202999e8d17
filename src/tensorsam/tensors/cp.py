"""CP (CANDECOMP/PARAFAC) format."""

from __future__ import annotations

import torch
from tensorly.cp_tensor import CPTensor
from tensorly.decomposition import parafac

from .base import FactorizedTensor, check_dense, register, tensorly_pytorch, validate_rank, validate_shape


@register("cp")
class CP(FactorizedTensor):
    """T[i_1..i_N] = sum_r prod_k U_k[i_k, r].

    ``rank`` is the single CP rank R (an int, or a one-element sequence).  ``cores`` are the
    N factor matrices U_k of shape (I_k, R).  There is **no weights vector**: a scale per
    component would be a further core outside the scale-invariant group, so it is absorbed
    into the factors (see :meth:`from_dense`).  Phi = R.
    """

    def __init__(self, shape, rank, dtype=None, device=None):
        super().__init__()
        self.shape = validate_shape(shape)
        (self.rank,) = validate_rank(rank, 1, form="the CP rank R")
        self._build([(i, self.rank) for i in self.shape], dtype=dtype, device=device)

    @property
    def num_rank_combinations(self) -> int:
        return self.rank

    def subscripts(self):
        n = self.order
        return [(k, n) for k in range(n)], tuple(range(n))

    @classmethod
    def from_dense(cls, tensor, rank, n_iter_max: int = 100, tol: float = 1e-8, init: str = "svd",
                   random_state=None, **kwargs) -> CP:
        """CP-ALS by tensorly's ``parafac`` (extra ``kwargs`` go to it).

        tensorly's weights w_r are absorbed by multiplying column r of every factor by
        |w_r|^(1/N), and the first factor also by sign(w_r), so the tensor is unchanged.
        tensorly's SVD initialisation needs R <= every mode size; above that, ``init='svd'``
        falls back to ``'random'`` (seeded with ``random_state``, 0 if None).
        """
        tensor = check_dense(tensor)
        (r,) = validate_rank(rank, 1, form="the CP rank R")
        if init == "svd" and r > min(tensor.shape):
            init, random_state = "random", 0 if random_state is None else random_state
        with tensorly_pytorch():
            weights, factors = parafac(tensor, r, n_iter_max=n_iter_max, tol=tol, init=init,
                                       random_state=random_state, **kwargs)
        n = tensor.ndim
        scale = weights.abs() ** (1.0 / n)
        factors = [f * scale for f in factors]
        factors[0] = factors[0] * torch.where(weights < 0, -1.0, 1.0).to(weights)
        return cls.around(factors, tensor.shape, r, dtype=tensor.dtype, device=tensor.device)

    def _to_tensorly(self, cores):
        return CPTensor((torch.ones(self.rank, dtype=cores[0].dtype, device=cores[0].device), cores))
