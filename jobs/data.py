"""make data: write the embedded "moving digits" dataset as WebDataset shards."""

from __future__ import annotations

import argparse
import sys

from pipeline.digits import write_moving_digits


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="data/moving-digits")
    p.add_argument("--src", default=None, help="folder of videos or 'path label' CSV")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=512)
    p.add_argument("--num-val", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=128)
    args = p.parse_args(argv)
    if args.src:
        sys.exit(f"SRC={args.src}: building shards from your own videos is not implemented yet (issue 3)")
    summary = write_moving_digits(
        args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val, samples_per_shard=args.samples_per_shard
    )
    print(f"data: {summary}")
    return summary


if __name__ == "__main__":
    main()
