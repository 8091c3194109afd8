"""make bench: every benchmark, side by side in one run -> BENCHMARKS.md and benchmarks.json."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from jobs.cli import entry, parser
from experiments import bench, bench_ingest, bench_probe, bench_report, bench_scale
from pipeline.cluster import init_ray
from experiments.runs import run_teacher
from salt.config import with_overrides


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__, run=None, help={
        "config": "config the benchmarks derive their runs from (data.crop_size=64 is set on top)",
        "run": "keep the bench's teacher, stores and students in this folder (default: a temporary one, removed)",
    })
    p.add_argument("--out", default=".", help="folder for BENCHMARKS.md and benchmarks.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cfg = bench.bench_config(args.config, *args.overrides)
    rows = bench.decode_throughput()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.run or tmp)
        teacher_cfg = with_overrides(cfg, *bench.QUICK_TEACHER)
        run_teacher(teacher_cfg, args.data, work / "teacher", progress=False)  # as make teacher starts it
        init_ray()
        extract, made = bench.extraction_rows(cfg, args.data, str(work / "teacher"), work)
        rows += extract + bench.student_rows(cfg, args.data, made["stores"], made["teacher"], work)
        rows += bench.mask_freshness_rows(cfg, args.data, made["stores"]["fp16"], work)
        rows += bench.loader_rows(work)
        # data at scale: start-up and store traffic at 500 and 4,000 shards, ingest, the probe's memory
        scale_overrides = [*bench.OVERRIDES, *args.overrides]
        rows += bench_scale.startup_rows(cfg, args.config, scale_overrides, str(work / "teacher"), work / "scale")
        rows += bench_scale.traffic_rows(args.config, scale_overrides, str(work / "teacher"), work / "scale")
        rows += bench_ingest.ingest_rows(work)
        rows += bench_probe.probe_memory_rows(work / "probe")
    bench_report.write_report(rows, Path(args.out), time.perf_counter() - t0, args.config, args.overrides)
    for r in rows:
        ratio = "" if r["ratio"] is None else f"ratio {r['ratio']:.3g}"
        print(f"{r['name']:36s} {r['value']:10.4g} {r['unit']:9s} {ratio}")
    return rows


if __name__ == "__main__":
    entry(main)
