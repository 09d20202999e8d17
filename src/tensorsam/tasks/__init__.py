"""tensorsam.tasks: the experiments (completion E1, toy E2, flatness E3) and their registry.

Each task has a config dataclass, a run function writing a results file, a summary and a
``figures(results, out_dir)`` used by ``tensorsam report``; :mod:`tensorsam.tasks.registry`
(:data:`TASKS`, :func:`get_task`) names them for the command line and the report.  Importing this
package imports no torch.
"""

from __future__ import annotations

from pathlib import Path

from tensorsam.tasks.registry import TASKS, Task, get_task, register

__all__ = ["TASKS", "Task", "figure_grid", "get_task", "register", "save_figure"]


def figure_grid(rows: int, cols: int, size: tuple[float, float], **kwargs):
    """A matplotlib Figure (Agg, no pyplot state) and its ``rows x cols`` axes array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **kwargs)


def save_figure(fig, out_dir, name: str, dpi: int = 120) -> Path:
    """Save ``fig`` as ``out_dir/name`` (folders created, tick labels made readable) and return the path."""
    from tensorsam.run.io import atomic_save_figure
    from tensorsam.ticks import readable_ticks

    return atomic_save_figure(readable_ticks(fig), Path(out_dir) / name, dpi=dpi)
