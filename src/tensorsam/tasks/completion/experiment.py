"""The completion experiment: every (seed, method) cell of a config as a :class:`~tensorsam.run.Sweep`
(each cell resumable, the grid growing when seeds or methods are added), its results file, and
the merge of output dirs that ran other seeds."""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path

import torch

from tensorsam.data import load_tensor, make_masks
from tensorsam.run import Sweep, atomic_torch_save, load_checkpoint, result_fields, write_results
from tensorsam.run.io import check_writable_dir, claim_directory
from tensorsam.tasks.completion.config import CompletionConfig, candidate_ranks
from tensorsam.tasks.completion.fit import build_model, hooi_run, select, train_run

# The paper's Table 1 (mean ± std over mask seeds 42, 87, 100).  The authors' code scores the
# training entries with the uncentred formula, so that is the metric these numbers are.
PAPER_TABLE1 = {"adam": [0.9482, 0.0012], "sam": [0.9485, 0.0013], "das": [0.9484, 0.0017],
                "hooi": [0.9268, 0.0063]}
PROTOCOL_NOTE = ("train_* metrics are computed on the training entries (what the paper's Table 1 reports); "
                 "heldout_* on the entries never seen in training; r2 is mean-centred, r2_uncentred is the "
                 "authors' 1 - ||X^-X||^2/||X||^2.")


def prepare(cfg: CompletionConfig):
    """Check ``cfg``, load the data and make every seed's masks (all errors happen here)."""
    cfg.validate()  # again: a field may have been assigned since construction
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_tensor(cfg.dataset, standardize=cfg.standardize, allow_missing=cfg.allow_missing)
    for rank in candidate_ranks(cfg):
        build_model(cfg, data.shape, rank, 0)  # a rank larger than a mode raises here
    val_fraction = cfg.val_fraction if cfg.protocol == "validated" else 0.0
    masks = {s: make_masks(data.shape, s, cfg.train_fraction, val_fraction, data.observed) for s in cfg.seeds}
    return data, masks


def completion_sweep(cfg: CompletionConfig, out_dir=None, *, resume: bool = False) -> Sweep:
    """The grid of ``cfg``: seeds (outer) x methods, cells tagged ``<method>_seed<seed>``, final cores
    kept in ``solutions.pt``; resuming into results made with other settings is refused."""
    return Sweep({"seed": cfg.seeds, "method": cfg.methods}, out_dir, resume=resume,
                 tag=lambda c: f"{c['method']}_seed{c['seed']}", payload_file="solutions.pt",
                 same=result_fields(cfg, grid=False))


def run_completion(cfg: CompletionConfig, out_dir=None, *, resume: bool = False, progress: bool = False,
                   started: float | None = None) -> dict:
    """Run every (method, seed) of ``cfg``; returns ``{"runs", "data", "solutions", "sweep"}``.

    With ``out_dir``, each finished run is kept under ``out_dir/.work`` and each training run
    checkpoints there, so ``resume=True`` continues an interrupted experiment, and cells already in
    ``out_dir``'s results are kept (a rerun with another seed runs only that seed).  At the end
    ``out_dir/results.json`` (via :func:`write_results`) and ``out_dir/solutions.pt`` (the final
    cores of every run, for :mod:`tensorsam.tasks.flatness`) are written and ``.work`` removed.
    An ``out_dir`` that cannot be written is refused before anything runs.  A run that diverges is
    recorded with its step (``status: "diverged"``, see :mod:`.fit`) and the grid carries on.
    """
    started = time.time() if started is None else started
    if out_dir is not None:
        check_writable_dir(out_dir)
    data, masks = prepare(cfg)
    sweep = completion_sweep(cfg, out_dir, resume=resume)

    def cell(c):
        method, seed = c["method"], c["seed"]
        cands = []
        for rank in candidate_ranks(cfg):
            if method == "hooi":
                cands.append(hooi_run(cfg, data.values, masks[seed], seed, rank))
                continue
            ckpt = sweep.checkpoint(c, "rank" + "x".join(map(str, rank)))
            cands.append(train_run(method, cfg, data.values, masks[seed], seed, rank, checkpoint=ckpt,
                                   resume=resume, progress=progress, desc=f"{c.tag} rank {rank}",
                                   fingerprint=sweep.fingerprint(c, rank=list(rank))))
        record, cores = select(cands) if cfg.protocol == "validated" else cands[0]
        record["masks"] = masks[seed].record()
        return record, cores

    def write(result):
        extra = {**_extra(cfg, data.record()), "sweep": result.record()}
        write_results(Path(out_dir) / "results.json", task="completion", config=cfg, runs=result.all_runs(),
                      extra=extra, started=started)

    result = sweep.run(cell, write, progress=progress)
    return {"runs": result.runs, "data": data.record(), "solutions": result.payloads, "sweep": result}


