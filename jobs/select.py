"""make select RUNS="<student run folder> ...": probe every checkpoint of the runs (their
snapshots and final checkpoints), fit probe top-1 against training loss, report R^2.

Writes selection.json and selection_<task>.png (and probe/<checkpoint>/) into --out, by
default the run folder when there is one. Snapshots come from `student.snapshot_every=N`.
"""

from __future__ import annotations

from pathlib import Path

from jobs.cli import config_from, entry, parser
from experiments.selection import select_runs


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)  # --config: the probe's (data geometry, probe.*); --data: a labelled dataset
    p.add_argument("--runs", nargs="+", required=True, help="student run folders")
    p.add_argument("--out", default=None)
    p.add_argument("--task", action="append", default=None, help="probe task (repeatable); default: every task")
    args = p.parse_args(argv)
    cfg = config_from(args)
    runs = {Path(r).resolve().name if len(args.runs) == 1 else f"{i}-{Path(r).name}": r for i, r in enumerate(args.runs)}
    out = args.out or (args.runs[0] if len(args.runs) == 1 else "runs/selection")
    result = select_runs(runs, cfg, args.data, out, tasks=args.task, progress=not args.no_progress)
    for task, r in result["selection"]["tasks"].items():
        print(f"{task:12s} R^2 {r['r2']:.3f} (k-NN {r['r2_knn']:.3f}, linear {r['r2_linear']:.3f}) over {r['points']} "
              f"checkpoints; lowest loss: {r['lowest_loss']}, "
              f"best probe: {r['best_probe']}  ({Path(out) / r['png']})")
    return result


if __name__ == "__main__":
    entry(main)
