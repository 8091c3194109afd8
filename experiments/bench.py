"""Benchmarks, each a ratio of two things measured side by side in one process.

Absolute seconds on a shared machine drift from run to run; a ratio of two
measurements taken back to back mostly does not. Every function returns rows of
`{"name", "value", "unit", "bound", "ratio", "command"}` (bound: what the value is
compared with; ratio: value / bound).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zarr

from pipeline import fs
from pipeline.extract import extract_targets
from pipeline.feeding import PlanInputs, plan
from pipeline.shards import list_shards, write_shard
from experiments.runs import run_student, run_teacher
from pipeline.store import pixel_codec
from pipeline.store.layout import row_crc32, shard_dir, store_bytes
from pipeline.store.provenance import PIXEL_CACHE, open_store, provenance
from pipeline.store.read import TargetStore, pixel_cache_summary, read_tables
from pipeline.store.write import ExtractedRow, commit_shard
from pipeline.loaders import ClipStream, TargetStream
from pipeline.video import clip_hash, crop, decode, decode_views, load_crops
from salt.config import Config, DataConfig, load_config, with_overrides
from salt.flops import DEFAULT_GPU_FLOPS_PER_S, forward_flops, train_flops
from salt.checkpoint import load_checkpoint
from salt.devices import default_device
from salt.train.loop import prepare_batch, train_step
from salt.train.student import build_student_state, cached_targets, online_targets
from salt.models.teachers import load_teacher
from salt.storage import StorageFormat

COMMAND = "make bench"
# On top of the given config (make bench: the tiny one): 64x64 crops (512 tokens), since at the
# demo's 128 tokens a CPU step is mostly fixed overhead, which says little about the GPU case
# the speedup figures are for.
OVERRIDES = ["data.crop_size=64"]
# The bench's teachers are for timing and for extraction's plumbing, not for quality: 2 steps.
QUICK_TEACHER = ["teacher.optim.steps=2", "teacher.optim.batch_size=4", "data.num_workers=0"]


def bench_config(config: str, *overrides: str) -> Config:
    """The config every benchmark derives its runs from: `config`, then OVERRIDES, then the user's."""
    return load_config(config, [*OVERRIDES, *overrides])


def row(name: str, value: float, unit: str, bound: float | None, note: str = "") -> dict:
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "bound": bound,
        "ratio": value / bound if bound else None,
        "command": COMMAND,
        "note": note,
    }


def real_resolution_video(width: int = 640, height: int = 360, frames: int = 300, fps: int = 30) -> bytes:
    """10 s of 360p H.264 with moving texture: the size of a typical Kinetics clip."""
    from pipeline.digits import encode_mp4  # PyAV: make gpu-wheels writes this video for GPU nodes without it
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    return encode_mp4(np.stack([np.roll(base, 3 * i, axis=1) for i in range(frames)]), fps=fps)


def timed_rate(fn: Callable[[int], object], count: int) -> float:
    """Calls per second of fn(i) for i in range(count), after one warm-up call."""
    fn(-1)
    t0 = time.perf_counter()
    for i in range(count):
        fn(i)
    return count / (time.perf_counter() - t0)


def decode_throughput(clips: int = 40) -> list[dict]:
    """What a loader does per clip, per core: decode, hash and crop (`load_crops`; the resize runs
    on the training device), default geometry (16 frames, step 4) on 360p.

    Bound: decoding the same frames without the hash and crop, in the same process.
    """
    torch.set_num_threads(1)  # per core: one decode thread, one torch thread
    video = real_resolution_video()
    cfg = DataConfig()

    def full(i: int) -> None:
        load_crops(video, cfg, key=f"clip{i}", views=[0])

    def decode_only(i: int) -> None:
        decode(video, cfg, key=f"clip{i}", view=0)

    bound = timed_rate(decode_only, clips)
    value = timed_rate(full, clips)
    return [
        row("decode_clips_per_s_per_core", value, "clips/s", bound,
            "640x360 H.264, 300 frames: decode, hash, uint8 crop (no resize); bound: decode only"),
    ]


