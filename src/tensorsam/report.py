"""Render results files (written by :func:`tensorsam.run.write_results`) as Markdown.

For each results file (or, with ``pool=True``, each task pooled over files) the report has one
table of every numeric metric per method: a row per metric and a column per method (the paper's
Table 1 layout) when there are at least as many metrics as methods, else a row per method.

Each cell is ``mean ± std (n=k)`` over the runs of that method (usually one per seed), with the
sample standard deviation (ddof = 1); a single run shows its value alone, ``(n=1)``.  Non-finite
or ``null`` values, and every value of a run whose ``status`` is ``"diverged"``, are left out of
the statistics and the cell then shows ``(n=k of m)``; the diverged runs are listed under the
table with their step.  Runs with ``status: "skipped"`` never ran: they are listed with their
reason and counted nowhere.  A results file may name the run fields to group by in a top-level
``"group_by"`` list (for example ``["method", "noise"]``); the default groups by ``method``.
Optional top-level ``"notes"`` (a string or list of strings) are quoted under the table.

``"reference"`` (published numbers, see :func:`reference_table`) adds a table of our means against
them in units of the published standard deviation, but only when the reference records the
``"protocol"`` it was measured under (config fields and values) and every run's config has the
same values (:func:`protocol_differences`); otherwise one line says why the comparison is omitted.

Figures come from the task registry (:mod:`tensorsam.tasks.registry`) when the file's task is
registered with a figures function.  A task may also replace the generic table with its own
Markdown (:func:`task_sections`).  Tick labels of the figures: :mod:`tensorsam.ticks`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from tensorsam.run.io import atomic_write_text, check_writable_dir

# preferred column order; other numeric metrics follow alphabetically
METRIC_ORDER = (
    "train_r2",
    "heldout_r2",
    "train_r2_uncentred",
    "heldout_r2_uncentred",
    "train_uncentred_r2",
    "heldout_uncentred_r2",
    "train_rmse",
    "heldout_rmse",
    "val_r2",
    "val_r2_uncentred",
    "val_rmse",
    "wall_seconds",
)
# numeric run fields that identify a run rather than measure it
NOT_METRICS = frozenset({"seed", "mask_seed", "iterations", "total_iterations", "diverged_at"})
GROUP_KEYS = ("method", "name", "label")


def load_results(path) -> dict:
    """Read one results file; a missing file or one that is not a results file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"results file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} is not a tensorsam results file (no list of 'runs')")  # noqa: TRY004
    if not all(isinstance(r, dict) for r in data["runs"]):
        raise ValueError(f"results file {path}: every entry of 'runs' must be an object")
    reference = data.get("reference")
    if reference is not None and not _valid_reference(reference):
        raise ValueError(
            f"results file {path}: 'reference' must be "
            "{'source': str, 'protocol': {field: value}, 'values': {method: {metric: [mean, std]}}}"
        )
    group_by = data.get("group_by")
    if group_by is not None and not (
        isinstance(group_by, list) and all(isinstance(k, str) for k in group_by)
    ):
        raise ValueError(f"results file {path}: 'group_by' must be a list of run field names")
    data.setdefault("task", "unknown")
    return data


def _valid_reference(ref) -> bool:
    values = ref.get("values") if isinstance(ref, dict) else None
    if isinstance(ref, dict) and not isinstance(ref.get("protocol", {}), dict):
        return False
    return isinstance(values, dict) and all(
        isinstance(per, dict)
        and all(isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v) for v in per.values())
        for per in values.values()
    )


def metric_label(key: str) -> str:
    """Human label of a metric key: ``heldout_r2_uncentred`` -> ``held-out R² (uncentred)``."""
    if key == "wall_seconds":
        return "wall s"
    words = key.split("_")
    uncentred = "uncentred" in words
    words = [w for w in words if w != "uncentred"]
    names = {"heldout": "held-out", "r2": "R²", "rmse": "RMSE", "mse": "MSE", "val": "validation"}
    label = " ".join(names.get(w, w) for w in words)
    return f"{label} (uncentred)" if uncentred else label


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _group_of(run: dict, group_by: Sequence[str] | None) -> str:
    if group_by:
        return ", ".join(str(run.get(k)) if k in GROUP_KEYS else f"{k}={run.get(k)}" for k in group_by)
    for key in GROUP_KEYS:
        if key in run:
            return str(run[key])
    return "run"


