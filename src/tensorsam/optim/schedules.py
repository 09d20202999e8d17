"""Schedules for the strength alpha_t of DAS and BAR.

Each schedule is one function ``f(alpha0, t, total_steps) -> float`` of the python step
counter ``t`` (steps already taken), so evaluating it never touches a device.  BAR recommends
a decreasing alpha_t (linear or cosine, ``papers/bar-algorithms.md``); the authors' tensor
completion code decays DAS's alpha linearly to 0 (the paper's tensor-completion experiment).
"""

from __future__ import annotations

import math

import torch


def constant(alpha0: float, t: int, total_steps: int | None) -> float:
    """alpha_t = alpha0."""
    return alpha0


def linear(alpha0: float, t: int, total_steps: int | None) -> float:
    """alpha_t = alpha0 * (1 - t/T), reaching 0 at t = T and staying there."""
    return alpha0 * max(0.0, 1.0 - t / total_steps)


def cosine(alpha0: float, t: int, total_steps: int | None) -> float:
    """alpha_t = alpha0 * (1 + cos(pi * t/T)) / 2, reaching 0 at t = T and staying there."""
    return alpha0 * 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))


SCHEDULES = {"constant": constant, "linear": linear, "cosine": cosine}


def get_schedule(name: str, total_steps: int | None = None):
    """The schedule function called ``name``; checks that decaying ones get ``total_steps``.

    Unknown names raise a ``ValueError`` listing the valid ones.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown alpha_schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    bad_total = isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0
    if name != "constant" and bad_total:
        raise ValueError(f"alpha_schedule={name!r} decays to 0 over total_steps, which must be a positive "
                         f"int, got {total_steps!r}")
    return SCHEDULES[name]


def schedule_table(schedule, total_steps: int | None, like: torch.Tensor) -> torch.Tensor:
    """``f(1, t, T)`` for t = 0..T as a 1-D tensor on ``like``'s device and dtype (one entry when
    ``total_steps`` is ``None``, the constant schedule).  Every schedule stays at f(1, T, T) after
    T, so entry ``min(t, T)`` is alpha_t / alpha at any step t: a compiled step can look it up from
    a device step counter (:func:`table_lookup`) instead of taking a new host value each step."""
    n = 0 if total_steps is None else total_steps
    return torch.tensor([schedule(1.0, t, total_steps) for t in range(n + 1)], dtype=like.dtype, device=like.device)


def table_lookup(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Entry ``min(t, len - 1)`` of a :func:`schedule_table` as a 1-element tensor (``t``: a 0-dim
    integer tensor; ``index_select``, as ``table[t]`` breaks a ``torch.compile`` graph)."""
    return table.index_select(0, t.clamp(max=table.numel() - 1).reshape(1))
