"""Tensor completion (E1): fit a factorized tensor to a random subset of entries.

The paper's protocol (its tensor-completion experiment, Table 1) is the default of :class:`CompletionConfig`: the COVID-19
serology tensor, Tucker rank (8, 6, 8), mask seeds 42/87/100 (30 % of entries train, the rest
held out), 50 000 Adam steps at lr 1e-3 on the *sum* of squared residuals over the training
entries, SAM rho = 0.01, DAS alpha = 0.001 decaying linearly to 0, and tensorly's masked HOOI
as the baseline.  Every run reports R² (mean-centred, as the appendix defines it), the
uncentred 1 - ||X^-X||²/||X||² of the authors' code and RMSE, each on the training entries
and on the held-out entries, labelled.  The paper's Table 1 is the *training* R².

``protocol='validated'`` carves a validation split out of the training entries and uses it
for early stopping and for choosing the rank among ``rank_grid``, so that held-out R² means
something (under the paper's protocol rank (8, 6, 8) overfits 30 % of the entries).

Speed: the training entries are gathered once as flat indices; one step is the gradient of
``sum((X^.flatten()[idx] - y)^2)`` (compiled with ``torch.compile`` when ``compile=True``)
plus the optimizer step; metrics and norm dynamics are read every ``log_every`` steps only.
Compiled, DAS's scaling and SAM's two passes run inside that one compiled function
(:func:`gradient_fns`, through :mod:`tensorsam.optim.functional`) and only the base step goes
through the optimizer (``opt.base_step()``): on this 4-core problem the wrappers' many tiny
per-step ops, not arithmetic, were what made DAS and SAM slow.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import shutil
import time
import typing
import warnings
from pathlib import Path

import numpy as np
import opt_einsum
import torch

from tensorsam.data import load_tensor, make_masks
from tensorsam.dynamics import NormTracker
from tensorsam.optim import build_optimizer
from tensorsam.run import Loop, atomic_torch_save, load_checkpoint, write_results
from tensorsam.tasks.metrics import scores
from tensorsam.tensors import get_format

METHODS = ("hooi", "adam", "sam", "das", "rebalance")
MODELS = ("tucker", "cp", "tt", "tr")
PROTOCOLS = ("paper", "validated")


@dataclasses.dataclass
class CompletionConfig:
    """Settings of a completion experiment; the defaults are the paper's protocol (Table 1).

    ``loss='sum'`` is the sum of squared residuals over the training entries (the authors'
    code); ``'mean'`` divides it by their number.  Caveat: DAS's lambda scales with the
    gradients' size relative to the cores, so alpha = 0.001 is calibrated for the sum; with
    the mean the same alpha acts differently (and SAM's rho is unaffected only because SAM
    normalises the gradient).
    """

    dataset: str = "covid19"  # a tensorly data set name or a path to a .npy file
    standardize: bool = False  # z-score the observed entries (the paper uses the array as shipped)
    allow_missing: bool = False  # for .npy files: treat NaNs as missing entries
    model: str = "tucker"  # tucker | cp | tt | tr
    rank: list[int] = dataclasses.field(default_factory=lambda: [8, 6, 8])
    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS))
    seeds: list[int] = dataclasses.field(default_factory=lambda: [42, 87, 100])
    iterations: int = 50000
    train_fraction: float = 0.3
    protocol: str = "paper"  # paper | validated
    val_fraction: float = 0.2  # validated protocol: share of the training entries held for validation
    rank_grid: list[list[int]] = dataclasses.field(default_factory=list)  # validated: candidate ranks
    patience: int = 10  # validated: stop after this many evaluations without a better val R²
    optimizer: str = "Adam"  # any torch.optim class name
    lr: float = 1e-3
    weight_decay: float = 0.0
    rho: float = 0.01  # SAM
    alpha: float = 0.001  # DAS
    alpha_schedule: str = "linear"  # constant | linear | cosine
    rebalance_every: int = 1
    loss: str = "sum"  # sum | mean
    init: str = "tensorly"  # tensorly (the authors': U[0,1) cores, Tucker core + 0.01) | unified
    hooi_iterations: int = 50000
    hooi_tol: float = 1e-5
    log_every: int = 500  # metrics, norm dynamics and (validated) evaluation every this many steps
    checkpoint_every: int = 2000
    compile: bool = True  # torch.compile the gradient (falls back to eager if compilation fails)
    threads: int = 1  # torch threads (the problem is tiny; more threads only add overhead)
    dtype: str = "float32"


# --------------------------------------------------------------------------- validation


def _known(value, options, what):
    if value not in options:
        raise ValueError(f"unknown {what} {value!r}; expected one of {list(options)}")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class called ``name`` (e.g. 'Adam', 'AdamW', 'SGD')."""
    cls = getattr(torch.optim, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or cls is torch.optim.Optimizer:
        valid = sorted(n for n, c in vars(torch.optim).items()
                       if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and n != "Optimizer")
        raise ValueError(f"unknown base optimizer {name!r}; expected a torch.optim class: {valid}")
    return cls


def check_config(cfg: CompletionConfig) -> None:
    """Refuse a bad configuration before anything runs or is written."""
    for m in cfg.methods:
        _known(m, METHODS, "method")
    if not cfg.methods:
        raise ValueError("methods is empty; expected some of " + ", ".join(METHODS))
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"methods lists a method twice: {cfg.methods}")
    _known(cfg.model, MODELS, "model")
    _known(cfg.protocol, PROTOCOLS, "protocol")
    _known(cfg.loss, ("sum", "mean"), "loss")
    _known(cfg.init, ("tensorly", "unified"), "init")
    _known(cfg.alpha_schedule, ("constant", "linear", "cosine"), "alpha_schedule")
    _known(cfg.dtype, ("float32", "float64"), "dtype")
    optimizer_class(cfg.optimizer)
    if "hooi" in cfg.methods and cfg.model != "tucker":
        raise ValueError(f"method 'hooi' fits a Tucker model; it cannot run with model={cfg.model!r}")
    if not cfg.seeds:
        raise ValueError("seeds is empty")
    if not 0.0 < cfg.train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {cfg.train_fraction}")
    if cfg.protocol == "validated" and not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1) under the validated protocol, got {cfg.val_fraction}")
    for key in ("iterations", "log_every", "checkpoint_every", "rebalance_every", "hooi_iterations",
                "patience", "threads"):
        value = getattr(cfg, key)
        if value < (0 if key == "threads" else 1):
            raise ValueError(f"{key} must be positive, got {value}")
    for key in ("lr", "rho", "alpha", "weight_decay", "hooi_tol"):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) >= 0):
            raise ValueError(f"{key} must be a non-negative number, got {getattr(cfg, key)}")


