"""The completion objective: the training loss on gathered entries, its gradient (compiled whole
with ``torch.compile`` when asked) and one training step per method.

Speed: the training entries are gathered once as flat indices; one step is the gradient of
``sum((X^.flatten()[idx] - y)^2)`` plus the optimizer step.  Compiled, DAS's scaling and SAM's
two passes run inside that one compiled function (:func:`gradient_fns`, through
:mod:`tensorsam.optim.functional`) and only the base step goes through the optimizer
(``opt.base_step()``): on this 4-core problem the wrappers' many tiny per-step ops, not
arithmetic, were what made DAS and SAM slow.

The reconstruction is the tensors' own (:mod:`tensorsam.tensors.contract`): opt_einsum's path
replayed as plain ``torch.einsum`` steps, which ``torch.compile`` traces with a dynamic number of
gathered entries.
"""

from __future__ import annotations

import typing
import warnings

import torch

from tensorsam.tensors.contract import ContractionPlan, contract


def contraction_plan(model) -> ContractionPlan:
    """The model's own replayable contraction plan (:meth:`FactorizedTensor.contraction_plan`)."""
    return model.contraction_plan()


reconstruct = contract   # the full tensor from cores along a plan: the tensors' own contraction


def train_loss_fn(plan):
    """``f(cores, idx, y, scale) = scale * sum((X^(cores).flatten()[idx] - y)^2)`` for one plan."""

    def train_loss(cores, idx, y, scale):
        r = reconstruct(cores, plan).reshape(-1).index_select(0, idx) - y
        return r.square().sum() * scale

    return train_loss


def gradient_fns(loss_fn) -> dict:
    """Pure-tensor gradient functions of ``loss_fn`` for :class:`Objective` (each compiled whole),
    built on the functional optimizer API (:mod:`tensorsam.optim.functional`):

    - ``'plain'``: ``(cores, idx, y, scale) -> (grads, loss)``;
    - ``'das'``: ``(..., eta_alpha0, table, t, seg, counts, normalization, divisor) -> (grads,
      loss, scaled cores, t + 1)``: DAS's scaling (:func:`das_factors`, Eq. 9) out of place, copied
      into the cores after the call (a graph that mutates its inputs lost inductor's fusion of the
      loss with its backward: 1.7x the kernel time); the base step follows with ``grads``.
      eta alpha_t is ``eta_alpha0`` (:meth:`DAS.eta_alpha0`) times the schedule's entry at the
      device step counter ``t`` (:meth:`DAS.alpha_table`), which the call advances: a new host
      value each step cost about 20 us of this ~0.5 ms step;
    - ``'sam'``: ``(..., rho, adaptive) -> (grads at w + e, loss at w)``, e from
      :func:`sam_perturbation` (Algorithm 1); the weights stay at w.  A non-finite first-pass
      gradient gives e = 0 and NaN in the returned gradient, as ``SAM.restore`` does.

    ``'<kind>+adam'``: the same, then ``torch.optim.Adam``'s step in the graph too (see
    :meth:`Objective.step_fn`).

    Gradients are made contiguous: einsum's backward can return transposed strides, and torch
    2.13's fused CPU Adam then pairs gradient and parameter entries wrongly (silently).
    """
    from tensorsam.optim.functional import adam_step, das_factors, nan_unless, sam_perturbation
    from tensorsam.optim.schedules import table_lookup

    grad_and_value = torch.func.grad_and_value(loss_fn)

    def plain(cores, idx, y, scale):
        grads, loss = grad_and_value(cores, idx, y, scale)
        return tuple(g.contiguous() for g in grads), loss

    def das(cores, idx, y, scale, eta_alpha0, table, t, seg, counts, normalization, divisor):
        grads, loss = plain(cores, idx, y, scale)
        eta_alpha = eta_alpha0 * table_lookup(table, t)
        f = das_factors(list(cores), list(grads), eta_alpha, seg, counts, normalization, divisor)
        return grads, loss, tuple(c * fk for c, fk in zip(cores, f.unbind())), t + 1

    def sam(cores, idx, y, scale, rho, adaptive):
        grads, loss = plain(cores, idx, y, scale)
        e, finite = sam_perturbation(list(cores), list(grads), rho, adaptive)
        grads, _ = plain(tuple(c + ek for c, ek in zip(cores, e)), idx, y, scale)
        return (grads[0] + nan_unless(finite), *grads[1:]), loss

    fns = {"plain": plain, "das": das, "sam": sam}

    def with_adam(kind):
        """``fns[kind]`` followed by Adam's step (:func:`adam_step`) on the cores it leaves (DAS's
        scaled ones): ``(cores, idx, y, scale, exp_avgs, exp_avg_sqs, step, lr, betas, eps,
        weight_decay, *kind's args) -> (grads, loss, cores, exp_avgs, exp_avg_sqs, step + 1, *rest)``."""
        inner = fns[kind]

        def f(cores, idx, y, scale, exp_avgs, exp_avg_sqs, step, lr, betas, eps, weight_decay, *args):
            out = inner(cores, idx, y, scale, *args)
            grads, loss = out[0], out[1]
            start = out[2] if kind == "das" else cores
            new = adam_step(start, grads, exp_avgs, exp_avg_sqs, step + 1, lr, betas, eps, weight_decay)
            return (grads, loss, *map(tuple, new), step + 1, *out[3 if kind == "das" else 2:])

        return f

    fns.update({f"{kind}+adam": with_adam(kind) for kind in ("plain", "das", "sam")})
    return fns


