"""make demo's chain: data -> teacher -> extract-targets -> student -> probe on the embedded dataset, then a summary.

Beside the V-Pixel chain runs the transfer control (experiments/controls.py): a small encoder
trained with the labels, extracted and distilled into a student the same way, which never
sees a label. The readout table puts all four encoders next to random-init encoders of each student's
size (the floors) on both tasks of the embedded dataset (linear readout and k-NN: docs/yardstick.md), and
the summary gives the share of the control teacher's margin over its floor that its student keeps.
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
from experiments.runs import run_student, run_teacher
from experiments.stats import margin_kept
from pipeline.digits import write_moving_digits
from pipeline.extract import extract_targets
from salt.config import Config, from_dict, to_dict, with_overrides
from salt.devices import set_torch_threads

# The transfer control's teacher: the yardstick's motion encoder, a vit_cpu_xs trained 1,000 steps of 32
# clips with the motion labels (97-99% on 3 data seeds, docs/YARDSTICK.md; 800 steps of 16 with the
# warm-up and cosine schedule read 60%). Motion only: the digit takes a label encoder thousands of steps.
CONTROL_SIZE, CONTROL_STEPS, CONTROL_BATCH, CONTROL_TASKS = "vit_cpu_xs", 1000, 32, ["motion"]
# Its student: the teacher's size (a vit_cpu_xs step costs about half of a vit_cpu_s one), tiny.yaml's 400
# steps, beside the V-Pixel student. With tiny.yaml's stage-2 recipe such a student
# leaves its plateau between steps 500 and 600 and keeps 0.72 / 0.62 / 0.25 of the teacher's motion
# margin at step 800 on data seeds 0 / 1 / 2 (docs/yardstick.md, "A stage-2 recipe for the tiny grid");
# 800 steps would take the demo past ten minutes with its setup, so at 400 it is still on the plateau.
CONTROL_STUDENT = ("model.student=vit_cpu_xs", "student.optim.steps=400")

# The students read the crops their teacher saw from the store's pixel cache instead of decoding the
# videos again: the same pixels (the loss is equal to the last bit), and less time for the students,
# whose loader workers no longer decode (docs/usage.md, "Stage-2 inputs"). The V-Pixel teacher trains
# 200 steps and its student 200, not tiny.yaml's 400: a V-Pixel teacher carries nothing the readouts see
# here at any length (docs/STAGE1.md), and its teacher and targets have to fit beside the control's teacher.
DEMO_OVERRIDES = ("extract.pixel_cache=true", "data.stage2_input=pixels", "teacher.optim.steps=200",
                  "student.optim.steps=200")


def _control_teacher(cfg_dict: dict, data: str, out: str, steps: int) -> float:
    """The control's label teacher (in the demo's second process, beside the V-Pixel teacher); its seconds."""
    t0 = time.perf_counter()
    cfg = from_dict(Config, cfg_dict)
    set_torch_threads(cfg.teacher)
    train_label_teachers(cfg, data, out, size=CONTROL_SIZE, steps=[steps], tasks=CONTROL_TASKS, batch_size=CONTROL_BATCH,
                         progress=False)
    return round(time.perf_counter() - t0, 1)


def _control_student(cfg_dict: dict, data: str, store: str, out: str) -> dict:
    """The control's student (in the demo's second process, beside the V-Pixel student and its readouts)."""
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
    # Two chains side by side, one core each (every stage runs at one torch thread): the V-Pixel chain in
    # this process, the control's teacher and then its student in a second; the extractions run here, on
    # Ray, and the readouts of the V-Pixel chain run here while the control's student trains.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        labels_run = pool.submit(_control_teacher, to_dict(cfg), data, str(control / "labels"), CONTROL_STEPS)
        t = timed("teacher", lambda: run_teacher(cfg, data, run / "teacher", progress=progress))
        x = timed("extract-targets", lambda: extract_targets(cfg, data=data, teacher=specs["teacher"],
                                                             store=str(run / "targets"), progress=progress))
        walls["control teacher"] = labels_run.result()
        timed("control targets", lambda: extract_targets(cfg, data=data, teacher=control_specs["control-teacher"],
                                                         store=str(control / "targets"), progress=progress))
        ray.shutdown()  # the local cluster's idle workers and actors would hold memory and a little CPU through the rest
        t0 = time.perf_counter()
        control_run = pool.submit(_control_student, to_dict(control_cfg), data, str(control / "targets"), str(control / "student"))
        set_torch_threads(cfg.student)
        s = timed("student", lambda: run_student(cfg, data, str(run / "targets"), run / "student", progress=progress))
        probes = timed("probe", lambda: probe_encoders(specs, cfg, data, run / "probe", progress=progress))
        cs = control_run.result()
        walls["control student"] = round(time.perf_counter() - t0, 1)
    torch.set_num_threads(os.cpu_count() or 1)  # the control's readouts run alone
    probes |= timed("control probe", lambda: probe_encoders(control_specs, cfg, data, run / "probe", progress=progress))
    specs |= control_specs
    ranks = {name: read_probe_features(run / "probe" / name)["effective_rank"] for name in specs}
    tasks = list(probes["student"])
    kept = {task: {readout: margin_kept(*(probes[n][task][readout] for n in ("control-student", "control-teacher", "random-xs")))
                   for readout in ("top1", "knn_top1")} for task in tasks if task in CONTROL_TASKS}
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
          f"({walls['extract-targets']} s)")
    print(f"student   final loss {summary['student_final_loss']:.4f}   ({walls['student']} s)")
    print(f"control   label-trained {CONTROL_SIZE} teacher ({walls['control teacher']} s, beside the teacher above), its targets "
          f"({walls['control targets']} s), its {control_cfg.model.student} student: final loss "
          f"{summary['control_student_final_loss']:.4f}   ({walls['control student']} s, beside the student and its readouts)")
    print(f"probe     ({walls['probe']} + {walls['control probe']} s): top-1 % on val ({probes['student'][tasks[0]]['num_val']} clips), "
          "frozen tokens: linear readout / k-NN (docs/yardstick.md)")
    print(" " * 26 + "".join(f"{t:>16s}" for t in tasks) + f"{'RankMe':>9s}")
    names = {"random": f"random init ({cfg.model.student})", "random-xs": f"random init ({control_cfg.model.student})"}
    for name in specs:
        cells = "".join(f"{100 * r['top1']:>9.1f} / {100 * r['knn_top1']:4.1f}" for r in (probes[name][t] for t in tasks))
        print(f"  {names.get(name, name):24s}{cells}{ranks[name]:9.1f}")
    print(f"  {'chance':24s}" + "".join(f"{100 * probes['student'][t]['chance']:>9.1f}" + " " * 7 for t in tasks))
    print("  control: a teacher trained with the motion labels, and its student, which never saw one (stage 2 on its own).")
    print("  The share of the control teacher's lead over a random init that its student keeps, linear / k-NN: " +
          ", ".join(f"{t} {r['top1']:.2f} / {r['knn_top1']:.2f}" for t, r in kept.items()))
    print("  RankMe: effective rank of the frozen tokens (1: all alike), a collapse check, not a quality score")
    if "data" in walls:
        print(f"data      ({walls['data']} s)")
    print(f"total     {walls['total']} s")
    (run / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
