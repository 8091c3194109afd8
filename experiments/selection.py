"""Model selection by training loss: probe student checkpoints, fit accuracy ~ loss, report R^2.

The paper's claim (R^2 = 0.951 over many checkpoints of students of one teacher) is what
would let a user pick students by their training loss instead of probing each one. The
points here are a run's snapshots (`student.snapshot_every`: encoder + the mean
training loss of the steps before it) and a run's final checkpoint (its summary's
final loss), across any number of runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from salt.config import Config
from salt.plots import plot_scatter_fit, r_squared
from salt.checkpoint import has_checkpoint, read_meta


def checkpoint_points(run_dir: str | Path, name: str) -> list[dict]:
    """Every snapshot of a run and its final checkpoint: name, encoder folder, step, training
    loss, run name, and whether it is the run's final state (a snapshot at the last step is)."""
    run_dir = Path(run_dir)
    points = []
    for snap in sorted((run_dir / "snapshots").glob("step-*")):
        if has_checkpoint(snap):
            meta = read_meta(snap)
            points.append({"name": f"{name}-step{meta['step']}", "spec": str(snap), "step": meta["step"],
                           "loss": meta["train_loss"], "run": name, "final": False})
    summary = run_dir / "summary.json"
    if summary.is_file() and has_checkpoint(run_dir):
        done = json.loads(summary.read_text())
        same = [p for p in points if p["step"] == done["step"]]
        if same:
            same[0]["final"] = True
        else:
            points.append({"name": f"{name}-step{done['step']}", "spec": str(run_dir), "step": done["step"],
                           "loss": done["final_loss"], "run": name, "final": True})
    return points


def final_points(points: list[dict]) -> dict[str, str]:
    """run name -> the name of its final checkpoint's point."""
    return {p["run"]: p["name"] for p in points if p["final"]}


READOUTS = ("top1", "knn_top1", "linear_top1")  # attentive (mean over probe seeds), k-NN, linear


def loss_vs_accuracy(points: list[dict], results: dict[str, dict[str, dict]], out_dir: str | Path, *, title: str) -> dict:
    """Per task: R^2 and slope of the attentive top-1 against training loss (and the R^2 of the
    k-NN and linear readouts); writes selection.json and
    selection_<task>.png into out_dir. `results` is name -> task -> probe result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"points": [], "tasks": {}}
    for p in points:
        report["points"].append(p | {f"{key}_{t}": r[key] for t, r in results[p["name"]].items() for key in READOUTS})
    tasks = sorted({t for p in points for t in results[p["name"]]})
    for task in tasks:
        xs = [p["loss"] for p in points]
        ys = [results[p["name"]][task]["top1"] for p in points]
        r2 = r_squared(xs, ys) if len(points) >= 3 else float("nan")
        # the paper's relation is negative (lower loss, higher accuracy): a high R^2 with a
        # positive slope would be a different finding
        slope = float(np.polyfit(xs, ys, 1)[0]) if len(points) >= 2 and np.ptp(xs) > 0 else float("nan")
        png = plot_scatter_fit(xs, ys, [p["name"] for p in points], out / f"selection_{task}.png",
                               xlabel="student training loss", ylabel=f"probe top-1 ({task})", r2=r2, title=title)
        best_by_loss = min(points, key=lambda p: p["loss"])["name"]
        best_by_probe = max(points, key=lambda p: results[p["name"]][task]["top1"])["name"]
        cheap = {f"r2_{key.removesuffix('_top1')}": r_squared(xs, [results[p["name"]][task][key] for p in points])
                 if len(points) >= 3 else float("nan") for key in READOUTS[1:]}  # k-NN and linear beside it
        report["tasks"][task] = {"r2": r2, **cheap, "slope": slope, "points": len(points), "png": png.name,
                                 "lowest_loss": best_by_loss, "best_probe": best_by_probe}
    (out / "selection.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def select_runs(run_dirs: dict[str, str], cfg: Config, data: str, out_dir: str | Path, *,
                tasks: list[str] | None = None, progress: bool = True, extra: dict[str, str] | None = None) -> dict:
    """Probe every checkpoint of the runs (clips decoded once) and report loss vs accuracy.

    `extra` adds encoders to probe alongside (e.g. the teacher, a random floor) that are
    not points of the fit. Returns {"selection": report, "probes": name -> task -> result}.
    """
    from experiments.probing import probe_encoders

    points = [p for name, run in run_dirs.items() for p in checkpoint_points(run, name)]
    if not points:
        raise FileNotFoundError(f"no checkpoints to probe in {sorted(run_dirs.values())}")
    specs = {p["name"]: p["spec"] for p in points} | (extra or {})
    probes = probe_encoders(specs, cfg, data, Path(out_dir) / "probe", tasks=tasks, progress=progress)
    report = loss_vs_accuracy(points, probes, out_dir, title="student loss vs probe accuracy")
    return {"selection": report, "probes": probes}
