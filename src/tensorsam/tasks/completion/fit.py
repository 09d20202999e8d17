"""One completion run: the model and its initialisation, the optimizer of a method, a training run
(resumable through :class:`tensorsam.run.Loop`), tensorly's masked HOOI, and the scores.

A training run that diverges is a result: each step's loss goes into a
:class:`~tensorsam.run.loop.Divergence` on the device (no host sync in the step), read every
``log_every`` steps; a non-finite training score at a read (cores made non-finite by the last step)
counts as a non-finite loss at the next step.  The run stops at that read and its record says
``status: "diverged"`` and ``diverged_at`` (the step, 1-based); other records say ``status: "ok"``."""

from __future__ import annotations

import inspect
import math
import time

import numpy as np
import torch

from tensorsam.dynamics import NormTracker
from tensorsam.optim import build_optimizer
from tensorsam.run.loop import Divergence, Loop
from tensorsam.tasks.completion.config import CompletionConfig, optimizer_class
from tensorsam.tasks.completion.objective import Objective, reconstruct
from tensorsam.tasks.metrics import scores
from tensorsam.tensors import get_format


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
              checkpoint=None, resume=False, progress=False, desc="",
              fingerprint=None) -> tuple[dict, list[torch.Tensor]]:
    """Train one (method, seed, rank) run; returns its record and final (or best) cores
    (``fingerprint``: see :class:`tensorsam.run.Loop`)."""
    values = values.to(getattr(torch, cfg.dtype))
    model = build_model(cfg, values.shape, rank, seed)
    obj = Objective(model, values, masks.train, cfg.loss, cfg.compile)
    opt = make_optimizer(method, obj.cores, cfg, cfg.iterations)
    tracker = NormTracker([obj.cores])
    validated = cfg.protocol == "validated"
    best = _Cores([c.detach().clone() for c in obj.cores])
    loop = Loop(cfg.iterations, state={"model": model, "optimizer": opt, "best": best},
                checkpoint=checkpoint, every=cfg.checkpoint_every, resume=resume, desc=desc,
                progress=progress, fingerprint=fingerprint)
    if not loop.resumed:
        loop.extra = {"trace": [], "wall": 0.0, "best_val": -math.inf, "best_it": 0, "stale": 0}
    ex = loop.extra
    divergence = Divergence(ex, obj.cores[0].device)
    diverged = None
    step = obj.step_fn(method, opt)
    t0 = time.perf_counter()
    for it in loop:
        loss = step()
        done = it + 1
        divergence.update(loss, done)
        if done % cfg.log_every == 0 or done == cfg.iterations:
            diverged = divergence.read(done)
            if diverged is not None:
                break
            dyn = tracker.compute()
            m = evaluate(obj.predict(), values, masks)
            if not math.isfinite(m["train_r2"]):
                diverged = done + 1
                break
            row = {"iteration": done, "loss": float(loss), "Q": float(dyn["Q"][0]),
                   "cov": float(dyn["cov"][0]),
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
    record = {"method": method, "seed": seed, "status": "ok" if diverged is None else "diverged",
              **({} if diverged is None else {"diverged_at": diverged}), **evaluate(pred, values, masks),
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
    record = {"method": "hooi", "seed": seed, "status": "ok", **evaluate(pred, values.to(dtype), masks),
              "wall_seconds": wall,
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


def select(cands: list[tuple[dict, list]]) -> tuple[dict, list]:
    """The candidate (record, cores) with the best validation R² (a non-finite one counts as the
    worst); the others are summarised in it."""
    def score(rc) -> float:
        v = rc[0].get("val_r2")
        return v if isinstance(v, float) and math.isfinite(v) else -math.inf

    best = max(cands, key=score)
    record = dict(best[0])
    record["info"] = {**record["info"], "candidates": [
        {"rank": r["info"]["rank"], "val_r2": r.get("val_r2"), "heldout_r2": r.get("heldout_r2"),
         "best_iteration": r["info"].get("best_iteration"), "status": r.get("status", "ok"),
         **({"diverged_at": r["diverged_at"]} if "diverged_at" in r else {})} for r, _ in cands]}
    record["wall_seconds"] = sum(r["wall_seconds"] for r, _ in cands)
    return record, best[1]

