"""make student: stage 2 from cached targets into $(RUN)/student. Never builds the teacher.

Single process by default; `torchrun --nproc_per_node N -m jobs.student ...` trains data-parallel.
student.optim.batch_size is the global batch on any number of processes. SIGTERM / SIGUSR1 stop
it after a whole step with a checkpoint and exit status 75; the same command resumes it
(salt/train/preemption.py).
"""

from __future__ import annotations

from pathlib import Path

from jobs.cli import config_from, entry, parser, run_training_job
from experiments.runs import run_student
from salt.train.preemption import leave_when_preempted


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--store", default=None, help="target store (default: $(RUN)/targets)")
    p.add_argument("--out", default=None, help="run folder of this student (default: $(RUN)/student)")
    args = p.parse_args(argv)
    cfg = config_from(args)
    store = args.store or str(Path(args.run) / "targets")
    out = args.out or Path(args.run) / "student"
    run = leave_when_preempted(lambda: run_student(cfg, args.data, store, out, progress=not args.no_progress))
    return run_training_job("student", cfg.student, run)


if __name__ == "__main__":
    entry(main)
