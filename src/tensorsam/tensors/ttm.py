"""TT-matrix (TTM, a.k.a. MPO) format."""

from __future__ import annotations

import math

from tensorly.decomposition import tensor_train_matrix
from tensorly.tt_matrix import TTMatrix

from .base import (
    FactorizedTensor,
    bond_subscripts,
    check_dense,
    register,
    tensorly_pytorch,
    validate_rank,
    validate_shape,
)
from .tt import inner_ranks

TTM_RANK_FORM = "the d-1 inner TT-matrix ranks r_1..r_{d-1}; the boundary ranks r_0 = r_d = 1 are implicit"


@register("ttm")
class TTM(FactorizedTensor):
    """A matrix of shape (prod m_k, prod n_k) as a chain of 4-way cores (r_{k-1}, m_k, n_k, r_k).

    ``rank`` is the d-1 inner ranks, or an int for all of them.  As in tensorly's
    ``tt_matrix_to_tensor``, the tensor has shape ``(m_1..m_d, n_1..n_d)``: all row modes,
    then all column modes (labels ``row_labels`` = 0..d-1 and ``col_labels`` = d..2d-1), and
    :meth:`to_matrix` is its (prod m, prod n) reshape, equal to ``tt_matrix_to_matrix``.
    Phi = prod of the inner ranks.
    """

    def __init__(self, row_modes, col_modes, rank, dtype=None, device=None):
        super().__init__()
        self.row_modes = validate_shape(row_modes, "row_modes")
        self.col_modes = validate_shape(col_modes, "col_modes")
        d = len(self.row_modes)
        if len(self.col_modes) != d:
            raise ValueError(f"row_modes {self.row_modes} and col_modes {self.col_modes} must have the "
                             "same number of modes")
        self.shape = self.row_modes + self.col_modes
        self.row_labels, self.col_labels = tuple(range(d)), tuple(range(d, 2 * d))
        self.rank = validate_rank(rank, d - 1, form=TTM_RANK_FORM)
        r = (1, *self.rank, 1)
        self._build([(r[k], m, n, r[k + 1]) for k, (m, n) in enumerate(zip(self.row_modes, self.col_modes))],
                    dtype=dtype, device=device)

    @property
    def num_rank_combinations(self) -> int:
        return math.prod(self.rank)

    def subscripts(self):
        d = len(self.row_modes)
        return bond_subscripts(list(zip(self.row_labels, self.col_labels)), 2 * d), tuple(range(2 * d))

    def to_matrix(self):
        """The (prod row_modes, prod col_modes) matrix, as tensorly's ``tt_matrix_to_matrix``."""
        return self.reconstruct().reshape(math.prod(self.row_modes), math.prod(self.col_modes))

    @classmethod
    def from_dense(cls, tensor, rank, svd: str = "truncated_svd", random_state=None) -> TTM:
        """TT-matrix SVD by tensorly's ``tensor_train_matrix``.  ``tensor`` is in tensorly's layout
        ``(m_1..m_d, n_1..n_d)``.  Ranks an unfolding cannot support are capped by the SVD."""
        tensor = check_dense(tensor)
        if tensor.ndim % 2:
            raise ValueError(f"tensor must have an even number of modes (m_1..m_d, n_1..n_d), got shape "
                             f"{tuple(tensor.shape)}")
        d = tensor.ndim // 2
        ranks = validate_rank(rank, d - 1, form=TTM_RANK_FORM)
        with tensorly_pytorch():
            cores = list(tensor_train_matrix(tensor, [1, *ranks, 1], svd=svd, random_state=random_state))
        return cls.around(cores, tensor.shape[:d], tensor.shape[d:], inner_ranks(cores), dtype=tensor.dtype,
                          device=tensor.device)

    @classmethod
    def from_matrix(cls, matrix, row_modes, col_modes, rank, **kwargs) -> TTM:
        """:meth:`from_dense` of a (prod row_modes, prod col_modes) matrix.  Row index i is the
        row-major multi-index over ``row_modes`` (likewise for columns), so the matrix reshapes to
        ``(*row_modes, *col_modes)`` directly; tensorly then interleaves the modes by permutation."""
        matrix = check_dense(matrix, 2, "matrix")
        row_modes, col_modes = validate_shape(row_modes, "row_modes"), validate_shape(col_modes, "col_modes")
        if tuple(matrix.shape) != (math.prod(row_modes), math.prod(col_modes)):
            raise ValueError(f"matrix shape {tuple(matrix.shape)} does not match row_modes {row_modes} x "
                             f"col_modes {col_modes}")
        return cls.from_dense(matrix.reshape(*row_modes, *col_modes), rank, **kwargs)

    def _to_tensorly(self, cores):
        return TTMatrix(cores)

    def extra_repr(self) -> str:
        return f"row_modes={self.row_modes}, col_modes={self.col_modes}, " + super().extra_repr()
