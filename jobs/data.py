"""make data: WebDataset shards of your videos (SRC=folder or CSV, local or s3://; a Ray job that
resumes where a killed run stopped), or of the embedded "moving digits" (no SRC). docs/ingest.md."""

from __future__ import annotations

import os
import sys

from jobs.cli import entry, parser
from pipeline import fs
from pipeline.digits import DIGITS_PER_SHARD, DIGITS_TRAIN, DIGITS_VAL, write_moving_digits
from pipeline.ingest import IngestConfig, Transcode, build_shards

SHOWN_ERRORS = 20  # the rest are in errors.parquet
INGEST_PER_SHARD = IngestConfig.samples_per_shard


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, flags=("data",), overrides=False, help={"data": "dataset folder (or URL) the shards are written to"})
    p.add_argument("--src", default=None, help="folder of videos or CSV ('path label' or 'path,label'), local or URL")
    p.add_argument("--split", default=None, help="write the shards to DATA/SPLIT (labels.json stays at DATA, shared by the splits)")
    p.add_argument("--labels", default=None, help="label map to use (labels.json form); default: DATA's, else made from SRC")
    p.add_argument("--seed", type=int, default=0)
    # one embedded dataset: the sizes make demo, make replicate and the tables in docs/ are measured on
    p.add_argument("--num-train", type=int, default=DIGITS_TRAIN, help="moving digits: train clips (no SRC)")
    p.add_argument("--num-val", type=int, default=DIGITS_VAL, help="moving digits: val clips (no SRC)")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help=f"default: {INGEST_PER_SHARD} for SRC, {DIGITS_PER_SHARD} for the moving digits")
    p.add_argument("--workers", type=int, default=None,
                   help="CPUs of the local Ray (default: all; a RAY_ADDRESS cluster uses its own; 0: no Ray, in this process); "
                        "for the moving digits, processes writing shards (default: all CPUs)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per video before it counts as a hang (SRC only)")
    p.add_argument("--short-side", type=int, default=0, help="transcode: short side at most this many pixels (0: keep)")
    p.add_argument("--max-fps", type=float, default=0.0, help="transcode: at most this frame rate (0: keep)")
    p.add_argument("--crf", type=int, default=Transcode.crf, help="transcode: libx264 quality (lower is better, bigger)")
    p.add_argument("--preset", default=Transcode.preset, help="transcode: libx264 preset")
    args = p.parse_args(argv)
    if args.src:
        transcode = None
        if args.short_side > 0 or args.max_fps > 0:
            transcode = Transcode(short_side=args.short_side, max_fps=args.max_fps, crf=args.crf, preset=args.preset)
        out = fs.join(args.data, args.split) if args.split else args.data
        try:
            cfg = IngestConfig(samples_per_shard=args.samples_per_shard or INGEST_PER_SHARD, timeout_s=args.timeout, transcode=transcode)
            summary = build_shards(
                args.src, out, cfg, label_root=args.data, labels=args.labels, workers=args.workers, progress=not args.no_progress,
            )
        except (OSError, ValueError) as e:  # bad input or storage: one line naming it
            sys.exit(f"data error: {e}")
        kept = f" ({summary['shards_kept']} kept from an earlier run)" if summary["shards_kept"] else ""
        print(f"data: {summary['inputs']} inputs -> {summary['samples']} samples in {summary['shards']} shards of {out}{kept}, "
              f"{summary['errors']} errors; label map {summary['labels']} ({summary['classes']} classes)")
        if summary["storage_retries"]:
            print(f"  storage retries: {summary['storage_retries']}")
        for e in summary["error_reasons"][:SHOWN_ERRORS]:
            print(f"  skipped {e['source']}: {e['reason']}")
        if summary["errors"] > SHOWN_ERRORS:
            print(f"  ... and {summary['errors'] - SHOWN_ERRORS} more in {fs.join(out, 'errors.parquet')}")
        return summary
    summary = write_moving_digits(
        args.data, seed=args.seed, num_train=args.num_train, num_val=args.num_val, samples_per_shard=args.samples_per_shard or DIGITS_PER_SHARD,
        progress=not args.no_progress, workers=(os.cpu_count() or 1) if args.workers is None else args.workers,
    )
    print(f"data: {summary}")
    return summary


if __name__ == "__main__":
    entry(main)
