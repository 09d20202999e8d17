"""The contract every factorized tensor format follows.

A format only describes *shapes* and an *einsum*: the shape of each core and the
subscripts that compose the cores into the full tensor.  Everything generic —
reconstruction along a cached, replayable opt_einsum path (contract.py), degrees of freedom, compression
ratio, the unified initialisation — lives here once, so formats stay small and
layers (``tensorsam.nn``) can contract an input with the cores of *any* format by
reusing the same subscripts.
"""

from __future__ import annotations

import contextvars
import math
import numbers
import operator
from collections.abc import Sequence

import opt_einsum
import tensorly
import torch
from torch import nn

from tensorsam.tensors.contract import ContractionPlan, contract, contraction_plan

FORMATS: dict[str, type[FactorizedTensor]] = {}


def register(name: str):
    """Class decorator adding a format to :data:`FORMATS` under ``name``."""

    def deco(cls):
        cls.format = name
        FORMATS[name] = cls
        return cls

    return deco


def get_format(name: str) -> type[FactorizedTensor]:
    """Look a format up by name; unknown names raise a ``ValueError`` listing the valid ones."""
    key = str(name).lower()
    if key not in FORMATS:
        raise ValueError(f"unknown tensor format {name!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[key]


def _integer(value) -> int:
    """``value`` as an int when it is an integer (a Python int, a numpy integer, a one-element integer
    torch tensor); a float (even a whole one such as ``3.0``), a bool or anything else is a
    ``TypeError``, so that a bad size is refused rather than truncated by ``int()``."""
    if isinstance(value, bool) or getattr(value, "dtype", None) == torch.bool:
        raise TypeError(f"entry {value!r} is a bool, not an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"entry {value!r} is not an integer") from None


def _integers(values, name: str, expected: str) -> tuple[int, ...]:
    """Each entry of the sequence ``values`` as an int, or a ``ValueError`` naming the bad entry."""
    try:
        items = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be {expected}, got {values!r}") from None
    out = []
    for v in items:
        try:
            out.append(_integer(v))
        except TypeError as e:
            raise ValueError(f"{name}: {e}; expected {expected}, got {values!r}") from None
    return tuple(out)


def validate_shape(shape, name: str = "shape") -> tuple[int, ...]:
    """Return ``shape`` as a tuple of positive ints or raise a ``ValueError`` naming ``name``
    (and the bad entry: a float such as ``2.5`` or ``3.0`` is refused, never truncated)."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    out = _integers(shape, name, "a non-empty sequence of positive ints")
    if len(out) == 0 or any(s <= 0 for s in out):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {shape!r}")
    return out


def validate_rank(rank, length: int, name: str = "rank", form: str = "") -> tuple[int, ...]:
    """Expand an int rank to ``length`` entries, or check a per-mode sequence.

    A wrong length, a non-positive entry or one that is not an integer (a float such as ``2.7``
    or ``3.0``, a bool) raises a ``ValueError`` that names the argument, the bad value and the
    expected form (``form`` describes it, e.g. "the N-1 inner TT ranks").
    """
    expected = f"an int or a sequence of {length} positive ints" + (f" ({form})" if form else "")
    if isinstance(rank, bool):
        raise ValueError(f"{name} must be {expected}, got {rank!r}")  # noqa: TRY004 (the contract: bad ranks are ValueErrors)
    if isinstance(rank, numbers.Integral):  # numpy ints too
        ranks = (int(rank),) * length
    elif isinstance(rank, numbers.Number):
        raise ValueError(f"{name}: {rank!r} is not an integer; expected {expected}")  # noqa: TRY004
    else:
        ranks = _integers(rank, name, expected)
        if len(ranks) != length:
            raise ValueError(f"{name} has {len(ranks)} entries; expected {expected}, got {rank!r}")
    if any(r <= 0 for r in ranks):
        raise ValueError(f"{name} must be positive; expected {expected}, got {rank!r}")
    return ranks


def tensorly_pytorch():
    """Context in which tensorly runs on the pytorch backend (restored on exit).

    Decompositions run here so that they keep the input's dtype and device, and so that
    tensorly's own results are exactly what the modules hold.
    """
    return tensorly.backend_context("pytorch")


def check_dense(tensor, ndim: int | None = None, name: str = "tensor") -> torch.Tensor:
    """Return ``tensor`` if it is a floating-point torch tensor (of order ``ndim``), else raise."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {type(tensor).__name__}"
                         + (f" of dtype {tensor.dtype}" if isinstance(tensor, torch.Tensor) else ""))
    if tensor.ndim == 0 or (ndim is not None and tensor.ndim != ndim):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected "
                         + (f"{ndim} modes" if ndim is not None else "at least one mode"))
    if not bool(torch.isfinite(tensor).all()):  # the SVDs would fail deep inside torch.linalg
        raise ValueError(f"{name} holds non-finite values (NaN or inf); cannot decompose it")
    return tensor.detach()


def bond_subscripts(mode_labels: Sequence[Sequence[int]], first_bond: int, ring: bool = False):
    """Labels of a chain (TT, TT-matrix) or ring (TR) of cores: core k gets
    ``(b_k, *mode_labels[k], b_{k+1})``.  A chain has d+1 bonds (the two boundary bonds have
    size 1); a ring has d, the last core closing back onto ``b_0``."""
    n_bonds = len(mode_labels) + (0 if ring else 1)
    return [(first_bond + k, *m, first_bond + (k + 1) % n_bonds) for k, m in enumerate(mode_labels)]