def metric_keys(runs: Sequence[dict], exclude: Sequence[str] = ()) -> list[str]:
    """Numeric run fields to tabulate, in :data:`METRIC_ORDER` then alphabetical order."""
    skip = NOT_METRICS | set(exclude)
    found = {k for r in runs for k, v in r.items() if _is_number(v) and k not in skip and k[:1] != "_"}
    ordered = [k for k in METRIC_ORDER if k in found]
    return ordered + sorted(found - set(ordered))


def summarize(
    runs: Sequence[dict], group_by: Sequence[str] | None = None
) -> tuple[list[str], list[str], dict]:
    """Group runs by method; return (methods, metrics, {(method, metric): (mean, std, k, n)}).

    Runs are grouped by ``group_by`` (run fields, e.g. ``["method", "noise"]``) when given,
    else by the first of ``method``/``name``/``label`` they have.  ``k`` counts the finite values
    used (none from a diverged run), ``n`` the method's runs (skipped runs are not counted);
    ``std`` is the sample standard deviation (NaN when k < 2).
    """
    methods: list[str] = []
    groups: dict[str, list[dict]] = {}
    for run in (r for r in runs if not skipped(r)):
        m = _group_of(run, group_by)
        if m not in groups:
            methods.append(m)
            groups[m] = []
        groups[m].append(run)
    metrics = metric_keys([r for g in groups.values() for r in g], exclude=group_by or ())
    stats = {}
    for m in methods:
        for key in metrics:
            vals = [float(r[key]) for r in groups[m]
                    if not diverged(r) and _is_number(r.get(key)) and math.isfinite(r[key])]
            k = len(vals)
            mean = sum(vals) / k if k else math.nan
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (k - 1)) if k > 1 else math.nan
            stats[(m, key)] = (mean, std, k, len(groups[m]))
    return methods, metrics, stats


def format_cell(mean: float, std: float, k: int, n: int, decimals: int | None = None) -> str:
    """``mean ± std (n=k)``: decimals follow two significant digits of the std (or are ``decimals``);
    one value is shown alone, ``value (n=1)``; ``(n=k of n)`` when only k of the n runs gave a
    finite value."""
    count = f"(n={k})" if k == n else f"(n={k} of {n})"
    if k == 0:
        return f"– {count}"
    plain = f"{mean:.6g}" if decimals is None else f"{mean:.{decimals}f}"
    if k == 1 or not math.isfinite(std):
        return f"{plain} {count}"
    if std <= 1e-12 * max(1.0, abs(mean)):  # identical up to rounding
        return f"{plain} ± 0 {count}"
    if decimals is None:
        decimals = min(max(1 - math.floor(math.log10(std)), 0), 8)
    return f"{mean:.{decimals}f} ± {std:.{decimals}f} {count}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of ``rows`` under ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def reference_table(stats: dict, reference: dict) -> str:
    """Our means against published ``reference`` values, with the gap in reference σ.

    ``reference`` is ``{"source": str, "values": {method: {metric: [mean, std]}}}`` (its protocol
    is checked by the caller, :func:`reference_section`).
    """
    rows = []
    for method, metrics in (reference.get("values") or {}).items():
        for key, (ref_mean, ref_std) in metrics.items():
            ours = stats.get((method, key))
            if ours is None or ours[2] == 0:
                gap, cell = "–", "–"
            else:
                cell = format_cell(*ours)
                gap = f"{(ours[0] - ref_mean) / ref_std:+.1f} σ" if ref_std > 0 else "–"
            rows.append([method, metric_label(key), cell, f"{ref_mean} ± {ref_std}", gap])
    if not rows:
        return ""
    source = reference.get("source", "reference")
    table = markdown_table(["method", "metric", "ours", str(source), "ours − reference"], rows)
    return f"Against {source}:\n\n{table}"


def _same_value(a, b) -> bool:
    if _is_number(a) and _is_number(b):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def protocol_differences(config: dict | None, protocol: dict) -> list[str]:
    """``"field ours vs reference"`` for each field of ``protocol`` whose value in the
    run's ``config`` differs (a field the config lacks differs too)."""
    config = config or {}
    return [f"{key} {config.get(key, 'unset')} vs {want}"
            for key, want in protocol.items() if key not in config or not _same_value(config[key], want)]


