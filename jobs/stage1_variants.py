"""make stage1-variants: V-Pixel teachers under each stage-1 variant, and a learning curve, against
random init over data seeds -> docs/STAGE1.md. See experiments/stage1.py.
"""

from __future__ import annotations

import sys

from jobs.cli import entry, parser
from experiments.stage1 import Stage1Study, run_stage1_study, write_report


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> dict:
    defaults = Stage1Study()
    # each data seed generates its own dataset under --run, so there is no --data
    p = parser(__doc__, flags=("config", "run"), config=defaults.config, run="runs/stage1",
               help={"overrides": "config overrides for every teacher and readout, e.g. teacher.optim.steps=800"})
    p.add_argument("--report", default="docs/STAGE1.md")
    p.add_argument("--seeds", type=_ints, default=defaults.seeds, help="comma-separated data seeds, e.g. 0,1,2")
    p.add_argument("--variants", type=lambda t: [v.strip() for v in t.split(";") if v.strip()], default=None,
                   help=f"';'-separated names among: {'; '.join(defaults.variants)}")
    p.add_argument("--curve-steps", type=_ints, default=defaults.curve_steps, help="comma-separated; empty: no curve")
    p.add_argument("--workers", type=int, default=defaults.workers)
    args = p.parse_args(argv)
    variants = defaults.variants
    if args.variants is not None:
        unknown = [v for v in args.variants if v not in variants]
        if unknown:
            p.error(f"unknown variant(s) {unknown}; known: {list(variants)}")
        variants = {v: variants[v] for v in args.variants}
    study = Stage1Study(config=args.config, seeds=args.seeds, variants=variants, curve_steps=args.curve_steps,
                        workers=args.workers, overrides=args.overrides)
    result = run_stage1_study(study, out=args.run, progress=not args.no_progress)
    command = "make stage1-variants" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    print(write_report(result, args.report, command=command))
    return result


if __name__ == "__main__":
    entry(main)
