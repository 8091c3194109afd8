"""A CPU-scale replication of the paper's claims on the embedded dataset, over seeds.

Per seed (the dataset is generated anew with that seed, and the seed also sets every
model's initialisation, sampling and the probe), every arm trains a teacher, extracts
its targets through the Ray job and trains a student of one size on them:

- `vpixel-<name>`: V-Pixel teachers (the method's stage 1), by default one of the
  student's size (`Study.vpixel` names more);
- `untrained`: a randomly initialised teacher (what stage 2 gets from no stage 1);
- `labels-<steps>`: the teacher-quality ladder, one encoder trained with the labels of
  the train split and saved at a few step counts, weak to strong
  (`pipeline.experiments.controls`). The top rung is the transfer control: a teacher known to
  carry the tasks, so its student measures stage 2 on its own.

Then every teacher, every student, snapshots of the V-Pixel and top-rung students and
a random-init encoder of the student's size (the floor, on that seed's data) are
probed. The report gives mean +- sd over seeds, whether a student beats its teacher,
how much of the top rung's margin over the floor its student keeps, student quality
against teacher quality along the ladder, and the R^2 of probe accuracy on student loss.
Independent runs go through a pool of worker processes, one torch thread each.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.experiments.controls import save_untrained_teacher, train_label_teachers
from pipeline.digits import write_moving_digits
from pipeline.cluster import init_ray
from pipeline.extract import extract_targets
from pipeline.experiments.probe import probe_encoders
from pipeline.experiments.runs import run_student, run_teacher
from pipeline.experiments.selection import checkpoint_points, loss_vs_accuracy
from salt.config import Config, from_dict, load_config, to_dict
from salt.plots import r_squared
from salt.runinfo import write_run_info

FLOOR = "floor"


@dataclasses.dataclass(kw_only=True)
class Study:
    config: str = "jobs/configs/tiny.yaml"
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    # vit_cpu_xs throughout: the size of the yardstick's label encoders, and what fits 3 seeds of 4 arms
    # on the embedded data's 2,000 train clips in 45 min on 2 cores
    student: str = "vit_cpu_xs"
    vpixel: dict[str, str] = dataclasses.field(default_factory=lambda: {"same": "vit_cpu_xs"})
    teacher_steps: int = 400
    ladder_teacher: str = "vit_cpu_xs"
    # one encoder trained with both tasks' labels, saved at these steps: the top rung is the transfer
    # control. The yardstick's single-task encoders need 1,000 (motion) and 2,000 (appearance) steps of 32
    ladder_steps: list[int] = dataclasses.field(default_factory=lambda: [500, 2000])
    ladder_batch: int = 32
    student_steps: int = 600
    snapshot_every: int = 200
    num_train: int = 2000
    num_val: int = 1200
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["appearance", "motion"])
    workers: int = 2
    overrides: list[str] = dataclasses.field(default_factory=list)

    def arms(self) -> list[str]:
        return [f"vpixel-{name}" for name in self.vpixel] + ["untrained"] + [f"labels-{s}" for s in sorted(self.ladder_steps)]

    @property
    def top_rung(self) -> str:
        return f"labels-{max(self.ladder_steps)}"

    def seed_config(self, seed: int) -> Config:
        return load_config(self.config, [
            *self.overrides,
            f"model.student={self.student}",
            f"teacher.optim.steps={self.teacher_steps}",
            f"student.optim.steps={self.student_steps}",
            f"teacher.seed={seed}", f"student.seed={seed}", f"probe.seed={seed}", f"data.seed={seed}",
        ])


def _in_worker(fn: Callable, *args, **kwargs):
    torch.set_num_threads(1)  # the workers share the cores
    return fn(*args, **kwargs)


def _in_pool(jobs: dict[str, tuple], workers: int) -> dict:
    """name -> (fn, args...) run in `workers` spawned processes; name -> result."""
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_in_worker, *job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def _write_data(out: str, seed: int, num_train: int, num_val: int) -> dict:
    return write_moving_digits(out, seed=seed, num_train=num_train, num_val=num_val, progress=False)


def _vpixel_teacher(cfg_dict: dict, size: str, data: str, out: str) -> dict:
    cfg = from_dict(Config, cfg_dict)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, teacher=size))
    return run_teacher(cfg, data, out, progress=False)


def _label_teachers(cfg_dict: dict, data: str, out: str, size: str, steps: list[int], batch: int, seed: int) -> dict:
    return train_label_teachers(from_dict(Config, cfg_dict), data, out, size=size, steps=steps, seed=seed,
                                batch_size=batch, progress=False)


def _student(cfg_dict: dict, data: str, store: str, out: str, snapshot_every: int) -> dict:
    cfg = from_dict(Config, cfg_dict)
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, snapshot_every=snapshot_every))
    return run_student(cfg, data, store, out, progress=False)


def _probe(cfg_dict: dict, specs: dict[str, str], data: str, out: str, tasks: list[str]) -> dict:
    return probe_encoders(specs, from_dict(Config, cfg_dict), data, out, tasks=tasks, progress=False)


def _halves(specs: dict[str, str], parts: int) -> list[dict[str, str]]:
    items = list(specs.items())
    return [dict(items[i::parts]) for i in range(parts) if items[i::parts]]


def run_study(study: Study, *, out: str | Path, progress: bool = True) -> dict:
    out = Path(out)
    seeds = {s: out / f"seed-{s}" for s in study.seeds}
    cfgs = {s: to_dict(study.seed_config(s)) for s in study.seeds}
    data = {s: str(root / "data") for s, root in seeds.items()}
    walls: dict[str, float] = {}

    def phase(name: str, jobs: dict[str, tuple]) -> dict:
        t0 = time.perf_counter()
        if progress:
            print(f"[replicate] {name}: {len(jobs)} runs", flush=True)
        result = _in_pool(jobs, study.workers) if jobs else {}
        walls[name] = time.perf_counter() - t0
        return result

    phase("data", {str(s): (_write_data, data[s], s, study.num_train, study.num_val)
                   for s in study.seeds if not Path(data[s], "labels.json").is_file()})
    teacher_dirs = {(s, arm): str(root / arm / "teacher") for s, root in seeds.items() for arm in study.arms()}
    jobs: dict[str, tuple] = {}
    for s, root in seeds.items():
        for name, size in study.vpixel.items():
            jobs[f"{s}/vpixel-{name}"] = (_vpixel_teacher, cfgs[s], size, data[s], teacher_dirs[(s, f"vpixel-{name}")])
        jobs[f"{s}/labels"] = (_label_teachers, cfgs[s], data[s], str(root / "labels"), study.ladder_teacher, study.ladder_steps,
                                study.ladder_batch, s)
    teachers = phase("teachers", jobs)
    for s, root in seeds.items():
        save_untrained_teacher(study.seed_config(s), teacher_dirs[(s, "untrained")], size=study.ladder_teacher, seed=s)
        for step, folder in teachers[f"{s}/labels"].items():
            teacher_dirs[(s, f"labels-{step}")] = folder

    import ray

    t0 = time.perf_counter()
    ours = not ray.is_initialized()
    init_ray()
    for (s, arm), teacher in teacher_dirs.items():
        extract_targets(study.seed_config(s), data=data[s], teacher=teacher, store=str(seeds[s] / arm / "targets"),
                        progress=progress)
    if ours:
        ray.shutdown()  # its idle workers would hold memory and a little CPU through the students
    walls["extract"] = time.perf_counter() - t0

    tracked = [a for a in study.arms() if a in ("vpixel-same", study.top_rung)]  # arms whose snapshots are probed
    students = phase("students", {
        f"{s}/{arm}": (_student, cfgs[s], data[s], str(seeds[s] / arm / "targets"), str(seeds[s] / arm / "student"),
                       study.snapshot_every if arm in tracked else 0)
        for s in study.seeds for arm in study.arms()
    })

    points = {s: [p for arm in tracked for p in checkpoint_points(seeds[s] / arm / "student", arm)] for s in study.seeds}
    specs: dict[int, dict[str, str]] = {}
    for s, root in seeds.items():
        specs[s] = {FLOOR: f"random:{study.student}"}
        for arm in study.arms():
            specs[s][f"teacher/{arm}"] = teacher_dirs[(s, arm)]
            specs[s][f"student/{arm}"] = str(root / arm / "student")
        specs[s] |= {p["name"]: p["spec"] for p in points[s] if not p["final"]}
    parts = max(1, study.workers // len(study.seeds))  # split a seed's encoders only when workers outnumber seeds
    probe_jobs = {f"{s}/{i}": (_probe, cfgs[s], part, data[s], str(seeds[s] / "probe"), study.tasks)
                  for s in study.seeds for i, part in enumerate(_halves(specs[s], parts))}
    probed = phase("probes", probe_jobs)
    probes: dict[int, dict[str, dict]] = {s: {} for s in study.seeds}
    for name, result in probed.items():
        probes[int(name.split("/")[0])] |= result
    for s in study.seeds:  # a final checkpoint is its student's result
        for p in points[s]:
            if p["final"]:
                probes[s][p["name"]] = probes[s][f"student/{p['run']}"]
    pooled = [p | {"name": f"s{s}-{p['name']}", "seed": s} for s in study.seeds for p in points[s]]
    selection = loss_vs_accuracy(pooled, {f"s{s}-{n}": r for s in study.seeds for n, r in probes[s].items()},
                                 out / "selection", title="student loss vs probe accuracy, all seeds")
    result = {
        "study": dataclasses.asdict(study),
        "teachers": {k: v for k, v in teachers.items() if "vpixel" in k},
        "students": students,
        "probes": {str(s): r for s, r in probes.items()},
        "selection": selection,
        "wall_s": {k: round(v, 1) for k, v in walls.items()},
    }
    write_run_info(out, study.seed_config(study.seeds[0]), study=json.dumps(dataclasses.asdict(study)))
    (out / "study.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _cell(xs: list[float]) -> str:
    m, sd = _mean_sd(xs)
    return f"{100 * m:.1f} ± {100 * sd:.1f}"


def _top1(result: dict, name: str, task: str, readout: str = "top1") -> list[float]:
    return [r[name][task][readout] for r in result["probes"].values()]


def _cells(result: dict, name: str, task: str) -> str:
    """The linear and the k-NN readout's cells of one encoder and task."""
    return f"{_cell(_top1(result, name, task))} | {_cell(_top1(result, name, task, 'knn_top1'))}"


