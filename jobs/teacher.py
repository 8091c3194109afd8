"""make teacher: stage 1, V-Pixel training streamed from the shards into $(RUN)/teacher."""

from __future__ import annotations

from pathlib import Path

from jobs.cli import config_from, parser, print_summary, set_torch_threads
from pipeline.shards import list_shards
from pipeline.stream import ShardedClips, make_loader
from salt.runinfo import write_run_info
from salt.train.teacher import train_teacher


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__).parse_args(argv)
    cfg = config_from(args)
    set_torch_threads(cfg.teacher)
    out = Path(args.run) / "teacher"
    shards = list_shards(args.data, "train")
    write_run_info(out, cfg, data=args.data)

    def batches(start: int):
        dataset = ShardedClips(cfg, shards, batch_size=cfg.teacher.optim.batch_size, start_batch=start)
        return make_loader(dataset, cfg.data.num_workers)

    summary = train_teacher(cfg, out, batches, progress=not args.no_progress)
    print_summary("teacher", summary)
    return summary


if __name__ == "__main__":
    main()
