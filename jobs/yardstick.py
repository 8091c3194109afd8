"""make yardstick: the probe's spread over probe seeds and the tasks' margins over data seeds -> YARDSTICK.md.

Per data seed: its own dataset, a random-init encoder, one label-trained encoder per task and (first
seed) a V-Pixel teacher, each read by every readout. See experiments/yardstick.py.
"""

from __future__ import annotations

import sys

from jobs.cli import entry, parser
from experiments.yardstick import Yardstick, run_yardstick, write_report


def main(argv: list[str] | None = None) -> dict:
    defaults = Yardstick()
    # each data seed generates its own dataset under --run, so there is no --data
    p = parser(__doc__, flags=("config", "run"), config=defaults.config, run="runs/yardstick",
               help={"overrides": "config overrides for every encoder and probe, e.g. probe.epochs=10"})
    p.add_argument("--report", default="docs/YARDSTICK.md")
    p.add_argument("--data-seeds", type=lambda t: [int(x) for x in t.split(",") if x], default=defaults.data_seeds)
    p.add_argument("--probe-seeds", type=int, default=defaults.probe_seeds)
    args = p.parse_args(argv)
    study = Yardstick(config=args.config, data_seeds=args.data_seeds, probe_seeds=args.probe_seeds,
                      overrides=args.overrides)
    result = run_yardstick(study, out=args.run, progress=not args.no_progress)
    command = "make yardstick" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    print(write_report(result, args.report, command=command))
    return result


if __name__ == "__main__":
    entry(main)