def _margin_kept(result: dict, arm: str, task: str) -> list[float]:
    """Per seed: (student - floor) / (teacher - floor), the share of the teacher's margin its student keeps."""
    out = []
    for r in result["probes"].values():
        floor = r[FLOOR][task]["top1"]
        gap = r[f"teacher/{arm}"][task]["top1"] - floor
        out.append((r[f"student/{arm}"][task]["top1"] - floor) / gap if gap > 0 else float("nan"))
    return out


def write_report(result: dict, path: str | Path, *, command: str, out: str | Path) -> str:
    """REPLICATION.md from a study's result: what was run, the figures, and what they say."""
    import yaml

    info = Path(out) / "run_info.yaml"  # the code that ran the study, even if the report is rewritten later
    commit = yaml.safe_load(info.read_text())["git_commit"] if info.is_file() else "unknown"
    study = result["study"]
    arms = Study(**study).arms()
    first = next(iter(result["probes"].values()))
    tasks = sorted(first[FLOOR])
    seeds = ", ".join(str(s) for s in study["seeds"])
    n = len(study["seeds"])
    lines = [
        "# Replication at CPU scale",
        "",
        f"Produced by `{command.strip()}` on {time.strftime('%Y-%m-%d')}, commit `{commit}`, in "
        f"{sum(result['wall_s'].values()) / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in result['wall_s'].items())}).",
        f"Seeds {seeds}: each seed generates its own moving-digits dataset ({study['num_train']} train / "
        f"{study['num_val']} val clips; `appearance` = which digit, 10 classes; `motion` = direction, 4 classes) and sets "
        "every initialisation, sample and probe. Figures are mean ± sd over the seeds.",
        f"Config: `{study['config']}`{' ' + ' '.join(study['overrides']) if study['overrides'] else ''}. Students: "
        f"`{study['student']}`, {study['student_steps']} steps on their teacher's stored targets. V-Pixel teachers: "
        + ", ".join(f"{k} = `{v}`" for k, v in study["vpixel"].items()) + f", {study['teacher_steps']} steps. "
        f"Ladder: one `{study['ladder_teacher']}` trained with the train split's labels (both tasks, batch "
        f"{study['ladder_batch']}), saved at "
        + ", ".join(str(s) for s in sorted(study["ladder_steps"])) + " steps; `untrained` is its random init.",
        f"Readouts (docs/yardstick.md): the reported top-1 is the linear readout on standardised mean-pooled "
        f"tokens of the frozen encoder (no seed); k-NN beside it. Tasks: {', '.join(study['tasks']) or 'all'}. "
        f"'floor' is a random-init `{study['student']}` (init seed = the seed), read on the same data as everything "
        "else of its seed. Every figure below except the k-NN columns is the linear readout.",
        "",
        "## Teachers and their students, top-1 (%)",
        "",
        "| encoder | " + " | ".join(f"{t} | {t} k-NN" for t in tasks) + " | final training loss |",
        "|---|" + "---|" * (2 * len(tasks) + 1),
        "| chance (majority class) | " + " | ".join(f"{100 * first[FLOOR][t]['chance']:.1f} | " for t in tasks) + " | |",
        "| floor (random init) | " + " | ".join(_cells(result, FLOOR, t) for t in tasks) + " | |",
    ]
    for arm in arms:
        s_loss = _mean_sd([result["students"][f"{s}/{arm}"]["final_loss"] for s in study["seeds"]])
        t_loss = ""
        if arm.startswith("vpixel-"):
            m, sd = _mean_sd([result["teachers"][f"{s}/{arm}"]["final_loss"] for s in study["seeds"]])
            t_loss = f"{m:.4f} ± {sd:.4f} (pixels)"
        lines.append(f"| teacher {arm} | " + " | ".join(_cells(result, f"teacher/{arm}", t) for t in tasks) + f" | {t_loss} |")
        lines.append(f"| student of {arm} | " + " | ".join(_cells(result, f"student/{arm}", t) for t in tasks)
                     + f" | {s_loss[0]:.4f} ± {s_loss[1]:.4f} (latents) |")
    ladder = ["untrained"] + [f"labels-{s}" for s in sorted(study["ladder_steps"])]
    lines += [
        "",
        "## Teacher-quality ladder: does the student follow its teacher, and surpass a weak one?",
        "",
        "Per rung, mean ± sd over seeds of probe top-1 (%); 'student - teacher' is per seed, then averaged.",
        "",
        "| rung | " + " | ".join(f"teacher {t} | student {t} | student - teacher {t}" for t in tasks) + " |",
        "|---|" + "---|" * (3 * len(tasks)),
    ]
    for arm in ladder:
        cells = []
        for t in tasks:
            te, st = _top1(result, f"teacher/{arm}", t), _top1(result, f"student/{arm}", t)
            cells += [_cell(te), _cell(st), _cell([b - a for a, b in zip(te, st)])]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Transfer control: how much of the top rung's margin over the floor its student keeps",
        "",
        "(student - floor) / (teacher - floor), per seed; undefined where the teacher is not above the floor.",
        "",
        "| task | " + " | ".join(f"seed {s}" for s in study["seeds"]) + " | mean |",
        "|---|" + "---|" * (n + 1),
    ]
    top = f"labels-{max(study['ladder_steps'])}"
    for t in tasks:
        kept = _margin_kept(result, top, t)
        valid = [k for k in kept if not math.isnan(k)]
        mean = f"{statistics.fmean(valid):.2f}" if valid else "n/a"
        lines.append(f"| {t} | " + " | ".join("n/a" if math.isnan(k) else f"{k:.2f}" for k in kept) + f" | {mean} |")
    sel = result["selection"]
    lines += [
        "",
        "## Does the student's training loss predict its probe accuracy?",
        "",
        f"Points: snapshots every {study['snapshot_every']} steps and final checkpoints of the vpixel-same and top-rung "
        "students, all seeds pooled. Paper: R^2 = 0.951 (ViT-L teacher, many checkpoints of its students).",
        "",
        "| task | R^2 | slope (top-1 per unit loss) | points | lowest-loss checkpoint | best-probed checkpoint |",
        "|---|---|---|---|---|---|",
    ]
    for t in tasks:
        r = sel["tasks"][t]
        lines.append(f"| {t}, both arms pooled | {r['r2']:.3f} | {r['slope']:+.2f} | {r['points']} | {r['lowest_loss']} | {r['best_probe']} |")
        for arm, fit in _fits_per_arm(sel["points"], t).items():
            lines.append(f"| {t}, {arm} students | {fit['r2']:.3f} | {fit['slope']:+.2f} | {fit['points']} | | |")
    lines += ["", f"Plots: `{Path(out) / 'selection'}/selection_<task>.png`.", "", "## What the numbers say", ""]
    lines += [f"- {s}" for s in _findings(result, tasks, arms)]
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    return text


