"""Frobenius norms of lists of tensors, and the core -> group index: the one place both are made.

:func:`norms` takes one of three paths, none of which reads a device value:

- ``foreach=False``: one ``vector_norm`` per tensor (the path ``torch.compile`` traces);
- ``foreach=True``: one ``torch._foreach_norm`` over the list;
- ``foreach=True`` with a :class:`StackedLayout`: small CPU tensors of one shape are stacked and
  reduced in one ``vector_norm`` per shape, the rest go through ``_foreach_norm``.  On a CPU,
  per-tensor dispatch, not arithmetic, is what costs for hundreds of small cores.

Half and bfloat16 tensors are reduced in float32 (:func:`acc_dtype`).  Norms of tensors of
several dtypes or devices are returned in the promoted dtype on the first tensor's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)

# A CPU tensor up to STACK_MAX_NUMEL entries is stacked with the others of its shape, if that
# shape is shared by at least STACK_MIN_COUNT tensors (fewer are not worth a reduction of their own).
STACK_MAX_NUMEL = 1 << 16
STACK_MIN_COUNT = 4


def acc_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """float32 for half and bfloat16, whose ~3 significant digits would swamp differences such as
    gamma_k - gamma_bar; else ``None`` (the tensor's own dtype)."""
    return torch.float32 if dtype in LOW_PRECISION else None


class StackedLayout:
    """How :func:`norms` buckets lists laid out like ``like`` (same shapes, dtypes and devices per
    position): small CPU tensors by (shape, dtype), the rest apart.  Built once, reused per step."""

    def __init__(self, like: Sequence[torch.Tensor]):
        buckets: dict = {}
        self.rest = []
        for i, t in enumerate(like):
            if t.device.type == "cpu" and 0 < t.numel() <= STACK_MAX_NUMEL:
                buckets.setdefault((tuple(t.shape), t.dtype), []).append(i)
            else:
                self.rest.append(i)
        for key in [k for k, b in buckets.items() if len(b) < STACK_MIN_COUNT]:
            self.rest.extend(buckets.pop(key))
        self.buckets = list(buckets.values())
        self.dtypes = [acc_dtype(dtype) for _, dtype in buckets]
        order = [i for b in self.buckets for i in b] + self.rest
        inverse = [0] * len(order)
        for pos, i in enumerate(order):
            inverse[i] = pos
        self.device = like[0].device
        self.inverse = None if order == sorted(order) else torch.tensor(inverse, device=self.device)


def _gather(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stack 0-dim (or concatenate 1-D) ``parts``, moved to the first one's device and to the
    promoted dtype when they differ (decided from attributes, not values)."""
    first = parts[0]
    dtype = first.dtype
    for t in parts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if any(t.device != first.device or t.dtype != dtype for t in parts):
        parts = [t.to(device=first.device, dtype=dtype) for t in parts]
    return torch.stack(parts) if first.dim() == 0 else torch.cat(parts)


def norms(tensors: Sequence[torch.Tensor], foreach: bool = True, layout: StackedLayout | None = None,
          squared: bool = False) -> torch.Tensor:
    """1-D tensor of the Frobenius norms of ``tensors`` (squared with ``squared=True``).

    ``foreach`` picks the multi-tensor path, ``layout`` (a :class:`StackedLayout` of lists laid
    out like ``tensors``) the stacked one.  No host sync on any path.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("norms of an empty list of tensors")
    if layout is not None and foreach:
        parts = [torch.linalg.vector_norm(torch.stack([tensors[i] for i in b]).reshape(len(b), -1), dim=1,
                                          dtype=dt) for b, dt in zip(layout.buckets, layout.dtypes)]
        if layout.rest:
            parts.append(norms([tensors[i] for i in layout.rest], True))
        out = parts[0].to(layout.device) if len(parts) == 1 else _gather(parts)
        if layout.inverse is not None:
            out = out[layout.inverse]
    elif foreach and not any(t.dtype in LOW_PRECISION for t in tensors):
        out = _gather(list(torch._foreach_norm(tensors)))
    else:
        out = _gather([torch.linalg.vector_norm(t, dtype=acc_dtype(t.dtype)) for t in tensors])
    return out.square() if squared else out


def segments(sizes: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seg, counts)`` for groups of ``sizes`` cores laid end to end: ``seg[k]`` is the group of
    core k and ``counts`` the number of cores of each group (int64, on ``device``)."""
    seg = torch.tensor([i for i, n in enumerate(sizes) for _ in range(n)], dtype=torch.int64, device=device)
    return seg, torch.tensor(list(sizes), dtype=torch.int64, device=device)
