"""PNG plots for run folders: loss curves and loss-vs-accuracy fits.

matplotlib's Agg backend renders to files only, so this works on headless machines
and never opens a window. pyplot is imported on the first plot, not with this module: every
training job imports it (its run log plots the loss at the end), and pyplot's import is
about half a second of each job's start, paid again by every process of a torchrun.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


@cache
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curves(
    metrics: str | Path | Iterable[dict],
    png_path: str | Path,
    *,
    title: str = "",
    x: str = "step",
    ys: Sequence[str] = ("loss",),
    group_by: str | None = None,
) -> Path:
    """One line per field in `ys` (and per value of `group_by`, e.g. the probe's task)
    against `x`, from a metrics.jsonl file or its records. Records lacking a field are
    skipped for that line, so mixed logs (train and eval records) plot fine."""
    records = read_jsonl(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    groups = sorted({r.get(group_by) for r in records}, key=str) if group_by else [None]
    for group in groups:
        for y in ys:
            points = [(r[x], r[y]) for r in records if x in r and y in r and (group_by is None or r.get(group_by) == group)]
            if points:
                label = y if group is None else (str(group) if len(ys) == 1 else f"{group} {y}")
                ax.plot(*zip(*points), label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(ys[0] if len(ys) == 1 else "value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _save(fig, png_path)


def r_squared(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Coefficient of determination of the least-squares line y ~ a x + b."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    residual = np.sum((y - (slope * x + intercept)) ** 2)
    total = np.sum((y - y.mean()) ** 2)
    return float(1.0 - residual / total) if total > 0 else float("nan")


def plot_scatter_fit(
    xs: Sequence[float],
    ys: Sequence[float],
    labels: Sequence[str] | None,
    png_path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    r2: float | None = None,
    title: str = "",
) -> Path:
    """Points (annotated with `labels`) and their least-squares line; R^2 in the legend
    (computed here when not given): the paper's student-loss-vs-accuracy plot."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    r2 = r_squared(x, y) if r2 is None else r2
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    ax.scatter(x, y)
    for xi, yi, label in zip(x, y, labels or ()):
        ax.annotate(str(label), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        line = np.linspace(x.min(), x.max(), 2)
        ax.plot(line, slope * line + intercept, color="C1", label=f"least squares, R$^2$ = {r2:.3f}")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, png_path)


def _save(fig, png_path: str | Path) -> Path:
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        _pyplot().close(fig)  # figures otherwise accumulate in pyplot's registry across calls
    return path