_AROUND_CORES: contextvars.ContextVar[bool] = contextvars.ContextVar("around_cores", default=False)


class FactorizedTensor(nn.Module):
    """A tensor of shape ``shape`` stored as cores that compose multilinearly.

    Subclasses set ``self.shape`` and ``self.rank`` and call :meth:`_build` with the core
    shapes, then implement :meth:`subscripts`, :meth:`from_dense` and (optionally)
    :meth:`_to_tensorly`.  ``cores`` is the ordered ``nn.ParameterList`` of one
    scale-invariant group: scaling core k by c_k with prod c_k = 1 leaves
    :meth:`reconstruct` unchanged.
    """

    format: str = "?"

    def _build(self, core_shapes: Sequence[Sequence[int]], dtype=None, device=None) -> None:
        if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
            raise ValueError(f"dtype must be a floating-point torch dtype (cores are trained), got {dtype}")
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(tuple(s), dtype=dtype, device=device)) for s in core_shapes
        )
        self._expr_cache: dict = {}
        if not _AROUND_CORES.get():
            self.reset_parameters()

    @classmethod
    def around(cls, cores: Sequence[torch.Tensor], *args, **kwargs) -> FactorizedTensor:
        """``cls(*args, **kwargs)`` holding ``cores``, built without drawing a random initialisation
        (so building from a decomposition leaves the global RNG alone)."""
        token = _AROUND_CORES.set(True)
        try:
            obj = cls(*args, **kwargs)
        finally:
            _AROUND_CORES.reset(token)
        return obj.load_cores(cores)

    # -- what a format must describe -------------------------------------------------------
    def subscripts(self) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
        """Integer einsum labels: one tuple per core, and the labels of the output modes in order.

        Labels ``0..N-1`` are reserved for the tensor's N modes (label i is mode i); rank
        (bond) labels start at N.  Layers rely on this convention to contract inputs.
        """
        raise NotImplementedError

    @property
    def num_rank_combinations(self) -> int:
        """Phi: the number of products summed for each entry."""
        raise NotImplementedError

    # -- generic machinery ------------------------------------------------------------------
    @property
    def order(self) -> int:
        return len(self.shape)

    def core_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(c.shape) for c in self.cores]

    def einsum_equation(self) -> str:
        ins, out = self.subscripts()
        sym = opt_einsum.get_symbol
        return ",".join("".join(sym(i) for i in s) for s in ins) + "->" + "".join(sym(i) for i in out)

    def contraction_plan(self) -> ContractionPlan:
        """The cached :class:`~tensorsam.tensors.contract.ContractionPlan` of :meth:`einsum_equation`
        for the current core shapes."""
        key = tuple(self.core_shapes())
        plan = self._expr_cache.get(key)
        if plan is None:
            plan = self._expr_cache[key] = contraction_plan(self.einsum_equation(), key)
        return plan

    def reconstruct(self) -> torch.Tensor:
        """The full tensor of shape ``self.shape`` (:func:`~tensorsam.tensors.contract.contract`
        along :meth:`contraction_plan`)."""
        return contract(list(self.cores), self.contraction_plan())

    def forward(self) -> torch.Tensor:
        return self.reconstruct()

    def numel(self) -> int:
        return math.prod(self.shape)

    def dof(self) -> int:
        """Number of stored parameters (sum of core sizes)."""
        return sum(c.numel() for c in self.cores)

    def compression_ratio(self) -> float:
        """Dense size divided by :meth:`dof` (> 1 means compressed)."""
        return self.numel() / self.dof()

    @torch.no_grad()
    def reset_parameters(self, target_variance: float = 1.0) -> None:
        """Unified initialisation (Pan et al., ICML 2022).

        Each core is drawn from U(±sqrt(3v)) with v = (target_variance / Phi)^(1/N), so
        that every entry of the reconstructed tensor has variance ``target_variance``.
        """
        n = len(self.cores)
        v = (target_variance / self.num_rank_combinations) ** (1.0 / n)
        bound = math.sqrt(3.0 * v)
        for c in self.cores:
            c.uniform_(-bound, bound)

    @classmethod
    def from_dense(cls, tensor: torch.Tensor, rank, **kwargs) -> FactorizedTensor:
        raise NotImplementedError

    @torch.no_grad()
    def load_cores(self, cores: Sequence[torch.Tensor]) -> FactorizedTensor:
        """Copy ``cores`` (same shapes as :attr:`cores`) into the parameters; returns ``self``."""
        if len(cores) != len(self.cores):
            raise ValueError(f"expected {len(self.cores)} cores, got {len(cores)}")
        for k, (p, c) in enumerate(zip(self.cores, cores)):
            if tuple(c.shape) != tuple(p.shape):
                raise ValueError(f"core {k} has shape {tuple(c.shape)}; expected {tuple(p.shape)}")
            p.copy_(c)
        return self

    def to_tensorly(self):
        """The cores as tensorly's object of this format (detached torch tensors; use tensorly's
        pytorch backend, e.g. :func:`tensorly_pytorch`, to compute with it)."""
        with tensorly_pytorch():
            return self._to_tensorly([c.detach() for c in self.cores])

    def _to_tensorly(self, cores: list[torch.Tensor]):
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"format={self.format}, shape={self.shape}, rank={self.rank}, dof={self.dof()}"