def reference_section(stats: dict, reference: dict, configs: Sequence[dict | None]) -> str:
    """The comparison with ``reference`` when every config has its protocol, else one line saying
    why it is omitted (a reference without a protocol is never compared)."""
    source = reference.get("source", "the reference")
    protocol = reference.get("protocol")
    if not protocol:
        return (f"_Comparison with {source} omitted: the reference does not record the protocol "
                "its numbers were measured under._")
    diffs = list(dict.fromkeys(d for c in configs for d in protocol_differences(c, protocol)))
    if diffs:
        return (f"_Comparison with {source} omitted: the protocol differs (this run vs the reference): "
                f"{'; '.join(diffs)}._")
    return reference_table(stats, reference)


def tables(runs: Sequence[dict], group_by: Sequence[str] | None = None, reference: dict | None = None,
           configs: Sequence[dict | None] = ()) -> str:
    """The runs' table (rows: the longer of metrics and methods) and, when the protocol matches,
    the comparison with ``reference``, as Markdown.  ``configs``: the configs of the runs' files."""
    methods, metrics, stats = summarize(runs, group_by)
    if not methods or not metrics:
        return "_No numeric metrics in these runs._"
    if len(metrics) >= len(methods):     # the paper's Table 1 layout
        text = "Rows: metrics; columns: methods" + _CELL_NOTE + "\n\n" + markdown_table(
            ["metric", *methods],
            [[metric_label(key)] + [format_cell(*stats[(m, key)]) for m in methods] for key in metrics])
    else:
        text = "Rows: methods; columns: metrics" + _CELL_NOTE + "\n\n" + markdown_table(
            ["method", *(metric_label(k) for k in metrics)],
            [[m] + [format_cell(*stats[(m, key)]) for key in metrics] for m in methods])
    against = reference_section(stats, reference, configs or [None]) if reference else ""
    return f"{text}\n\n{against}" if against else text


_CELL_NOTE = "; cells: mean ± sample std over runs (n = number of runs with a finite value):"


def diverged(run: dict) -> bool:
    """Whether a run's ``status`` says it diverged."""
    return run.get("status") == "diverged"


def diverged_note(runs: Sequence[dict], group_by: Sequence[str] | None = None) -> str:
    """The diverged runs, one bullet each with the step (empty when none diverged)."""
    lines = []
    for r in (r for r in runs if diverged(r)):
        name = _group_of(r, group_by) + (f", seed {r['seed']}" if "seed" in r else "")
        lines.append(f"- **diverged**: {name} at step {r.get('diverged_at', '?')}")
    if not lines:
        return ""
    return "Diverged runs (non-finite loss; left out of the means above):\n\n" + "\n".join(lines)


def skipped(run: dict) -> bool:
    """Whether a run's ``status`` says it was skipped (it never ran)."""
    return run.get("status") == "skipped"


def skipped_note(runs: Sequence[dict], group_by: Sequence[str] | None = None) -> str:
    """The skipped runs, one bullet each with the reason (empty when none was skipped)."""
    lines = [f"- **skipped**: {_group_of(r, group_by)}" + (f", seed {r['seed']}" if "seed" in r else "")
             + (f": {r['reason']}" if r.get("reason") else "") for r in runs if skipped(r)]
    return "Skipped runs (never ran; not counted):\n\n" + "\n".join(lines) if lines else ""


def _summary_line(results: dict) -> str:
    runs = results["runs"]
    seeds = sorted(
        {r["seed"] for r in runs if "seed" in r},
        key=lambda s: (not _is_number(s), s if _is_number(s) else str(s)),
    )
    prov = results.get("provenance") or {}
    bad = [f"{n} {what}" for what, n in (("diverged", sum(map(diverged, runs))), ("skipped", sum(map(skipped, runs))))
           if n]
    parts = [f"task `{results['task']}`", f"{len(runs)} runs" + (f" ({', '.join(bad)})" if bad else "")]
    if seeds:
        parts.append("seeds " + ", ".join(str(s) for s in seeds))
    if _is_number(results.get("wall_seconds")):
        parts.append(f"wall {results['wall_seconds']:.1f} s")
    if prov.get("git_commit"):
        parts.append(f"commit `{str(prov['git_commit'])[:10]}`")
    if prov.get("device"):
        parts.append(f"device {prov['device']}")
    return "; ".join(parts)


