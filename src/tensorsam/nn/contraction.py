"""Pure contraction helpers shared by every tensorized layer.

A layer never knows which format it holds: it asks the factorized tensor for its integer
einsum labels (:meth:`FactorizedTensor.subscripts`), adds labels for the input's batch and
spatial axes, and lets opt_einsum pick a contraction path once.  The compiled expression
is cached by operand shapes, so the per-call cost is the pairwise contractions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import opt_einsum
import torch

# relative cost of moving one element vs one multiply-add, used by the FLOP+memory estimate
MEMORY_WEIGHT = 4.0


def equation(operand_labels: Sequence[Sequence[int]], out_labels: Sequence[int]) -> str:
    """Integer labels -> an einsum string (opt_einsum symbols, so any number of labels works)."""
    sym = opt_einsum.get_symbol
    return ",".join("".join(sym(i) for i in s) for s in operand_labels) + "->" + "".join(
        sym(i) for i in out_labels)


@dataclass
class Contraction:
    """A compiled opt_einsum expression plus its cost estimate (for ``forward_mode='auto'``).

    Calling it runs plain torch ops (``tensordot``/``bmm``), so autograd, double backward,
    ``torch.func`` transforms and every device work as for any torch code.
    """

    expression: opt_einsum.contract.ContractExpression
    flops: float
    memory: float
    out_shape: tuple[int, ...] | None = None  # reshape of the result, done inside the contraction

    def __call__(self, *operands: torch.Tensor) -> torch.Tensor:
        device = operands[0].device.type
        if torch.is_autocast_enabled(device):
            # tensordot is not an autocast op, and F.unfold's output may already be cast: follow
            # autocast as F.linear/F.conv2d do, so that every mode returns the same dtype
            dtype = torch.get_autocast_dtype(device)
            operands = tuple(o.to(dtype) if o.dtype != torch.float64 else o for o in operands)
        out = self.expression(*operands, backend="torch")
        return out if self.out_shape is None else out.reshape(self.out_shape)

    @property
    def cost(self) -> float:
        return self.flops + MEMORY_WEIGHT * self.memory


def compile_contraction(operand_labels: Sequence[Sequence[int]], operand_shapes: Sequence[Sequence[int]],
                        out_labels: Sequence[int], out_shape: Sequence[int] | None = None) -> Contraction:
    """Choose a path (exhaustive for few operands, dynamic programming otherwise) and compile it.

    ``memory`` counts the elements written by all pairwise steps (intermediates and output):
    the traffic that a FLOP count misses, and that autograd keeps for the backward pass.
    """
    eq = equation(operand_labels, out_labels)
    shapes = [tuple(int(d) for d in s) for s in operand_shapes]
    optimize = "optimal" if len(shapes) <= 4 else "dp"
    path, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=optimize)
    sizes = info.size_dict
    memory = 0.0
    for step in info.contraction_list:
        out = step[2].split("->")[1]
        n = 1
        for c in out:
            n *= sizes[c]
        memory += n
    expr = opt_einsum.contract_expression(eq, *shapes, optimize=path)
    return Contraction(expr, float(info.opt_cost), memory, None if out_shape is None else tuple(out_shape))
