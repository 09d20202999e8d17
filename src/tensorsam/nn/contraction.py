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
import math
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


# --------------------------------------------------------------------------- matrix-product chains
# A factorized linear layer whose contraction is a sequence of 2-D matrix products on views of
# contiguous tensors: each product reads its operands as (possibly transposed) matrices and writes
# its result in the order the next product reads, so neither the forward nor autograd's backward
# copies a permuted intermediate (the pairwise steps above permute the large one in and out of
# each tensordot).  ``flops`` counts 2 per multiply-add as opt_einsum does; ``memory`` the elements
# written.  Plain picklable attributes and plain torch ops (double backward, torch.func, autocast).


class TuckerLinearChain:
    """``y = x`` times a Tucker weight of shape (in modes..., out modes...), core first in the
    operands, then the factors U_k (I_k, R_k), then ``x`` (B, in modes...); returns (B, out).

    The input factors are applied last mode first, each product putting its rank axis in front
    (so the next mode to contract is always the last axis): ``(R_1..R_n, B)`` meets the core as a
    (R_in, R_out) matrix, and the output factors are applied first mode first, each putting its
    mode axis last, which leaves ``(B, O_1..O_m)``."""

    def __init__(self, dims: Sequence[int], ranks: Sequence[int], n_in: int, batch: int):
        self.dims, self.ranks, self.n_in = tuple(dims), tuple(ranks), n_in
        self.r_in = math.prod(ranks[:n_in])
        self.r_out = math.prod(ranks[n_in:])
        self.batch, self.out_size = batch, math.prod(dims[n_in:])
        flops = memory = 0.0
        size = batch * math.prod(dims[:n_in])  # elements of the running intermediate
        for k in reversed(range(n_in)):
            flops, size = flops + 2.0 * size * ranks[k], size // dims[k] * ranks[k]
            memory += size
        flops, size = flops + 2.0 * batch * self.r_in * self.r_out, batch * self.r_out
        memory += size
        for k in range(n_in, len(dims)):
            flops, size = flops + 2.0 * size * dims[k], size // ranks[k] * dims[k]
            memory += size
        self.flops, self.memory = flops, memory

    @property
    def cost(self) -> float:
        return self.flops + MEMORY_WEIGHT * self.memory

    def __call__(self, core: torch.Tensor, *operands: torch.Tensor) -> torch.Tensor:
        *factors, x = operands
        t = x
        for k in reversed(range(self.n_in)):  # (.., B, I_1..I_k) -> (R_k, .., B, I_1..I_{k-1})
            t = torch.mm(factors[k].t(), t.reshape(-1, self.dims[k]).t())
        t = torch.mm(core.reshape(self.r_in, self.r_out).t(), t.reshape(self.r_in, self.batch))
        for k in range(self.n_in, len(self.dims)):  # (R'_k, .., B, O_1..) -> (.., B, O_1..O_k)
            t = torch.mm(t.reshape(self.ranks[k], -1).t(), factors[k].t())
        return t.reshape(self.batch, self.out_size)


class TTMLinearChain:
    """``y = x`` times a TT-matrix weight: cores (r_{k-1}, O_k, I_k, r_k), then ``x`` (B, in
    modes...); returns (B, out).

    One core j is kept apart; the others merge (one small cached contraction) into a matrix
    ``W`` (O_{!=j} r_{j-1} r_j, I_{!=j}).  ``x`` permuted to (I_{!=j}, I_j B) (a copy the size of
    the input) meets ``W`` in one matrix product, ``U`` (O_{!=j}, r_{j-1} r_j I_j, B), and a
    batched product over O_{!=j} with core j broadcast as (O_j, r_{j-1} r_j I_j) finishes; only
    the output is permuted back.  Core j's gradient sums O_{!=j} small copies.  j is the core
    with the fewest FLOPs, then the least memory, then the last."""

    def __init__(self, core_shapes: Sequence[Sequence[int]], batch: int):
        shapes = [tuple(int(s) for s in c) for c in core_shapes]
        d = len(shapes)
        if d < 2:
            raise ValueError("a TT-matrix chain needs at least two cores")
        rows, cols = [s[1] for s in shapes], [s[2] for s in shapes]
        self.batch, self.in_modes, self.out_size = batch, tuple(cols), math.prod(rows)
        best = None
        for j in reversed(range(d)):  # ties go to the last core (2-D transposes, below)
            merge = self._merge(shapes, j)
            p_in, p_out = math.prod(cols) // cols[j], math.prod(rows) // rows[j]
            k = shapes[j][0] * shapes[j][3] * cols[j]  # the contracted axis of the batched product
            flops = merge.flops + 2.0 * p_out * k * p_in * batch + 2.0 * p_out * rows[j] * k * batch
            # x permuted, U, the batched product and its permuted copy, core j's gradient copies
            memory = (merge.memory + batch * p_in * cols[j] + p_out * k * batch
                      + 2.0 * batch * self.out_size + p_out * rows[j] * k)
            if best is None or (flops, memory) < best[:2]:
                best = (flops, memory, j, merge, p_out, k)
        self.flops, self.memory, self.j, self.merge, self.p_out, self.k = best
        j = self.j
        self.x_view = (batch, math.prod(cols[:j]), cols[j], math.prod(cols[j + 1:]))  # -> (I_<j, I_>j, I_j, B)
        # (O_<j, O_>j, O_j, B) -> (B, O_<j, O_j, O_>j)
        left = math.prod(rows[:j])
        self.y_view = (left, self.p_out // left, rows[j], batch)

    @staticmethod
    def _merge(shapes, j) -> Contraction:
        """Every core but j contracted to a (O_{!=j} r_{j-1} r_j, I_{!=j}) matrix (the boundary
        bonds, of size 1, are left out)."""
        d = len(shapes)
        others = [i for i in range(d) if i != j]
        rows, cols, bond = range(d), range(d, 2 * d), range(2 * d, 3 * d + 1)
        inner = [k for k in (j, j + 1) if 0 < k < d]  # the bonds of core j that other cores share
        out = (*(rows[i] for i in others), *(bond[k] for k in inner), *(cols[i] for i in others))
        n_rows = math.prod(shapes[i][1] for i in others) * shapes[j][0] * shapes[j][3]
        n_cols = math.prod(shapes[i][2] for i in others)
        return compile_contraction([(bond[i], rows[i], cols[i], bond[i + 1]) for i in others],
                                   [shapes[i] for i in others], out, (n_rows, n_cols))

    @property
    def cost(self) -> float:
        return self.flops + MEMORY_WEIGHT * self.memory

    def __call__(self, *operands: torch.Tensor) -> torch.Tensor:
        *cores, x = operands
        j, b = self.j, self.batch
        if self.x_view[3] == 1:  # j is the last core: a 2-D transpose
            xt = x.reshape(b, -1).t().contiguous().view(self.merge.out_shape[1], -1)
        else:
            xt = x.reshape(self.x_view).permute(1, 3, 2, 0).reshape(self.merge.out_shape[1], -1)
        u = torch.mm(self.merge(*(c for i, c in enumerate(cores) if i != j)), xt)
        g = cores[j].permute(1, 0, 3, 2).reshape(-1, self.k)  # (O_j, r_{j-1} r_j I_j)
        y = torch.bmm(g.expand(self.p_out, *g.shape), u.view(self.p_out, self.k, b))  # (O_{!=j}, O_j, B)
        if self.y_view[1] == 1:  # j is the last core: a 2-D transpose (torch's blocked copy)
            return y.view(-1, b).t().contiguous()
        return y.view(self.y_view).permute(3, 0, 2, 1).reshape(b, self.out_size).contiguous()
