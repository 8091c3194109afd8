"""make demo: data -> teacher -> extract-targets -> student on the embedded dataset, then a summary."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jobs import data, extract_targets, student, teacher


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="jobs/configs/tiny.yaml")
    p.add_argument("--data", default="data/moving-digits")
    p.add_argument("--run", default="runs/demo")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    common = ["--config", args.config, "--data", args.data, "--run", args.run, *args.overrides]
    walls = {}

    def timed(name, fn, argv):
        t0 = time.perf_counter()
        out = fn(argv)
        walls[name] = round(time.perf_counter() - t0, 1)
        return out

    if not (Path(args.data) / "labels.json").is_file():
        timed("data", data.main, ["--out", args.data])
    t = timed("teacher", teacher.main, common)
    x = timed("extract-targets", extract_targets.main, common)
    s = timed("student", student.main, common)
    summary = {
        "teacher_final_loss": round(t["final_loss"], 4),
        "store_samples": x["samples"],
        "store_errors": x["errors"],
        "store_bytes": x["bytes"],
        "student_final_loss": round(s["final_loss"], 4),
        "wall_s": walls,
    }
    print("\n=== demo summary ===")
    print(f"teacher   final loss {summary['teacher_final_loss']:.4f}   ({walls['teacher']} s)")
    print(f"targets   {x['samples']} samples, {x['errors']} errors, {x['bytes'] / 1e6:.1f} MB   ({walls['extract-targets']} s)")
    print(f"student   final loss {summary['student_final_loss']:.4f}   ({walls['student']} s)")
    if "data" in walls:
        print(f"data      ({walls['data']} s)")
    print(f"total     {sum(walls.values()):.1f} s")
    (Path(args.run) / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
