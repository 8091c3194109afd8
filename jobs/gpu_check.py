"""make gpu-check: what only a GPU node can show, in one run of at most 8 minutes on one H100/H200.

(a) the tests marked gpu (tests/test_gpu.py); (b) a short chain on the GPU: teacher ->
extraction (Ray's graph where Ray is installed, else the actor's and the commit task's own
code in this process) -> student -> probe; (c) a bench: a ViT-L-shaped student step with
cached vs online targets (FLOP-ideal speedup, measured train/forward FLOP-rate ratio, MFU from
the planner's FLOPs), each stage-2 input mode's loader rate per core against the clips one GPU
consumes, the resize on the GPU, and extraction samples/s per GPU. Writes GPU_CHECK.md and
GPU_CHECK.json. Without a CUDA device it prints one line and exits 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from jobs.cli import entry, parser

# bf16 dense peak FLOP/s per GPU by device name, for MFU (vendor data sheets, SXM parts)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# the chain: the tiny config, few steps (it checks that the GPU path runs end to end, not learning)
CHAIN = ["teacher.optim.steps=20", "student.optim.steps=20", "teacher.optim.warmup_steps=2",
         "student.optim.warmup_steps=2", "probe.epochs=2", "data.num_workers=2"]
# the ViT-L bench: the paper's geometry (jobs/configs/vitl.yaml) at a batch one GPU holds
VITL_BATCH = 16
# (a) gets at most this much of the 8 minutes; (b) and (c) took about a minute each on a CPU at toy size
TESTS_TIMEOUT_S = 300
VITL = ["teacher.optim.steps=1", "teacher.optim.batch_size=2", "data.num_workers=0", f"student.optim.batch_size={VITL_BATCH}"]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def tests_part(bundle: Path) -> dict:
    """The gpu-marked tests, on the bundle's copy of the tests' dataset (its generator needs av
    and scikit-learn, which the node need not have)."""
    env = os.environ | {"SALT_TEST_DIGITS": str(bundle / "test-digits")}
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-rs", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                              capture_output=True, text=True, env=env, timeout=TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # the other parts still run; the report says so
        tail = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"returncode": None, "summary": f"timed out after {TESTS_TIMEOUT_S} s", "output_tail": tail[-4000:]}
    lines = done.stdout.strip().splitlines()
    return {"returncode": done.returncode, "summary": lines[-1] if lines else done.stderr[-500:],
            "output_tail": "\n".join(lines[-40:])}


def chain_part(data: str, work: Path, overrides: list[str]) -> dict:
    from pipeline.extract import extract_targets
    from experiments.probing import probe_checkpoint
    from experiments.runs import run_student, run_teacher
    from salt.config import load_config

    cfg = load_config("jobs/configs/tiny.yaml", [*CHAIN, *overrides])
    out, times = {}, {}
    t = time.perf_counter()
    out["teacher"] = run_teacher(cfg, data, work / "teacher", progress=False)
    times["teacher_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ray = installed("ray")
    out["extraction"] = extract_targets(cfg, data=data, teacher=str(work / "teacher"), store=str(work / "store"),
                                        progress=False, in_process=not ray)
    out["extraction"]["executor"] = "ray" if ray else "in process (Ray is not installed)"
    times["extraction_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out["student"] = run_student(cfg, data, str(work / "store"), work / "student", progress=False)
    times["student_s"] = time.perf_counter() - t
    t = time.perf_counter()
    probe = probe_checkpoint(str(work / "student"), cfg, data, work / "probe", progress=False)
    out["probe_top1"] = {task: r["top1"] for task, r in probe.items()}
    times["probe_s"] = time.perf_counter() - t
    return out | {"times": times}


def bench_part(data: str, video: bytes, work: Path, device: str = "cuda", overrides: tuple[str, ...] = ()) -> list[dict]:
    """(c); `device` and `overrides` (of the ViT-L config) let a CPU run it at a toy size, to check the code."""
    from experiments import bench
    from experiments.runs import run_teacher
    from pipeline.shards import list_shards
    from pipeline.loaders import ClipStream
    from salt.config import load_config
    from salt.devices import autocast
    from salt.models.teachers import load_teacher
    from salt.train.loop import prepare_batch

    cfg = load_config("jobs/configs/vitl.yaml", [*VITL, *overrides])
    run_teacher(cfg, data, work / "vitl-teacher", progress=False)  # one step: a ViT-L teacher run folder to load
    teacher = load_teacher(str(work / "vitl-teacher"), cfg, device)
    loaded = ClipStream(cfg, list_shards(data), batch_size=VITL_BATCH).batch(0)
    batch = prepare_batch(loaded, device, cfg.data)
    rows = bench.student_step_speedup(cfg, batch, teacher, pairs=10, label="_vitl")
    by_name = {r["name"]: r for r in rows}
    achieved = by_name["student_tflops_cached_vitl"]["value"] * 1e12
    name = torch.cuda.get_device_name() if device == "cuda" else device
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    rows.append(bench.row("student_mfu_vitl", achieved / peak if peak else float("nan"), "fraction", None,
                          f"6ND FLOP/s of the cached ViT-L student step over {name}'s bf16 dense peak "
                          f"({peak / 1e12:.0f} TFLOP/s)" if peak else f"no peak FLOP/s known for {name}"))

    def extract(i: int) -> None:  # the actor's GPU work on one batch: resize, bf16 forward, latents to the host
        clips = prepare_batch(loaded, device, cfg.data)["clips"]
        with torch.no_grad(), autocast(clips.device, cfg.teacher.bf16):
            teacher(clips).float().cpu()

    extract_rate = bench.timed_rate(extract, 5) * VITL_BATCH
    rows.append(bench.row("extract_samples_per_s_per_gpu_vitl", extract_rate, "samples/s", None,
                          f"ViT-L teacher forward (bf16) with the resize on the GPU, batch {VITL_BATCH}; decode and "
                          "writes excluded (CPU tasks and shard commits)"))
    consumed = VITL_BATCH / by_name["student_step_s_cached_vitl"]["value"]
    for r in bench.loader_rows(work, video=video):
        rows.append(r)
        if r["name"].startswith("loader_") and r["name"].endswith("_per_core"):
            mode = r["name"].removeprefix("loader_").removesuffix("_samples_per_s_per_core")
            rows.append(bench.row(f"cores_per_gpu_vitl_{mode}", consumed / r["value"], "cores", 4.0,
                                  f"measured ViT-L student consumption {consumed:.0f} samples/s per GPU over the "
                                  f"{mode} loader's rate per core; bound: 4 cores per GPU (issue 24)"))
    return rows


def write_report(report: dict, out: Path) -> None:
    (out / "GPU_CHECK.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    lines = ["# GPU check", "", f"Produced by `make gpu-check` on {report['device']}, torch {report['torch']}, "
             f"{report['wall_s']:.0f} s.", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {part} | {s:.0f} |" for part, s in report["part_s"].items()]
    lines += ["", *[f"- {note}" for note in report["notes"]]]
    if report["failed"]:
        lines += ["", f"**Failed: {', '.join(report['failed'])}.**"]
    fmt = lambda v: "" if v is None else f"{v:.4g}"
    renderers = {
        "tests": ("## (a) gpu tests", lambda t: [f"`{t['summary']}`", "", "```", t["output_tail"], "```"]),
        "chain": ("## (b) chain", lambda c: ["```", json.dumps(c, indent=1, default=str), "```"]),
        "bench": ("## (c) bench", lambda rows: [
            "| name | value | unit | bound | ratio | what |", "|---|---|---|---|---|---|",
            *[f"| `{r['name']}` | {fmt(r['value'])} | {r['unit']} | {fmt(r['bound'])} | {fmt(r['ratio'])} | {r['note']} |"
              for r in rows]]),
    }
    for name, (title, render) in renderers.items():
        if name in report:
            result = report[name]
            failed = isinstance(result, dict) and "error" in result  # the part raised: its traceback (run_parts)
            lines += ["", title, "", *(["```", result["error"], "```"] if failed else render(result))]
    (out / "GPU_CHECK.md").write_text("\n".join(lines) + "\n")


def run_parts(parts: dict[str, Callable[[Path], object]], report: dict) -> list[str]:
    """Runs each part in a scratch folder of its own, its result (or its traceback) and seconds into
    `report`; returns the names of the parts that failed, the gpu tests' failure counted too."""
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in parts.items():
            t = time.perf_counter()
            try:
                report[name] = run(Path(tmp) / name)
            except Exception:  # a GPU lease is short: one run reports every part's failure, not the first
                report[name] = {"error": traceback.format_exc().rstrip()}
                failed.append(name)
                print(report[name]["error"], file=sys.stderr, flush=True)
            report["part_s"][name] = time.perf_counter() - t
            print(f"gpu-check {name}: {report['part_s'][name]:.0f} s", flush=True)
    if report.get("tests", {}).get("returncode", 0) != 0:
        failed.append("tests")
    return failed


