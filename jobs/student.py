"""make student: stage 2 from cached targets into $(RUN)/student. Never builds the teacher.

Single process by default; `torchrun --nproc_per_node N -m jobs.student ...` trains data-parallel.
"""

from __future__ import annotations

from pathlib import Path

from jobs.cli import config_from, parser, print_summary, set_torch_threads
from pipeline.runs import run_student
from salt.train.distributed import finish, init_distributed


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--store", default=None, help="target store (default: $(RUN)/targets)")
    p.add_argument("--out", default=None, help="run folder of this student (default: $(RUN)/student)")
    args = p.parse_args(argv)
    cfg = config_from(args)
    set_torch_threads(cfg.student)
    rank = init_distributed()
    store = args.store or str(Path(args.run) / "targets")
    summary = run_student(cfg, args.data, store, args.out or Path(args.run) / "student", progress=not args.no_progress)
    finish()
    if rank.is_main:
        print_summary("student", summary)
    return summary


if __name__ == "__main__":
    main()
