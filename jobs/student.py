"""make student: stage 2 from cached targets into $(RUN)/student. Never builds the teacher.

Single process by default; `torchrun --nproc_per_node N -m jobs.student ...` trains data-parallel.
"""

from __future__ import annotations

from pathlib import Path

from jobs.cli import config_from, entry, parser, run_training_job
from experiments.runs import run_student


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--store", default=None, help="target store (default: $(RUN)/targets)")
    p.add_argument("--out", default=None, help="run folder of this student (default: $(RUN)/student)")
    args = p.parse_args(argv)
    cfg = config_from(args)
    store = args.store or str(Path(args.run) / "targets")
    out = args.out or Path(args.run) / "student"
    return run_training_job("student", cfg.student, lambda: run_student(cfg, args.data, store, out, progress=not args.no_progress))


if __name__ == "__main__":
    entry(main)
