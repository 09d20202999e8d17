"""Seeded train / validation / held-out entry masks for tensor completion.

The training mask is exactly the authors' (their tensor-completion code): ``torch.manual_seed(seed)`` then
``torch.rand(shape) < train_fraction``.  We draw it from a private ``torch.Generator``
seeded the same way, which gives the same entries without touching the global RNG.
Validation entries are carved out of the training entries with a second generator whose
seed is derived from ``seed``, so a validation split never changes which entries are held
out, and ``val_fraction=0`` reproduces the paper's split exactly.  Masks are intersected
with the entries that exist in the data (``observed``).
"""

from __future__ import annotations

import dataclasses
import operator

import numpy as np
import torch

PROTOCOL = "torch.manual_seed(seed); train = torch.rand(shape) < train_fraction"


@dataclasses.dataclass
class Masks:
    """Disjoint boolean masks of training, validation and held-out entries."""

    train: torch.Tensor
    val: torch.Tensor
    heldout: torch.Tensor
    spec: dict

    def record(self) -> dict:
        """What to store in a results file: enough to re-create the masks, plus counts."""
        return {
            **self.spec,
            "n_train": int(self.train.sum()),
            "n_val": int(self.val.sum()),
            "n_heldout": int(self.heldout.sum()),
        }


def _check_fraction(value, name: str, low_open: bool) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = (0.0 < f < 1.0) if low_open else (0.0 <= f < 1.0)
    if not ok:
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return f


def val_seed_for(seed: int) -> int:
    """The seed of the validation generator, derived from the mask seed."""
    return int(np.random.SeedSequence([int(seed), 1]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def make_masks(
    shape, seed: int, train_fraction: float = 0.3, val_fraction: float = 0.0, observed=None
) -> Masks:
    """Split the entries of a tensor of ``shape`` into train / validation / held-out.

    ``train_fraction`` (in (0, 1)) is the chance an entry is drawn for training, as in the
    authors' code.  ``val_fraction`` (in [0, 1)) is the share *of those training entries*
    moved to validation.  ``observed`` (bool, same shape) removes missing entries from all three.
    """
    try:  # operator.index: a float entry such as 3.7 is refused, never truncated
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a non-empty sequence of positive ints, got {shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a non-empty sequence of positive ints, got {shape!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")  # noqa: TRY004
    tf = _check_fraction(train_fraction, "train_fraction", low_open=True)
    vf = _check_fraction(val_fraction, "val_fraction", low_open=False)
    if observed is None:
        observed = torch.ones(shape, dtype=torch.bool)
    else:
        observed = torch.as_tensor(observed)
        if observed.dtype != torch.bool or tuple(observed.shape) != shape:
            raise ValueError(
                f"observed must be a bool tensor of shape {shape}, got {observed.dtype} {tuple(observed.shape)}"
            )
        observed = observed.cpu()

    gen = torch.Generator().manual_seed(int(seed))
    drawn = torch.rand(shape, generator=gen) < tf
    heldout = ~drawn & observed
    train = drawn & observed
    val = torch.zeros(shape, dtype=torch.bool)
    vseed = None
    if vf > 0:
        vseed = val_seed_for(int(seed))
        vgen = torch.Generator().manual_seed(vseed)
        val = train & (torch.rand(shape, generator=vgen) < vf)
        train = train & ~val
        if not val.any():
            raise ValueError(f"val_fraction={vf} leaves no validation entries in a tensor of shape {shape}")
    if not train.any():
        raise ValueError(f"train_fraction={tf} leaves no training entries in a tensor of shape {shape}")
    spec = {
        "protocol": PROTOCOL,
        "seed": int(seed),
        "train_fraction": tf,
        "val_fraction": vf,
        "val_seed": vseed,
        "shape": list(shape),
    }
    return Masks(train=train, val=val, heldout=heldout, spec=spec)


def masks_from_record(record: dict, observed=None) -> Masks:
    """Re-create the masks stored by :meth:`Masks.record` (``observed`` as when they were made)."""
    try:
        return make_masks(
            record["shape"],
            record["seed"],
            record["train_fraction"],
            record.get("val_fraction", 0.0),
            observed,
        )
    except KeyError as err:
        raise ValueError(f"mask record lacks key {err.args[0]!r}") from None
