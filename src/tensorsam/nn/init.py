"""Initialisation targets for tensorized layers."""

from __future__ import annotations

import math


def kaiming_variance(fan_in: int, gain: float = math.sqrt(2.0)) -> float:
    """Var(W) = gain^2 / fan_in: Kaiming's fan-in variance (2 / fan_in for ReLU nets).

    This is the target of the unified initialisation (Pan et al., ICML 2022): the
    format's ``reset_parameters(target_variance)`` draws its cores so that every entry of the
    reconstructed weight has this variance.  ``fan_in`` is ``in_features`` for a linear
    layer and ``C_in * k_h * k_w`` for a convolution.
    """
    if fan_in <= 0:
        raise ValueError(f"fan_in must be positive, got {fan_in}")
    return gain * gain / fan_in
