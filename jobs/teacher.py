"""make teacher: stage 1, V-Pixel training streamed from the shards into $(RUN)/teacher.

Single process by default; `torchrun --nproc_per_node N -m jobs.teacher ...` trains data-parallel.
"""

from __future__ import annotations

from pathlib import Path

from jobs.cli import config_from, entry, parser, run_training_job
from experiments.runs import run_teacher


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__).parse_args(argv)
    cfg = config_from(args)
    return run_training_job(
        "teacher", cfg.teacher, lambda: run_teacher(cfg, args.data, Path(args.run) / "teacher", progress=not args.no_progress)
    )


if __name__ == "__main__":
    entry(main)
