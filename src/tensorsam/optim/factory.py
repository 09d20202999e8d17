"""``build_optimizer``: every method by name, the one way tasks and integrations make optimizers."""

from __future__ import annotations

import inspect
import re

import torch

from tensorsam.optim.balance import Rebalance
from tensorsam.optim.bar import BAR
from tensorsam.optim.das import DAS
from tensorsam.optim.sam import SAM

BASES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
METHODS = ("base", "sgd", "adam", "adamw", "sam", "asam", "das", "nbar", "obar", "rebalance",
           "sam-every-K", "sam-random-Q")
COMMON = ("foreach", "skip_nonfinite")
OWNED = {   # options each wrapper takes; every other option goes to the base optimizer
    "sam": ("rho", "adaptive", "every", "prob", "seed", "compile", *COMMON),
    "das": ("alpha", "alpha_schedule", "normalization", "variant", "compile", *COMMON),
    "bar": ("alpha", "alpha_schedule", *COMMON),
    "rebalance": ("every", "rescale_state", *COMMON),
}
_EVERY = re.compile(r"sam-every-(\d+)")
_RANDOM = re.compile(r"sam-random-((?:\d+(?:\.\d*)?|\.\d+)(?:e-?\d+)?)")


def base_class(base) -> type[torch.optim.Optimizer]:
    """``base`` as a ``torch.optim.Optimizer`` class: one of :data:`BASES` by name, or a class."""
    if isinstance(base, str) and base.lower() in BASES:
        return BASES[base.lower()]
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        return base
    raise ValueError(f"unknown base optimizer {base!r}; expected one of {sorted(BASES)} or a "
                     "torch.optim.Optimizer class")


def _split(method: str, options: dict, base: type) -> tuple[dict, dict]:
    """(wrapper options, base options); an option neither takes is an error listing the valid ones."""
    owned = OWNED.get(method, ())
    accepted = set(inspect.signature(base.__init__).parameters) - {"self", "params"}
    wrapper = {k: v for k, v in options.items() if k in owned}
    rest = {k: v for k, v in options.items() if k not in owned}
    unknown = sorted(set(rest) - accepted)
    if unknown:
        valid = sorted(set(owned) | accepted)
        raise ValueError(f"unknown option(s) {unknown} for method {method!r} over {base.__name__}; "
                         f"valid options: {valid}")
    return wrapper, rest


def build_optimizer(method: str, params, *, groups=None, base="sgd", total_steps: int | None = None,
                    **options) -> torch.optim.Optimizer:
    """The optimizer called ``method`` over ``params``.

    Methods: ``sgd``, ``adam``, ``adamw`` (that torch optimizer alone; ``base`` is ignored),
    ``base`` (the base optimizer alone), ``sam``, ``asam``, ``das``, ``nbar``, ``obar``,
    ``rebalance``, ``sam-every-K`` (SAM on every K-th step, the base step in between) and
    ``sam-random-Q`` (SAM with probability Q).

    ``base`` is a name (sgd, adam, adamw) or a ``torch.optim.Optimizer`` class.  ``groups`` (a model
    or lists of parameters) is required by das, nbar/obar (pairs) and rebalance.  ``total_steps``
    feeds the decaying alpha schedules.  ``options`` go to the wrapper when it owns them (rho,
    rho, adaptive, every, prob, seed, alpha, alpha_schedule, normalization, variant, rescale_state,
    compile, foreach, skip_nonfinite) and to the base optimizer otherwise (lr, momentum, weight_decay, betas, ...).

    Example::

        opt = build_optimizer("das", model.parameters(), groups=model, base="sgd", alpha=0.1,
                              lr=0.1, momentum=0.9, weight_decay=5e-4)
    """
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, got {method!r}")  # noqa: TRY004
    every, random = _EVERY.fullmatch(method), _RANDOM.fullmatch(method)
    if method not in METHODS[:-2] and not (every or random):
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)} "
                         "(K a positive int, Q a probability, e.g. sam-every-2, sam-random-0.5)")
    if method in BASES:
        base, method = method, "base"
    cls = base_class(base)
    kind = {"asam": "sam", "nbar": "bar", "obar": "bar"}.get(method, method)
    if every or random:
        kind = "sam"
    wrapper, rest = _split(kind, options, cls)
    if kind == "base":
        return cls(params, **rest)
    if kind == "sam":
        implied = {"adaptive": method == "asam"}
        if every:
            implied["every"] = int(every.group(1))
        if random:
            implied["prob"] = float(random.group(1))
        clash = sorted(k for k, v in implied.items()
                       if k in wrapper and wrapper[k] != v and (k != "adaptive" or method == "asam"))
        if clash:
            raise ValueError(f"method {method!r} fixes {clash}; do not pass them as options")
        return SAM(params, cls, **{**implied, **wrapper}, **rest)
    if groups is None:
        raise ValueError(f"method {method!r} needs groups=: a model or a list of parameter lists "
                         "(its scale-invariant groups)")
    if kind == "rebalance":
        return Rebalance(params, cls, groups=groups, **wrapper, **rest)
    if "alpha" not in wrapper:
        raise ValueError(f"method {method!r} needs alpha= (its strength)")
    if kind == "das":
        return DAS(params, cls, groups=groups, total_steps=total_steps, **wrapper, **rest)
    return BAR(params, cls, pairs=groups, mode=method[0], total_steps=total_steps, **wrapper, **rest)