# ViT-L-shaped targets at the default geometry (16 x 224^2, 16^2 patches, tubelet 2): 1568 x 1024
VITL_TOKENS, VITL_WIDTH = 1568, 1024
LOADER_MODES = {  # row suffix: stage-2 input overrides
    "video": [],
    "views2": ["data.views_per_decode=2"],
    "pixels": ["data.stage2_input=pixels"],
}


def realistic_store(work: Path, clips: int = 8, views: int = 2, video: bytes | None = None) -> tuple[str, str]:
    """One source shard of 640x360 H.264 clips and a store of `views` views each, with random
    ViT-L-shaped fp16 targets (the loader's cost does not depend on their values; a CPU ViT-L
    forward would take minutes) and the pixel cache. The rows are what extraction writes:
    real clip hashes, crop boxes and sample specs, through the store's own writer and store.json,
    whose teacher is only a width and a note. `video`: real_resolution_video()'s bytes, made here
    when not given."""
    video = video or real_resolution_video()
    source = work / "realistic" / "shard-000000.tar"
    source.parent.mkdir(parents=True, exist_ok=True)
    keys = [f"clip{i:03d}" for i in range(clips)]
    write_shard(source, [{"__key__": k, "mp4": video} for k in keys])
    cfg, rng = load_config(None, [f"extract.views_per_clip={views}", "extract.pixel_cache=true"]), np.random.default_rng(0)
    rows = []
    for key in keys:
        for view, (frames, spec) in enumerate(decode_views(video, cfg.data, key=key, views=range(views))):
            box = crop(frames, spec)
            latents = rng.standard_normal((VITL_TOKENS, VITL_WIDTH), dtype=np.float32).astype(np.float16)
            rows.append(ExtractedRow(key, view, clip_hash(frames), spec.frame_indices, spec.crop, spec.flip, latents,
                                     pixels=pixel_codec.encode(box), pixels_crc32=row_crc32(box)))
    store = str(work / "realistic-store")
    teacher = {"width": VITL_WIDTH, "note": "make bench: random ViT-L-shaped targets"}
    store_id = open_store(store, provenance(cfg, data=str(source.parent), split="train", teacher=teacher, shards=[str(source)]), None)
    commit_shard(store, "shard-000000", rows, [], fmt=cfg.extract.storage, store_id=store_id, pixel_cache=True)
    return str(source), store


