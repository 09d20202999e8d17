"""SAM and ASAM (Algorithm 1 of the DAS paper; SPEC §3), wrapping any base optimizer."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tensorsam.optim.base import (
    MaybeCompiled,
    WrappedOptimizer,
    acc_dtype,
    acc_like,
    check_compile,
    check_strength,
    norms,
    per_core_values,
    single_bucket,
)


@contextlib.contextmanager
def disable_running_stats(model: nn.Module):
    """Keep BatchNorm (and other running-stat norm layers) from updating their running
    statistics, e.g. during SAM's perturbed pass.

    Inside the block every such module in training mode normalises with batch statistics as
    usual but leaves ``running_mean``, ``running_var`` and ``num_batches_tracked`` exactly as
    they were (``track_running_stats`` is switched off and restored afterwards)::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with disable_running_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    """
    mods = [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    for m in mods:
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m in mods:
            m.track_running_stats = True


def sam_scale(total_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1, step 2: the factor 1/||g|| of e = rho * g / ||g|| (ASAM: 1/|| |w| * g ||),
    and whether the first-pass gradient was finite.

    A zero or non-finite norm gives the factor 0, hence no perturbation and never NaN.
    """
    finite = torch.isfinite(total_norm)
    ok = finite & (total_norm > 0)
    inv = torch.where(ok, 1.0 / torch.where(ok, total_norm, torch.ones_like(total_norm)),
                      torch.zeros_like(total_norm))
    return inv, finite


def nan_if_not(finite: torch.Tensor) -> torch.Tensor:
    """0 if ``finite`` else NaN: added to a gradient it marks the step non-finite (see :meth:`SAM.restore`)."""
    return torch.where(finite, torch.zeros((), device=finite.device), torch.full((), float("nan"), device=finite.device))


def sam_e(grads: list[torch.Tensor], rho: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Algorithm 1, step 2 on tensors only: e_i = rho_i * g_i / ||g|| (global norm, :func:`sam_scale`;
    e = 0 if a gradient is non-finite), ``rho`` holding each tensor's rho.  Returns (e, whether
    the gradient was finite)."""
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=acc_dtype(g.dtype))
                                                  for g in grads]))
    inv, finite = sam_scale(total)
    e = [torch.where(finite, g * r, torch.zeros((), dtype=g.dtype, device=g.device))
         for g, r in zip(grads, (inv * rho).unbind())]
    return e, finite


def sam_perturb_(ps: list[torch.Tensor], grads: list[torch.Tensor], saved: list[torch.Tensor],
                 rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``saved`` <- w, then w <- w + e (:func:`sam_e`); returns (first-pass gradient finite,
    :func:`nan_if_not` of it).  Compiled as one function by ``SAM(compile=True)``."""
    e, finite = sam_e(grads, rho)
    for p, w, ek in zip(ps, saved, e):
        w.copy_(p)
        p.add_(ek)
    return finite, nan_if_not(finite)


_sam_perturb_compiled = MaybeCompiled(sam_perturb_)