class Objective:
    """The training loss on gathered entries, and a closure that puts its gradient in ``.grad``.

    ``idx`` are the flat indices of the training entries, gathered once.  With ``compile=True``
    the gradient (``torch.func.grad_and_value``) is compiled with ``torch.compile``; if that
    fails, eager autograd is used and a warning says so.  :meth:`step_fn` gives one whole
    training iteration; compiled, DAS's scaling and SAM's two passes run inside the one
    compiled gradient function (:func:`gradient_fns`), which saves the optimizer wrappers' many
    small per-step ops on this 4-core problem.
    """

    _compiled_cache: typing.ClassVar[dict] = {}

    def __init__(self, model, values: torch.Tensor, train: torch.Tensor, loss: str = "sum",
                 compile: bool = False):
        self.model = model
        self.cores = list(model.cores)
        self.plan = contraction_plan(model)
        dtype = self.cores[0].dtype
        flat = values.reshape(-1).to(dtype)
        self.idx = train.reshape(-1).nonzero().squeeze(1)
        self.y = flat.index_select(0, self.idx)
        self.scale = torch.tensor(1.0 if loss == "sum" else 1.0 / max(1, self.idx.numel()), dtype=dtype)
        self.loss_fn = train_loss_fn(self.plan)
        self.compiled = bool(compile)   # False once the gradient's compilation has failed
        self._grad = None               # the compiled gradient, built at its first use
        self._key = (model.einsum_equation(), tuple(model.core_shapes()), dtype)
        if compile:
            torch._dynamo.mark_dynamic(self.idx, 0)  # one graph for every mask size
            torch._dynamo.mark_dynamic(self.y, 0)

    def _compiled_grad(self):
        """The compiled plain gradient, compiled at the first call (a step with Adam in the graph
        never needs it); ``None`` once its compilation failed (warned: eager autograd from then)."""
        if self._grad is None and self.compiled:
            fn = self._compiled("plain")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn(tuple(c.detach() for c in self.cores), self.idx, self.y, self.scale)
                self._grad = fn
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
                warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); using eager autograd",
                              stacklevel=3)
                self.compiled = False
        return self._grad

    def _compiled(self, kind: str):
        """The compiled ``gradient_fns(...)[kind]`` for this model's shapes (cached per process)."""
        key = (*self._key, kind)
        if key not in self._compiled_cache:
            self._compiled_cache[key] = torch.compile(gradient_fns(self.loss_fn)[kind])
        return self._compiled_cache[key]

    def loss_and_grads(self, cores, compiled: bool = True):
        """(loss, gradients) of the training loss at ``cores`` (detached tensors); compiled when the
        objective is (``compiled=False``: eager autograd regardless)."""
        fn = self._compiled_grad() if compiled else None
        if fn is not None:
            grads, loss = fn(tuple(cores), self.idx, self.y, self.scale)
            return loss, grads
        with torch.enable_grad():
            leaves = [c.detach().requires_grad_() for c in cores]
            loss = self.loss_fn(leaves, self.idx, self.y, self.scale)
            grads = torch.autograd.grad(loss, leaves)
        return loss.detach(), grads

    def closure(self, compiled: bool = True):
        """Compute the gradient at the current cores into ``.grad``; returns the loss."""
        loss, grads = self.loss_and_grads([c.detach() for c in self.cores], compiled)
        self._set_grads(grads)
        return loss

    def _set_grads(self, grads) -> None:
        for p, g in zip(self.cores, grads):
            p.grad = g.contiguous()   # see gradient_fns

    def step_fn(self, method: str, opt):
        """A callable doing one training iteration of ``method`` with ``opt`` (from
        :func:`make_optimizer`) and returning the loss at the current point (a tensor, not read).

        Compiled, with a plain ``torch.optim.Adam`` as the base step, the whole iteration (DAS's
        scaling or SAM's two passes, and Adam's step) is one compiled graph (:meth:`_adam_step`).
        Otherwise DAS and SAM use the fused gradient functions of :func:`gradient_fns` and the base
        step runs through ``opt``.  If a compilation fails, a warning is given and the next path
        takes over, down to the eager wrappers.  No step reads a device value.
        """
        def eager(compiled: bool = True):
            closure = self.closure if compiled else (lambda: self.closure(compiled=False))
            if method == "sam":
                return opt.step(closure)
            loss = closure()
            opt.step()
            return loss

        if not self.compiled or method not in ("adam", "das", "sam"):
            return eager
        in_graph = self._adam_step(method, opt, lambda: eager(compiled=False))   # one graph, nothing else compiled
        if in_graph is not None or method == "adam":
            return in_graph or eager
        cores = tuple(c.detach() for c in self.cores)
        step, warm = (self._das_step if method == "das" else self._sam_step)(self._compiled(method), cores, opt)
        return step if self._warm(method, warm) else eager

    def _warm(self, method: str, warm) -> bool:
        """Compile now (the gradient functions are pure, so the call changes nothing); on a
        compiler failure, warn and return False (the caller falls back to the eager wrappers)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                warm()
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
            warnings.warn(f"torch.compile of the fused {method} step failed ({type(err).__name__}: {err}); "
                          "using the eager optimizer wrapper", stacklevel=3)
            return False
        return True

    def _sam_step(self, fn, cores, opt):
        """(the fused SAM iteration around the compiled ``fn``, a call of ``fn`` that changes nothing)."""
        def call():
            return fn(cores, self.idx, self.y, self.scale, *opt.functional_args(self.cores))

        def step():
            grads, loss = call()
            self._set_grads(grads)
            opt.base_step()
            return loss

        return step, call

    def _das_step(self, fn, cores, opt):
        """(the fused DAS iteration around the compiled ``fn`` (:func:`gradient_fns`' ``'das'``), a
        call of ``fn`` that changes nothing)."""
        das, targets, idx, y, scale = _DASArgs(opt), list(cores), self.idx, self.y, self.scale

        def step():
            grads, loss, scaled, t = fn(cores, idx, y, scale, *das())
            das.advance(t)
            torch._foreach_copy_(targets, scaled)
            self._set_grads(grads)
            opt.base_step()
            return loss

        return step, lambda: fn(cores, idx, y, scale, *das())

    def _adam_step(self, method: str, opt, fallback):
        """The iteration with Adam's step inside the compiled graph as well (``'<kind>+adam'`` of
        :func:`gradient_fns`), writing Adam's own state (moments, step count), or ``None`` where
        Adam is not exactly the base step (:func:`~tensorsam.optim.functional.adam_fits_graph`),
        non-finite steps are to be skipped (that needs a host read) or compilation fails.  Until
        Adam has state (its first step), and when its state or param group is replaced (a reload),
        ``fallback`` (the eager wrapper on eager autograd: nothing else to compile) takes the step,
        and the state is picked up after it."""
        from tensorsam.optim.functional import adam_fits_graph, adam_settings
        from tensorsam.optim.plan import per_core_values

        base = getattr(opt, "base_optimizer", opt)
        if not adam_fits_graph(base, self.cores) or getattr(opt, "skip_nonfinite", False):
            return None
        kind = {"adam": "plain", "das": "das", "sam": "sam"}[method]
        fn = self._compiled(f"{kind}+adam")
        cores, idx, y, scale = tuple(c.detach() for c in self.cores), self.idx, self.y, self.scale
        das = _DASArgs(opt) if method == "das" else None
        extra = das if das is not None else ((lambda: opt.functional_args(self.cores)) if method == "sam" else tuple)
        held: dict = {"of": None}        # Adam's state tensors, and the (state, group) they belong to
        lr_cache: dict = {}              # the lr tensor, kept while lr holds its value

        def state_args():
            group = base.param_groups[0]
            if held["of"] != (id(base.state), id(group)):
                if not all(p in base.state for p in self.cores):
                    return None
                st = [base.state[p] for p in self.cores]
                held.update(of=(id(base.state), id(group)), m=tuple(s["exp_avg"] for s in st),
                            v=tuple(s["exp_avg_sq"] for s in st), steps=[s["step"] for s in st])
                held["targets"] = [*cores, *held["m"], *held["v"], *held["steps"]]
            lr = per_core_values([group], [0], lambda g: g["lr"], cores[0], lr_cache)
            return (held["m"], held["v"], held["steps"][0], lr, *adam_settings(group))

        def step():
            adam = state_args()
            if adam is None:
                return fallback()
            grads, loss, p, m, v, t, *rest = fn(cores, idx, y, scale, *adam, *extra())
            torch._foreach_copy_(held["targets"], [*p, *m, *v, *[t] * len(held["steps"])])
            self._set_grads(grads)
            if das is not None:
                das.advance(rest[0])
            if base is not opt:
                opt.count_step()
            return loss

        def warm():   # Adam's own settings; zero moments, step and lr like those of the coming steps
            zeros = tuple(torch.zeros_like(c) for c in cores)
            return fn(cores, idx, y, scale, zeros, zeros, torch.zeros((), device=cores[0].device),
                      torch.zeros(1, dtype=cores[0].dtype, device=cores[0].device),
                      *adam_settings(base.param_groups[0]), *extra())

        return step if self._warm(f"{method} (Adam in the graph)", warm) else None

    @torch.no_grad()
    def predict(self) -> torch.Tensor:
        """The reconstruction, flattened."""
        return reconstruct([c.detach() for c in self.cores], self.plan).reshape(-1)


class _DASArgs:
    """DAS's arguments of the compiled ``'das'`` graphs: (eta_alpha0, schedule table, device step
    counter t, seg, counts, normalization, divisor).  The graph returns t + 1, kept for the next
    call; t is rebuilt from ``opt.step_count`` (a fill on the device, no copy) whenever the two part: at
    the first step, after a skipped step or eager steps, or a state reload."""

    def __init__(self, opt):
        a = opt.functional_args()
        self.opt, self.fixed, self.table = opt, (a.seg, a.counts, a.normalization, a.divisor), opt.alpha_table()
        self.t, self.at, self.n = None, None, None

    def __call__(self) -> tuple:
        self.n = self.opt.step_count
        if self.at != self.n:
            self.t = torch.full((), self.n, dtype=torch.int64, device=self.table.device)   # a fill, no copy
        return (self.opt.eta_alpha0(), self.table, self.t, *self.fixed)

    def advance(self, t: torch.Tensor) -> None:
        """The graph's t + 1, for the step after this one (call before counting the step)."""
        self.t, self.at = t, self.n + 1
