"""make demo: data -> teacher -> extract-targets -> student -> probe on the embedded dataset, then a summary
(experiments/demo.py: run_demo)."""

from __future__ import annotations

from jobs.cli import config_from, entry, parser
from experiments.demo import run_demo


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__).parse_args(argv)
    return run_demo(config_from(args), data=args.data, run=args.run, progress=not args.no_progress)


if __name__ == "__main__":
    entry(main)