def candidate_ranks(cfg: CompletionConfig) -> list[list[int]]:
    """The ranks to try: ``rank_grid`` under the validated protocol (if given), else ``rank``."""
    if cfg.protocol == "validated" and cfg.rank_grid:
        return [list(r) for r in cfg.rank_grid]
    return [list(cfg.rank)]


def build_model(cfg: CompletionConfig, shape, rank, seed: int):
    """The completion model for ``shape`` at ``rank``, initialised as ``cfg.init`` says.

    ``init='tensorly'`` is the authors' initialisation: tensorly's random Tucker init seeded
    with the mask seed (core ~ U[0,1) + 0.01, factors ~ U[0,1)); for CP/TT/TR each core is
    U[0,1) from the same seeded numpy generator.  ``'unified'`` is the variance-matched
    initialisation of :meth:`FactorizedTensor.reset_parameters` (target variance 1).
    """
    dtype = getattr(torch, cfg.dtype)
    model = get_format(cfg.model)(shape, rank if len(rank) != 1 else int(rank[0]), dtype=dtype)
    if cfg.init == "unified":
        gen_state = torch.get_rng_state()
        torch.manual_seed(seed)
        model.reset_parameters()
        torch.set_rng_state(gen_state)
        return model
    if cfg.model == "tucker":
        import tensorly as tl
        from tensorly.decomposition._tucker import initialize_tucker

        with tl.backend_context("numpy"):
            core, factors = initialize_tucker(np.zeros(shape), list(model.rank), list(range(len(shape))),
                                              random_state=seed, init="random")
        cores = [core, *factors]
    else:
        rng = np.random.RandomState(seed)
        cores = [rng.random_sample(s) for s in model.core_shapes()]
    return model.load_cores([torch.as_tensor(np.asarray(c), dtype=dtype) for c in cores])


