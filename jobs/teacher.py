"""make teacher: stage 1, V-Pixel training streamed from the shards into $(RUN)/teacher.

Single process by default; `torchrun --nproc_per_node N -m jobs.teacher ...` trains data-parallel.
teacher.optim.batch_size is the global batch on any number of processes. SIGTERM / SIGUSR1 stop
it after a whole step with a checkpoint and exit status 75; the same command resumes it
(salt/train/preemption.py).
"""

from __future__ import annotations

from pathlib import Path

from jobs.cli import config_from, entry, parser, run_training_job
from experiments.runs import run_teacher
from salt.train.preemption import leave_when_preempted


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__).parse_args(argv)
    cfg = config_from(args)
    run = leave_when_preempted(lambda: run_teacher(cfg, args.data, Path(args.run) / "teacher", progress=not args.no_progress))
    return run_training_job("teacher", cfg.teacher, run)


if __name__ == "__main__":
    entry(main)
