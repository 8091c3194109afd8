"""make bench's report: BENCHMARKS.md and benchmarks.json from the rows experiments/bench.py measured."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from experiments.bench import COMMAND, FORMATS, OVERRIDES, format_overrides
from salt.runinfo import git_commit


def write_report(rows: list[dict], out: Path, wall_s: float, config: str, overrides: list[str]) -> None:
    commit = git_commit()  # before writing: the report files themselves would mark the tree dirty
    (out / "benchmarks.json").write_text(json.dumps(rows, indent=1) + "\n")
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), platform.processor())
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{COMMAND}` (all figures from one run, {wall_s:.0f} s) on "
        f"{datetime.now(timezone.utc).date()}, commit `{commit}`.",
        f"Machine: {os.cpu_count()} cores ({cpu}), {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}.",
        f"Config: `{config}` with `{' '.join([*OVERRIDES, *overrides])}`.",
        "Each figure is a ratio of two measurements taken side by side in that run.",
        "",
        "| name | value | unit | bound | ratio | what |",
        "|---|---|---|---|---|---|",
    ]
    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.4g}"

    for r in rows:
        lines.append(f"| `{r['name']}` | {fmt(r['value'])} | {r['unit']} | {fmt(r['bound'])} | {fmt(r['ratio'])} | {r['note']} |")
    lines += ["", "## Storage format", "", storage_recommendation(rows)]
    (out / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")


def storage_recommendation(rows: list[dict]) -> str:
    """The smallest lossy format whose targets stay within 1% and whose student loss stays
    within 1% of fp16's, from this run's figures; fp16 when none qualifies."""
    by_name = {r["name"]: r for r in rows}
    fits = []
    for name in FORMATS:
        error, loss = by_name.get(f"target_error_{name}"), by_name.get(f"student_loss_{name}_vs_fp16")
        if error and loss and error["value"] < 0.01 and abs(loss["ratio"] - 1) < 0.01:
            fits.append((by_name[f"bytes_ratio_{name}"]["value"], name))
    fp16 = by_name["bytes_ratio_fp16"]["value"]
    if not fits:
        return f"No lossy format kept targets and student loss within 1% of fp16 in this run: keep fp16 ({fp16:.3f} of fp32's bytes)."
    ratio, name = min(fits)
    return (
        f"Recommended: `{name}` ({' '.join(format_overrides(name))}): {ratio:.3f} of fp32's bytes ({ratio / fp16:.2f} of fp16's), "
        f"target error {by_name['target_error_' + name]['value']:.4f}, student loss "
        f"{by_name['student_loss_' + name + '_vs_fp16']['ratio']:.4f} x fp16's after 40 steps. "
        "It is the smallest format here whose targets stay within 1% of fp32 and whose student loss stays within 1% of "
        "fp16's. The project default stays fp16 until the effect is measured with a trained teacher and a "
        "longer student run: the CPU teacher here trained for 2 steps and 40 student steps show little."
    )

