"""Many students, one target store: a sweep file lists variants (config overrides) of one base config.

Each variant trains into <out>/<variant>/ exactly as `make student` would (experiments.runs), one
after another on this machine or as Ray tasks (one GPU each where there are GPUs). The
store is only read, so any number of students may share it. A variant whose run folder
already holds a finished run is not trained again: rerunning a sweep resumes it.
Results (variant, steps, final loss, wall time, probe top-1 when probing is on) go to
results.json / results.csv / results.md in the sweep folder, with loss_curves.png (every student's
loss curve) linked from results.md. Every student logs to one TensorBoard root,
<out>/tensorboard/<variant> (`tensorboard: false` in the sweep file turns that off):
`tensorboard --logdir <out>/tensorboard` shows them side by side.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import yaml

from experiments.runs import run_student
from salt.config import Config, ConfigError, apply_overrides, from_dict, load_config, to_dict
from salt.devices import set_torch_threads
from salt.plots import plot_loss_curves, read_jsonl

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
LOSS_CURVES = "loss_curves.png"


@dataclass(kw_only=True)
class Variant:
    name: str
    overrides: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class SweepConfig:
    base: str  # the config every variant starts from (relative paths: from the sweep file's folder, then the cwd)
    variants: list[Variant]
    overrides: list[str] = field(default_factory=list)  # applied to every variant, before its own
    executor: Literal["local", "ray"] = "local"  # local: one after another; ray: one Ray task per variant
    probe: bool = False  # attentive-probe every student afterwards (clips decoded once for all)
    tasks: list[str] = field(default_factory=list)  # probe tasks; empty: every task in labels.json
    tensorboard: bool = True  # every student's TensorBoard log under <out>/tensorboard/<variant> (the track extra)


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if "variants" not in raw:
        raise ConfigError(f"{path} is not a sweep file: it has no 'variants' list (see jobs/configs/sweep-demo.yaml)")
    raw = to_dict(SweepConfig(base="", variants=[])) | raw  # an override may set a key the file leaves out
    apply_overrides(raw, overrides, "sweep")
    sweep = from_dict(SweepConfig, raw, "sweep")
    names = [v.name for v in sweep.variants]
    for name in names:
        if not _SAFE_NAME.match(name):
            raise ConfigError(f"sweep variant name {name!r} must match {_SAFE_NAME.pattern} (it names a folder)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"sweep variant names must be unique; repeated: {duplicates}")
    base = path.parent / sweep.base
    sweep.base = str(base if base.is_file() else Path(sweep.base))
    return sweep


def variant_configs(sweep: SweepConfig) -> dict[str, Config]:
    """name -> resolved config; every variant is checked before any trains (a typo fails in seconds)."""
    configs = {}
    for v in sweep.variants:
        # relative to the run folder <out>/<variant>, so the sweep folder can move
        logs = ["student.log.tensorboard=true", f"student.log.tensorboard_dir=../tensorboard/{v.name}"] if sweep.tensorboard else []
        try:
            configs[v.name] = load_config(sweep.base, [*sweep.overrides, *v.overrides, *logs])
        except ConfigError as e:
            raise ConfigError(f"sweep variant {v.name!r}: {e}") from None
    return configs


def train_variant(cfg_dict: dict, data: str, store: str, run_dir: str, progress: bool) -> dict:
    """One student; takes a plain dict so it can travel to a Ray worker."""
    cfg = from_dict(Config, cfg_dict)
    set_torch_threads(cfg.student)
    return run_student(cfg, data, store, run_dir, progress=progress)  # a finished run reports its summary.json


def run_sweep(sweep: SweepConfig, *, data: str, store: str, out: str | Path, progress: bool = True) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = variant_configs(sweep)
    (out / "sweep.yaml").write_text(yaml.safe_dump(to_dict(sweep), sort_keys=False))
    jobs = {name: (to_dict(cfg), data, store, str(out / name)) for name, cfg in configs.items()}
    if sweep.executor == "ray":
        summaries = _run_on_ray(jobs)
    else:
        summaries = {name: train_variant(*job, progress) for name, job in jobs.items()}
    probes = _probe(sweep, configs, data, out, progress) if sweep.probe else {}
    rows = []
    for v in sweep.variants:
        s = summaries[v.name]
        row = {
            "variant": v.name,
            "overrides": " ".join(v.overrides),
            "steps": s["step"],
            "final_loss": round(s["final_loss"], 4),
            "wall_s": round(s["wall_s"], 1),
            "data_wait_fraction": round(s["data_wait_fraction"], 3),
        }
        for task, r in probes.get(v.name, {}).items():
            row[f"top1_{task}"] = round(r["top1"], 4)
        rows.append(row)
    curves = [r | {"variant": v.name} for v in sweep.variants for r in read_jsonl(out / v.name / "metrics.jsonl")]
    plot_loss_curves(curves, out / LOSS_CURVES, title="training loss of every student", group_by="variant")
    write_results(rows, out, figures=[LOSS_CURVES])
    return rows


def _run_on_ray(jobs: dict[str, tuple]) -> dict[str, dict]:
    import ray

    from pipeline.cluster import actor_gpus, init_ray

    init_ray()
    # one GPU per student where the cluster has GPUs (asked of Ray, not of the driver, as extraction
    # does); on CPUs, a core each so students run side by side
    resources = {"num_gpus": 1} if actor_gpus() else {"num_cpus": 1}
    remote = ray.remote(**resources)(train_variant)
    refs = {name: remote.remote(*job, False) for name, job in jobs.items()}
    return {name: ray.get(ref) for name, ref in refs.items()}


def _probe(sweep: SweepConfig, configs: dict[str, Config], data: str, out: Path, progress: bool) -> dict:
    """variant -> task -> probe result of its final checkpoint; every checkpoint of the sweep
    (finals and snapshots) goes into the loss-vs-accuracy report in the sweep folder."""
    from experiments.selection import final_points, select_runs

    runs = {name: str(out / name) for name in configs}
    first = next(iter(configs.values()))
    selected = select_runs(runs, first, data, out, tasks=sweep.tasks or None, progress=progress)
    finals = final_points(selected["selection"]["points"])
    return {name: selected["probes"][finals[name]] for name in runs}


def write_results(rows: list[dict], out: Path, figures: Sequence[str] = ()) -> None:
    """results.json, .csv and .md; the markdown links `figures` (PNGs in `out`) under its table."""
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    lines += [f"\n![{Path(f).stem}]({f})" for f in figures]
    (out / "results.md").write_text("\n".join(lines) + "\n")
