"""Compress a trained dense ResNet, then fine-tune it (the paper's E6, on the data sets we have).

1. **Source** (:mod:`.source`): the dense network of ``cfg.model``, its weights loaded exactly.
2. **Compression**, once per (format, target, balance), before any cell runs and before anything
   is written, so that an unreachable target leaves the output dir as it was:
   :func:`tensorsam.nn.tensorize` with ``decompose=True`` (TT-SVD for TT), ``ratio=`` or
   ``rank=``, ``balance=`` and ``exclude=cfg.exclude`` (the classifier by default: the 3x3
   convs are compressed).  Each compressed model is scored on the full test set and saved as
   ``DIR/compressed/<format><target>[_bal].pt`` (:func:`load_compressed` reads it back).
3. **Fine-tuning**: every (format, target, balance, method, seed) is a resumable cell of a
   :class:`~tensorsam.run.Sweep`, trained through :func:`tensorsam.train.fit` with the vision
   task's data handling (:class:`tensorsam.tasks.vision.experiment._Data`: images on the device,
   augmentation, normalisation with the fine-tuning split's own statistics, label noise) and its
   optimizer options; final and best weights go to ``DIR/models/<cell>.pt``.

Each run records the shared fields plus ``format``, ``target_ratio`` (``rank`` for a rank
target), ``achieved_ratio``, ``params``, ``dense_params``, ``acc_dense`` (the source model on the
full test set), ``acc_before_finetune`` (the compressed model, same data), ``q_after_decompose``,
``q_after_balance`` (None without balancing) and ``q_final`` (after fine-tuning), each Q summed
over the compressed layers' groups.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from tensorsam.dynamics import NormTracker, norm_deviation
from tensorsam.groups import scale_invariant_groups
from tensorsam.models import resnet
from tensorsam.nn import count_parameters, tensorize
from tensorsam.optim import build_optimizer
from tensorsam.run import (
    Sweep,
    atomic_torch_save,
    config_to_dict,
    load_checkpoint,
    result_fields,
    seed_everything,
    to_jsonable,
    write_results,
)
from tensorsam.run.io import check_writable_dir
from tensorsam.tasks.compress.config import CompressConfig
from tensorsam.tasks.compress.source import Source, load_dense, read_source
from tensorsam.tasks.vision.experiment import _Data, optimizer_options
from tensorsam.train import accuracies, evaluate, fit, setup, wrap

COMPRESSED = "compressed"   # the folder of the compressed models in the output dir
DATA_CACHE = 3              # data sets (one per seed) kept on the device while the grid runs


# ----------------------------------------------------------------------------- names

def model_tag(coords: dict) -> str:
    """``ttx2.5`` / ``ttr8``, with ``_bal`` when the cores are balanced: a compressed model's name."""
    target = f"x{coords['target_ratio']:g}" if "target_ratio" in coords else f"r{coords['rank']}"
    return f"{coords['format']}{target}{'_bal' if coords['balance'] else ''}"


def cell_tag(coords: dict) -> str:
    return f"{coords['method']}_{model_tag(coords)}_seed{coords['seed']}"


def compress_sweep(cfg: CompressConfig, out_dir=None, *, resume: bool = False, sha256: str = "") -> Sweep:
    """The grid (format, target, balance, method, seed); ``sha256`` of the source file joins each
    cell's fingerprint, so a cell is never resumed from another model."""
    axes = {"format": cfg.formats, cfg.target_axis: cfg.ratios or cfg.ranks, "balance": cfg.balances,
            "method": cfg.methods, "seed": cfg.seeds}
    same = {**result_fields(cfg, grid=False), "model_sha256": sha256}
    return Sweep(axes, out_dir, resume=resume, same=same, tag=cell_tag)


# ----------------------------------------------------------------------------- compression

@dataclasses.dataclass
class Compressed:
    """One compressed model (on the CPU) with its tensorize summary and test accuracy."""

    coords: dict          # format, target_ratio or rank, balance
    model: torch.nn.Module
    summary: object       # tensorsam.nn.TensorizeSummary
    acc: float

    @property
    def tag(self) -> str:
        return model_tag(self.coords)

    def fields(self) -> dict:
        """What each fine-tuning run of this model records about its start."""
        s = self.summary
        return {"achieved_ratio": s.ratio, "dense_params": s.params_before, "q_after_decompose": s.q_after_decompose,
                "q_after_balance": s.q_after_balance}

    def record(self, acc_dense: float) -> dict:
        """The results file's entry: targets, achieved ratio, Q, accuracies and one row per layer."""
        return {"tag": self.tag, **self.coords, **self.summary.to_dict(), "acc_dense": acc_dense,
                "acc_before_finetune": self.acc, "path": f"{COMPRESSED}/{self.tag}.pt"}


