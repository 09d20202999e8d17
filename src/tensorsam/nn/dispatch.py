"""Prepared forwards: what makes ``forward_mode='auto'`` cost nothing once it has decided.

A tensorized layer's forward looks its input signature ``(forward_mode, shape, dtype, device,
grad)`` up in one dict, ``layer._prepared``.  On a miss, :func:`prepare_and_run` checks the input,
makes ``auto``'s choice (:mod:`.auto`) and stores the chosen mode's *prepared forward*: a closure
``run(layer, x)`` with every shape-derived constant (reshape targets, output size, im2col shape)
and the compiled contraction (its opt_einsum path unrolled into torch calls,
:func:`.contraction.unroll`) bound, built by the layer's ``_prepare_<mode>(x)``.  A hit runs that
closure and nothing else, so ``auto`` and a forced mode run the same code after their first call.

What the closures do *not* bind: the parameters.  They read the cores (and the bias) from the
layer they are called with, so ``load_state_dict``, ``torch.func.functional_call``, FSDP's
parameter swaps and in-place optimizer updates are seen as before.  The cache is emptied whenever
what it assumed may have changed: new factors, loaded state (auto's choices, ``assign=True``),
``.to()``/``.double()``/``.cuda()`` (the cores' dtype decides which inputs pass the dtype check),
and it is never pickled or deep-copied (a copy starts empty).  ``auto`` stores a prepared forward
only once its choice is cached (not with ``TENSORSAM_AUTO_TIMING=0``, where the estimate decides
each call), and under ``torch.compile`` the layer bypasses the cache altogether.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch

PREPARED_ATTR = "_prepared"
# the forward_<mode> methods that are exactly ``_prepare_<mode>(x)(self, x)``: a prepared forward
# stands in for them; any other (a subclass's override, a patched instance) is called as it is
_STANDARD: set = set()


def standard(fn):
    """Mark ``fn`` (a ``forward_<mode>`` method) as equal to its ``_prepare_<mode>``'s closure."""
    _STANDARD.add(fn)
    return fn


def reset(layer) -> None:
    """Forget every prepared forward of ``layer``."""
    layer.__dict__[PREPARED_ATTR] = {}


def drop_prepared(state: dict) -> dict:
    """A module's pickled ``__dict__`` without its prepared forwards (closures do not pickle)."""
    state = dict(state)
    state[PREPARED_ATTR] = {}
    return state


def core_getter(n: int) -> Callable[[torch.nn.ParameterList], tuple]:
    """``get(cores)``: the ``n`` entries of a ParameterList in order, read by key from its
    ``_parameters`` (never in dict order, which a parameter swap could change) without
    ParameterList's per-item lookups; where they are not all there (``nn.DataParallel`` replicas
    hold theirs as plain attributes) the ParameterList's own iteration."""
    keys = tuple(str(i) for i in range(n))
    get = operator.itemgetter(*keys) if n > 1 else (lambda params: (params["0"],))

    def cores(plist) -> tuple:
        try:
            return get(plist._parameters)
        except KeyError:
            return tuple(plist)

    return cores


def requires_grad(module) -> bool:
    """Whether any parameter of ``module`` (or its submodules) requires grad: what
    ``any(p.requires_grad for p in module.parameters())`` says, without its generator machinery."""
    stack = [module]
    while stack:
        m = stack.pop()
        for p in m._parameters.values():
            if p is not None and p.requires_grad:
                return True
        stack.extend(c for c in m._modules.values() if c is not None)
    return False


def prepared_forward(layer, mode: str, x: torch.Tensor):
    """``run(layer, x)`` for ``mode`` and inputs like ``x``: the layer's ``_prepare_<mode>(x)``, or a
    plain call of ``forward_<mode>`` where that method is not the standard one."""
    name = f"forward_{mode}"
    if getattr(getattr(layer, name), "__func__", None) in _STANDARD:
        return getattr(layer, f"_prepare_{mode}")(x)
    return lambda layer, x: getattr(layer, name)(x)


def prepare_and_run(layer, x: torch.Tensor, key: tuple) -> torch.Tensor:
    """A cache miss: check ``x``, choose the mode, prepare its forward, store it (unless ``auto``
    could not cache its choice), run it."""
    layer._check_input(x)
    layer._check_dtype(x)
    mode, store = key[0], True
    if mode == "auto":
        mode = layer.choose_mode(x)
        store = (tuple(x.shape), str(x.dtype), x.device.type, key[4]) in layer._auto.modes
    run = prepared_forward(layer, mode, x)
    if store:
        if x.dtype != layer.weight_factors.cores[0].dtype:  # passed the dtype check under autocast only
            unchecked = run

            def run(layer, x):
                layer._check_dtype(x)
                return unchecked(layer, x)

        layer.__dict__[PREPARED_ATTR][key] = run
    return run(layer, x)
