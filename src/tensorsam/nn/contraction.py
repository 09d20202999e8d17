"""Pure contraction helpers shared by every tensorized layer.

A layer never knows which format it holds: it asks the factorized tensor for its integer
einsum labels (:meth:`FactorizedTensor.subscripts`), adds labels for the input's batch and
spatial axes, and lets opt_einsum pick a contraction path once.  The compiled expression
is cached by operand shapes, and its pairwise steps are unrolled once into the exact
``torch.tensordot``/``permute``/``torch.einsum`` calls that opt_einsum's torch backend makes
(:func:`unroll`), so a call runs those calls only: no parsing, no backend look-up, no symbol
conversion, and the same results bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import opt_einsum
import torch
from opt_einsum.parser import convert_to_valid_einsum_chars, has_valid_einsum_chars_only

# relative cost of moving one element vs one multiply-add, used by the FLOP+memory estimate
MEMORY_WEIGHT = 4.0
# Opt-in: contractions cheaper than this many FLOPs run on one thread on CPU (0 = off, the default).
# Each pairwise step of a small contraction is a tiny GEMM whose parallel region costs more than it
# saves when the cores are oversubscribed (a TR 32->32 conv measured 2.7-3.3x a dense conv with a
# busy process beside it when multi-threaded, 1.0-1.3x single-threaded); on a quiet machine the
# thread switching costs more than it saves (TR-ResNet-32 step at 2 threads: 1.13-1.16x dense with
# it, 1.08-1.09x without).  Set TENSORSAM_SINGLE_THREAD_FLOPS=5e7 on shared, oversubscribed CPUs.
SINGLE_THREAD_MAX_FLOPS = float(os.environ.get("TENSORSAM_SINGLE_THREAD_FLOPS", "0"))


def equation(operand_labels: Sequence[Sequence[int]], out_labels: Sequence[int]) -> str:
    """Integer labels -> an einsum string (opt_einsum symbols, so any number of labels works)."""
    sym = opt_einsum.get_symbol
    return ",".join("".join(sym(i) for i in s) for s in operand_labels) + "->" + "".join(
        sym(i) for i in out_labels)


@dataclass
class Contraction:
    """A compiled opt_einsum expression plus its cost estimate (for ``forward_mode='auto'``).

    Calling it runs the pairwise ``tensordot``/``bmm`` steps; on CPU, a contraction below
    :data:`SINGLE_THREAD_MAX_FLOPS` runs them (forward and backward) on one thread.  Results,
    double backward and ``torch.func`` transforms are those of plain torch ops (the latter run
    the plain ops); on other devices it is always the plain ops.
    """

    expression: opt_einsum.contract.ContractExpression
    flops: float
    memory: float
    out_shape: tuple[int, ...] | None = None  # reshape of the result, done inside the contraction
    steps: tuple = field(init=False, repr=False)  # the expression's pairwise steps (:func:`unroll`)

    def __post_init__(self) -> None:
        self.steps = unroll(self.expression)

    def __call__(self, *operands: torch.Tensor) -> torch.Tensor:
        device = operands[0].device.type
        if torch.is_autocast_enabled(device):
            # tensordot is not an autocast op, and F.unfold's output may already be cast: follow
            # autocast as F.linear/F.conv2d do, so that every mode returns the same dtype
            dtype = torch.get_autocast_dtype(device)
            operands = tuple(o.to(dtype) if o.dtype != torch.float64 else o for o in operands)
        if (device != "cpu" or self.flops > SINGLE_THREAD_MAX_FLOPS or torch.get_num_threads() == 1
                or torch._C._functorch.peek_interpreter_stack() is not None):  # torch.func: plain ops
            return self.run(*operands)
        if not (torch.is_grad_enabled() and any(o.requires_grad for o in operands)):
            with single_thread():
                return self.run(*operands)
        return _SingleThreaded.apply(self.run, *operands)

    def run(self, *operands: torch.Tensor) -> torch.Tensor:
        """The pairwise steps of the expression, as opt_einsum's torch backend runs them."""
        ops = list(operands)
        if len(ops) != self.expression.num_args:
            raise ValueError(f"this contraction takes {self.expression.num_args} operands, got {len(ops)}")
        for inds, how, perm in self.steps:
            tmp = [ops.pop(i) for i in inds]
            if type(how) is str:
                out = torch.einsum(how, *tmp)
            else:
                out = torch.tensordot(*tmp, dims=how)
                if perm is not None:
                    out = out.permute(*perm)
            ops.append(out)
        out = ops[0]
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


def unroll(expression: opt_einsum.contract.ContractExpression) -> tuple:
    """The pairwise steps of ``expression`` as ``(operand positions, how, perm)``, decided once
    exactly as opt_einsum's ``_core_contract`` decides them for the torch backend (which has
    einsum): a BLAS step that opt_einsum does not mark ``EINSUM`` is ``torch.tensordot(a, b,
    dims=how)`` followed by ``permute(*perm)`` when its labels come out in another order; any
    other step is ``torch.einsum(how, ...)`` (``how`` a string, ``perm`` None) with the equation
    converted to letters as the torch backend converts it.  Plain tuples and strings: a :class:`Contraction` stays picklable."""
    steps = []
    for inds, idx_rm, einsum_str, _, blas_flag in expression.contraction_list:
        inds = tuple(inds)
        if blas_flag and "EINSUM" not in blas_flag:
            input_str, result = einsum_str.split("->")
            left, right = input_str.split(",")
            tensor_result = "".join(c for c in left + right if c not in idx_rm)
            if idx_rm:
                axes = tuple(zip(*sorted((left.find(c), right.find(c)) for c in idx_rm)))
            else:
                axes = ((), ())
            perm = tuple(map(tensor_result.index, result)) if tensor_result != result else None
            steps.append((inds, axes, perm))
        else:
            eq = einsum_str
            if not has_valid_einsum_chars_only(eq):  # opt_einsum's _einsum
                if "->" not in eq:
                    eq += "->" + opt_einsum.parser.find_output_str(eq)
                eq = convert_to_valid_einsum_chars(eq)
            steps.append((inds, convert_to_valid_einsum_chars(eq), None))  # the torch backend's einsum
    return tuple(steps)


@contextlib.contextmanager
def single_thread():
    """Run the enclosed ops on one intra-op thread (restored on exit, exceptions included)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _SingleThreaded(torch.autograd.Function):
    """A small CPU contraction whose forward *and* first backward run on one thread.

    The forward records the pairwise steps in an inner graph on detached leaves, and the
    backward differentiates that graph (``retain_graph``, so a repeated outer backward works).
    A backward that must itself be differentiable (``create_graph=True``) recomputes the
    contraction on the saved original operands instead, so second derivatives flow to them.
    """

    @staticmethod
    def forward(ctx, run, *operands):
        with torch.enable_grad(), single_thread():
            leaves = [o.detach().requires_grad_(o.requires_grad) for o in operands]
            out = run(*leaves)
        ctx.run, ctx.inner = run, (out, leaves)
        ctx.save_for_backward(*operands)
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph: differentiate through the original operands
            operands = ctx.saved_tensors
            need = [o for o in operands if o.requires_grad]
            grads = iter(torch.autograd.grad(ctx.run(*operands), need, grad, create_graph=True))
            return (None, *(next(grads) if o.requires_grad else None for o in operands))
        out, leaves = ctx.inner
        need = [x for x in leaves if x.requires_grad]
        with single_thread():
            grads = iter(torch.autograd.grad(out, need, grad, retain_graph=True))
        return (None, *(next(grads) if x.requires_grad else None for x in leaves))