# --------------------------------------------------------------------------- the objective


def contraction_plan(model) -> tuple[list, str]:
    """Pairwise ``torch.einsum`` steps along opt_einsum's optimal path for ``model``'s cores.

    Replaying the path with plain ``torch.einsum`` (rather than an opt_einsum expression) keeps
    the reconstruction traceable by ``torch.compile``.
    """
    eq = model.einsum_equation()
    path, _ = opt_einsum.contract_path(eq, *model.core_shapes(), shapes=True, optimize="optimal")
    ins, out = eq.split("->")
    ops = ins.split(",")
    steps = []
    for pair in path:
        pair = sorted(pair, reverse=True)
        taken = [ops.pop(i) for i in pair]
        joined = "".join(taken)
        rest = "".join(ops) + out
        keep = "".join(dict.fromkeys(c for c in joined if c in rest))
        steps.append((tuple(pair), ",".join(taken) + "->" + keep))
        ops.append(keep)
    return steps, f"{ops[0]}->{out}"


def reconstruct(cores, plan) -> torch.Tensor:
    """The full tensor from ``cores`` along a :func:`contraction_plan`."""
    steps, final = plan
    ops = list(cores)
    for pair, eq in steps:
        ops.append(torch.einsum(eq, *[ops.pop(i) for i in pair]))
    return torch.einsum(final, ops[0])


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
    - ``'das'``: the same, then DAS's scaling of the cores in place (:func:`das_scale_`, Eq. 9)
      with the arguments of ``DAS.functional_args()``; the base step follows with ``grads``;
    - ``'sam'``: ``(..., rho, adaptive) -> (grads at w + e, loss at w)``, e from
      :func:`sam_perturbation` (Algorithm 1); the weights stay at w.  A non-finite first-pass
      gradient gives e = 0 and NaN in the returned gradient, as ``SAM.restore`` does.

    Gradients are made contiguous: einsum's backward can return transposed strides, and torch
    2.13's fused CPU Adam then pairs gradient and parameter entries wrongly (silently).
    """
    from tensorsam.optim.functional import das_scale_, nan_unless, sam_perturbation

    grad_and_value = torch.func.grad_and_value(loss_fn)

    def plain(cores, idx, y, scale):
        grads, loss = grad_and_value(cores, idx, y, scale)
        return tuple(g.contiguous() for g in grads), loss

    def das(cores, idx, y, scale, eta_alpha, seg, counts, normalization, divisor):
        grads, loss = plain(cores, idx, y, scale)
        das_scale_(list(cores), list(grads), eta_alpha, seg, counts, normalization, divisor)
        return grads, loss

    def sam(cores, idx, y, scale, rho, adaptive):
        grads, loss = plain(cores, idx, y, scale)
        e, finite = sam_perturbation(list(cores), list(grads), rho, adaptive)
        grads, _ = plain(tuple(c + ek for c, ek in zip(cores, e)), idx, y, scale)
        return (grads[0] + nan_unless(finite), *grads[1:]), loss

    return {"plain": plain, "das": das, "sam": sam}


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
        self.compiled = False
        self._grad = None
        self._key = (model.einsum_equation(), tuple(model.core_shapes()), dtype)
        if compile:
            torch._dynamo.mark_dynamic(self.idx, 0)  # one graph for every mask size
            torch._dynamo.mark_dynamic(self.y, 0)
            fn = self._compiled("plain")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn(tuple(c.detach() for c in self.cores), self.idx, self.y, self.scale)
                self._grad = fn
                self.compiled = True
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
                warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); using eager autograd",
                              stacklevel=2)

    def _compiled(self, kind: str):
        """The compiled ``gradient_fns(...)[kind]`` for this model's shapes (cached per process)."""
        key = (*self._key, kind)
        if key not in self._compiled_cache:
            self._compiled_cache[key] = torch.compile(gradient_fns(self.loss_fn)[kind])
        return self._compiled_cache[key]

    def loss_and_grads(self, cores):
        """(loss, gradients) of the training loss at ``cores`` (detached tensors)."""
        if self._grad is not None:
            grads, loss = self._grad(tuple(cores), self.idx, self.y, self.scale)
            return loss, grads
        with torch.enable_grad():
            leaves = [c.detach().requires_grad_() for c in cores]
            loss = self.loss_fn(leaves, self.idx, self.y, self.scale)
            grads = torch.autograd.grad(loss, leaves)
        return loss.detach(), grads

    def closure(self):
        """Compute the gradient at the current cores into ``.grad``; returns the loss."""
        loss, grads = self.loss_and_grads([c.detach() for c in self.cores])
        self._set_grads(grads)
        return loss

    def _set_grads(self, grads) -> None:
        for p, g in zip(self.cores, grads):
            p.grad = g.contiguous()   # see gradient_fns

    def step_fn(self, method: str, opt):
        """A callable doing one training iteration of ``method`` with ``opt`` (from
        :func:`make_optimizer`) and returning the loss at the current point (a tensor, not read).

        Compiled, DAS and SAM use the fused gradient functions of :func:`gradient_fns` (the
        base step still runs through ``opt``); if their compilation fails, a warning is given and
        the eager wrappers take over.  No step reads a device value.
        """
        def eager():
            if method == "sam":
                return opt.step(self.closure)
            loss = self.closure()
            opt.step()
            return loss

        if not self.compiled or method not in ("das", "sam"):
            return eager
        cores = tuple(c.detach() for c in self.cores)
        fn = self._compiled(method)

        def fused():
            args = opt.functional_args()[1:] if method == "das" else opt.functional_args(self.cores)
            grads, loss = fn(cores, self.idx, self.y, self.scale, *args)
            self._set_grads(grads)
            opt.base_step()
            return loss

        state = {"step": None}

        def step():
            if state["step"] is not None:
                return state["step"]()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loss = fused()
                state["step"] = fused
            except Exception as err:  # noqa: BLE001 - compiler failures happen before any update
                warnings.warn(f"torch.compile of the fused {method} step failed ({type(err).__name__}: {err}); "
                              "using the eager optimizer wrapper", stacklevel=2)
                state["step"] = eager
                loss = eager()
            return loss

        return step

    @torch.no_grad()
    def predict(self) -> torch.Tensor:
        """The reconstruction, flattened."""
        return reconstruct([c.detach() for c in self.cores], self.plan).reshape(-1)