def main(argv: list[str] | None = None) -> dict | None:
    p = parser(__doc__, flags=(), help={"overrides": "dotted key=value overrides of the chain's (tiny) config"})
    p.add_argument("--bundle", default="gpu-bundle", help="make gpu-wheels' folder: data/, test-digits/, video-360p.mp4")
    p.add_argument("--out", default=".", help="folder for GPU_CHECK.md and GPU_CHECK.json")
    p.add_argument("--parts", default="abc", help="a: gpu tests, b: chain, c: bench")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return None
    bundle = Path(args.bundle)
    t0 = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "part_s": {}, "notes": []}
    for module, what in (("ray", "extraction runs in process, the GPU extraction test too"),
                         ("xformers", "the xformers-vs-SDPA test is skipped")):
        if not installed(module):
            report["notes"].append(f"{module} is not installed: {what}")
            print(f"{module} is not installed: {what}")
    parts = {"a": ("tests", lambda work: tests_part(bundle)),
             "b": ("chain", lambda work: chain_part(str(bundle / "data"), work, args.overrides)),
             "c": ("bench", lambda work: bench_part(str(bundle / "data"), (bundle / "video-360p.mp4").read_bytes(), work))}
    report["failed"] = run_parts({name: run for key, (name, run) in parts.items() if key in args.parts}, report)
    report["wall_s"] = time.perf_counter() - t0
    write_report(report, Path(args.out))
    print(f"gpu-check: {report['wall_s']:.0f} s -> {Path(args.out) / 'GPU_CHECK.md'}")
    if report["failed"]:
        raise SystemExit(f"gpu-check: failed parts: {', '.join(report['failed'])} (GPU_CHECK.md has each one's error)")
    return report


if __name__ == "__main__":
    entry(main)