def compress_model(dense: torch.nn.Module, coords: dict, exclude, ranks: dict | None = None):
    """A compressed copy of ``dense`` and its summary: TT-SVD (or the format's decomposition) of the
    trained weights at ranks chosen for the target ratio, at the given rank, or at ``ranks`` (those
    already chosen for this target: the same cores, then balanced or not)."""
    model = copy.deepcopy(dense)
    if ranks is not None:
        target = {"rank": ranks}
    else:
        target = {"ratio": coords["target_ratio"]} if "target_ratio" in coords else {"rank": coords["rank"]}
    summary = tensorize(model, coords["format"], decompose=True, balance=coords["balance"], exclude=list(exclude),
                        **target)
    summary.target_ratio = coords.get("target_ratio")
    return model, summary


def compress_all(cfg: CompressConfig, dense, test, device) -> list[Compressed]:
    """Every (format, target, balance) of ``cfg``, compressed and scored on ``test``; all or nothing.
    The ranks are chosen once per (format, target) and reused for each balance value."""
    out = []
    for fmt in cfg.formats:
        for target in cfg.ratios or cfg.ranks:
            ranks = None
            for balance in cfg.balances:
                coords = {"format": fmt, cfg.target_axis: target, "balance": balance}
                model, summary = compress_model(dense, coords, cfg.exclude, ranks)
                ranks = summary.ranks
                acc = evaluate(model.to(device), test)["acc"]
                out.append(Compressed(coords, model.cpu(), summary, acc))
    return out


def save_compressed(c: Compressed, cfg: CompressConfig, source: Source, arch: dict, out_dir: Path) -> None:
    """``out_dir/compressed/<tag>.pt``: weights, ranks and what :func:`load_compressed` needs."""
    atomic_torch_save({"config": config_to_dict(cfg), "source": source.record, "arch": arch,
                       "format": c.coords["format"], "ranks": to_jsonable(c.summary.ranks),
                       "exclude": list(cfg.exclude), "summary": c.summary.to_dict(),
                       "state_dict": c.model.state_dict()}, out_dir / COMPRESSED / f"{c.tag}.pt")


def load_compressed(path) -> torch.nn.Module:
    """The compressed ResNet saved by ``tensorsam compress`` (``DIR/compressed/<tag>.pt``)."""
    saved = load_checkpoint(path)
    a = saved["arch"]
    model = resnet(a["depth"], None, None, a["num_classes"], a["in_channels"])
    ranks = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["ranks"].items()}
    tensorize(model, saved["format"], rank=ranks, exclude=saved["exclude"])
    model.load_state_dict(saved["state_dict"])
    return model


# ----------------------------------------------------------------------------- fine-tuning

def q_total(model) -> float:
    """Q (Eq. 5) summed over the model's scale-invariant groups (its tensorized layers)."""
    with torch.no_grad():
        return float(norm_deviation(scale_invariant_groups(model)).sum())