# --------------------------------------------------------------------------- optimizers


def make_optimizer(method: str, cores, cfg: CompletionConfig, total_steps: int):
    """The optimizer of ``method`` over ``cores`` (one scale-invariant group), base ``cfg.optimizer``,
    from :func:`tensorsam.optim.build_optimizer`; 'adam' is the base optimizer alone."""
    base = optimizer_class(cfg.optimizer)
    kwargs = {"lr": cfg.lr}
    params = inspect.signature(base.__init__).parameters
    if "weight_decay" in params:
        kwargs["weight_decay"] = cfg.weight_decay
    if "fused" in params:
        kwargs["fused"] = True  # one kernel for the whole base step
    options = {"adam": {}, "sam": {"rho": cfg.rho, "compile": cfg.compile},
               "das": {"alpha": cfg.alpha, "alpha_schedule": cfg.alpha_schedule, "compile": cfg.compile},
               "rebalance": {"every": cfg.rebalance_every}}
    if method not in options:
        raise ValueError(f"method {method!r} is not trained by an optimizer")
    return build_optimizer("base" if method == "adam" else method, cores, groups=[cores], base=base,
                           total_steps=total_steps, **options[method], **kwargs)


# --------------------------------------------------------------------------- one run


def _entries(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = mask.reshape(-1).nonzero().squeeze(1)
    return idx, values.reshape(-1).index_select(0, idx)


def evaluate(pred_flat: torch.Tensor, values: torch.Tensor, masks) -> dict[str, float]:
    """Training, validation and held-out scores of a flat prediction (see :func:`scores`)."""
    out = {}
    for name, mask in (("train", masks.train), ("val", masks.val), ("heldout", masks.heldout)):
        idx, target = _entries(values, mask)
        out.update(scores(pred_flat.index_select(0, idx), target, name))
    return out


class _Cores:
    """``state_dict`` adapter so the Loop checkpoints a list of tensors (e.g. the best cores)."""

    def __init__(self, tensors):
        self.tensors = list(tensors)

    def state_dict(self):
        return {str(i): t for i, t in enumerate(self.tensors)}

    def load_state_dict(self, sd):
        with torch.no_grad():
            for i, t in enumerate(self.tensors):
                t.copy_(sd[str(i)])


def train_run(method: str, cfg: CompletionConfig, values, masks, seed: int, rank, *,
              checkpoint=None, resume=False, progress=False, desc="") -> tuple[dict, list[torch.Tensor]]:
    """Train one (method, seed, rank) run; returns its record and final (or best) cores."""
    values = values.to(getattr(torch, cfg.dtype))
    model = build_model(cfg, values.shape, rank, seed)
    obj = Objective(model, values, masks.train, cfg.loss, cfg.compile)
    opt = make_optimizer(method, obj.cores, cfg, cfg.iterations)
    tracker = NormTracker([obj.cores])
    validated = cfg.protocol == "validated"
    best = _Cores([c.detach().clone() for c in obj.cores])
    loop = Loop(cfg.iterations, state={"model": model, "optimizer": opt, "best": best},
                checkpoint=checkpoint, every=cfg.checkpoint_every, resume=resume, desc=desc,
                progress=progress)
    if not loop.resumed:
        loop.extra = {"trace": [], "wall": 0.0, "best_val": -math.inf, "best_it": 0, "stale": 0}
    ex = loop.extra
    step = obj.step_fn(method, opt)
    t0 = time.perf_counter()
    for it in loop:
        loss = step()
        done = it + 1
        if done % cfg.log_every == 0 or done == cfg.iterations:
            dyn = tracker.compute()
            m = evaluate(obj.predict(), values, masks)
            row = {"iteration": done, "loss": float(loss), "Q": float(dyn["Q"][0]), "cov": float(dyn["cov"][0]),
                   **{k: m[k] for k in ("train_r2", "val_r2", "heldout_r2") if k in m}}
            ex["trace"].append(row)
            loop.log(loss=row["loss"], train_r2=row["train_r2"], Q=row["Q"])
            if validated:
                if m["val_r2"] > ex["best_val"]:
                    ex["best_val"], ex["best_it"], ex["stale"] = m["val_r2"], done, 0
                    best.load_state_dict({str(i): c.detach() for i, c in enumerate(obj.cores)})
                else:
                    ex["stale"] += 1
                if ex["stale"] >= cfg.patience:
                    break
        if done % cfg.checkpoint_every == 0:  # the loop saves right after this body
            ex["wall"] += time.perf_counter() - t0
            t0 = time.perf_counter()
    ex["wall"] += time.perf_counter() - t0
    final = [t.clone() for t in best.tensors] if validated else [c.detach().clone() for c in obj.cores]
    pred = reconstruct(final, obj.plan).reshape(-1)
    record = {"method": method, "seed": seed, **evaluate(pred, values, masks),
              "wall_seconds": ex["wall"],
              "info": {"rank": list(rank), "iterations": ex["trace"][-1]["iteration"] if ex["trace"] else 0,
                       "compiled": obj.compiled, "best_iteration": ex["best_it"] if validated else None},
              "trace": _columns(ex["trace"])}
    return record, final


def _columns(rows: list[dict]) -> dict[str, list]:
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: [r.get(k) for r in rows] for k in keys}


