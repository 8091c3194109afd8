"""make student: stage 2 from cached targets into $(RUN)/student. Never builds the teacher."""

from __future__ import annotations

from pathlib import Path

from jobs.cli import config_from, parser, print_summary, set_torch_threads
from pipeline.shards import list_shards
from pipeline.stream import ShardedClips, make_loader
from pipeline.targets import TargetStore, check_compatible
from salt.runinfo import write_run_info
from salt.train.student import train_student


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--store", default=None, help="target store (default: $(RUN)/targets)")
    args = p.parse_args(argv)
    cfg = config_from(args)
    set_torch_threads(cfg.student)
    store_path = args.store or str(Path(args.run) / "targets")
    store = TargetStore(store_path)
    check_compatible(store.meta, cfg, store_path)
    out = Path(args.run) / "student"
    shards = list_shards(args.data, store.meta["source"]["split"])
    write_run_info(out, cfg, data=args.data, store=store_path)

    def batches(start: int):
        dataset = ShardedClips(cfg, shards, batch_size=cfg.student.optim.batch_size, start_batch=start, store=store_path)
        return make_loader(dataset, cfg.data.num_workers)

    summary = train_student(
        cfg, out, batches, teacher_width=store.teacher_width, store_meta=store.meta, progress=not args.no_progress
    )
    print_summary("student", summary)
    return summary


if __name__ == "__main__":
    main()