def finetune_cell(cfg: CompressConfig, cell, start: Compressed, data: _Data, info, *, checkpoint=None,
                  resume=False, progress=False, fingerprint=None, models_dir: Path | None = None,
                  acc_before: float | None = None) -> dict:
    """Fine-tune a copy of ``start`` with the cell's method and seed; returns its run record.
    ``acc_before``: ``start``'s test accuracy on this data, when already scored (it is the same for
    every method of a seed)."""
    seed_everything(cell["seed"])
    net = copy.deepcopy(start.model).to(info.device)
    if acc_before is None:
        acc_before = evaluate(net, data.test)["acc"]
    base = {**cell.coords, "target_ratio": cell.coords.get("target_ratio"), "epochs": cfg.epochs, **start.fields(),
            "acc_before_finetune": acc_before}
    opt = build_optimizer(cell["method"], net.parameters(), **optimizer_options(cfg, cell["method"], net))
    model = wrap(net, info)
    steps_per_epoch = max(1, len(data.train_y) // info.world_size // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    tracker = NormTracker(net, every=max(1, steps_per_epoch // 4))      # Q, Cov, u_D four times an epoch
    t0 = time.perf_counter()
    res = fit(model, opt, (data.train_x, data.train_y), epochs=cfg.epochs, batch_size=cfg.batch_size, val=data.val,
              test=data.test_subset, eval_every=cfg.eval_every or None, scheduler=sched, tracker=tracker,
              batch_transform=data.transform, seed=cell["seed"], checkpoint=checkpoint,
              checkpoint_every=cfg.checkpoint_every, resume=resume, progress=progress, desc=cell.tag,
              on_evaluate=data.train_accuracies, fingerprint=fingerprint)
    wall = time.perf_counter() - t0
    common = {"wall_seconds": wall, "seconds_per_step": res.seconds_per_step, "history": res.history,
              "dynamics": tracker.history}
    if res.status == "diverged":
        return {**base, **common, "status": "diverged", "diverged_at": res.diverged_at, "q_final": None}
    record = {**base, **common, "status": "ok", "params": count_parameters(net),
              "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
              "q_final": q_total(net), "final_test_acc": evaluate(model, data.test)["acc"],
              **{f"final_{k}": v for k, v in accuracies(model, data.train_norm, data.train_labels).items()},
              "best_val_acc": res.best_val_acc, "best_step": res.best_step, "test_acc_at_best_val": None}
    final_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if res.best_state is not None:
        if all(torch.equal(final_state[k], v.cpu()) for k, v in res.best_state.items()):
            record["test_acc_at_best_val"] = record["final_test_acc"]     # best = last: scored already
        else:
            net.load_state_dict(res.best_state)
            record["test_acc_at_best_val"] = evaluate(model, data.test)["acc"]
    if models_dir is not None and info.is_main:
        atomic_torch_save({"config": config_to_dict(cfg), "cell": dict(cell.coords),
                           "compressed": f"{COMPRESSED}/{start.tag}.pt", "final": final_state,
                           "best": res.best_state}, models_dir / f"{cell.tag}.pt")
    return record


# ----------------------------------------------------------------------------- the task

def _check_same_source(out_dir: Path, sha256: str) -> None:
    """Refuse to resume into results made from another model file."""
    path = out_dir / "results.json"
    if not path.is_file():
        return
    try:
        old = (json.loads(path.read_text()).get("source") or {}).get("sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return                                  # the sweep says what is wrong with the file
    if old and old != sha256:
        raise ValueError(f"cannot resume into {out_dir}: its results were made from another model file "
                         f"(sha256 {old[:12]}... -> {sha256[:12]}...); use the same model or another output dir")


def _dense_model(source: Source, data: _Data) -> tuple[torch.nn.Module, dict]:
    arch = {"depth": source.depth, "num_classes": data.num_classes, "in_channels": data.in_channels}
    dense = resnet(source.depth, None, None, data.num_classes, data.in_channels)
    load_dense(dense, source.state, f"a dense ResNet-{source.depth} for {source.dataset} "
                                    f"({data.in_channels} input channel(s), {data.num_classes} classes)")
    return dense, arch


def run_compress(cfg: CompressConfig, out_dir=None, *, resume: bool = False, progress: bool = False,
                 started: float | None = None) -> dict:
    """Compress ``cfg.model`` and fine-tune every cell; with ``out_dir``, write ``results.json``,
    ``compressed/`` and ``models/`` (see the module docstring)."""
    started = time.time() if started is None else started
    out = None if out_dir is None else check_writable_dir(out_dir)
    info = setup(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source = read_source(cfg)
    if out is not None and resume:
        _check_same_source(out, source.record["sha256"])
    cfg = dataclasses.replace(cfg, arch=source.record["arch"], dataset=source.dataset, data_dir=source.data_dir)
    first = _Data(cfg, cfg.label_noise, cfg.seeds[0], info.device)
    dense, arch = _dense_model(source, first)
    cache = {cfg.seeds[0]: (first, evaluate(dense.to(info.device), first.test)["acc"])}   # seed -> (data, acc_dense)
    starts = compress_all(cfg, dense.cpu(), first.test, info.device)
    records = [c.record(cache[cfg.seeds[0]][1]) for c in starts]
    sweep = compress_sweep(cfg, out, resume=resume, sha256=source.record["sha256"])
    by_tag = {c.tag: c for c in starts}

    before: dict = {}                         # (compressed model, seed) -> its test accuracy before fine-tuning

    def cell_fn(cell):
        seed = cell["seed"]
        if seed not in cache:                 # the seed varies fastest in the grid: keep a few data sets
            while len(cache) >= DATA_CACHE:
                del cache[next(iter(cache))]
            data = _Data(cfg, cfg.label_noise, seed, info.device)
            cache[seed] = (data, evaluate(dense.to(info.device), data.test)["acc"])
        data, acc_dense = cache[seed]
        start = by_tag[model_tag(cell.coords)]
        record = finetune_cell(cfg, cell, start, data, info,
                               checkpoint=sweep.checkpoint(cell, "fit"), resume=resume,
                               progress=progress and info.is_main, models_dir=None if out is None else out / "models",
                               fingerprint=sweep.fingerprint(cell, world_size=info.world_size),
                               acc_before=before.get((start.tag, seed)))
        before[(start.tag, seed)] = record["acc_before_finetune"]
        return {**record, "acc_dense": acc_dense, "data": data.record}, None

    def write(result):
        write_results(out / "results.json", task="compress", config=cfg, runs=result.all_runs(),
                      extra={"source": source.record, "compressions": records,
                             "sweep": result.record(), "device": str(info.device), "world_size": info.world_size},
                      started=started)

    with sweep.claimed():   # the dir is held, and a run it would lose refused, before the first write
        if out is not None and info.is_main:
            for c in starts:
                save_compressed(c, cfg, source, arch, out)
        if info.is_main:
            from tensorsam.tasks.compress.report import compression_line

            for r in records:
                print(compression_line(r), flush=True)
        result = sweep.run(cell_fn, write, progress=progress and info.is_main)
    return {"runs": result.runs, "sweep": result}