def hooi_run(cfg: CompletionConfig, values, masks, seed: int, rank) -> tuple[dict, list[torch.Tensor]]:
    """tensorly's masked Tucker (HOOI) as the authors ran it: ``init='random'`` seeded with the
    mask seed, ``n_iter_max`` and ``tol`` from the config.  Entries outside the training mask are
    zeroed before the call, so no held-out value can leak in."""
    import tensorly as tl
    from tensorly.decomposition import tucker

    t0 = time.perf_counter()
    x = values.double().numpy()
    m = masks.train.numpy()
    with tl.backend_context("numpy"), _single_threaded_blas():
        (core, factors), errors = tucker(x * m, list(rank), mask=m.astype(np.float64),
                                         n_iter_max=cfg.hooi_iterations, tol=cfg.hooi_tol, init="random",
                                         random_state=seed, return_errors=True)
    wall = time.perf_counter() - t0
    dtype = getattr(torch, cfg.dtype)
    final = [torch.as_tensor(np.asarray(c), dtype=dtype) for c in (core, *factors)]
    model = get_format("tucker")(values.shape, rank, dtype=dtype).load_cores(final)
    pred = model.reconstruct().detach().reshape(-1)
    with torch.no_grad():
        q = float(NormTracker([list(model.cores)]).compute()["Q"][0])
    record = {"method": "hooi", "seed": seed, **evaluate(pred, values.to(dtype), masks), "wall_seconds": wall,
              "info": {"rank": list(rank), "iterations": len(errors), "Q_final": q}}
    return record, final


