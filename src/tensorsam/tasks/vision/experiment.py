"""The vision experiment: tensorized ResNets trained with SGD, SAM, DAS, ... under symmetric label
noise, every (label noise, format, rank, method, seed) a resumable cell of a :class:`~tensorsam.run.Sweep`.

Each cell trains through :func:`tensorsam.train.fit` on images kept on the training device:
training images stay uint8 and each batch is augmented (random crop with 2-pixel zero padding,
horizontal flip) and normalised with the training split's own statistics; validation and test
images are normalised once.  Validation labels carry the same noise as the training labels (a
practitioner has no clean ones); the test labels are clean.  Each evaluation also scores a fixed
subset of the training images (:data:`TRAIN_SCORED`) against their noisy and their clean labels, in
one forward pass: how much of the noise is memorised.  The final and best-on-validation weights go to
``DIR/models/<cell>.pt``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tensorsam.data.images import ChannelNorm, augment, load_images
from tensorsam.dynamics import NormTracker
from tensorsam.groups import scale_invariant_groups
from tensorsam.models import resnet
from tensorsam.nn import count_parameters
from tensorsam.optim import build_optimizer
from tensorsam.run import (
    Sweep,
    atomic_torch_save,
    config_to_dict,
    result_fields,
    seed_everything,
    write_results,
)
from tensorsam.run.io import check_writable_dir
from tensorsam.tasks.vision.config import NEEDS_GROUPS, VisionConfig
from tensorsam.train import (
    DistInfo,
    accuracies,
    evaluate,
    fit,
    full_state_dict,
    load_full_state_dict,
    setup,
    unwrap,
    wrap,
)

TRAIN_SCORED = 2000   # training images scored (noisy and clean labels) at every evaluation


def vision_sweep(cfg: VisionConfig, out_dir=None, *, resume: bool = False) -> Sweep:
    axes = {"label_noise": cfg.label_noises, "format": cfg.formats, "rank": cfg.ranks, "method": cfg.methods,
            "seed": cfg.seeds}
    return Sweep(axes, out_dir, resume=resume, same=result_fields(cfg, grid=False),
                 tag=lambda c: f"{c['method']}_{c['format']}{c['rank']}_p{c['label_noise']:g}_seed{c['seed']}")


def optimizer_options(cfg: VisionConfig, method: str, model) -> dict:
    """The factory options of ``method`` (SGD with momentum and weight decay underneath)."""
    options = {"base": "sgd", "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    if method.startswith("sam") or method == "asam":
        options["rho"] = cfg.rho
    elif method == "das":
        options.update(alpha=cfg.alpha, variant=cfg.das_variant, groups=model)
    elif method == "rebalance":
        options["groups"] = model
    return options


class _Data:
    """A cell's data on the device: uint8 training images with their normaliser, normalised
    evaluation sets (validation, the fixed test subset, the full test set, training images for the
    noisy/clean training accuracies)."""

    def __init__(self, cfg: VisionConfig, label_noise: float, seed: int, device: torch.device):
        d = load_images(cfg.dataset, cfg.data_dir or None, val_size=cfg.val_size or None,
                        train_subset=cfg.train_subset or None, label_noise=label_noise, seed=seed)
        self.record = d.record()
        self.num_classes, self.in_channels = d.num_classes, d.image_shape[0]
        self.train_x, self.train_y = d.train_x.to(device), d.train_y.to(device)
        self.norm = ChannelNorm.fit(self.train_x)
        self.record["normalisation"] = self.norm.record()
        n_test = min(cfg.test_subset or len(d.test_y), len(d.test_y))
        sub = torch.randperm(len(d.test_y), generator=torch.Generator().manual_seed(0))[:n_test]
        ev = lambda x, y: (self.norm(x.to(device)), y.to(device))
        self.val = ev(d.val_x, d.val_y) if len(d.val_y) else None
        self.test_subset, self.test = ev(d.test_x[sub], d.test_y[sub]), ev(d.test_x, d.test_y)
        self.train_norm = self.norm(self.train_x)
        self.train_labels = {"train_acc_noisy": self.train_y, "train_acc_clean": d.train_y_clean.to(device)}
        # the training images scored at every evaluation: a fixed subset of at most TRAIN_SCORED
        n_scored = min(TRAIN_SCORED, len(self.train_y))
        pick = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(1))[:n_scored].to(device)
        self.scored = (self.train_norm[pick], {k: y[pick] for k, y in self.train_labels.items()})
        self.augment = cfg.augment

    def transform(self, xb: torch.Tensor) -> torch.Tensor:
        return self.norm(augment(xb, padding=2) if self.augment else xb)

    def train_accuracies(self, model) -> dict:
        """Accuracy on the noisy and on the clean labels of the scored training images (one forward)."""
        return accuracies(model, *self.scored)


def train_cell(cfg: VisionConfig, cell, data: _Data, info: DistInfo, *, checkpoint=None, resume=False, progress=False,
               models_dir: Path | None = None, fingerprint: dict | None = None, after_evaluation=None,
               score_test: bool = True) -> dict:
    """Train one cell; returns its run record (status ``skipped`` when the method needs tensorized layers).
    ``after_evaluation`` goes to :func:`~tensorsam.train.fit`; ``score_test=False`` (a search) never
    touches the test split."""
    fmt, rank, method, seed = cell["format"], cell["rank"], cell["method"], cell["seed"]
    base = {**cell.coords, "epochs": cfg.epochs}
    if fmt == "none" and method in NEEDS_GROUPS:
        return {**base, "status": "skipped", "reason": f"{method} scales the cores of tensorized layers; "
                "a dense network has none"}
    if fmt == "none" and rank != cfg.ranks[0]:
        return {**base, "status": "skipped", "reason": f"a dense network has no rank (run once, at rank {cfg.ranks[0]})"}
    seed_everything(seed)
    model = resnet(cfg.depth, None if fmt == "none" else fmt, rank, data.num_classes, data.in_channels)
    model = wrap(model, info)                   # DDP (or FSDP2) under torchrun; sharding replaces the parameters
    net = unwrap(model)
    opt = build_optimizer(method, net.parameters(), **optimizer_options(cfg, method, net))
    steps_per_epoch = len(data.train_y) // info.world_size // cfg.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * max(1, steps_per_epoch))
    tracker = NormTracker(net, every=max(1, steps_per_epoch)) if scale_invariant_groups(net) else None
    t0 = time.perf_counter()
    res = fit(model, opt, (data.train_x, data.train_y), epochs=cfg.epochs, batch_size=cfg.batch_size,
              val=data.val, test=data.test_subset if score_test else None, eval_every=cfg.eval_every or None, scheduler=sched,
              tracker=tracker, batch_transform=data.transform, seed=seed, checkpoint=checkpoint,
              checkpoint_every=cfg.checkpoint_every, resume=resume, progress=progress, desc=cell.tag,
              on_evaluate=data.train_accuracies, after_evaluation=after_evaluation, fingerprint=fingerprint)
    wall = time.perf_counter() - t0
    if res.status == "diverged":               # a result, not a NaN: the weights are not evaluated
        return {**base, "status": "diverged", "diverged_at": res.diverged_at, "wall_seconds": wall,
                "seconds_per_step": res.seconds_per_step, "history": res.history}
    final_state = full_state_dict(net)          # gathered whole when sharded (every rank joins)
    record = {**base, "status": "ok", "params": count_parameters(net),
              "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
              "seconds_per_step": res.seconds_per_step, "wall_seconds": wall,
              "final_test_acc": evaluate(model, data.test)["acc"] if score_test else None,
              **{f"final_{k}": v for k, v in accuracies(model, data.train_norm, data.train_labels).items()},
              "best_val_acc": res.best_val_acc, "best_step": res.best_step, "test_acc_at_best_val": None,
              "history": res.history,
              "dynamics": [] if tracker is None else tracker.history}
    if res.best_state is not None and score_test:
        load_full_state_dict(net, res.best_state)
        record["test_acc_at_best_val"] = evaluate(model, data.test)["acc"]
    if models_dir is not None and info.is_main:
        atomic_torch_save({"config": config_to_dict(cfg), "cell": dict(cell.coords), "final": final_state,
                           "best": res.best_state}, models_dir / f"{cell.tag}.pt")
    return record


def run_vision(cfg: VisionConfig, out_dir=None, *, resume: bool = False, progress: bool = False,
               started: float | None = None) -> dict:
    """Run every cell of ``cfg``; with ``out_dir``, write ``results.json`` and ``models/<cell>.pt``."""
    started = time.time() if started is None else started
    if out_dir is not None:
        check_writable_dir(out_dir)
    info = setup(cfg.device, strategy=cfg.distributed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sweep = vision_sweep(cfg, out_dir, resume=resume)
    cache: dict = {}
    models_dir = None if out_dir is None else Path(out_dir) / "models"

    def cell_fn(cell):
        key = (cell["label_noise"], cell["seed"])
        if key not in cache:
            cache.clear()                     # one data set on the device at a time
            cache[key] = _Data(cfg, cell["label_noise"], cell["seed"], info.device)
        record = train_cell(cfg, cell, cache[key], info, checkpoint=sweep.checkpoint(cell, "fit"),
                            resume=resume, progress=progress and info.is_main, models_dir=models_dir,
                            fingerprint=sweep.fingerprint(cell, world_size=info.world_size))
        record["data"] = cache[key].record
        return record, None

    def write(result):
        write_results(Path(out_dir) / "results.json", task="vision", config=cfg, runs=result.all_runs(),
                      extra={"sweep": result.record(), "device": str(info.device),
                             "world_size": info.world_size}, started=started)

    result = sweep.run(cell_fn, write, progress=progress and info.is_main)
    return {"runs": result.runs, "sweep": result}


def summary_lines(runs: list[dict]) -> list[str]:
    """Per (label noise, model, method): final and best-on-validation test accuracy, mean ± std over
    seeds, training accuracy on noisy / clean labels, seconds per step (:mod:`.report`)."""
    from tensorsam.tasks.vision.report import summary_lines as lines

    return lines(runs)


def figures(results: dict, out_dir) -> list[Path]:
    """Test accuracy and mean Q against epochs per model, and the accuracy gain over SGD against the
    compression ratio (:mod:`.report`)."""
    from tensorsam.tasks.vision.report import figures as make

    return make(results, out_dir)