def _fits_per_arm(points: list[dict], task: str) -> dict[str, dict]:
    """R^2 and slope of top-1 on loss over one arm's checkpoints (all seeds): the paper's setting,
    students of one kind of teacher, which pooling arms with different loss scales hides."""
    out = {}
    for arm in sorted({p["run"] for p in points}):
        xs = [p["loss"] for p in points if p["run"] == arm]
        ys = [p[f"top1_{task}"] for p in points if p["run"] == arm]
        out[arm] = {"r2": r_squared(xs, ys) if len(xs) >= 3 else float("nan"),
                    "slope": float(np.polyfit(xs, ys, 1)[0]) if len(xs) >= 2 and np.ptp(xs) > 0 else float("nan"),
                    "points": len(xs)}
    return out


def _findings(result: dict, tasks: list[str], arms: list[str]) -> list[str]:
    """Plain statements read off the numbers, whichever way they came out. 'Beats by more than
    two standard errors': the per-seed differences' mean exceeds 2 sd / sqrt(seeds)."""
    out = []
    n = len(result["probes"])

    def diff(a: str, b: str, t: str) -> tuple[float, float]:
        d = [x - y for x, y in zip(_top1(result, a, t), _top1(result, b, t))]
        m, sd = _mean_sd(d)
        return m, sd / n**0.5

    for arm in [a for a in arms if a.startswith("vpixel-")]:
        for t in tasks:
            m, se = diff(f"teacher/{arm}", FLOOR, t)
            verdict = "beats" if m > 2 * se and m > 0 else "does not beat"
            out.append(f"{t}: the {arm} teacher {verdict} the random-init floor by more than two standard errors "
                       f"({100 * m:+.1f} ± {100 * se:.1f} points).")
            m, se = diff(f"student/{arm}", f"teacher/{arm}", t)
            out.append(f"{t}: the student of {arm} vs its teacher: {100 * m:+.1f} ± {100 * se:.1f} points.")
    for arm in arms:
        if arm.startswith("labels-") or arm == "untrained":
            for t in tasks:
                m, se = diff(f"student/{arm}", FLOOR, t)
                out.append(f"{t}: the student of {arm} vs the floor: {100 * m:+.1f} ± {100 * se:.1f} points.")
    ladder = [a for a in arms if a == "untrained" or a.startswith("labels-")]
    for t in tasks:
        teach = " -> ".join(f"{100 * statistics.fmean(_top1(result, f'teacher/{a}', t)):.1f}" for a in ladder)
        stud = " -> ".join(f"{100 * statistics.fmean(_top1(result, f'student/{a}', t)):.1f}" for a in ladder)
        above = [a for a in ladder if (lambda m, se: m > 2 * se and m > 0)(*diff(f"student/{a}", f"teacher/{a}", t))]
        out.append(f"{t}: along the ladder ({', '.join(ladder)}) teachers read {teach} and their students {stud}; "
                   f"a student beats its teacher by more than two standard errors on: {', '.join(above) or 'no rung'}.")
    for t in tasks:
        for arm, fit in _fits_per_arm(result["selection"]["points"], t).items():
            direction = "lower loss, higher accuracy" if fit["slope"] < 0 else "lower loss, lower accuracy"
            out.append(f"{t}: over the {arm} students' checkpoints, R^2 of top-1 on loss {fit['r2']:.3f} ({direction}; "
                       "paper 0.951, lower loss higher accuracy).")
    return out