def _single_threaded_blas():
    """BLAS on one thread: tensorly's HOOI does many tiny SVDs, and a multi-threaded BLAS on
    a busy machine makes each of them ~20x slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only costs speed
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def _select(cands: list[tuple[dict, list]]) -> tuple[dict, list]:
    """The candidate (record, cores) with the best validation R²; the others are summarised in it."""
    best = max(cands, key=lambda rc: rc[0].get("val_r2", -math.inf))
    record = dict(best[0])
    record["info"] = {**record["info"], "candidates": [
        {"rank": r["info"]["rank"], "val_r2": r.get("val_r2"), "heldout_r2": r.get("heldout_r2"),
         "best_iteration": r["info"].get("best_iteration")} for r, _ in cands]}
    record["wall_seconds"] = sum(r["wall_seconds"] for r, _ in cands)
    return record, best[1]


# --------------------------------------------------------------------------- the experiment


def prepare(cfg: CompletionConfig):
    """Check ``cfg``, load the data and make every seed's masks (all errors happen here)."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_tensor(cfg.dataset, standardize=cfg.standardize, allow_missing=cfg.allow_missing)
    for rank in candidate_ranks(cfg):
        build_model(cfg, data.shape, rank, 0)  # a rank larger than a mode raises here
    val_fraction = cfg.val_fraction if cfg.protocol == "validated" else 0.0
    masks = {s: make_masks(data.shape, s, cfg.train_fraction, val_fraction, data.observed) for s in cfg.seeds}
    return data, masks


