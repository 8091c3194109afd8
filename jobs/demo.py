"""make demo: data -> teacher -> extract-targets -> student -> probe on the embedded dataset, then a summary
(experiments/demo.py: run_demo)."""

from __future__ import annotations

from jobs.cli import config_from, entry, parser
from experiments.demo import DEMO_OVERRIDES, run_demo


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__).parse_args(argv)
    args.overrides = [*DEMO_OVERRIDES, *args.overrides]  # the user's own overrides come last and win
    return run_demo(config_from(args), data=args.data, run=args.run, progress=not args.no_progress)


if __name__ == "__main__":
    entry(main)