def _config_block(config) -> str:
    if not config:
        return ""
    import yaml

    body = yaml.safe_dump(config, sort_keys=True, default_flow_style=None, allow_unicode=True).rstrip()
    return f"<details><summary>config</summary>\n\n```yaml\n{body}\n```\n\n</details>"


def _task(results: dict):
    from tensorsam.tasks.registry import TASKS

    return TASKS.get(str(results.get("task", "")))


def task_figures(results: dict, out_dir: Path) -> list[Path]:
    """The figures of the registered task named by the results file (:mod:`tensorsam.tasks.registry`),
    made in ``out_dir``; none for a task that is not registered or has no figures."""
    task = _task(results)
    fn = None if task is None else task.get("figures")
    if fn is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    return [Path(p) for p in (fn(results, out_dir) or [])]


def task_sections(results: dict) -> str | None:
    """The task's own Markdown for ``results`` (its registry ``report`` part), or None to use the
    generic table."""
    task = _task(results)
    fn = None if task is None else task.get("report")
    return None if fn is None else fn(results)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "results"


def _sections(paths: list[Path], loaded: list[dict], pool: bool):
    """(title, runs, [(path, results)]) per file, or per task when pooling."""
    if not pool:
        return [(f"{res['task']}: {p}", res["runs"], [(p, res)]) for p, res in zip(paths, loaded)]
    by_task: dict[str, list[tuple[Path, dict]]] = {}
    for p, res in zip(paths, loaded):
        by_task.setdefault(str(res["task"]), []).append((p, res))
    return [(f"{task} (pooled over {len(items)} files)", [r for _, res in items for r in res["runs"]], items)
            for task, items in by_task.items()]


def _body(runs: list[dict], items: list[tuple[Path, dict]]) -> list[str]:
    """The tables and run notes of one section: the task's own, or the generic table."""
    first = items[0][1]
    own = task_sections({**first, "runs": runs})
    if own is not None:
        return [own, ""]
    group_by = first.get("group_by")
    lines = [tables(runs, group_by, first.get("reference"), [res.get("config") for _, res in items]), ""]
    for note in (diverged_note(runs, group_by), skipped_note(runs, group_by)):
        lines += [note, ""] if note else []
    return lines


def _file_lines(p: Path, res: dict, out_dir: Path, figures: bool, used: set[str]) -> list[str]:
    """A file's notes, config and figure links."""
    notes = res.get("notes") or []
    lines = [f"> {note}" for note in ([notes] if isinstance(notes, str) else notes)]
    lines += [""] if notes else []
    block = _config_block(res.get("config"))
    lines += [block, ""] if block else []
    if not figures:
        return lines
    slug = _slug(f"{p.parent.name}-{p.stem}")
    while slug in used:
        slug += "-1"
    used.add(slug)
    for fig in task_figures(res, out_dir / "figures" / slug):
        rel = Path(os.path.relpath(fig.resolve(), out_dir.resolve())).as_posix()
        lines += [f"![{fig.stem}]({rel})", ""]
    return lines


def make_report(
    paths: Sequence, out_dir=None, *, pool: bool = False, figures: bool = True
) -> tuple[Path, str]:
    """Write ``out_dir/report.md`` for the results files ``paths``; return its path and text.

    ``out_dir`` defaults to the folder of the first file.  With ``pool=True`` the runs of all
    files with the same task are tabulated together.
    """
    if not paths:
        raise ValueError("give at least one results file")
    paths = [Path(p) for p in paths]
    loaded = [load_results(p) for p in paths]
    out_dir = check_writable_dir(out_dir if out_dir is not None else paths[0].parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    lines = ["# tensorsam report", ""]
    for title, runs, items in _sections(paths, loaded, pool):
        lines += [f"## {title}", "", *(f"- `{p}`: {_summary_line(res)}" for p, res in items), ""]
        lines += _body(runs, items)
        for p, res in items:
            lines += _file_lines(p, res, out_dir, figures, used)
    text = "\n".join(lines).rstrip() + "\n"
    target = out_dir / "report.md"
    atomic_write_text(target, text)
    return target, text
