"""The replication study's report: REPLICATION.md from run_study's result (experiments/replication.py)."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np

from experiments.demo import CONTROL_SCHEDULE, CONTROL_STEPS
from experiments.replication import FLOOR, Study
from experiments.stats import margin_kept, mean_sd, percent_mean_sd
from salt.plots import r_squared


def _top1(result: dict, name: str, task: str, readout: str = "top1") -> list[float]:
    return [r[name][task][readout] for r in result["probes"].values()]


def _cells(result: dict, name: str, task: str) -> str:
    """The linear and the k-NN readout's cells of one encoder and task."""
    return f"{percent_mean_sd(_top1(result, name, task))} | {percent_mean_sd(_top1(result, name, task, 'knn_top1'))}"


def _margin_kept(result: dict, arm: str, task: str, readout: str = "top1") -> list[float]:
    """Per seed: (student - floor) / (teacher - floor), the share of the teacher's margin its student keeps."""
    return [margin_kept(r[f"student/{arm}"][task][readout], r[f"teacher/{arm}"][task][readout], r[FLOOR][task][readout])
            for r in result["probes"].values()]


def _kept_cell(kept: list[float]) -> str:
    valid = [k for k in kept if not math.isnan(k)]
    if not valid:
        return "n/a"
    m, sd = mean_sd(valid)
    return f"{m:.2f} ± {sd:.2f}"


def write_report(result: dict, path: str | Path, *, command: str, out: str | Path) -> str:
    """REPLICATION.md from a study's result: what was run, the figures, and what they say."""
    import yaml

    info = Path(out) / "run_info.yaml"  # the code that ran the study, even if the report is rewritten later
    commit = yaml.safe_load(info.read_text())["git_commit"] if info.is_file() else "unknown"
    study = result["study"]
    spec = Study(**study)  # the study as run; fields a study.json from before them lacks take their defaults
    arms = spec.arms()
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
        s_loss = mean_sd([result["students"][f"{s}/{arm}"]["final_loss"] for s in study["seeds"]])
        t_loss = ""
        if arm.startswith("vpixel-"):
            m, sd = mean_sd([result["teachers"][f"{s}/{arm}"]["final_loss"] for s in study["seeds"]])
            t_loss = f"{m:.4f} ± {sd:.4f} (pixels)"
        lines.append(f"| teacher {arm} | " + " | ".join(_cells(result, f"teacher/{arm}", t) for t in tasks) + f" | {t_loss} |")
        lines.append(f"| student of {arm} | " + " | ".join(_cells(result, f"student/{arm}", t) for t in tasks)
                     + f" | {s_loss[0]:.4f} ± {s_loss[1]:.4f} (latents) |")
    ladder = ["untrained"] + [f"labels-{s}" for s in sorted(study["ladder_steps"])]
    # the demo's control is this study's rung when the rung sits at the same step of the same lr schedule
    demo_rung = CONTROL_STEPS in spec.ladder_steps and spec.ladder_schedule == CONTROL_SCHEDULE
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
            cells += [percent_mean_sd(te), percent_mean_sd(st), percent_mean_sd([b - a for a, b in zip(te, st)])]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Transfer: how much of each label teacher's margin over the floor its student keeps",
        "",
        "(student - floor) / (teacher - floor) per seed, linear / k-NN; n/a where the teacher is not above the floor."
        + (f" `make demo`'s transfer control is labels-{CONTROL_STEPS} on data seed 0." if demo_rung else ""),
        "",
        "| rung | task | " + " | ".join(f"seed {s}" for s in study["seeds"]) + " | linear, mean ± sd | k-NN, mean ± sd |",
        "|---|---|" + "---|" * (n + 2),
    ]
    for arm in [a for a in ladder if a.startswith("labels-")]:
        for t in tasks:
            lin, knn = _margin_kept(result, arm, t), _margin_kept(result, arm, t, "knn_top1")
            per_seed = " | ".join(f"{a:.2f} / {b:.2f}".replace("nan", "n/a") for a, b in zip(lin, knn))
            lines.append(f"| {arm} | {t} | {per_seed} | {_kept_cell(lin)} | {_kept_cell(knn)} |")
    sel = result["selection"]
    lines += [
        "",
        "## Does the student's training loss predict its probe accuracy?",
        "",
        f"Points: snapshots every {study['snapshot_every']} steps and final checkpoints of the vpixel-same and label-rung "
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
        m, sd = mean_sd(d)
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
    for arm in [a for a in arms if a.startswith("labels-")]:
        for t in tasks:
            kept = _margin_kept(result, arm, t) + _margin_kept(result, arm, t, "knn_top1")
            half = all(k >= 0.5 for k in kept)  # nan (no teacher margin) counts as not kept
            valid = [k for k in kept if not math.isnan(k)]  # min() over a list with nan depends on its order
            lowest = f"lowest {min(valid):.2f}" if valid else "the teacher has no margin"
            out.append(f"{t}: the student of {arm} keeps {'at least' if half else 'less than'} half of its teacher's "
                       f"margin over the floor {'on every seed by both readouts' if half else 'on some seed or readout'} "
                       f"({lowest}).")
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

