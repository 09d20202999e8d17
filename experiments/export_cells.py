"""Copy the finished cells of running or finished grids into a folder of JSON records, one file per
cell, so that they can be committed before the grid ends.

    python experiments/export_cells.py runs/e5/noise-0.6-s1 ... --to docs/results/e5/noise-0.6/cells
    python experiments/export_cells.py runs/e6/ratio-2.5 --to docs/results/e6/cells --merge docs/results/e6/results.json

Finished cells come from a grid's ``.work/<tag>.pt`` (while it runs) or its ``results.json`` (once it
has finished); the record is written as ``<tag>.json`` with the grid's config (from results.json, or
``.work/settings.json`` while it runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tensorsam.run.io import atomic_write_json, load_checkpoint


def _tag(run: dict, task: str) -> str:
    """The cell's tag as the task's Sweep names it."""
    if task == "compress":
        target = f"x{run['target_ratio']:g}" if run.get("target_ratio") is not None else f"r{run['rank']}"
        return f"{run['method']}_{run['format']}{target}{'_bal' if run.get('balance') else ''}_seed{run['seed']}"
    if task == "finetune":
        return f"{run['adapter']}_{run['method']}_seed{run['seed']}"
    return f"{run['method']}_{run['format']}{run['rank']}_p{run['label_noise']:g}_seed{run['seed']}"


def _order(method: str) -> tuple:
    """SGD first, then SAM, DAS and the rest as the tables list them."""
    known = ("sgd", "adam", "sam", "asam", "das", "rebalance", "nbar", "obar")
    return (known.index(method), "") if method in known else (len(known), method)


def finished_cells(grid: Path) -> dict[str, dict]:
    """``{tag: record}`` of the finished cells of one grid directory."""
    cells = {}
    results = grid / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        for run in data["runs"]:   # provenance: the grid's commit, versions, command and machine
            cells[_tag(run, data.get("task", "vision"))] = {"config": data["config"],
                                                           "provenance": data.get("provenance"), "run": run}
    settings = grid / ".work" / "settings.json"
    config = json.loads(settings.read_text()) if settings.is_file() else None
    for done in sorted((grid / ".work").glob("*.pt")):
        cells.setdefault(done.stem, {"config": config, "run": json.loads(load_checkpoint(done)["record"])})
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grids", nargs="+", type=Path)
    parser.add_argument("--to", required=True, type=Path)
    parser.add_argument("--merge", type=Path, help="also write the runs of every cell record in --to (these "
                        "grids' and any exported before) as one results file of --task (for `tensorsam "
                        "report`), marked partial in its notes")
    parser.add_argument("--task", default="vision", help="the grids' task: vision (default), compress or finetune")
    args = parser.parse_args()
    config = None
    for grid in args.grids:
        for tag, cell in finished_cells(grid).items():
            atomic_write_json(args.to / f"{tag}.json", {"grid": str(grid), **cell})
            config = config or cell["config"]
            print(f"{grid}: {tag}")
    if args.merge:   # every record in --to, so cells exported earlier (from grids since removed) stay in
        cells = [json.loads(f.read_text()) for f in sorted(args.to.glob("*.json"))]
        config = dict(config or cells[0]["config"])
        for key in ("methods", "seeds", "label_noises", "formats", "ranks"):   # the union over the cells' grids
            values = [v for c in cells for v in (c["config"] or {}).get(key, ())]
            if values:
                config[key] = sorted(dict.fromkeys(values), key=_order if key == "methods" else None)
        commits = {c["grid"]: (c.get("provenance") or {}).get("git_commit", "not recorded") for c in cells}
        atomic_write_json(args.merge, {"task": args.task, "config": config,
                                       "runs": [c["run"] for c in cells], "grid_commits": commits, "notes": [
            (f"Merged from the {len(cells)} cell records in {args.to} by experiments/export_cells.py; "
             "the grid may be partial: count the runs per cell (n) before reading a mean.")]})


if __name__ == "__main__":
    main()
