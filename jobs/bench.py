"""make bench: every benchmark, side by side in one run -> BENCHMARKS.md and benchmarks.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from pipeline import bench
from pipeline.extract import extract_targets, init_ray
from pipeline.shards import list_shards
from pipeline.stream import ShardedClips, make_loader
from salt.config import load_config
from salt.runinfo import git_commit
from salt.train.student import train_student
from salt.train.teacher import load_frozen_teacher, train_teacher


def extraction_rows(cfg, data: str, teacher_dir: str, work: Path) -> tuple[list[dict], dict]:
    """End-to-end extraction against the teacher's forward alone on pre-decoded clips."""
    stores, summaries = {}, {}
    for dtype in ("float32", "float16"):
        stores[dtype] = str(work / f"store-{dtype}")
        summaries[dtype] = extract_targets(
            load_config(CONFIG, [f"extract.dtype={dtype}"]), data=data, teacher_dir=teacher_dir, store=stores[dtype], progress=False
        )
    samples = summaries["float16"]["samples"]
    torch.set_num_threads(cfg.extract.actor_torch_threads)  # what one actor gets
    teacher = load_frozen_teacher(teacher_dir, cfg)
    dataset = ShardedClips(cfg, list_shards(data), batch_size=cfg.extract.batch_size)
    clips = [dataset.batch(g)["clips"] for g in range(samples // cfg.extract.batch_size)]
    t0 = time.perf_counter()
    with torch.no_grad():
        for c in clips:
            teacher(c)
    forward_s = time.perf_counter() - t0
    forward_rate = len(clips) * cfg.extract.batch_size / forward_s
    extract_rate = samples / summaries["float16"]["wall_s"]
    fp32 = bench.array_bytes_per_sample(stores["float32"])
    rows = [
        bench.row("extract_vs_forward_only", extract_rate / forward_rate, "x", 1.0,
                  f"end to end {extract_rate:.1f} samples/s (Ray start included) vs forward only {forward_rate:.1f}"),
        bench.row("write_overhead_fraction", summaries["float16"]["write_s"] / forward_s, "fraction", None,
                  "shard write seconds / teacher forward seconds, fp16 store"),
        bench.row("bytes_ratio_fp16", bench.array_bytes_per_sample(stores["float16"]) / fp32, "x", 0.51,
                  f"array bytes per sample over fp32's {fp32:.0f}; bound: issue 4's 0.51"),
    ]
    return rows, {"store": stores["float32"], "teacher": teacher}


def student_rows(cfg, data: str, store: str, teacher, work: Path) -> list[dict]:
    from pipeline.targets import TargetStore

    batch = ShardedClips(cfg, list_shards(data), batch_size=cfg.student.optim.batch_size, store=store).batch(0)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = bench.student_step_speedup(cfg, batch, teacher)
    run_cfg = load_config(CONFIG, ["student.optim.steps=30", "data.num_workers=1"])
    summary = train_student(
        run_cfg, work / "student", lambda start: make_loader(
            ShardedClips(run_cfg, list_shards(data), batch_size=run_cfg.student.optim.batch_size, start_batch=start, store=store), 1
        ),
        teacher_width=teacher.width, store_meta=TargetStore(store).meta, progress=False,
    )
    rows.append(bench.row("data_wait_fraction", summary["data_wait_fraction"], "fraction", 0.10,
                          "time waiting on the loader / step time, 30 student steps, 1 loader worker"))
    return rows


def write_report(rows: list[dict], out: Path, wall_s: float) -> None:
    (out / "benchmarks.json").write_text(json.dumps(rows, indent=1) + "\n")
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), platform.processor())
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{bench.COMMAND}` (all figures from one run, {wall_s:.0f} s) on "
        f"{datetime.now(timezone.utc).date()}, commit `{git_commit()}`.",
        f"Machine: {os.cpu_count()} cores ({cpu}), {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}.",
        "Each figure is a ratio of two measurements taken side by side in that run.",
        "",
        "| name | value | unit | bound | ratio | what |",
        "|---|---|---|---|---|---|",
    ]
    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.4g}"

    for r in rows:
        lines.append(f"| `{r['name']}` | {fmt(r['value'])} | {r['unit']} | {fmt(r['bound'])} | {fmt(r['ratio'])} | {r['note']} |")
    (out / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")


CONFIG = "jobs/configs/tiny.yaml"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="data/moving-digits")
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cfg = load_config(CONFIG)
    rows = bench.decode_throughput()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher_cfg = load_config(CONFIG, ["teacher.optim.steps=2", "data.num_workers=0"])
        shards = list_shards(args.data)
        train_teacher(teacher_cfg, work / "teacher", lambda start: ShardedClips(teacher_cfg, shards, batch_size=4, start_batch=start), progress=False)
        init_ray()
        extract, made = extraction_rows(cfg, args.data, str(work / "teacher"), work)
        rows += extract + student_rows(cfg, args.data, made["store"], made["teacher"], work)
    write_report(rows, Path(args.out), time.perf_counter() - t0)
    for r in rows:
        ratio = "" if r["ratio"] is None else f"ratio {r['ratio']:.3g}"
        print(f"{r['name']:36s} {r['value']:10.4g} {r['unit']:9s} {ratio}")
    return rows


if __name__ == "__main__":
    main()
