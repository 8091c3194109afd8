"""make index DATA=<folder or URL>: the dataset index of each split folder (index.parquet), for
folders of shards made before ingest wrote one. Shards are read in parallel, once; a folder whose
index already covers its shards is left as it is (--rebuild: index every shard again).

Extraction does the same on first use; this job is for doing it ahead, or after editing shards.
"""

from __future__ import annotations

from jobs.cli import entry, parser, print_summary
from pipeline import fs
from pipeline.dataset_index import INDEX_FILE, ensure_index, index_location
from pipeline.shards import list_shards


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, flags=("data",), overrides=False)
    p.add_argument("--splits", default="train,val", help="split folders to index where the data has them")
    p.add_argument("--workers", type=int, default=None, help="threads reading shards (default: 4 per core, at most 32)")
    p.add_argument("--rebuild", action="store_true", help=f"index every shard again (replaces {INDEX_FILE})")
    args = p.parse_args(argv)
    root = str(args.data).rstrip("/")
    splits = [s for s in args.splits.split(",") if s and fs.isdir(fs.join(root, s))]
    folders = [fs.join(root, s) for s in splits] or [root]  # a folder of shards without splits
    summary = {}
    for folder in folders:
        shards = list_shards(folder, listing=True)
        if args.rebuild and fs.exists(index_location(folder)):
            fs.remove(index_location(folder))
        index = ensure_index(folder, shards, workers=args.workers)
        summary[folder] = {"shards": len(shards), "samples": int(sum(index.table.column("samples").to_pylist())),
                           "index": index_location(folder)}
    print_summary("index", summary)
    return summary


if __name__ == "__main__":
    entry(main)
