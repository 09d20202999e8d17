"""Tensorized layers on top of :mod:`tensorsam.tensors`: Linear and Conv2d in any format,
one ``forward_mode='auto'`` default, the unified initialisation, and :func:`tensorize` (at a rank, or
to a compression ratio or reconstruction error: :mod:`.budget`)."""

from .budget import balance_cores_
from .init import kaiming_variance
from .layers import FORWARD_MODES, TensorizedConv2d, TensorizedLinear
from .layout import default_modes
from .tensorize import LayerRow, TensorizeSummary, count_parameters, tensorize

__all__ = ["FORWARD_MODES", "LayerRow", "TensorizeSummary", "TensorizedConv2d", "TensorizedLinear",
           "balance_cores_", "count_parameters", "default_modes", "kaiming_variance", "tensorize"]
