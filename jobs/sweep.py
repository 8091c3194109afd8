"""make sweep CONFIG=<sweep.yaml>: many student variants against one target store, then a results table.

Writes $(RUN)/sweeps/<sweep name>/<variant>/ (student run folders) and results.{md,csv,json}.
With executor=slurm (make slurm-sweep) it submits a SLURM job per variant and one that writes the
results once they are done, and prints their job ids (docs/cluster.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.cli import entry, parser
from experiments.sweep import load_sweep, run_sweep, submit_sweep
from salt.config import ConfigError


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__, config="jobs/configs/sweep-demo.yaml", help={
        "config": "sweep file (see jobs/configs/sweep-demo.yaml)",
        "overrides": "overrides of the sweep file, e.g. executor=ray probe=true",
    })
    p.add_argument("--store", default=None, help="target store (default: $(RUN)/targets)")
    p.add_argument("--out", default=None, help="sweep folder (default: $(RUN)/sweeps/<sweep file name>)")
    p.add_argument("--dry-run", action="store_true", help="executor slurm: write the batch scripts, submit nothing")
    args = p.parse_args(argv)
    try:
        sweep = load_sweep(args.config, args.overrides)
    except (ConfigError, OSError) as e:
        sys.exit(f"sweep error: {e}")
    out = args.out or str(Path(args.run) / "sweeps" / Path(args.config).stem)
    store = args.store or str(Path(args.run) / "targets")
    if sweep.executor == "slurm":
        jobs = submit_sweep(sweep, data=args.data, store=store, out=out, dry_run=args.dry_run)
        for name, job in jobs.items():
            print(f"{name}: {'wrote ' if args.dry_run else 'SLURM job '}{job}")
        print(f"sweep results: {out}/results.md once the results job has run (squeue --me; logs in {out}/slurm/)")
        return []
    rows = run_sweep(sweep, data=args.data, store=store, out=out, progress=not args.no_progress)
    print((Path(out) / "results.md").read_text(), end="")
    print(f"sweep results: {out}/results.md")
    return rows


if __name__ == "__main__":
    entry(main)
