"""make demo's chain: data -> teacher -> extract-targets -> student -> probe on the embedded dataset, then a summary.

Beside the V-Pixel chain runs the transfer control (experiments/controls.py): a small encoder
trained with the labels, extracted and distilled into a student the same way, which never
sees a label (`make demo-check` holds it to keeping half of its teacher's motion margin). The readout
table puts all four encoders next to random-init encoders of each student's size (the floors) on both
tasks of the embedded dataset (linear readout and k-NN: docs/yardstick.md), and the summary gives the
share of the control teacher's margin over its floor that its student keeps.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import ray
import torch

from experiments.controls import label_teacher_dir, train_label_teachers
from experiments.probing import probe_encoders, read_probe_features
from experiments.runs import READ_PIXEL_CACHE, run_student, run_teacher
from experiments.stats import margin_kept
from pipeline.digits import write_moving_digits
from pipeline.extract import extract_targets
from salt.config import Config, from_dict, to_dict, with_overrides
from salt.devices import set_torch_threads

# The transfer control: `make replicate`'s labels-500 rung on the demo's data (data seed 0). Its teacher is a
# vit_cpu_xs trained with both tasks' labels, batches of 32, stopped at step 500 of a 2,000-step lr
# schedule (half the steps of the yardstick's 1,000-step motion encoder). Its student is the teacher's size (a
# vit_cpu_xs step costs about half of a vit_cpu_s one) and trains 800 steps: with the tiny recipe such a
# student keeps 0.92 / 0.84 / 0.87 of this teacher's motion margin (linear; k-NN 0.64 / 0.81 / 0.71) on data
# seeds 0 / 1 / 2 at step 800 (REPLICATION.md); at step 600 seed 0 kept 0.54 by k-NN, and a 2,000-step
# teacher's student was still on its plateau at 800 (docs/yardstick.md, "A stage-2 recipe for the tiny grid").
CONTROL_SIZE, CONTROL_STEPS, CONTROL_SCHEDULE, CONTROL_BATCH = "vit_cpu_xs", 500, 2000, 32
CONTROL_STUDENT = ("model.student=vit_cpu_xs", "student.optim.steps=800")
CONTROL_TASK = "motion"  # the task whose kept share the demo is judged by; the digit is far from learnt at step 500

# The students read the store's pixel cache (READ_PIXEL_CACHE). The V-Pixel teacher trains
# 200 steps and its student 200, not tiny.yaml's 400: a V-Pixel teacher carries nothing the readouts see
# here at any length (docs/STAGE1.md), and its chain has to fit beside the control's.
DEMO_OVERRIDES = (*READ_PIXEL_CACHE, "teacher.optim.steps=200", "student.optim.steps=200")


def _control_teacher(cfg_dict: dict, data: str, out: str, steps: int) -> float:
    """The control's label teacher (in the demo's second process, beside the V-Pixel teacher); its seconds."""
    t0 = time.perf_counter()
    cfg = from_dict(Config, cfg_dict)
    set_torch_threads(cfg.teacher)
    train_label_teachers(cfg, data, out, size=CONTROL_SIZE, steps=[steps], schedule_steps=CONTROL_SCHEDULE,
                         batch_size=CONTROL_BATCH, progress=False)
    return round(time.perf_counter() - t0, 1)


def _control_student(cfg_dict: dict, data: str, store: str, out: str) -> dict:
    """The control's student (in the demo's second process, beside the V-Pixel targets, student and readouts)."""
    cfg = from_dict(Config, cfg_dict)
    set_torch_threads(cfg.student)
    return run_student(cfg, data, store, out, progress=False)


def run_demo(cfg: Config, *, data: str, run: str | Path, progress: bool = True) -> dict:
    """The demo's chain on the embedded data (written to `data` first if it is not there), its summary
    printed and written to `run`/demo_summary.json; returns the summary."""
    walls, started = {}, time.perf_counter()

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        walls[name] = round(time.perf_counter() - t0, 1)
        return out

    if not (Path(data) / "labels.json").is_file():
        timed("data", lambda: write_moving_digits(data, progress=progress, workers=os.cpu_count() or 1))
    run = Path(run)
    control = run / "control"
    control_cfg = with_overrides(cfg, *CONTROL_STUDENT)
    specs = {"teacher": str(run / "teacher"), "student": str(run / "student"), "random": f"random:{cfg.model.student}"}
    control_specs = {"control-teacher": str(label_teacher_dir(control / "labels", CONTROL_STEPS)),
                     "control-student": str(control / "student"), "random-xs": f"random:{control_cfg.model.student}"}
    set_torch_threads(cfg.teacher)
    # Two chains side by side, one core each (every stage runs at one torch thread). The control's chain is the
    # longer one (its student trains 800 steps), so it goes first wherever the two meet: its teacher trains in a
    # second process beside the V-Pixel teacher here, its targets are extracted (on Ray, here) before the
    # V-Pixel ones, and its student trains in the second process while this one extracts the V-Pixel targets,
    # trains the V-Pixel student and reads every encoder but the control's student.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        labels_run = pool.submit(_control_teacher, to_dict(cfg), data, str(control / "labels"), CONTROL_STEPS)
        t = timed("teacher", lambda: run_teacher(cfg, data, run / "teacher", progress=progress))
        walls["control teacher"] = labels_run.result()
        timed("control targets", lambda: extract_targets(cfg, data=data, teacher=control_specs["control-teacher"],
                                                         store=str(control / "targets"), progress=progress))
        t0 = time.perf_counter()
        control_run = pool.submit(_control_student, to_dict(control_cfg), data, str(control / "targets"), str(control / "student"))
        x = timed("extract-targets", lambda: extract_targets(cfg, data=data, teacher=specs["teacher"],
                                                             store=str(run / "targets"), progress=progress))
        ray.shutdown()  # the local cluster's idle workers and actors would hold memory and a little CPU through the rest
        set_torch_threads(cfg.student)
        s = timed("student", lambda: run_student(cfg, data, str(run / "targets"), run / "student", progress=progress))
        read_now = specs | {name: control_specs[name] for name in ("control-teacher", "random-xs")}
        probes = timed("probe", lambda: probe_encoders(read_now, cfg, data, run / "probe", progress=progress))
        cs = control_run.result()
        walls["control student"] = round(time.perf_counter() - t0, 1)
    torch.set_num_threads(os.cpu_count() or 1)  # the control student's readouts run alone
    probes |= timed("control probe", lambda: probe_encoders({"control-student": control_specs["control-student"]}, cfg,
                                                            data, run / "probe", progress=progress))
    specs |= control_specs
    ranks = {name: read_probe_features(run / "probe" / name)["effective_rank"] for name in specs}
    tasks = list(probes["student"])
    kept = {task: {readout: margin_kept(*(probes[n][task][readout] for n in ("control-student", "control-teacher", "random-xs")))
                   for readout in ("top1", "knn_top1")} for task in tasks}
    walls["total"] = round(time.perf_counter() - started, 1)
    summary = {
        "teacher_final_loss": round(t["final_loss"], 4),
        "store_samples": x["samples"],
        "store_errors": x["errors"],
        "store_bytes": x["bytes"],
        "student_final_loss": round(s["final_loss"], 4),
        "control_student_final_loss": round(cs["final_loss"], 4),
        "probe_top1": {name: {task: round(r["top1"], 4) for task, r in res.items()} for name, res in probes.items()},
        "knn_top1": {name: {task: round(r["knn_top1"], 4) for task, r in res.items()} for name, res in probes.items()},
        "probe_effective_rank": ranks,
        "control_margin_kept": {task: {k: round(v, 3) for k, v in r.items()} for task, r in kept.items()},
        "wall_s": walls,
    }
    print("\n=== demo summary ===")
    print(f"teacher   final loss {summary['teacher_final_loss']:.4f}   ({walls['teacher']} s, beside the control's teacher)")
    print(f"targets   {x['samples']} samples, {x['errors']} errors, {x['bytes'] / 1e6:.1f} MB{' with the pixel cache' * cfg.extract.pixel_cache}   "
          f"({walls['extract-targets']} s, beside the control's student)")
    print(f"student   final loss {summary['student_final_loss']:.4f}   ({walls['student']} s, beside the control's student)")
    print(f"control   label-trained {CONTROL_SIZE} teacher, step {CONTROL_STEPS} of a {CONTROL_SCHEDULE}-step schedule "
          f"({walls['control teacher']} s, beside the teacher above), its targets ({walls['control targets']} s), its "
          f"{control_cfg.model.student} student, {control_cfg.student.optim.steps} steps: final loss "
          f"{summary['control_student_final_loss']:.4f}   ({walls['control student']} s)")
    print(f"probe     ({walls['probe']} s beside the control's student + {walls['control probe']} s): top-1 % on val ({probes['student'][tasks[0]]['num_val']} clips), "
          "frozen tokens: linear readout / k-NN (docs/yardstick.md)")
    print(" " * 26 + "".join(f"{t:>16s}" for t in tasks) + f"{'RankMe':>9s}")
    names = {"random": f"random init ({cfg.model.student})", "random-xs": f"random init ({control_cfg.model.student})"}
    for name in specs:
        cells = "".join(f"{100 * r['top1']:>9.1f} / {100 * r['knn_top1']:4.1f}" for r in (probes[name][t] for t in tasks))
        print(f"  {names.get(name, name):24s}{cells}{ranks[name]:9.1f}")
    print(f"  {'chance':24s}" + "".join(f"{100 * probes['student'][t]['chance']:>9.1f}" + " " * 7 for t in tasks))
    print("  control: a teacher trained with the labels, and its student, which never saw one (stage 2 on its own).")
    print("  The share of the control teacher's lead over a random init that its student keeps, linear / k-NN: " +
          ", ".join(f"{t} {r['top1']:.2f} / {r['knn_top1']:.2f}" for t, r in kept.items()) +
          f" ({CONTROL_TASK} is the one the teacher has learnt by step {CONTROL_STEPS}; docs/yardstick.md)")
    print("  RankMe: effective rank of the frozen tokens (1: all alike), a collapse check, not a quality score")
    if "data" in walls:
        print(f"data      ({walls['data']} s)")
    print(f"total     {walls['total']} s")
    (run / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
