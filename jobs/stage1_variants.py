"""make stage1-variants: V-Pixel teachers under each stage-1 variant, and a learning curve, against
random init over data seeds -> docs/STAGE1.md. See experiments/stage1.py.
"""

from __future__ import annotations

from jobs.cli import entry, int_list, make_command, study_parser
from experiments.stage1 import Stage1Study, run_stage1_study, write_report


def main(argv: list[str] | None = None) -> dict:
    defaults = Stage1Study()
    p = study_parser(__doc__, config=defaults.config, run="runs/stage1", report="docs/STAGE1.md",
                     overrides_help="config overrides for every teacher and readout, e.g. teacher.optim.steps=800")
    p.add_argument("--seeds", type=int_list, default=defaults.seeds, help="comma-separated data seeds, e.g. 0,1,2")
    p.add_argument("--variants", type=lambda t: [v.strip() for v in t.split(";") if v.strip()], default=None,
                   help="';'-separated names among: " + '; '.join(defaults.variants).replace('%', '%%'))
    p.add_argument("--curve-steps", type=int_list, default=defaults.curve_steps, help="comma-separated; empty: no curve")
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
    print(write_report(result, args.report, command=make_command("stage1-variants", argv)))
    return result


if __name__ == "__main__":
    entry(main)