def run_completion(cfg: CompletionConfig, out_dir=None, *, resume: bool = False, progress: bool = False,
                   started: float | None = None) -> dict:
    """Run every (method, seed) of ``cfg``; returns ``{"runs": [...], "data": ..., "masks": ...}``.

    With ``out_dir``, each finished run is kept under ``out_dir/.work`` and each training run
    checkpoints there, so ``resume=True`` continues an interrupted experiment; at the end
    ``out_dir/results.json`` (via :func:`write_results`) and ``out_dir/solutions.pt`` (the final
    cores of every run, for :mod:`tensorsam.tasks.flatness`) are written and ``.work`` removed.
    """
    started = time.time() if started is None else started
    data, masks = prepare(cfg)
    work = Path(out_dir) / ".work" if out_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    runs, solutions = [], {}
    for seed in cfg.seeds:
        for method in cfg.methods:
            tag = f"{method}_seed{seed}"
            done_file = work / f"{tag}.pt" if work is not None else None
            if resume and done_file is not None and done_file.exists():
                saved = load_checkpoint(done_file)
                runs.append(json.loads(saved["record"]))
                solutions[tag] = list(saved["cores"])
                continue
            cands = []
            for rank in candidate_ranks(cfg):
                if method == "hooi":
                    cands.append(hooi_run(cfg, data.values, masks[seed], seed, rank))
                    continue
                ckpt = work / f"{tag}_rank{'x'.join(map(str, rank))}.ckpt" if work is not None else None
                cands.append(train_run(method, cfg, data.values, masks[seed], seed, rank, checkpoint=ckpt,
                                       resume=resume, progress=progress, desc=f"{tag} rank {rank}"))
            record, cores = _select(cands) if cfg.protocol == "validated" else cands[0]
            record["masks"] = masks[seed].record()
            runs.append(record)
            solutions[tag] = cores
            if done_file is not None:
                atomic_torch_save({"record": json.dumps(record), "cores": cores}, done_file)
    result = {"runs": runs, "data": data.record(), "solutions": solutions}
    if out_dir is not None:
        out = Path(out_dir)
        atomic_torch_save({k: list(v) for k, v in solutions.items()}, out / "solutions.pt")
        write_results(out / "results.json", task="completion", config=cfg, runs=runs,
                      extra=_extra(cfg, data.record()), started=started)
        shutil.rmtree(work, ignore_errors=True)
    return result


# The paper's Table 1 (mean ± std over mask seeds 42, 87, 100).  The authors' code scores the
# training entries with the uncentred formula, so that is the metric these numbers are.
PAPER_TABLE1 = {"adam": [0.9482, 0.0012], "sam": [0.9485, 0.0013], "das": [0.9484, 0.0017],
                "hooi": [0.9268, 0.0063]}


def _extra(cfg: CompletionConfig, data_record: dict) -> dict:
    extra = {"data": data_record, "protocol_note": PROTOCOL_NOTE}
    paper = CompletionConfig()
    if all(getattr(cfg, k) == getattr(paper, k) for k in ("dataset", "model", "rank", "train_fraction", "protocol",
                                                          "loss", "init", "optimizer", "lr")):
        extra["reference"] = {
            "source": "paper Table 1 (training entries, uncentred R² of the authors' code)",
            "values": {m: {"train_r2_uncentred": v} for m, v in PAPER_TABLE1.items() if m in cfg.methods}}
    return extra


