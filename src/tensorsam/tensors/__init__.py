"""Factorized tensors, one module per format (see :mod:`tensorsam.tensors.base`)."""

from .base import FORMATS, FactorizedTensor, get_format, register, validate_rank, validate_shape

__all__ = ["FORMATS", "FactorizedTensor", "get_format", "register", "validate_rank", "validate_shape"]