class SAM(WrappedOptimizer):
    r"""Sharpness-Aware Minimisation (Algorithm 1) with the *global* gradient norm.

    ``first_step`` saves w and moves to w + e, e = rho * g / ||g|| (norm over all parameters);
    with ``adaptive=True`` (ASAM) e = rho * w^2 * g / || |w| * g || elementwise.  ``second_step``
    restores w exactly (a copy, not a subtraction) and takes the base step with the gradient
    computed at w + e.  ``rho`` and ``adaptive`` are stored per param group.  Memory: one
    copy of the parameters (the saved w), allocated on the first step and reused.

    Closure style (the closure zeroes the gradients, runs forward and backward, returns the
    loss; it is called twice)::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)          # loss at w (the first pass)

    (The closure runs both passes in training mode, so BatchNorm running statistics see the
    perturbed pass too; the two-step style below keeps them out.)

    Two-step style, with BatchNorm statistics kept from the perturbed pass::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with disable_running_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    Gradient accumulation over ``n`` micro-batches (equal to one step on the whole batch)::

        for xb, yb in micro_batches:
            (loss_fn(model(xb), yb) / n).backward()
        opt.first_step(zero_grad=True)    # e from the accumulated gradient, w saved once
        for xb, yb in micro_batches:
            (loss_fn(model(xb), yb) / n).backward()
        opt.second_step(zero_grad=True)   # w restored once, one base step

    Calling ``first_step`` twice without ``second_step`` raises instead of overwriting the saved
    weights (the bug of the authors' accumulation code, SPEC §3).

    Mixed precision with ``torch.amp.GradScaler``: the perturbation direction does not depend
    on the loss scale, so ``first_step`` runs on the scaled gradients; a non-finite first-pass
    gradient gives e = 0 (no perturbation, so the perturbed pass and BatchNorm statistics stay
    clean) and :meth:`restore` then marks the second gradient non-finite (adds NaN), so that the
    scaler's single inf check skips the whole step::

        scaler.scale(loss_fn(model(x), y)).backward()
        opt.first_step(zero_grad=True)
        scaler.scale(loss_fn(model(x), y)).backward()
        opt.restore()           # weights back at w whatever the scaler decides
        scaler.step(opt)        # one inf check; runs opt.step() (= second_step) only if finite
        scaler.update()
        opt.zero_grad()

    Without a scaler, ``skip_nonfinite=True`` does the same with one host sync per step.

    DDP: the gradient of the first pass decides the perturbation.

    - synchronised first pass (plain ``backward``): every replica perturbs with the all-reduced
      gradient, exactly like one process on the combined batch;
    - first pass under ``model.no_sync()``: each replica perturbs with its own gradient
      (per-replica perturbation, i.e. m-sharpness with m = the per-replica batch); the second
      pass is synchronised, so the update itself is identical on every replica::

        with model.no_sync():
            loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()       # all-reduced
        opt.second_step(zero_grad=True)

    ``compile=True`` runs ``first_step`` for non-adaptive groups on one device and dtype as one
    ``torch.compile``'d function (:func:`sam_perturb_`), which saves ~20 small ops per step on
    small models, at the cost of seconds of compilation once per process.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False,
                 foreach: bool | None = None, skip_nonfinite: bool = False, compile: bool = False,
                 **kwargs):
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be a bool, got {adaptive!r}")  # noqa: TRY004
        super().__init__(params, base_optimizer, {"rho": check_strength(rho, "rho"), "adaptive": adaptive},
                         foreach=foreach, skip_nonfinite=skip_nonfinite, **kwargs)
        self.compile = check_compile(compile)
        # idle -> perturbed (first_step) -> restored (restore) -> idle (second_step); a step
        # that a GradScaler skipped stays "restored", which is safe: the weights are w
        self._phase = "idle"
        self._saved: dict = {}    # parameter -> buffer holding w during the perturbed pass
        self._first_finite: torch.Tensor | None = None
        self._poison: torch.Tensor | None = None
        self._like: dict = {}
        self._perturbed: list[torch.Tensor] = []

    # -- Algorithm 1 ----------------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save w and move to w + e (Algorithm 1, step 2) using the current (accumulated) gradient."""
        if self._phase == "perturbed":
            raise RuntimeError("SAM.first_step() called again before second_step(): the weights are "
                               "still perturbed (with a GradScaler, call restore() before scaler.step)")
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        groups = [(g, ps) for g, ps in groups if ps]
        if not groups:
            raise RuntimeError("SAM.first_step() found no gradients; run backward first")
        if self.compile and not any(g["adaptive"] for g, _ in groups):
            ps = [p for _, grp in groups for p in grp]
            grads = [p.grad for p in ps]
            if single_bucket(ps + grads):
                self._perturbed = ps
                saved = self._saved_buffers(ps)
                self._first_finite, self._poison = _sam_perturb_compiled(ps, grads, saved, self.rho_per_param(ps))
                self._phase = "perturbed"
                if zero_grad:
                    self.zero_grad()
                return
        per = []
        for g, ps in groups:
            grads = [p.grad for p in ps]
            if g["adaptive"]:
                grads = self._each("mul", grads, self._each("abs", ps))
            per.append(norms(grads, self.foreach))
        dev = per[0].device
        total = torch.linalg.vector_norm(torch.cat([n.to(dev) for n in per]))
        inv, finite = sam_scale(total)
        self._perturbed = []
        for g, ps in groups:
            e = self._each("mul", [p.grad for p in ps], inv * g["rho"])
            if g["adaptive"]:
                e = self._each("mul", e, self._each("mul", ps, ps))
            bad = ~finite
            for t in e:       # non-finite first-pass gradient: no perturbation at all
                t.masked_fill_(bad if t.device == bad.device else bad.to(t.device), 0.0)
            saved = self._saved_buffers(ps)
            self._each("copy_", saved, ps)
            self._each("add_", ps, e)
            self._perturbed.extend(ps)
        self._first_finite, self._poison = finite, None
        self._phase = "perturbed"
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved weights w back exactly (no-op unless perturbed).

        If the first-pass gradient was non-finite, NaN is added to the current gradient (one
        tensor per device) so that a GradScaler or ``skip_nonfinite`` skips this step: a step is
        non-finite if either pass is.
        """
        if self._phase != "perturbed":
            return
        ps = self._perturbed
        self._each("copy_", ps, [self._saved[p] for p in ps])
        poison = nan_if_not(self._first_finite) if self._poison is None else self._poison
        first_on_device = {}
        for p in self._params_with_grad():   # one gradient per device is enough for any inf check
            first_on_device.setdefault(p.grad.device, p.grad)
        for grad in first_on_device.values():
            grad.add_(poison.to(grad.device))
        self._phase = "restored"

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w and take the base step with the gradient from w + e (Algorithm 1, steps 4-5)."""
        if self._phase == "idle":
            raise RuntimeError("SAM.second_step() called without first_step()")
        self.restore()
        self._phase = "idle"
        self._mark_stepped()
        if not self._skip_this_step():
            self.base_optimizer.step()
            self._step += 1
        if zero_grad:
            self.zero_grad()

    def rho_per_param(self, params: list[torch.Tensor]) -> torch.Tensor:
        """1-D tensor of each of ``params``' rho (from its param group), in the accumulation dtype
        of the first (:func:`acc_like`): the ``rho`` of :func:`sam_e`.  A ``ValueError`` for a
        parameter in an adaptive (ASAM) group, which :func:`sam_e` does not cover."""
        where = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        index = [where[id(p)] for p in params]
        if any(self.param_groups[i]["adaptive"] for i in index):
            raise ValueError("rho_per_param: sam_e covers SAM, not ASAM (adaptive=True)")
        return per_core_values(self.param_groups, index, lambda g: g["rho"], acc_like(self._like, params[0]))

    @torch.no_grad()
    def base_step(self) -> None:
        """The base step with the gradients in ``.grad``, which the caller computed at w + e itself
        (e.g. both passes in one compiled function with :func:`sam_e` and :meth:`rho_per_param`,
        the weights never leaving w); honours ``skip_nonfinite`` and counts the step."""
        if self._phase != "idle":
            raise RuntimeError("SAM.base_step() called between first_step() and second_step()")
        self._mark_stepped()
        if not self._skip_this_step():
            self.base_optimizer.step()
            self._step += 1

    def _saved_buffers(self, ps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The buffers that hold w during the perturbed pass (allocated on first use)."""
        saved = [self._saved.get(p) for p in ps]
        for i, p in enumerate(ps):
            if saved[i] is None:
                saved[i] = self._saved[p] = torch.empty_like(p)
        return saved

    def step(self, closure=None):
        """With a closure (zero_grad + forward + backward, returning the loss): a full SAM step,
        returning the loss at w.  Without one: :meth:`second_step` (after :meth:`first_step`)."""
        if closure is None:
            if self._phase == "idle":
                raise RuntimeError("SAM.step() without a closure is second_step() and needs first_step() "
                                   "before it; pass a closure (zero_grad + forward + backward) for a full step")
            return self.second_step()
        with torch.enable_grad():
            loss = closure()
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

    # -- plain / foreach primitives ------------------------------------------------------------
    def _each(self, op: str, xs, *args):
        """``torch._foreach_<op>(xs, *args)`` or its per-tensor loop ``x.<op>(...)``.

        A list argument is taken per tensor, anything else (a 0-dim tensor) is shared."""
        xs = list(xs)
        if self.foreach:
            out = getattr(torch, f"_foreach_{op}")(xs, *args)
            return None if out is None else list(out)
        return [getattr(x, op)(*(a[i] if isinstance(a, list) else a for a in args)) for i, x in enumerate(xs)]
