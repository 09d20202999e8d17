"""Hyperparameter search for the vision task with optuna (``tensorsam tune vision``).

One study per (method, settings): each trial trains one cell of the vision task (the config's first
label noise, format, rank and seed) with values of ρ, α and/or the learning rate drawn log-uniformly
from :data:`SPACE`, and is scored by its best **validation** accuracy; the test split is never
scored.  Each evaluation reports the validation accuracy to optuna, so a median pruner stops poor
trials early; a trial that diverges is pruned and the study goes on.

The study lives in ``DIR/study.db`` (SQLite), so an interrupted search continues: a trial that was
running when the process died is marked failed and its values are tried again first.  The study
records the fingerprint of its settings and refuses to continue under others.  ``DIR/tune.json``
(written atomically after every trial) lists every trial and the best values; ``DIR/tune.png``
plots validation accuracy against each searched value.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from tensorsam.run import config_to_dict, result_fields
from tensorsam.run.io import atomic_save_figure, atomic_write_json, check_writable_dir
from tensorsam.run.loop import fingerprint_changes
from tensorsam.run.sweep import Cell
from tensorsam.tasks.vision.config import VisionConfig

SPACE = {"rho": (1e-3, 1.0), "alpha": (1e-3, 3.0), "lr": (1e-3, 0.5)}  # log-uniform ranges


def default_params(method: str) -> list[str]:
    """What a search over ``method`` tunes: ρ (SAM family) or α (DAS), and the learning rate."""
    if method.startswith("sam") or method == "asam":
        return ["rho", "lr"]
    return ["alpha", "lr"] if method == "das" else ["lr"]


def _check(cfg: VisionConfig, params: list[str]) -> str:
    if len(cfg.methods) != 1:
        raise ValueError(f"a search tunes one method at a time, got methods {cfg.methods}")
    unknown = [p for p in params if p not in SPACE]
    if unknown or not params:
        raise ValueError(f"cannot search {unknown or params}; searchable values: {list(SPACE)}")
    return cfg.methods[0]


def tune_vision(cfg: VisionConfig, out_dir, *, trials: int, params: list[str] | None = None, seed: int = 0,
                progress: bool = False):
    """Run until the study in ``out_dir`` holds ``trials`` complete or pruned trials; returns the study."""
    import optuna
    from optuna.trial import TrialState

    method = _check(cfg, params or default_params(cfg.methods[0]))
    params = params or default_params(method)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    out = check_writable_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = config_to_dict({**result_fields(cfg, grid=False), "method": method, "params": params,
                                  **{k: v[0] for k, v in (("label_noise", cfg.label_noises), ("format", cfg.formats),
                                                          ("rank", cfg.ranks), ("seed", cfg.seeds))}})
    for p in params:
        fingerprint.pop(p, None)                  # searched, not fixed
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=f"vision-{method}", storage=f"sqlite:///{out / 'study.db'}", load_if_exists=True,
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    _check_fingerprint(study, fingerprint, out)
    _retry_interrupted(study)
    objective = _objective(cfg, method, params, progress)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    for _ in range(max(0, trials - done)):
        study.optimize(objective, n_trials=1)
        write_summary(study, out, params)
    write_summary(study, out, params)
    return study


def _check_fingerprint(study, fingerprint: dict, out: Path) -> None:
    saved = study.user_attrs.get("fingerprint")
    if saved is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif saved != fingerprint:
        raise ValueError(f"cannot continue the study in {out}: it was made with other settings "
                         f"({fingerprint_changes(saved, fingerprint)}); use the same settings or another output dir")


def _retry_interrupted(study) -> None:
    """Trials left running by a killed process: marked failed, their values enqueued to run first."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


def _objective(cfg: VisionConfig, method: str, params: list[str], progress: bool):
    import optuna

    from tensorsam.run import seed_everything
    from tensorsam.tasks.vision.experiment import _Data, train_cell
    from tensorsam.train import setup

    info = setup(cfg.device)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seeds[0])
    data = _Data(cfg, cfg.label_noises[0], cfg.seeds[0], info.device)
    coords = {"label_noise": cfg.label_noises[0], "format": cfg.formats[0], "rank": cfg.ranks[0], "method": method,
              "seed": cfg.seeds[0]}

    def objective(trial) -> float:
        values = {p: trial.suggest_float(p, *SPACE[p], log=True) for p in params}
        tcfg = dataclasses.replace(cfg, **values)

        def report(row: dict) -> None:
            trial.report(row["val_acc"], row["step"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {row['step']} (validation accuracy {row['val_acc']:.4f})")

        t0 = time.perf_counter()
        record = train_cell(tcfg, Cell(coords, f"trial{trial.number}"), data, info, after_evaluation=report,
                            score_test=False, progress=progress)
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        if record["status"] == "diverged":
            trial.set_user_attr("diverged_at", record["diverged_at"])
            raise optuna.TrialPruned(f"diverged at step {record['diverged_at']}")
        trial.set_user_attr("final_train_acc_noisy", record["final_train_acc_noisy"])
        return record["best_val_acc"]

    return objective


def trials_table(study) -> list[dict]:
    """Every trial: number, state, searched values, best validation accuracy (or where it stopped)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"number": t.number, "state": t.state.name.lower(), **t.params, "best_val_acc": t.value,
                     "last_step": last, "last_val_acc": None if last is None else t.intermediate_values[last],
                     **t.user_attrs})
    return rows


def write_summary(study, out: Path, params: list[str]) -> None:
    """``tune.json`` (every trial, the best values, how it was made) and ``tune.png``."""
    from tensorsam.run.meta import provenance

    rows = trials_table(study)
    done = [r for r in rows if r["state"] == "complete"]
    best = max(done, key=lambda r: r["best_val_acc"]) if done else None
    atomic_write_json(out / "tune.json", {
        "task": "tune-vision", "study": study.study_name, "storage": str(out / "study.db"),
        "fingerprint": study.user_attrs.get("fingerprint"), "searched": {p: list(SPACE[p]) for p in params},
        "score": "best validation accuracy (noisy validation labels); the test split is not scored",
        "best": None if best is None else {p: best[p] for p in params} | {"best_val_acc": best["best_val_acc"]},
        "trials": rows, **provenance()})
    if rows:
        _plot(rows, params, out / "tune.png")


def _plot(rows: list[dict], params: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.2), squeeze=False)
    styles = {"complete": ("tab:blue", "o"), "pruned": ("tab:grey", "x")}
    for ax, p in zip(axes[0], params):
        for state, (color, marker) in styles.items():
            pts = [(r[p], r["best_val_acc"] if state == "complete" else r["last_val_acc"]) for r in rows
                   if r["state"] == state and p in r]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.scatter(*zip(*pts), c=color, marker=marker, label=state)
        ax.set_xscale("log")
        ax.set_xlabel(p)
        ax.set_ylabel("validation accuracy")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)
