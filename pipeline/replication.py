"""A CPU-scale replication of the paper's claims on the embedded dataset.

Two arms share everything but the teacher's size: a teacher of the student's size
("same") and a smaller one ("small"). Each arm trains its teacher briefly, extracts its
targets, and trains a student for longer on them (compute split toward the student, as
in the paper). Then every teacher, every student checkpoint (snapshots along the runs)
and a random-init encoder of the student's size are probed, and the report compares
teacher vs student per task, fits student loss against probe accuracy (R^2), and
compares the arms. The two arms train side by side, one process and one core each.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from pipeline.extract import extract_targets, init_ray
from pipeline.runs import run_student, run_teacher
from pipeline.selection import checkpoint_points, final_points, loss_vs_accuracy, select_runs
from salt.config import Config, load_config, to_dict
from salt.runinfo import write_run_info


@dataclasses.dataclass(kw_only=True)
class Study:
    config: str = "jobs/configs/tiny.yaml"
    teachers: dict[str, str] = dataclasses.field(default_factory=lambda: {"same": "vit_cpu_s", "small": "vit_cpu_xs"})
    # about 1:4 teacher:student steps (the paper's best split is 40k:200k)
    teacher_steps: int = 780
    student_steps: int = 3000
    snapshot_every: int = 375
    overrides: list[str] = dataclasses.field(default_factory=list)

    def arm_config(self, teacher: str) -> Config:
        return load_config(self.config, [
            *self.overrides,
            f"model.teacher={teacher}",
            f"teacher.optim.steps={self.teacher_steps}",
            f"student.optim.steps={self.student_steps}",
            f"student.snapshot_every={self.snapshot_every}",
        ])


def _in_process(stage: str, cfg_dict: dict, *args) -> dict:
    """One training run in a worker process (one torch thread: the two arms share the cores)."""
    from salt.config import from_dict

    cfg = from_dict(Config, cfg_dict)
    torch.set_num_threads(1)
    run = run_teacher if stage == "teacher" else run_student
    return run(cfg, *args, progress=False)


def _side_by_side(jobs: dict[str, tuple]) -> dict[str, dict]:
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_in_process, *job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def run_study(study: Study, *, data: str, out: str | Path, progress: bool = True) -> dict:
    out = Path(out)
    configs = {arm: study.arm_config(size) for arm, size in study.teachers.items()}
    walls: dict[str, float] = {}
    t0 = time.perf_counter()
    teachers = _side_by_side({arm: ("teacher", to_dict(cfg), data, str(out / arm / "teacher")) for arm, cfg in configs.items()})
    walls["teachers"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    init_ray()
    for arm, cfg in configs.items():
        extract_targets(cfg, data=data, teacher_dir=str(out / arm / "teacher"), store=str(out / arm / "targets"), progress=progress)
    walls["extract"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    students = _side_by_side({arm: ("student", to_dict(cfg), data, str(out / arm / "targets"), str(out / arm / "student"))
                              for arm, cfg in configs.items()})
    walls["students"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    probe_cfg = next(iter(configs.values()))
    extra = {f"teacher-{arm}": str(out / arm / "teacher") for arm in configs}
    extra["random"] = f"random:{probe_cfg.model.student}"
    selected = select_runs({arm: str(out / arm / "student") for arm in configs}, probe_cfg, data, out / "selection",
                           progress=progress, extra=extra)
    per_arm = {arm: loss_vs_accuracy(checkpoint_points(out / arm / "student", arm), selected["probes"], out / arm / "selection",
                                     title=f"student loss vs probe accuracy, {arm} teacher")
               for arm in configs}
    walls["probes"] = time.perf_counter() - t0
    result = {
        "study": dataclasses.asdict(study),
        "data": data,
        "student_size": probe_cfg.model.student,
        "teachers": teachers,
        "students": students,
        "probes": selected["probes"],
        "selection": selected["selection"],
        "selection_per_arm": per_arm,
        "wall_s": {k: round(v, 1) for k, v in walls.items()},
    }
    write_run_info(out, probe_cfg, data=data, study=dataclasses.asdict(study))
    (out / "study.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _fit(task_report: dict) -> str:
    return f"{task_report['r2']:.3f} ({task_report['slope']:+.2f}, {task_report['points']} points)"


def write_report(result: dict, path: str | Path, *, command: str, out: str | Path) -> str:
    """REPLICATION.md from a study's result: what was run, and the figures it produced."""
    import yaml

    info = Path(out) / "run_info.yaml"  # the code that ran the study, even if the report is rewritten later
    commit = yaml.safe_load(info.read_text())["git_commit"] if info.is_file() else "unknown"
    study, probes, arms = result["study"], result["probes"], list(result["study"]["teachers"])
    tasks = sorted(next(iter(probes.values())))
    final = final_points(result["selection"]["points"])
    chance = {t: next(iter(probes.values()))[t]["chance"] for t in tasks}
    lines = [
        "# Replication at CPU scale",
        "",
        f"Produced by `{command.strip()}` on {time.strftime('%Y-%m-%d')}, commit `{commit}`, in "
        f"{sum(result['wall_s'].values()) / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in result['wall_s'].items())}).",
        f"Data: `{result['data']}` (moving digits: `appearance` = which digit, 10 classes; `motion` = direction, 4 classes).",
        f"Config: `{study['config']}`{' ' + ' '.join(study['overrides']) if study['overrides'] else ''}. Teachers: "
        + ", ".join(f"{arm} = `{size}`" for arm, size in study["teachers"].items())
        + f", {study['teacher_steps']} steps each; students `{result['student_size']}`"
        f" on each teacher's targets, {study['student_steps']} steps (snapshots every {study['snapshot_every']}).",
        "Probe: attentive probe on frozen tokens, train split, top-1 on the val split (fast protocol, 1 clip, 1 view);"
        " 'floor' is a randomly initialised encoder of the student's size, 'chance' the majority class.",
        "",
        "## Teacher vs student, probe top-1 (%)",
        "",
        "| encoder | " + " | ".join(tasks) + " | training loss |",
        "|---|" + "---|" * (len(tasks) + 1),
        "| chance | " + " | ".join(_pct(chance[t]) for t in tasks) + " | |",
        "| floor (random init) | " + " | ".join(_pct(probes["random"][t]["top1"]) for t in tasks) + " | |",
    ]
    for arm in arms:
        teacher_loss = result["teachers"][arm]["final_loss"]
        student_loss = result["students"][arm]["final_loss"]
        lines.append(f"| teacher ({arm}, `{study['teachers'][arm]}`) | "
                     + " | ".join(_pct(probes[f"teacher-{arm}"][t]["top1"]) for t in tasks) + f" | {teacher_loss:.4f} (pixels) |")
        lines.append(f"| student of the {arm} teacher | "
                     + " | ".join(_pct(probes[final[arm]][t]["top1"]) for t in tasks) + f" | {student_loss:.4f} (latents) |")
    lines += [
        "",
        "## Does the student's training loss predict its probe accuracy?",
        "",
        "Points: every snapshot and final checkpoint of the students; loss = mean training loss of the"
        " steps before the checkpoint. Paper: R^2 = 0.951 (ViT-L teacher, many student checkpoints).",
        "",
        "| points | " + " | ".join(f"R^2 {t} (slope: top-1 per unit loss)" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
        "| both arms pooled | " + " | ".join(_fit(result["selection"]["tasks"][t]) for t in tasks) + " |",
    ]
    for arm in arms:
        lines.append(f"| {arm} teacher's student | "
                     + " | ".join(_fit(result["selection_per_arm"][arm]["tasks"][t]) for t in tasks) + " |")
    lines += ["", "| checkpoint | loss | " + " | ".join(f"top-1 {t}" for t in tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for p in result["selection"]["points"]:
        lines.append(f"| {p['name']} | {p['loss']:.4f} | " + " | ".join(_pct(p[f'top1_{t}']) for t in tasks) + " |")
    lines += ["", f"Plots: `{Path(out) / 'selection'}/selection_<task>.png` (pooled), `<arm>/selection/` (per arm).", ""]
    lines += ["## What happened", ""] + [f"- {s}" for s in _findings(result, tasks, final, arms)]
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    return text


def _findings(result: dict, tasks: list[str], final: dict[str, str], arms: list[str]) -> list[str]:
    """Plain statements read off the numbers, whichever way they came out."""
    probes, out = result["probes"], []
    n_val = next(iter(probes["random"].values()))["num_val"]
    noise = {t: 2 * (probes["random"][t]["chance"] * (1 - probes["random"][t]["chance"]) / n_val) ** 0.5 for t in tasks}
    for t in tasks:
        above = [name for name, r in probes.items() if r[t]["top1"] - r[t]["chance"] > noise[t]]
        out.append(f"{t}: with {n_val} val videos, two standard errors of a top-1 near chance are "
                   f"{_pct(noise[t])} points; above chance by more than that: {', '.join(sorted(above)) or 'no encoder'}.")
    for arm in arms:
        for t in tasks:
            s, te, floor = probes[final[arm]][t]["top1"], probes[f"teacher-{arm}"][t]["top1"], probes["random"][t]["top1"]
            verdict = "beats" if s > te else ("ties" if s == te else "trails")
            out.append(f"{t}: the student of the {arm} teacher {verdict} its teacher ({_pct(s)} vs {_pct(te)}); floor {_pct(floor)}.")
    if len(arms) == 2:
        a, b = arms
        for t in tasks:
            sa, sb = probes[final[a]][t]["top1"], probes[final[b]][t]["top1"]
            out.append(f"{t}: student of the {a} teacher {_pct(sa)} vs of the {b} teacher {_pct(sb)}.")
    for t in tasks:
        r2 = result["selection"]["tasks"][t]["r2"]
        slope = result["selection"]["tasks"][t]["slope"]
        direction = "lower loss, higher accuracy" if slope < 0 else "lower loss, lower accuracy"
        out.append(f"{t}: pooled R^2 of top-1 on student loss {r2:.3f} ({direction}; paper 0.951, lower loss higher accuracy); lowest-loss checkpoint "
                   f"{result['selection']['tasks'][t]['lowest_loss']}, best-probed {result['selection']['tasks'][t]['best_probe']}.")
    return out
