"""Frobenius norms of lists of tensors, and the core -> group index: the one place both are made.

:func:`norms` takes one of three paths, none of which reads a device value:

- ``foreach=False``: one ``vector_norm`` per tensor (the path ``torch.compile`` traces);
- ``foreach=True``: one ``torch._foreach_norm`` over the list;
- ``foreach=True`` with a :class:`StackedLayout`: small CPU tensors of one shape are stacked and
  reduced in one ``vector_norm`` per shape, the rest go through ``_foreach_norm``.  On a CPU,
  per-tensor dispatch, not arithmetic, is what costs for hundreds of small cores.

Half and bfloat16 tensors are reduced in float32 (:func:`acc_dtype`).  Norms of tensors of
several dtypes or devices are returned in the promoted dtype on the first tensor's device.

**Sharded tensors (DTensor, e.g. FSDP2's parameters and gradients).**  With a :class:`Sharding`,
:func:`norms` takes each DTensor's local tensor, computes every squared norm locally (a partial
sum over this rank's shard for a sharded tensor, the whole value for a replicated or plain one),
and completes the partial sums in **one** ``all_reduce`` of the stacked vector over the mesh's
process group (one per distinct group when tensors are sharded over several).  A replicated or
plain tensor's entry is left out of the sum, so it is not counted world-size times.  Which
entries are summed is decided once, when the :class:`Sharding` is built; without a DTensor
nothing of this runs (:meth:`Sharding.of` gives ``None``).
"""

from __future__ import annotations

import sys
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


def dtensor_class() -> type | None:
    """``DTensor`` if ``torch.distributed.tensor`` has been imported, else ``None`` (then no DTensor
    can exist, and nothing is imported to find out)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def local_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each DTensor's local tensor (the very tensor its storage lives in: in-place ops on it change
    the DTensor); other tensors as they are."""
    cls = dtensor_class()
    if cls is None:
        return list(tensors)
    return [t._local_tensor if isinstance(t, cls) else t for t in tensors]


class Sharding:
    """Which squared norms of lists laid out like ``like`` are partial sums over shards, and the
    process groups that complete them (see the module docstring).

    A DTensor entry with a ``Shard`` placement on mesh dimension d is summed over that dimension's
    process group; ``Replicate`` placements add nothing; a ``Partial`` placement (a pending sum of
    whole tensors, whose norm is not a sum of local norms) is refused.  Build it with :meth:`of`,
    once per list layout."""

    def __init__(self, like: Sequence[torch.Tensor]):
        cls = dtensor_class()
        n, masks = len(like), {}
        for i, t in enumerate(like):
            if cls is None or not isinstance(t, cls):
                continue
            for dim, placement in enumerate(t.placements):
                if placement.is_partial():
                    raise NotImplementedError(
                        f"norms of a DTensor with a Partial placement ({t.placements}) are not sums of local "
                        "norms; redistribute it to Shard or Replicate first")
                if placement.is_shard():
                    masks.setdefault(t.device_mesh.get_group(dim), [False] * n)[i] = True
        device = local_tensors(like[:1])[0].device if n else None
        # (group, mask): mask None when every entry is summed over that group
        self.reductions = [(group, None if all(mask) else torch.tensor(mask, device=device))
                           for group, mask in masks.items()]

    @classmethod
    def of(cls, like: Sequence[torch.Tensor]) -> Sharding | None:
        """A :class:`Sharding` if ``like`` holds a DTensor, else ``None`` (the one-process path)."""
        dt = dtensor_class()
        if dt is None or not any(isinstance(t, dt) for t in like):
            return None
        return cls(like)

    def reduce(self, sq: torch.Tensor) -> torch.Tensor:
        """Complete local squared norms ``sq`` (1-D, one per entry): one ``all_reduce`` (sum) per
        process group, over the sharded entries only.  No host sync."""
        import torch.distributed as dist

        for group, mask in self.reductions:
            if mask is None:
                sq = sq.contiguous()
                dist.all_reduce(sq, group=group)
            else:
                part = torch.where(mask.to(sq.device), sq, torch.zeros((), dtype=sq.dtype, device=sq.device))
                dist.all_reduce(part, group=group)
                sq = torch.where(mask.to(sq.device), part, sq)
        return sq


class StackedLayout:
    """How :func:`norms` buckets lists laid out like ``like`` (same shapes, dtypes and devices per
    position): small CPU tensors by (shape, dtype), the rest apart.  Built once, reused per step.
    Of a DTensor, the local tensor's shape counts (the layout is this rank's)."""

    def __init__(self, like: Sequence[torch.Tensor]):
        like = local_tensors(like)
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
          squared: bool = False, sharding: Sharding | None = None) -> torch.Tensor:
    """1-D tensor of the Frobenius norms of ``tensors`` (squared with ``squared=True``).

    ``foreach`` picks the multi-tensor path, ``layout`` (a :class:`StackedLayout` of lists laid
    out like ``tensors``) the stacked one.  ``sharding`` (a :class:`Sharding` of lists laid out
    like ``tensors``) gives the global norms of DTensors: local squared norms, then one
    all-reduce.  No host sync on any path.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("norms of an empty list of tensors")
    if sharding is not None:
        sq = sharding.reduce(norms(local_tensors(tensors), foreach, layout, squared=True))
        return sq if squared else sq.sqrt()
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