def loader_rows(work: Path, batches: int = 8, video: bytes | None = None) -> list[dict]:
    """Stage-2 loader capacity per input mode on one core: samples/s of TargetStream batches
    (read, check and convert the targets, masks, and the uint8 crop box from video or from the
    pixel cache: the loader does no resize), the resize that the training step does instead on
    its device, and what the planner makes of each loader rate for a ViT-L student (the paper's
    setting, the planner's default 160 TFLOP/s effective per GPU, 16 cores per GPU)."""
    torch.set_num_threads(1)
    source, store = realistic_store(work, video=video)
    rates = {}
    for mode, overrides in LOADER_MODES.items():
        dataset = TargetStream(load_config(None, overrides), [source], batch_size=2, store=store)
        rates[mode] = timed_rate(lambda g: dataset.batch(max(g, 0)), batches) * 2
    device = default_device()
    loaded = dataset.batch(0)

    def resize(i: int) -> None:
        prepare_batch(loaded, device, DataConfig())
        if device.type == "cuda":
            torch.cuda.synchronize()

    resize_rate = timed_rate(resize, batches) * len(loaded["crops"])
    cache = pixel_cache_summary(read_tables(store)[0], PIXEL_CACHE)  # what make inspect reports
    pixel_mb, raw_mb = cache["bytes_per_sample"] / 1e6, cache["raw_bytes_per_sample"] / 1e6
    rows = [row(f"loader_{mode}_samples_per_s_per_core", rates[mode], "samples/s", rates["video"],
                f"stage-2 TargetStream, {overrides or 'one view per decode'}, 640x360 H.264 -> uint8 crop box (resized on "
                f"the training device: resize row), "
                f"{VITL_TOKENS}x{VITL_WIDTH} fp16 targets; bound: from video, one view per decode")
            for mode, overrides in LOADER_MODES.items()]
    rows.append(row(f"resize_samples_per_s_{device.type}", resize_rate, "samples/s", rates["pixels"],
                    f"the training step's prepare_batch on {device.type} (one thread on a CPU): copy, resize to "
                    "16x224x224, flip, normalise, of the stage-2 crops above; no loader core pays it; bound: the "
                    "pixel-cache loader's rate"))
    rows.append(row("pixel_cache_mb_per_view", pixel_mb, "MB", raw_mb,
                    "pixels.bin bytes per view (blosc-zstd of the uint8 crop box; synthetic texture, not natural "
                    "video); bound: the raw crop box"))
    paper = PlanInputs(views_per_clip=2, views_per_decode=2, cached_video_samples_per_s_per_core=rates["video"],
                       multiview_samples_per_s_per_core=rates["views2"], pixel_samples_per_s_per_core=rates["pixels"],
                       pixel_mb_per_view=pixel_mb)
    feeds = {f.stage: f for f in plan(paper).feeds}
    stages = {"video": "stage 2: cached targets", "views2": "stage 2: cached, 2 views/decode", "pixels": "stage 2: cached, pixel cache"}
    for mode, stage in stages.items():
        f = feeds[stage]
        bound = 4.0 if mode == "pixels" else 12.0  # issue 24: the pixel cache at <= 4 cores per GPU
        rows.append(row(f"plan_cores_per_gpu_vitl_{mode}", f.decode_cores_per_gpu, "cores", bound,
                        f"make plan views_per_clip=2 views_per_decode=2 with these rates: ViT-L student at "
                        f"{f.clips_per_s_per_gpu:.0f} clips/s per GPU; {f.binding} binds at {f.gpu_utilisation:.0%} "
                        f"({f.target_mb_per_s_per_node:,.0f} MB/s per node); bound: {bound:g} cores per GPU"))
    return rows


