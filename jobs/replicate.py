"""make replicate: the CPU-scale replication study over seeds -> $(RUN)/study.json and REPLICATION.md.

Per seed: its own dataset; a V-Pixel teacher of the student's size, an
untrained teacher and a ladder of label-trained teachers, each with a student trained on
its extracted targets; then every encoder probed. See experiments/replication.py.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import entry, int_list, study_parser
from experiments.replication import Study, run_study
from experiments.replication_report import write_report


def main(argv: list[str] | None = None) -> dict:
    defaults = Study()
    p = study_parser(__doc__, config=defaults.config, run="runs/replication", report="REPLICATION.md",
                     overrides_help="config overrides for every arm, e.g. probe.epochs=10")
    p.add_argument("--seeds", type=int_list, default=defaults.seeds, help="comma-separated, e.g. 0,1,2")
    p.add_argument("--teacher-steps", type=int, default=defaults.teacher_steps)
    p.add_argument("--ladder-steps", type=int_list, default=defaults.ladder_steps, help="comma-separated")
    p.add_argument("--ladder-schedule", type=int, default=defaults.ladder_schedule,
                   help="the label run's lr schedule in steps (it stops at the top rung)")
    p.add_argument("--student-steps", type=int, default=defaults.student_steps)
    p.add_argument("--snapshot-every", type=int, default=defaults.snapshot_every)
    p.add_argument("--workers", type=int, default=defaults.workers)
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)  # what the report says produced it
    args = p.parse_args(argv)
    study = Study(config=args.config, seeds=args.seeds, teacher_steps=args.teacher_steps, ladder_steps=args.ladder_steps,
                  ladder_schedule=args.ladder_schedule,
                  student_steps=args.student_steps, snapshot_every=args.snapshot_every, workers=args.workers,
                  overrides=args.overrides)
    result = run_study(study, out=args.run, progress=not args.no_progress)
    command = args.command or "python -m jobs.replicate " + " ".join(sys.argv[1:] if argv is None else argv)
    print(write_report(result, args.report, command=command, out=args.run))
    return result


if __name__ == "__main__":
    entry(main)