# the settings the paper's Table 1 was measured under: a run is compared with it only when they match
# (seeds may differ)
PAPER_PROTOCOL = ("dataset", "standardize", "model", "rank", "iterations", "train_fraction", "protocol", "loss",
                  "init", "optimizer", "lr", "weight_decay", "rho", "alpha", "alpha_schedule", "hooi_iterations",
                  "hooi_tol")


def _extra(cfg: CompletionConfig, data_record: dict) -> dict:
    """The results file's data record, protocol note and the paper's Table 1 with its protocol."""
    paper = CompletionConfig()
    return {"data": data_record, "protocol_note": PROTOCOL_NOTE, "reference": {
        "source": "paper Table 1 (training entries, uncentred R² of the authors' code)",
        "protocol": {k: getattr(paper, k) for k in PAPER_PROTOCOL},
        "values": {m: {"train_r2_uncentred": v} for m, v in PAPER_TABLE1.items() if m in cfg.methods}}}


def read_results(path) -> tuple[CompletionConfig, dict]:
    """The config and the results of a completion output dir (its ``results.json``)."""
    file = Path(path) / "results.json"
    if not file.is_file():
        raise FileNotFoundError(f"no completion results in {path} (expected {file})")
    data = json.loads(file.read_text())
    if data.get("task") != "completion":
        raise ValueError(f"{file} is a {data.get('task')!r} results file, not a completion one")
    known = {f.name for f in dataclasses.fields(CompletionConfig)}
    return CompletionConfig(**{k: v for k, v in data["config"].items() if k in known}), data


def merge_results(sources, out_dir) -> dict:
    """Merge completion output dirs that ran the same config on different seeds (e.g. one process
    per seed) into ``out_dir``: one results.json with every run, one solutions.pt."""
    check_writable_dir(out_dir)
    loaded = [(Path(src), *read_results(src)) for src in sources]
    configs = [{k: v for k, v in res["config"].items() if k != "seeds"} for _, _, res in loaded]
    if any(c != configs[0] for c in configs[1:]):
        raise ValueError("the results to merge were made with different configs (apart from seeds)")
    runs = [r for _, _, res in loaded for r in res["runs"]]
    cfg = dataclasses.replace(loaded[0][1], seeds=list(dict.fromkeys(r["seed"] for r in runs)))
    solutions = {}
    for src, _, _ in loaded:
        solutions.update(load_checkpoint(src / "solutions.pt"))
    extra = _extra(cfg, loaded[0][2].get("data", {}))
    extra["merged_from"] = [{"dir": str(src), "wall_seconds": res.get("wall_seconds"),
                             "provenance": res.get("provenance")} for src, _, res in loaded]
    started = min(datetime.datetime.fromisoformat(res["provenance"]["started_utc"]).timestamp()
                  for _, _, res in loaded)
    with claim_directory(out_dir) as out:      # one writer; nothing there that the merge leaves out
        _refuse_merge_loss(out, runs)
        atomic_torch_save(solutions, out / "solutions.pt")
        return write_results(out / "results.json", task="completion", config=cfg, runs=runs, extra=extra,
                             started=started)


def _refuse_merge_loss(out: Path, runs: list[dict]) -> None:
    """Refuse to merge into a dir whose results hold a (method, seed) run the merge does not."""
    if not (out / "results.json").is_file():
        return
    _, held = read_results(out)
    merged = {(r["method"], r["seed"]) for r in runs}
    lost = [f"{r['method']} seed {r['seed']}" for r in held["runs"] if (r["method"], r["seed"]) not in merged]
    if lost:
        raise ValueError(f"{out} holds {len(lost)} run(s) the merge leaves out ({', '.join(lost[:4])}"
                         f"{', ...' if len(lost) > 4 else ''}); merging there would lose them: add {out} to "
                         "--merge or use another --out")