def student_step_speedup(cfg: Config, batch: dict, teacher: torch.nn.Module, pairs: int = 20, label: str = "") -> list[dict]:
    """Step time with a live frozen teacher over step time with cached targets, same student and batch,
    next to the same ratio from the 6ND/2ND FLOP accounting of this batch's real token counts.

    Cached and online steps alternate (A B A B ...) and the ratio is taken per adjacent pair, so a
    neighbour that slows the machine for a while slows both sides of the pairs it touches; the
    median ratio is reported with its interquartile range."""
    device = batch["clips"].device  # where prepare_batch put the clips: the CPU here, a GPU in make gpu-check
    state = build_student_state(cfg, teacher.width)
    state.encoder.to(device), state.predictor.to(device), teacher.to(device)
    with torch.no_grad():
        batch = batch | {"targets": teacher(batch["clips"])}
    online = online_targets(teacher, bf16=cfg.student.bf16)  # same precision as the student's step on CUDA

    def step(make_targets) -> float:
        t0 = time.perf_counter()
        train_step(state, batch, make_targets(batch), cfg.student)
        if device.type == "cuda":  # the step no longer reads its loss back: wait for its kernels
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    step(cached_targets), step(online)  # warm-up
    timed = np.array([(step(cached_targets), step(online)) for _ in range(pairs)])  # [pairs, (cached, online)]
    ratios = timed[:, 1] / timed[:, 0]
    q1, q3 = np.percentile(ratios, [25, 75])
    cached_s, online_s = np.median(timed, axis=0)
    n_student = sum(p.numel() for p in state.encoder.parameters())
    n_pred = sum(p.numel() for p in state.predictor.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    ctx = sum(int(m.ctx_valid.sum()) for m in batch["masks"])
    pred = sum(int(m.ctx_valid.sum() + m.tgt_valid.sum()) for m in batch["masks"])
    cached_flops = train_flops(n_student, ctx) + train_flops(n_pred, pred)
    online_flops = cached_flops + forward_flops(n_teacher, batch["clips"].shape[0] * teacher.num_tokens)
    ideal = online_flops / cached_flops
    # 6ND/2ND assume a training step runs at the FLOP rate of a frozen forward; where it runs at
    # r times that rate, the speedup is 1 + (ideal - 1) * r: this is r, from the same pairs
    teacher_s = float(np.median(timed[:, 1] - timed[:, 0]))
    rate_ratio = (cached_flops / cached_s) / ((online_flops - cached_flops) / teacher_s)
    sizes = f"teacher {cfg.model.teacher}, student {cfg.model.student}"
    return [
        row(f"student_speedup_cached_vs_online{label}", float(np.median(ratios)), "x", ideal,
            f"{sizes}: median of {pairs} adjacent (cached, online) step pairs, IQR {q1:.3f}-{q3:.3f}; "
            f"bound: student_speedup_flop_ideal{label}"),
        row(f"student_speedup_flop_ideal{label}", ideal, "x", None, f"{sizes}: 6ND/2ND on this batch's real token counts"),
        row(f"student_step_s_cached{label}", float(cached_s), "s", float(online_s), f"{sizes}: bound: step with the online teacher"),
        row(f"student_tflops_cached{label}", cached_flops / cached_s / 1e12, "TFLOP/s", DEFAULT_GPU_FLOPS_PER_S / 1e12,
            f"{sizes}: 6ND FLOPs of the cached step (this batch's real token counts) per second; bound: the "
            "planner's assumed effective GPU rate"),
        row(f"train_over_forward_flop_rate{label}", rate_ratio, "x", 1.0,
            f"{sizes}: 6ND FLOP/s of the cached student step over 2ND FLOP/s of the teacher forward (online minus "
            "cached step time); the FLOP-ideal assumes 1"),
    ]


def array_bytes_per_sample(store: str | Path) -> float:
    """Bytes of the Zarr arrays alone (manifests and provenance excluded) per stored sample."""
    target_store = TargetStore(store)
    arrays = sum(store_bytes(fs.join(shard_dir(store, s), "c")) for s in target_store.shards)
    rows = sum(len(target_store.manifest(s)) for s in target_store.shards)
    return arrays / rows


def relative_error(reference: str | Path, other: str | Path) -> float:
    """mean |other - reference| / mean |reference| over every stored row."""
    diff = total = 0.0
    for shard in TargetStore(reference).shards:
        a = zarr.open_array(shard_dir(reference, shard), mode="r")[:].astype(np.float64)
        b = zarr.open_array(shard_dir(other, shard), mode="r")[:].astype(np.float64)
        diff += np.abs(a - b).sum()
        total += np.abs(a).sum()
    return diff / total


FP16 = StorageFormat(dtype="float16")
FORMATS: dict[str, tuple[StorageFormat, list[str]]] = {  # name: format, other extract overrides; fp32 is the reference
    "fp32": (StorageFormat(dtype="float32"), []),
    "fp16": (FP16, []),
    "fp16_zstd": (StorageFormat(dtype="float16", codec="zstd"), []),
    "fp16_br7_blosc": (StorageFormat(dtype="float16", keepbits=7, codec="blosc"), []),
    "fp16_br5_blosc": (StorageFormat(dtype="float16", keepbits=5, codec="blosc"), []),
    # the bench teacher (vit_cpu_s) is 96 wide: a fixed orthogonal projection to half of it
    "fp16_proj48": (FP16, ["extract.projection=orthogonal", "extract.projection_dim=48"]),
}


def format_overrides(name: str) -> list[str]:
    fmt, extra = FORMATS[name]
    return [*fmt.overrides(), *extra]


# two teacher actors on a 2-core machine: each gets half a CPU so the decode tasks still run
TWO_ACTORS = ["extract.num_actors=2", "extract.actor_num_cpus=0.5", "extract.decode_num_cpus=0.5"]


def extraction_rows(cfg, data: str, teacher_dir: str, work: Path) -> tuple[list[dict], dict]:
    """End-to-end extraction against the teacher's forward alone on pre-decoded clips,
    and each storage format's bytes and error against fp32."""
    stores, summaries = {}, {}
    for name in FORMATS:
        stores[name] = str(work / f"store-{name}")
        summaries[name] = extract_targets(with_overrides(cfg, *format_overrides(name)), data=data, teacher=teacher_dir, store=stores[name], progress=False)
    samples = summaries["fp16"]["samples"]
    torch.set_num_threads(cfg.extract.actor_torch_threads)  # what one actor gets
    teacher = load_teacher(teacher_dir, cfg)
    dataset = ClipStream(cfg, list_shards(data), batch_size=cfg.extract.batch_size)
    t0 = time.perf_counter()
    clips = [prepare_batch(dataset.batch(g), "cpu", cfg.data)["clips"] for g in range(samples // cfg.extract.batch_size)]
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for c in clips:
            teacher(c)
    forward_s = time.perf_counter() - t0
    forward_rate = len(clips) * cfg.extract.batch_size / forward_s
    extract_rate = samples / summaries["fp16"]["wall_s"]
    two = extract_targets(with_overrides(cfg, *format_overrides("fp16"), *TWO_ACTORS), data=data, teacher=teacher_dir,
                          store=str(work / "store-fp16-2actors"), progress=False)
    rows = [
        row("extract_vs_forward_only", extract_rate / forward_rate, "x", 1.0,
                  f"end to end {extract_rate:.1f} samples/s (Ray start included) vs forward only {forward_rate:.1f}"),
        row("extract_2_actors_vs_1", samples / two["wall_s"] / extract_rate, "x", None,
            f"end to end with {' '.join(TWO_ACTORS)}: {samples / two['wall_s']:.1f} samples/s, shards written by "
            f"{len(two['shard_writers'])} worker process(es), teacher forwards by {len(two['forward_workers'])}; bound: one actor"),
        row("write_overhead_fraction", summaries["fp16"]["write_s"] / forward_s, "fraction", None,
                  "shard commit seconds (Ray tasks in worker processes, off the driver) / teacher forward seconds, fp16 store"),
        row("decode_over_forward", decode_s / forward_s, "fraction", None,
            f"decode+augment {decode_s:.1f} s vs forward {forward_s:.1f} s vs write {summaries['fp16']['write_s']:.1f} s, "
            f"{len(clips) * cfg.extract.batch_size} clips, one core each"),
    ]
    fp32 = array_bytes_per_sample(stores["fp32"])
    for name in FORMATS:
        if name == "fp32":
            continue
        bound = 0.51 if name == "fp16" else None
        rows.append(row(f"bytes_ratio_{name}", array_bytes_per_sample(stores[name]) / fp32, "x", bound,
                              f"array bytes per sample over fp32's {fp32:.0f}"))
        if "br" in name:
            rows.append(row(f"target_error_{name}", relative_error(stores["fp32"], stores[name]), "fraction", None,
                                  "mean |stored - fp32| / mean |fp32|"))
    return rows, {"stores": stores, "teacher": teacher}


def short_student(cfg: Config, data: str, store: str, out: Path, steps: int = 40) -> dict:
    run_cfg = with_overrides(cfg, f"student.optim.steps={steps}", "data.num_workers=1")
    return run_student(run_cfg, data, store, out, progress=False)


# The paper's headline comparison (teacher and student of one size) has a small FLOP-ideal speedup
# with its real masks (two masks with a small context each: the student encoder runs twice per
# sample; BENCHMARKS.md's student_speedup_flop_ideal), so caching is also measured with a teacher
# 6x the student's parameters, the setting a store of a big teacher serving small students is for.
BIG_TEACHER = "vit_cpu_m"


def student_rows(cfg, data: str, stores: dict[str, str], teacher, work: Path) -> list[dict]:
    loaded = TargetStream(cfg, list_shards(data), batch_size=cfg.student.optim.batch_size, store=stores["fp16"]).batch(0)
    batch = prepare_batch(loaded, default_device(), cfg.data)
    big_cfg = with_overrides(cfg, f"model.teacher={BIG_TEACHER}", *QUICK_TEACHER)
    run_teacher(big_cfg, data, work / "teacher-big", progress=False)
    big_teacher = load_teacher(str(work / "teacher-big"), big_cfg)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = student_step_speedup(cfg, batch, teacher)
    rows += student_step_speedup(big_cfg, batch, big_teacher, label="_big_teacher")
    fp16 = short_student(cfg, data, stores["fp16"], work / "student-fp16")
    rows.append(row("data_wait_fraction", fp16["data_wait_fraction"], "fraction", 0.10,
                          "time waiting on the loader / step time, 40 student steps, 1 loader worker"))
    for name in (n for n in stores if "br" in n or "proj" in n):
        lossy = short_student(cfg, data, stores[name], work / f"student-{name}")
        what = "targets projected 96 -> 48 wide (their own task)" if "proj" in name else "same targets, rounded"
        rows.append(row(f"student_loss_{name}_vs_fp16", lossy["final_loss"], "loss", fp16["final_loss"],
                              f"final loss (mean of last 10 of 40 steps), same student, seed and batches; {what}"))
    return rows


def held_out_mask_loss(cfg: Config, data: str, store: str, run_dir: Path, batches: int) -> float:
    """A trained student's loss on the first `batches` of the store's samples under masks drawn
    for a far epoch (1000), so neither a fresh-mask nor a fixed-mask run has trained on them."""
    target_store = TargetStore(store)
    state = build_student_state(cfg, target_store.teacher_width)
    load_checkpoint(run_dir, state.modules(), state.optimizer)
    state.model.eval()
    eval_cfg = replace(cfg, masking=replace(cfg.masking, fresh_per_epoch=True))
    dataset = TargetStream(eval_cfg, list_shards(data), batch_size=cfg.student.optim.batch_size, store=store)
    first = 1000 * dataset.batches_per_epoch
    with torch.no_grad():
        losses = [
            state.model(b["clips"], b["masks"], cached_targets(b)).item()
            for b in (prepare_batch(dataset.batch(g), "cpu", cfg.data) for g in range(first, first + batches))
        ]
    return float(np.mean(losses))


def mask_freshness_rows(cfg: Config, data: str, store: str, work: Path, steps: int = 200, eval_batches: int = 8) -> list[dict]:
    """Stage 2 with masks drawn fresh every epoch vs epoch 0's masks every epoch: same store,
    seed and sample order; scored on masks neither run trained on."""
    losses = {}
    for name, fresh in (("fresh", True), ("fixed", False)):
        run_cfg = with_overrides(cfg, f"student.optim.steps={steps}", "data.num_workers=1", f"masking.fresh_per_epoch={str(fresh).lower()}")
        run_student(run_cfg, data, store, work / f"masks-{name}", progress=False)
        losses[name] = held_out_mask_loss(run_cfg, data, store, work / f"masks-{name}", eval_batches)
    return [
        row("held_out_mask_loss_fixed_vs_fresh", losses["fixed"], "loss", losses["fresh"],
            f"student loss on unseen masks after {steps} steps with epoch 0's masks reused (bound: fresh masks each epoch), "
            f"{eval_batches} batches"),
    ]
