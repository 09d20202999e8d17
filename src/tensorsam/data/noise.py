"""Seeded label operations: stratified splits, symmetric label noise, a stable hash of labels."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch

_NOISE_STREAM = 0x6E6F6973  # keeps the noise stream apart from the split streams of the same seed


@dataclasses.dataclass(frozen=True)
class NoisyLabels:
    """Labels after :func:`symmetric_label_noise`.

    ``noisy`` and ``clean`` are int64 tensors on the input's device, ``flipped`` a bool mask
    (``noisy != clean`` exactly), ``sha256`` the :func:`labels_sha256` of ``noisy``.
    """

    noisy: torch.Tensor
    clean: torch.Tensor
    flipped: torch.Tensor
    sha256: str

    @property
    def n_flipped(self) -> int:
        return int(self.flipped.sum())


def labels_sha256(labels: torch.Tensor | np.ndarray) -> str:
    """sha256 hex digest of the labels as little-endian int64 bytes: stable across devices and dtypes."""
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return hashlib.sha256(np.ascontiguousarray(arr, dtype="<i8").tobytes()).hexdigest()


def symmetric_label_noise(labels: torch.Tensor, p: float, seed: int, num_classes: int) -> NoisyLabels:
    """Flip exactly ``round(p * n)`` labels (Python's ``round``), each to a different class drawn uniformly.

    Which labels flip and their new classes depend only on ``(labels, p, seed, num_classes)``
    (numpy's ``default_rng``; no global random state).  ``p = 0`` returns the labels unchanged.
    Apply it to each split separately; test labels stay clean.
    """
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"label noise rate must be in [0, 1], got {p}")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-d tensor, got shape {tuple(labels.shape)}")
    y = labels.detach().cpu().numpy().astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    k = round(float(p) * y.size)
    if k and num_classes < 2:
        raise ValueError("label noise needs at least two classes")
    noisy = y.copy()
    if k:
        rng = np.random.default_rng([int(seed), _NOISE_STREAM])
        idx = rng.choice(y.size, size=k, replace=False)
        noisy[idx] = (y[idx] + rng.integers(1, num_classes, size=k)) % num_classes
    noisy_t = torch.from_numpy(noisy).to(labels.device)
    clean_t = torch.from_numpy(y).to(labels.device)
    return NoisyLabels(noisy=noisy_t, clean=clean_t, flipped=noisy_t != clean_t, sha256=labels_sha256(noisy))


def stratified_split(
    labels: torch.Tensor, size: int, seed: int, stream: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices ``(rest, taken)`` with exactly ``size`` taken, every class in proportion.

    Class quotas are ``size * n_c / n`` rounded by largest remainder (ties to the lower class);
    the members of each class are drawn with ``numpy.random.default_rng([seed, stream])``.
    """
    y = labels.cpu().numpy()
    n = len(y)
    if not 0 <= size <= n:
        raise ValueError(f"split size must be in [0, {n}], got {size}")
    classes, counts = np.unique(y, return_counts=True)
    quota, remainder = np.divmod(counts * size, n)
    quota[np.argsort(-remainder, kind="stable")[: size - int(quota.sum())]] += 1
    rng = np.random.default_rng([int(seed), int(stream)])
    taken = np.zeros(n, dtype=bool)
    for c, q in zip(classes, quota):
        taken[rng.permutation(np.flatnonzero(y == c))[:q]] = True
    return torch.from_numpy(np.flatnonzero(~taken)), torch.from_numpy(np.flatnonzero(taken))
