"""Factorized tensors, one module per format (see :mod:`tensorsam.tensors.base`)."""

from .base import FORMATS, FactorizedTensor, get_format, register, validate_rank, validate_shape
from .cp import CP
from .shapes import balanced_factors, matrix_to_tensor, tensor_to_matrix
from .tr import TR
from .tt import TT
from .ttm import TTM
from .tucker import Tucker

__all__ = ["CP", "FORMATS", "TR", "TT", "TTM", "FactorizedTensor", "Tucker", "balanced_factors",
           "get_format", "matrix_to_tensor", "register", "tensor_to_matrix", "validate_rank", "validate_shape"]
