"""SAM and ASAM (Algorithm 1 of the DAS paper) over any base optimizer, and the cost-matched
baselines that take SAM's step on every K-th step or with probability Q."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from tensorsam.norms import Sharding, dtensor_class
from tensorsam.optim import functional as F
from tensorsam.optim.plan import acc_like, per_core_values, single_bucket
from tensorsam.optim.wrapper import WrappedOptimizer, check_flag, check_strength

SEED = "sam_seed"


@contextlib.contextmanager
def disable_running_stats(model: nn.Module):
    """Keep BatchNorm (and other running-stat norm layers) from updating their running statistics,
    e.g. during SAM's perturbed pass: they normalise with batch statistics as usual, and
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` stay exactly as they were."""
    mods = [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    for m in mods:
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m in mods:
            m.track_running_stats = True


class SAM(WrappedOptimizer):
    r"""Sharpness-Aware Minimisation (Algorithm 1) with the global gradient norm; ASAM with
    ``adaptive=True``.

    .. code-block:: text

        g = grad L(w)                                    (first pass)
        e = rho g / ||g||         (ASAM: rho w^2 g / || |w| g ||)
        g' = grad L(w + e)                               (second pass)
        w <- base_step(w, g')     (w restored exactly before the step)

    Args:
        params, base_optimizer, \*\*kwargs: the base optimizer (a class built on ``params`` with
            ``kwargs``, or an instance).
        rho, adaptive: the radius and ASAM's switch, stored per param group.
        every: take SAM's step on every ``every``-th step (the first included) and the base step
            with one gradient in between (``sam-every-K``).
        prob: take SAM's step with probability ``prob`` (``sam-random-Q``); the draw of step t is
            a function of (``seed``, t), so every rank draws alike and a checkpoint, which holds
            both, resumes the same draws.
        foreach, skip_nonfinite: see :class:`~tensorsam.optim.wrapper.WrappedOptimizer`.
        compile: run the ascent step as one ``torch.compile``'d function when every tensor shares
            one device and dtype (seconds of compilation once per process).

    **FSDP2 (DTensor parameters).**  ||g|| is the global norm: local squared norms of each rank's
    gradient shards, completed by one all-reduce; e and the restore are applied to the local shards.
    FSDP2 reduce-scatters every backward pass, so the first-pass gradient is already the global
    one and every rank perturbs with the same e (``sam_sync=True`` is the only mode there: the
    per-replica variant, m-sharpness, needs each replica to hold its own w + e, which one sharded
    copy of w cannot; see ``docs/scaling.md``).  Plain parameters may sit beside DTensor ones.

    A non-finite first-pass gradient gives e = 0, and :meth:`restore` adds NaN to the second
    gradient so that a GradScaler or ``skip_nonfinite`` skips the step.  ``first_step`` twice
    without ``second_step`` raises instead of overwriting the saved weights.

    Example (BatchNorm statistics kept out of the perturbed pass)::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()
        if opt.perturbs_this_step():
            opt.first_step(zero_grad=True)
            with disable_running_stats(model):
                loss_fn(model(x), y).backward()
        opt.step()                # second_step(), or the base step on a step without SAM
        opt.zero_grad()

    ``opt.step(closure)`` with a closure (zero_grad + forward + backward, returning the loss) does
    the same, running both passes in training mode.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *,
                 every: int = 1, prob: float | None = None, seed: int = 0, foreach: bool | None = None,
                 skip_nonfinite: bool = False, compile: bool = False, **kwargs):
        check_flag(adaptive, "adaptive")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if prob is not None and not (isinstance(prob, (int, float)) and 0.0 <= prob <= 1.0):
            raise ValueError(f"prob must be a number in [0, 1] or None, got {prob!r}")
        if prob is not None and every != 1:
            raise ValueError("give every (SAM on every K-th step) or prob (SAM with probability Q), not both")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        super().__init__(params, base_optimizer, {"rho": check_strength(rho, "rho"), "adaptive": adaptive},
                         foreach=foreach, skip_nonfinite=skip_nonfinite, **kwargs)
        self.every, self.prob = every, prob
        for g in self.param_groups:
            g[SEED] = seed
        self.compile = check_flag(compile, "compile")
        # idle -> perturbed (first_step) -> restored (restore) -> idle (second_step); a step that a
        # GradScaler skipped stays "restored", which is safe: the weights are w
        self._phase = "idle"
        self._saved: dict = {}      # parameter -> buffer holding w during the perturbed pass
        self._perturbed: list[torch.Tensor] = []
        self._perturbed_saved: list[torch.Tensor] = []     # their buffers, in the same order
        self._first_finite: torch.Tensor | None = None
        self._like: dict = {}
        self._sharding_key: tuple | None = None     # the params whose Sharding is cached
        self._sharding: Sharding | None = None
        self._perturbed_sharding: Sharding | None = None

    def perturbs_this_step(self) -> bool:
        """Whether the coming step is a SAM step (always, unless ``every`` or ``prob`` says otherwise).
        Decided on the host from the step counter: no device value is read."""
        t = self.step_count
        if self.prob is not None:
            return bool(np.random.default_rng([self.param_groups[0][SEED], t]).random() < self.prob)
        return t % self.every == 0

    def functional_args(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[bool, ...]]:
        """``(rho, adaptive)`` of :func:`~tensorsam.optim.functional.sam_perturbation` for ``params``
        (each one's rho from its param group, in the accumulation dtype of the first)."""
        where = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        index = [where[id(p)] for p in params]
        rho = per_core_values(self.param_groups, index, lambda g: g["rho"], acc_like(self._like, params[0]))
        return rho, tuple(self.param_groups[i]["adaptive"] for i in index)

    def sharding(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> Sharding | None:
        """The :class:`~tensorsam.norms.Sharding` of the gradients ``grads`` of ``params`` (``None``
        without DTensors), cached for the last list of parameters."""
        if dtensor_class() is None:     # no DTensor can exist: the one-process path
            return None
        key = tuple(map(id, params))
        if key != self._sharding_key:
            self._sharding_key, self._sharding = key, Sharding.of(grads)
        return self._sharding

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save w and move to w + e with the current (accumulated) gradient (Algorithm 1, step 2)."""
        if self._phase == "perturbed":
            raise RuntimeError("SAM.first_step() called again before second_step(): the weights are "
                               "still perturbed (with a GradScaler, call restore() before scaler.step)")
        ps = self._params_with_grad()
        if not ps:
            raise RuntimeError("SAM.first_step() found no gradients; run backward first")
        grads = [p.grad for p in ps]
        saved = [self._saved.get(p) for p in ps]
        for i, p in enumerate(ps):
            if saved[i] is None:
                saved[i] = self._saved[p] = torch.empty_like(p)
        rho, adaptive = self.functional_args(ps)
        sharding = self.sharding(ps, grads)
        if self.compile and sharding is None and single_bucket(ps + grads):
            self._first_finite = F.compiled(F.sam_perturb_)(ps, grads, saved, rho, adaptive, False)
        else:
            self._first_finite = F.sam_perturb_(ps, grads, saved, rho, adaptive, self.foreach, sharding)
        self._perturbed, self._perturbed_saved, self._perturbed_sharding = ps, saved, sharding
        self._phase = "perturbed"
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put w back exactly (no-op unless perturbed); with a non-finite first pass, mark the
        current gradient non-finite (:func:`~tensorsam.optim.functional.sam_restore_`)."""
        if self._phase != "perturbed":
            return
        F.sam_restore_(self._perturbed, self._perturbed_saved, self._first_finite,
                       [p.grad for p in self._params_with_grad()], self.foreach, self._perturbed_sharding)
        self._phase = "restored"

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w and take the base step with the gradient from w + e (Algorithm 1, steps 4-5)."""
        if self._phase == "idle":
            raise RuntimeError("SAM.second_step() called without first_step()")
        self.restore()
        self._phase = "idle"
        self.base_step()
        if zero_grad:
            self.zero_grad()

    def base_step(self) -> bool:
        if self._phase == "perturbed":
            raise RuntimeError("SAM.base_step() called between first_step() and second_step()")
        return super().base_step()

    def step(self, closure=None):
        """With a closure: a whole step (two passes on a SAM step, one otherwise), returning the loss
        at w.  Without one: :meth:`second_step` after :meth:`first_step`, or the base step on a step
        that :meth:`perturbs_this_step` says is not a SAM step."""
        if closure is None:
            if self._phase != "idle":
                return self.second_step()
            if self.initialising_state():
                self.base_optimizer.step()
                return None
            if not self.perturbs_this_step():
                self.base_step()
                return None
            raise RuntimeError("SAM.step() without a closure is second_step() and needs first_step() "
                               "before it; pass a closure (zero_grad + forward + backward) for a full step")
        with torch.enable_grad():
            loss = closure()
        if not self.perturbs_this_step():
            self.base_step()
            return loss
        self.first_step()
        try:
            with torch.enable_grad():
                closure()
        except BaseException:
            self.restore()          # never leave the model at w + e (e.g. on KeyboardInterrupt)
            self._phase = "idle"
            raise
        self.second_step()
        return loss

    def state_dict(self) -> dict:
        if self._phase == "perturbed":
            raise RuntimeError("SAM.state_dict() called between first_step() and second_step(); "
                               "save after second_step()")
        return super().state_dict()
