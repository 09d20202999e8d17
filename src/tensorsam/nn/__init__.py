"""Tensorized layers on top of :mod:`tensorsam.tensors`: Linear and Conv2d in any format,
one ``forward_mode='auto'`` default, the unified initialisation, and :func:`tensorize`."""

from .init import kaiming_variance
from .layers import FORWARD_MODES, TensorizedConv2d, TensorizedLinear
from .layout import default_modes
from .tensorize import TensorizeSummary, count_parameters, tensorize

__all__ = ["FORWARD_MODES", "TensorizeSummary", "TensorizedConv2d", "TensorizedLinear", "count_parameters",
           "default_modes", "kaiming_variance", "tensorize"]
