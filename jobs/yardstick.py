"""make yardstick: the probe's spread over probe seeds and the tasks' margins over data seeds -> YARDSTICK.md.

Per data seed: its own dataset, a random-init encoder, one label-trained encoder per task and (first
seed) a V-Pixel teacher, each read by every readout. See experiments/yardstick.py.
"""

from __future__ import annotations

from jobs.cli import entry, int_list, make_command, study_parser
from experiments.yardstick import Yardstick, run_yardstick, write_report


def main(argv: list[str] | None = None) -> dict:
    defaults = Yardstick()
    p = study_parser(__doc__, config=defaults.config, run="runs/yardstick", report="docs/YARDSTICK.md",
                     overrides_help="config overrides for every encoder and probe, e.g. probe.epochs=10")
    p.add_argument("--data-seeds", type=int_list, default=defaults.data_seeds)
    p.add_argument("--probe-seeds", type=int, default=defaults.probe_seeds)
    args = p.parse_args(argv)
    study = Yardstick(config=args.config, data_seeds=args.data_seeds, probe_seeds=args.probe_seeds,
                      overrides=args.overrides)
    result = run_yardstick(study, out=args.run, progress=not args.no_progress)
    print(write_report(result, args.report, command=make_command("yardstick", argv)))
    return result


if __name__ == "__main__":
    entry(main)
