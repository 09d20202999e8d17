"""Contraction plans: an einsum equation's opt_einsum path, replayed as pairwise ``torch.einsum`` steps.

The path is found once per operand shapes (exhaustively for up to four operands, by dynamic
programming beyond); replaying it with plain ``torch.einsum`` keeps the contraction traceable by
``torch.compile`` (an opt_einsum expression is not, e.g. for a Tensor-Ring with a dynamic number
of gathered entries) and makes its result a function of the plan alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import opt_einsum
import torch


class ContractionPlan(NamedTuple):
    """Pairwise steps ``((i, j), 'ab,bc->ac')`` (operand positions, popped highest first) and the
    final single-operand equation."""

    steps: list
    final: str


def contraction_plan(equation: str, shapes: Sequence[Sequence[int]]) -> ContractionPlan:
    """The plan of ``equation`` for operands of ``shapes``."""
    optimize = "optimal" if len(shapes) <= 4 else "dp"
    path, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimize)
    ins, out = equation.split("->")
    ops = ins.split(",")
    steps = []
    for pair in path:
        pair = sorted(pair, reverse=True)
        taken = [ops.pop(i) for i in pair]
        rest = "".join(ops) + out
        keep = "".join(dict.fromkeys(c for c in "".join(taken) if c in rest))
        steps.append((tuple(pair), ",".join(taken) + "->" + keep))
        ops.append(keep)
    return ContractionPlan(steps, f"{ops[0]}->{out}")


def contract(operands: Sequence[torch.Tensor], plan: ContractionPlan) -> torch.Tensor:
    """Replay ``plan`` on ``operands``."""
    ops = list(operands)
    for pair, eq in plan.steps:
        ops.append(torch.einsum(eq, *[ops.pop(i) for i in pair]))
    return torch.einsum(plan.final, ops[0])
