"""Completion metrics on a set of entries (training, validation or held-out).

Each takes the predicted and true values of the entries of one set (1-D tensors, gathered
with the set's flat indices) and returns a python float.
"""

from __future__ import annotations

import torch


def r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean-centred coefficient of determination, R^2 = 1 - sum (x^ - x)^2 / sum (x - mean x)^2,
    as the appendix defines it (the mean is that of the set's true values)."""
    pred, target = pred.double(), target.double()
    ss_res = (pred - target).square().sum()
    ss_tot = (target - target.mean()).square().sum()
    return float(1.0 - ss_res / ss_tot)


def r2_uncentred(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The authors' code's score, 1 - ||X^ - X||^2 / ||X||^2 (no centring)."""
    pred, target = pred.double(), target.double()
    return float(1.0 - (pred - target).square().sum() / target.square().sum())


def rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Root mean squared error over the set's entries."""
    return float((pred.double() - target.double()).square().mean().sqrt())


def scores(pred: torch.Tensor, target: torch.Tensor, prefix: str) -> dict[str, float]:
    """``{prefix}_r2``, ``{prefix}_r2_uncentred`` and ``{prefix}_rmse`` of one set of entries."""
    if pred.numel() == 0:
        return {}
    return {
        f"{prefix}_r2": r2(pred, target),
        f"{prefix}_r2_uncentred": r2_uncentred(pred, target),
        f"{prefix}_rmse": rmse(pred, target),
    }
