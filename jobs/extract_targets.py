"""make extract-targets: Ray Data job, frozen teacher over the shards -> $(RUN)/targets.

Runs on a local Ray instance, or on a cluster when RAY_ADDRESS is set. Rerunning
resumes: committed shards are skipped.
"""

from __future__ import annotations

from pathlib import Path

from jobs.cli import config_from, entry, parser, print_summary
from pipeline.extract import extract_targets


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument(
        "--teacher", default=None,
        help="teacher spec: a run folder (default: $(RUN)/teacher), hf-videomae:<folder> or hf-vjepa2:<folder>; "
             "a folder may be a URL (s3://..., gs://...), copied once per machine",
    )
    p.add_argument("--store", default=None, help="output store (default: $(RUN)/targets)")
    p.add_argument("--split", default="train")
    args = p.parse_args(argv)
    cfg = config_from(args)
    summary = extract_targets(
        cfg,
        data=args.data,
        teacher=args.teacher or str(Path(args.run) / "teacher"),
        store=args.store or str(Path(args.run) / "targets"),
        split=args.split,
        progress=not args.no_progress,
    )
    print_summary("extract-targets", summary)
    return summary


if __name__ == "__main__":
    entry(main)
