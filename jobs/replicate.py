"""make replicate: the CPU-scale replication study -> $(RUN)/study.json and REPLICATION.md.

Two teachers (the student's size and a smaller one) trained briefly, their targets
extracted, a student trained longer on each, then every checkpoint probed.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.replication import Study, run_study, write_report


def main(argv: list[str] | None = None) -> dict:
    defaults = Study()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="data/moving-digits")
    p.add_argument("--run", default="runs/replication")
    p.add_argument("--report", default="REPLICATION.md")
    p.add_argument("--config", default=defaults.config)
    p.add_argument("--teacher-steps", type=int, default=defaults.teacher_steps)
    p.add_argument("--student-steps", type=int, default=defaults.student_steps)
    p.add_argument("--snapshot-every", type=int, default=defaults.snapshot_every)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)  # what the report says produced it
    p.add_argument("overrides", nargs="*", help="config overrides for both arms, e.g. probe.epochs=10")
    args = p.parse_args(argv)
    study = Study(config=args.config, teacher_steps=args.teacher_steps, student_steps=args.student_steps,
                  snapshot_every=args.snapshot_every, overrides=args.overrides)
    result = run_study(study, data=args.data, out=args.run, progress=not args.no_progress)
    command = args.command or "python -m jobs.replicate " + " ".join(sys.argv[1:] if argv is None else argv)
    print(write_report(result, args.report, command=command, out=args.run))
    return result


if __name__ == "__main__":
    main()
