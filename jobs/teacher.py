"""make teacher: stage 1, V-Pixel training streamed from the shards into $(RUN)/teacher.

Single process by default; `torchrun --nproc_per_node N -m jobs.teacher ...` trains data-parallel.
"""

from __future__ import annotations

from pathlib import Path

from jobs.cli import config_from, parser, print_summary, set_torch_threads
from pipeline.runs import run_teacher
from salt.train.distributed import finish, init_distributed


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__).parse_args(argv)
    cfg = config_from(args)
    set_torch_threads(cfg.teacher)
    rank = init_distributed()
    summary = run_teacher(cfg, args.data, Path(args.run) / "teacher", progress=not args.no_progress)
    finish()
    if rank.is_main:
        print_summary("teacher", summary)
    return summary


if __name__ == "__main__":
    main()
