"""A CPU-scale replication of the paper's claims on the embedded dataset, over seeds.

Per seed (the dataset is generated anew with that seed, and the seed also sets every
model's initialisation, sampling and the probe), every arm trains a teacher, extracts
its targets through the Ray job and trains a student of one size on them:

- `vpixel-<name>`: V-Pixel teachers (the method's stage 1), by default one of the
  student's size (`Study.vpixel` names more);
- `untrained`: a randomly initialised teacher (what stage 2 gets from no stage 1);
- `labels-<steps>`: the teacher-quality ladder, one encoder trained with the labels of
  the train split and saved at a few step counts, weak to strong
  (`experiments.controls`): teachers known to carry the tasks, so their students measure
  stage 2 on its own (the transfer control; `make demo`'s is the 500-step rung).

Then every teacher, every student, snapshots of the V-Pixel and label-rung students and
a random-init encoder of the student's size (the floor, on that seed's data) are
probed. The report gives mean +- sd over seeds, whether a student beats its teacher,
how much of each rung's margin over the floor its student keeps, student quality
against teacher quality along the ladder, and the R^2 of probe accuracy on student loss.
Independent runs go through a pool of worker processes, one torch thread each.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from experiments.controls import save_untrained_teacher, train_label_teachers
from experiments.pool import Phases, vpixel_teacher
from experiments.probing import probe_encoders
from experiments.runs import READ_PIXEL_CACHE, run_student
from pipeline.cluster import init_ray
from pipeline.extract import extract_targets
from experiments.selection import checkpoint_points, loss_vs_accuracy
from salt.config import Config, from_dict, load_config, to_dict
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
    # one encoder trained with both tasks' labels, saved at these steps: 500 is make demo's transfer control.
    # A 2,000-step rung (--ladder-steps 500,2000) reads motion better and its students keep nothing of it at
    # step 800 (docs/yardstick.md); its label run and its students took ~15 of the study's ~52 minutes
    ladder_steps: list[int] = dataclasses.field(default_factory=lambda: [500])
    # the label run's lr schedule (warm-up over a tenth, then a cosine to 0); the run stops at its last rung
    ladder_schedule: int = 2000
    ladder_batch: int = 32
    # 800: with the tiny recipe a 1,000-step motion teacher's student left its loss plateau between steps 500
    # and 650 (docs/yardstick.md, "A stage-2 recipe for the tiny grid"), and the 500-step rung's keeps half of
    # its teacher's motion margin by both readouts from step 600 on every seed
    student_steps: int = 800
    snapshot_every: int = 200
    num_train: int = 2000
    num_val: int = 1200
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["appearance", "motion"])
    workers: int = 2
    overrides: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.ladder_schedule < max(self.ladder_steps):
            raise ValueError(f"ladder_schedule={self.ladder_schedule} is shorter than the ladder's top rung "
                             f"({max(self.ladder_steps)} steps): the label run would stop past the end of its lr schedule")

    def arms(self) -> list[str]:
        return [f"vpixel-{name}" for name in self.vpixel] + ["untrained"] + [f"labels-{s}" for s in sorted(self.ladder_steps)]

    def seed_config(self, seed: int) -> Config:
        return load_config(self.config, [
            *READ_PIXEL_CACHE,  # 12 students, two at a time on two cores: loader workers that decode would take CPU from them
            *self.overrides,
            f"model.student={self.student}",
            f"teacher.optim.steps={self.teacher_steps}",
            f"student.optim.steps={self.student_steps}",
            f"teacher.seed={seed}", f"student.seed={seed}", f"probe.seed={seed}", f"data.seed={seed}",
        ])


def _label_teachers(cfg_dict: dict, data: str, out: str, size: str, steps: list[int], schedule: int, batch: int,
                    seed: int) -> dict:
    return train_label_teachers(from_dict(Config, cfg_dict), data, out, size=size, steps=steps, schedule_steps=schedule,
                                seed=seed, batch_size=batch, progress=False)


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
    with Phases("replicate", study.workers, progress) as phases:
        phase = phases.run
        phases.write_data(data, study.num_train, study.num_val)
        teacher_dirs = {(s, arm): str(root / arm / "teacher") for s, root in seeds.items() for arm in study.arms()}
        jobs: dict[str, tuple] = {}
        for s, root in seeds.items():
            for name, size in study.vpixel.items():
                jobs[f"{s}/vpixel-{name}"] = (vpixel_teacher, cfgs[s], size, data[s], teacher_dirs[(s, f"vpixel-{name}")])
            jobs[f"{s}/labels"] = (_label_teachers, cfgs[s], data[s], str(root / "labels"), study.ladder_teacher, study.ladder_steps,
                                    study.ladder_schedule, study.ladder_batch, s)
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
        phases.walls["extract"] = time.perf_counter() - t0

        tracked = [a for a in study.arms() if a == "vpixel-same" or a.startswith("labels-")]  # arms whose snapshots are probed
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
        "wall_s": phases.rounded(),
    }
    write_run_info(out, study.seed_config(study.seeds[0]), study=json.dumps(dataclasses.asdict(study)))
    (out / "study.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result
