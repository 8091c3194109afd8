"""Many students, one target store: a sweep file lists variants (config overrides) of one base config.

Each variant trains into <out>/<variant>/ exactly as `make student` would (experiments.runs), one
after another on this machine, as Ray tasks (one GPU each where there are GPUs), or as SLURM jobs
(`submit_sweep`: each variant its own job with its own nodes and GPUs, the sweep's `slurm` section
and then the variant's; a last job, once they all succeed, runs this sweep again with executor local
to tabulate). The store is only read, so any number of students may share it. A variant whose run
folder already holds a finished run is not trained again but read (`finished_summary`: on any
world size it was trained at): rerunning a sweep resumes it.
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
from experiments.slurm import SlurmConfig, command_script, submit, training_script, write_script
from salt.checkpoint import has_checkpoint, read_meta
from salt.config import Config, ConfigError, apply_overrides, from_dict, load_config, to_dict
from salt.devices import set_torch_threads
from salt.plots import plot_loss_curves, read_jsonl

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
LOSS_CURVES = "loss_curves.png"


@dataclass(kw_only=True)
class Variant:
    name: str
    overrides: list[str] = field(default_factory=list)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # executor slurm: the sweep's section, then these keys


@dataclass(kw_only=True)
class SweepConfig:
    base: str  # the config every variant starts from (relative paths: from the sweep file's folder, then the cwd)
    variants: list[Variant]
    overrides: list[str] = field(default_factory=list)  # applied to every variant, before its own
    # local: one after another; ray: one Ray task per variant; slurm: one SLURM job per variant
    executor: Literal["local", "ray", "slurm"] = "local"
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # every variant's SLURM resources (executor slurm)
    probe: bool = False  # attentive-probe every student afterwards (clips decoded once for all)
    tasks: list[str] = field(default_factory=list)  # probe tasks; empty: every task in labels.json
    tensorboard: bool = True  # every student's TensorBoard log under <out>/tensorboard/<variant> (the track extra)


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if "variants" not in raw:
        raise ConfigError(f"{path} is not a sweep file: it has no 'variants' list (see jobs/configs/sweep-demo.yaml)")
    defaults = to_dict(SweepConfig(base="", variants=[]))
    raw = defaults | raw | {"slurm": defaults["slurm"] | (raw.get("slurm") or {})}  # an override may set a key the file leaves out
    apply_overrides(raw, overrides, "sweep")
    for v in raw["variants"] or []:  # a variant's slurm keys over the sweep's (unknown keys fail in from_dict)
        if isinstance(v, dict):
            v["slurm"] = raw["slurm"] | (v.get("slurm") or {})
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


def finished_summary(run_dir: str | Path, steps: int) -> dict | None:
    """The summary of a run that has trained all `steps` (its checkpoint at that step), else None.
    Read, not resumed: a run trained on 16 GPUs (a SLURM variant) is reported by a sweep on one."""
    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    if not (summary.is_file() and has_checkpoint(run_dir)) or read_meta(run_dir).get("step") != steps:
        return None
    done = json.loads(summary.read_text())
    return done if done.get("step") == steps else None


def train_variant(cfg_dict: dict, data: str, store: str, run_dir: str, progress: bool) -> dict:
    """One student; takes a plain dict so it can travel to a Ray worker."""
    cfg = from_dict(Config, cfg_dict)
    done = finished_summary(run_dir, cfg.student.optim.steps)
    if done is not None:
        return done
    set_torch_threads(cfg.student)
    return run_student(cfg, data, store, run_dir, progress=progress)


def run_sweep(sweep: SweepConfig, *, data: str, store: str, out: str | Path, progress: bool = True) -> list[dict]:
    if sweep.executor == "slurm":
        raise ValueError("a sweep with executor slurm is submitted (experiments/sweep.py: submit_sweep), not run here")
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


def submit_sweep(sweep: SweepConfig, *, data: str, store: str, out: str | Path, dry_run: bool = False) -> dict[str, Path | int]:
    """Every variant as its own SLURM student job (<out>/slurm/<variant>.sbatch, its resolved config
    beside it), then a job that runs this sweep with executor local once all succeed: every variant is
    finished by then, so it only reads them, probes (probe: true) and writes the results. Returns
    name -> job id ("results" for the last), or name -> script path with dry_run."""
    out = Path(out).resolve()
    configs = variant_configs(sweep)
    slurm_dir = out / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    snapshot = out / "sweep.yaml"
    snapshot.write_text(yaml.safe_dump(to_dict(sweep), sort_keys=False))
    jobs: dict[str, Path | int] = {}
    for v in sweep.variants:
        cfg_file = slurm_dir / f"{v.name}.yaml"  # the resolved config: a later edit of the sweep file changes no queued job
        cfg_file.write_text(yaml.safe_dump(to_dict(configs[v.name]), sort_keys=False))
        args = ["--config", str(cfg_file), "--data", data, "--store", store, "--out", str(out / v.name), "--no-progress"]
        script = write_script(training_script("student", args, v.slurm, name=v.name, log_dir=slurm_dir), slurm_dir / f"{v.name}.sbatch")
        jobs[v.name] = script if dry_run else submit(script)
    # the results job: one process on one node (a GPU for the probe where the variants have GPUs)
    results = SlurmConfig(**(to_dict(sweep.slurm) | {"nodes": 1, "gpus_per_node": min(1, sweep.slurm.gpus_per_node),
                                                     "procs_per_node": 0, "grace_s": 0}))
    after = "afterok:" + ":".join(str(j) for j in jobs.values()) if not dry_run else ""
    command = ["-m", "jobs.sweep", "--config", str(snapshot), "--data", data, "--store", store, "--out", str(out),
               "--no-progress", "executor=local"]
    text = command_script(command, results, name="results", log_dir=slurm_dir, dependency=after,
                          what=f"sweep results: {len(jobs)} variants read{', probed' if sweep.probe else ''} and tabulated into {out}/results.md")
    script = write_script(text, slurm_dir / "results.sbatch")
    jobs["results"] = script if dry_run else submit(script)
    return jobs


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
