"""Tick labels a reader can read: :func:`readable_ticks` makes every plotted axis of a figure show
enough tick labels and none overlapping (category labels rotated instead), and running it twice
changes nothing; :func:`tick_problems` says what is wrong with a figure's ticks (tests use it)."""

from __future__ import annotations


def _labelled_ticks(axis) -> list[tuple[float, object]]:
    """(location, label) of the ticks inside the view whose label is shown and not empty."""
    lo, hi = sorted(axis.get_view_interval())
    pad = 1e-9 * max(abs(lo), abs(hi), 1e-300)
    out = []
    for locs, ticks in ((axis.get_majorticklocs(), axis.get_major_ticks()),
                        (axis.get_minorticklocs(), axis.get_minor_ticks())):
        for loc, tick in zip(locs, ticks):
            label = tick.label1 if tick.label1.get_visible() else tick.label2
            if lo - pad <= loc <= hi + pad and label.get_visible() and label.get_text().strip():
                out.append((float(loc), label))
    return sorted(out, key=lambda t: t[0])


def _overlaps(labels, renderer) -> list[tuple[object, object]]:
    boxes = [lab.get_window_extent(renderer).padded(1.0) for lab in labels]
    return [(labels[i], labels[i + 1]) for i in range(len(labels) - 1) if boxes[i].overlaps(boxes[i + 1])]


def _checked_axes(fig):
    """(name, axis) of every axis of a plotted panel whose tick labels are meant to show."""
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.has_data():
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            tick = axis.get_major_ticks()[0] if axis.get_major_ticks() else None
            if tick is not None and (tick.label1.get_visible() or tick.label2.get_visible()):
                yield f"panel {i} {name}", axis


def tick_problems(fig, min_labels: int = 2) -> list[str]:
    """What makes the figure's tick labels unreadable: an axis with fewer than ``min_labels`` labels
    in view, or labels that overlap (empty when all is well)."""
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    problems = []
    for name, axis in _checked_axes(fig):
        labelled = _labelled_ticks(axis)
        if len(labelled) < min_labels:
            problems.append(f"{name}: {len(labelled)} tick label(s)")
        clash = _overlaps([lab for _, lab in labelled], renderer)
        if clash:
            problems.append(f"{name}: overlapping tick labels " + ", ".join(
                f"{a.get_text()!r}/{b.get_text()!r}" for a, b in clash))
    return problems


def _short(value, _pos=None) -> str:
    text = f"{value:.0f}" if 1 <= abs(value) < 1e6 and value == round(value) else f"{value:.4g}"
    return text.replace("-", "−")


def _densify(axis) -> None:
    """More labelled ticks on an axis that shows too few."""
    from matplotlib import ticker

    scale = axis.get_scale()
    if scale == "log":
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    elif scale == "symlog":
        axis.set_major_locator(ticker.SymmetricalLogLocator(axis.get_transform(), subs=(1.0, 2.0, 5.0)))
    else:
        axis.set_major_locator(ticker.MaxNLocator(5))
    axis.set_major_formatter(ticker.FuncFormatter(_short))
    axis.set_minor_formatter(ticker.NullFormatter())


def _spread(axis) -> None:
    """Three ticks evenly spread (in the axis' scale) over the view, the last resort."""
    import numpy as np
    from matplotlib import ticker

    tr = axis.get_transform()
    ends = tr.transform(np.asarray(sorted(axis.get_view_interval()), dtype=float))
    axis.set_major_locator(ticker.FixedLocator(tr.inverted().transform(np.linspace(*ends, 3))))
    axis.set_major_formatter(ticker.FuncFormatter(_short))


def _thin(axis, renderer) -> None:
    """Drop tick labels that overlap one kept before them (zero is kept first); rotate category
    labels instead."""
    from matplotlib import ticker
    from matplotlib.category import StrCategoryFormatter

    labelled = [t for t in _labelled_ticks(axis) if t[1] in axis.get_majorticklabels()]
    if not _overlaps([lab for _, lab in labelled], renderer):
        return
    if isinstance(axis.get_major_formatter(), ticker.FixedFormatter | StrCategoryFormatter):
        for lab in axis.get_majorticklabels():
            lab.set(rotation=30, ha="right", rotation_mode="anchor")
        return
    kept: list = []
    for loc, lab in sorted(labelled, key=lambda t: t[0] != 0):      # zero first, then in order
        if not any(_overlaps([other, lab], renderer) for _, other in kept):
            kept.append((loc, lab))
    axis.set_major_locator(ticker.FixedLocator(sorted(loc for loc, _ in kept)))
    axis.set_minor_formatter(ticker.NullFormatter())


def _wanted(axis, min_labels: int) -> int:
    """Labels an axis needs: one for categories, two for ticks placed by hand (a FixedLocator)."""
    from matplotlib import ticker
    from matplotlib.category import StrCategoryFormatter

    if isinstance(axis.get_major_formatter(), StrCategoryFormatter):
        return 1
    return min(2, min_labels) if isinstance(axis.get_major_locator(), ticker.FixedLocator) else min_labels


def readable_ticks(fig, min_labels: int = 3):
    """Give every plotted axis of ``fig`` at least ``min_labels`` tick labels (two where the ticks
    were placed by hand, one for categories) and no overlapping ones (call it after plotting,
    before saving; calling it again changes nothing); returns ``fig``."""
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    for fix in (_densify, _spread):
        sparse = [axis for _, axis in _checked_axes(fig)
                  if len(_labelled_ticks(axis)) < _wanted(axis, min_labels)]
        for axis in sparse:
            fix(axis)
        fig.draw_without_rendering()
    for _, axis in _checked_axes(fig):
        _thin(axis, renderer)
    fig.draw_without_rendering()
    return fig
