"""make plan's driver: the planner's inputs with the rates make bench measured (its benchmarks.json
rows, mapped to PlanInputs fields), and the plan or the paper's table 10 as text."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.feeding import Plan, PlanInputs, plan
from salt.config import load_config
from salt.flops import inputs_from_config, inputs_from_overrides, table10

# make bench rows -> the PlanInputs fields they measure
MEASURED = {
    "decode_clips_per_s_per_core": "decode_clips_per_s_per_core",
    "loader_video_samples_per_s_per_core": "cached_video_samples_per_s_per_core",
    "loader_pixels_samples_per_s_per_core": "pixel_samples_per_s_per_core",
    "pixel_cache_mb_per_view": "pixel_mb_per_view",
}


MULTIVIEW_ROW = "loader_views{k}_samples_per_s_per_core"  # measured at k views per decode


def measured_rates(bench: str) -> dict[str, float]:
    """make bench's rows from its benchmarks.json (none where there is no file), by row name."""
    path = Path(bench)
    if not path.exists():
        return {}
    try:
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise TypeError(f"a {type(rows).__name__}, not a list of rows")
        return {r["name"]: float(r["value"]) for r in rows}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{bench}: not a benchmarks.json written by make bench ({e})") from None


def with_measured_rates(base: PlanInputs, overrides: list[str], measured: dict[str, float]) -> PlanInputs:
    """base with the measured rates, then the key=value overrides (which win); the multi-view rate
    only where it was measured at the plan's views_per_decode."""
    fields = {field: measured[name] for name, field in MEASURED.items() if name in measured}
    inp = inputs_from_overrides(overrides, dataclasses.replace(base, **fields))
    multiview = measured.get(MULTIVIEW_ROW.format(k=inp.views_per_decode))
    if inp.multiview_samples_per_s_per_core is None and multiview is not None:
        inp = dataclasses.replace(inp, multiview_samples_per_s_per_core=multiview)
    return inp



def plan_text(*, config: str | None, overrides: list[str], bench: str, preset: str | None, as_json: bool) -> str:
    """The plan of `config` (the paper's setting without one) with the measured rates of `bench` and
    the key=value overrides, or with `preset` the table-10 rows; JSON or a table."""
    if preset:
        rows = table10()
        return json.dumps(rows, indent=1) if as_json else format_table10(rows)
    base = inputs_from_config(load_config(config), PlanInputs) if config else PlanInputs()
    result = plan(with_measured_rates(base, overrides, measured_rates(bench)))
    return json.dumps(dataclasses.asdict(result), indent=1) if as_json else format_plan(result)


def format_plan(pl: Plan) -> str:
    i, n = pl.inputs, pl.params
    runs, views = _count(i.student_runs, "student run"), _count(i.views_per_clip, "view")
    extract_rate = i.extract_flops_per_s or i.gpu_flops_per_s
    rows = [
        ("stage 1: teacher (V-Pixel)", i.teacher_steps, pl.stage1),
        (f"extraction: {views}/clip, once", None, pl.extraction),
        ("stage 2: student, cached targets", i.student_steps, pl.student_run_cached),
        ("stage 2: student, online teacher", i.student_steps, pl.student_run_online),
        (f"total, {runs}, cached", None, pl.total_cached),
        (f"total, {runs}, online", None, pl.total_online),
    ]
    lines = [
        f"teacher {i.teacher} {n.teacher / 1e6:.1f}M, student {i.student} {n.student / 1e6:.1f}M, "
        f"predictor {n.predictor_stage1 / 1e6:.1f}M (stage 1) / {n.predictor_stage2 / 1e6:.1f}M (stage 2)",
        f"{i.num_clips:,} clips x {views} x {pl.tokens_per_view} tokens, global batch {i.batch_size}"
        + (f" (stage 1: {i.teacher_batch_size})" if i.teacher_batch_size not in (None, i.batch_size) else "") + ", "
        f"context {i.context_fraction:g} x {i.masks_per_sample} masks",
        f"throughput {i.gpu_flops_per_s / 1e12:g} TFLOP/s per GPU training, {extract_rate / 1e12:g} extracting",
        "",
        f"{'':40} {'steps':>8} {'FLOPs':>9} {'GPU-hours':>10}",
        *(f"{name:40} {'' if steps is None else f'{steps:,}':>8} {c.flops:9.2e} {c.gpu_hours:10,.0f}" for name, steps, c in rows),
        "",
        f"target store  {pl.store_bytes / 1e12:.2f} TB ({pl.bytes_per_view / 1e6:.2f} MB per view, {i.storage.name()})",
        f"break-even    caching costs fewer FLOPs from student run {pl.break_even_runs} "
        f"(GPU-hours: from run {pl.break_even_runs_gpu_hours})",
        "",
        f"feeding one GPU: per core, decode {i.decode_clips_per_s_per_core:.3g} clips/s"
        + (f" (stage 2 {i.cached_video_samples_per_s_per_core:.3g} with its targets)" if i.cached_video_samples_per_s_per_core else "")
        + (f", {i.views_per_decode} views/decode {i.multiview_samples_per_s_per_core or i.views_per_decode * i.decode_clips_per_s_per_core:.3g} samples/s"
           if i.views_per_decode > 1 else "")
        + f", pixel cache {i.pixel_samples_per_s_per_core:.3g} samples/s ({i.pixel_mb_per_view:.2f} MB/view); "
        f"node of {i.gpus_per_node} GPUs, {i.cpu_cores_per_node} cores, {i.storage_mb_per_s_per_node:,.0f} MB/s storage",
        f"{'':32} {'clips/s/GPU':>11} {'decode cores/GPU':>16} {'store MB/s/GPU':>14} {'MB/s/node':>10} "
        f"{'binds':>8} {'GPU util':>8}",
        *(f"{f.stage:32} {f.clips_per_s_per_gpu:11,.1f} {f.decode_cores_per_gpu:16,.1f} "
          f"{f.target_mb_per_s_per_gpu:14,.0f} {f.target_mb_per_s_per_node:10,.0f} {f.binding:>8} "
          f"{f.gpu_utilisation:8.0%}" for f in pl.feeds),
    ]
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("s" if n != 1 else "")


def format_table10(rows: list[dict]) -> str:
    head = f"{'student':8} {'params':>7} {'stage 1':>9} {'stage 2':>9} {'total':>9} {'paper':>7} {'diff':>6} {'cached':>9}"
    lines = ["Table 10, SALT with a ViT-L teacher: 80k teacher + 160k student steps, batch 3072 (FLOPs)", head]
    for r in rows:
        diff = r["total_flops"] / r["paper_total_flops"] - 1
        lines.append(
            f"{r['student']:8} {r['student_params'] / 1e9:6.2f}B {r['stage1_flops']:9.2e} {r['stage2_flops']:9.2e} "
            f"{r['total_flops']:9.2e} {r['paper_total_flops']:7.1e} {diff:+6.1%} {r['total_flops_cached']:9.2e}"
        )
    lines.append("stage 2 and total count the teacher forward online, as the paper does; cached: with a target store")
    return "\n".join(lines)

