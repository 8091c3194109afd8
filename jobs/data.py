"""make data: WebDataset shards of your videos (SRC=folder or CSV), or of the embedded "moving digits"."""

from __future__ import annotations

import sys

from jobs.cli import entry, parser
from pipeline.digits import write_moving_digits
from pipeline.ingest import build_shards


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, flags=("data",), overrides=False, help={"data": "folder the shards are written to"})
    p.add_argument("--src", default=None, help="folder of videos or 'path label' CSV")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=512)
    p.add_argument("--num-val", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="probe processes (SRC only)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per video before it counts as a hang (SRC only)")
    args = p.parse_args(argv)
    if args.src:
        try:
            summary = build_shards(
                args.src, args.data, samples_per_shard=args.samples_per_shard, workers=args.workers, timeout_s=args.timeout,
                progress=not args.no_progress,
            )
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"data error: {e}")
        print(f"data: {summary['inputs']} inputs -> {summary['samples']} samples in {summary['shards']} shards of {args.data}, {summary['errors']} errors")
        for e in summary["error_reasons"]:
            print(f"  skipped {e['source']}: {e['reason']}")
        return summary
    summary = write_moving_digits(
        args.data, seed=args.seed, num_train=args.num_train, num_val=args.num_val, samples_per_shard=args.samples_per_shard,
        progress=not args.no_progress,
    )
    print(f"data: {summary}")
    return summary


if __name__ == "__main__":
    entry(main)