def merge_results(sources, out_dir) -> dict:
    """Merge completion output dirs that ran the same config on different seeds (e.g. one process
    per seed) into ``out_dir``: one results.json with every run, one solutions.pt."""
    loaded = []
    for src in sources:
        path = Path(src) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"no completion results in {src} (expected {path})")
        loaded.append((Path(src), json.loads(path.read_text())))
    known = {f.name for f in dataclasses.fields(CompletionConfig)}
    configs = [{k: v for k, v in res["config"].items() if k != "seeds"} for _, res in loaded]
    if any(c != configs[0] for c in configs[1:]):
        raise ValueError("the results to merge were made with different configs (apart from seeds)")
    cfg = CompletionConfig(**{k: v for k, v in loaded[0][1]["config"].items() if k in known})
    runs = [r for _, res in loaded for r in res["runs"]]
    cfg.seeds = list(dict.fromkeys(r["seed"] for r in runs))
    solutions = {}
    for src, _ in loaded:
        solutions.update(load_checkpoint(src / "solutions.pt"))
    out = Path(out_dir)
    atomic_torch_save(solutions, out / "solutions.pt")
    extra = _extra(cfg, loaded[0][1].get("data", {}))
    extra["merged_from"] = [{"dir": str(src), "wall_seconds": res.get("wall_seconds"),
                             "provenance": res.get("provenance")} for src, res in loaded]
    import datetime

    started = min(datetime.datetime.fromisoformat(res["provenance"]["started_utc"]).timestamp()
                  for _, res in loaded)
    return write_results(out / "results.json", task="completion", config=cfg, runs=runs, extra=extra,
                         started=started)


PROTOCOL_NOTE = ("train_* metrics are computed on the training entries (what the paper's Table 1 reports); "
                 "heldout_* on the entries never seen in training; r2 is mean-centred, r2_uncentred is the "
                 "authors' 1 - ||X^-X||^2/||X||^2.")

def summary_lines(runs: list[dict]) -> list[str]:
    """One line per method: mean ± std over seeds of training and held-out R²."""
    lines = [f"{'method':<10} {'train R²':>18} {'held-out R²':>22} {'wall s':>8}"]
    for method in dict.fromkeys(r["method"] for r in runs):
        sel = [r for r in runs if r["method"] == method]

        def ms(key, sel=sel):
            v = np.array([r.get(key, math.nan) for r in sel], dtype=float)
            return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}"

        wall = sum(r["wall_seconds"] for r in sel) / len(sel)
        lines.append(f"{method:<10} {ms('train_r2'):>18} {ms('heldout_r2'):>22} {wall:>8.1f}")
    return lines


def figures(results: dict, out_dir: Path) -> list[Path]:
    """Norm dynamics (Q, Cov) and training R² against iterations, one line per (method, seed), and
    training / held-out R² per method (mean ± std over seeds)."""
    from tensorsam.tasks import figure_grid, save_figure

    runs = results["runs"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    paths = []
    traced = [r for r in runs if r.get("trace")]
    if traced:
        fig, (axes,) = figure_grid(1, 3, (15, 4))
        for r in traced:
            tr = r["trace"]
            label = r["method"] if r["seed"] == min(x["seed"] for x in traced) else None
            for ax, key in zip(axes, ("Q", "cov", "train_r2")):
                ax.plot(tr["iteration"], tr[key], color=colors[r["method"]], lw=1, label=label)
        axes[0].set(yscale="log", ylabel="norm deviation Q", xlabel="iteration")
        axes[1].set(yscale="symlog", ylabel="Cov(s, γ)", xlabel="iteration")
        axes[2].set(ylim=(0, 1), ylabel="training R²", xlabel="iteration")
        axes[0].legend()
        paths.append(save_figure(fig, out_dir, "completion_dynamics.png"))
    fig, (axes,) = figure_grid(1, 2, (10, 4))
    for ax, key in zip(axes, ("train_r2", "heldout_r2")):
        vals = [np.array([r[key] for r in runs if r["method"] == m], dtype=float) for m in methods]
        ax.bar(methods, [v.mean() for v in vals], yerr=[v.std(ddof=1) if len(v) > 1 else 0 for v in vals],
               color=[colors[m] for m in methods])
        ax.set_ylabel(("training" if key == "train_r2" else "held-out") + " R² (mean ± std over seeds)")
        if key == "train_r2":
            low = min(v.min() for v in vals)
            ax.set_ylim(max(low - 0.01, 0.0) if low > 0 else None, 1.0)
        else:
            ax.set_yscale("symlog")
    paths.append(save_figure(fig, out_dir, "completion_r2.png"))
    return paths
