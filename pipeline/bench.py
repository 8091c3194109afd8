"""Benchmarks, each a ratio of two things measured side by side in one process.

Absolute seconds on a shared machine drift from run to run; a ratio of two
measurements taken back to back mostly does not. Every function returns rows of
`{"name", "value", "unit", "bound", "ratio", "command"}` (bound: what the value is
compared with; ratio: value / bound).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Callable

import av
import numpy as np
import torch

from pipeline.video import augment, clip_hash, decode
from salt.config import Config, DataConfig

COMMAND = "make bench"


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
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    buf = io.BytesIO()
    container = av.open(buf, mode="w", format="mp4")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return buf.getvalue()


def timed_rate(fn: Callable[[int], object], count: int) -> float:
    """Calls per second of fn(i) for i in range(count), after one warm-up call."""
    fn(-1)
    t0 = time.perf_counter()
    for i in range(count):
        fn(i)
    return count / (time.perf_counter() - t0)


def decode_throughput(clips: int = 40) -> list[dict]:
    """decode + sample + augment per core, default geometry (16 x 224^2, step 4) on 360p.

    Bound: decoding the same frames without the augmentation, in the same process.
    """
    torch.set_num_threads(1)  # per core: one decode thread, one torch thread
    video = real_resolution_video()
    cfg = DataConfig()

    def full(i: int) -> None:
        frames, spec = decode(video, cfg, key=f"clip{i}", view=0)
        clip_hash(frames)
        augment(frames, spec, cfg)

    def decode_only(i: int) -> None:
        decode(video, cfg, key=f"clip{i}", view=0)

    bound = timed_rate(decode_only, clips)
    value = timed_rate(full, clips)
    return [
        row("decode_clips_per_s_per_core", value, "clips/s", bound, "640x360 H.264, 300 frames; bound: decode only"),
    ]


def student_step_speedup(cfg: Config, batch: dict, teacher: torch.nn.Module, steps: int = 6) -> list[dict]:
    """Step time with a live frozen teacher over step time with cached targets, same student and batch,
    next to the same ratio from the 6ND/2ND FLOP accounting of this batch's real token counts."""
    from salt.flops import forward_flops, train_flops
    from salt.train.loop import train_step
    from salt.train.student import build_student_state, cached_targets, online_targets

    state = build_student_state(cfg, teacher.width)
    with torch.no_grad():
        batch = batch | {"targets": teacher(batch["clips"])}
    online = online_targets(teacher)

    def step(make_targets) -> float:
        t0 = time.perf_counter()
        train_step(state, batch, make_targets(batch), cfg.student)
        return time.perf_counter() - t0

    step(cached_targets), step(online)  # warm-up
    cached_s = np.median([step(cached_targets) for _ in range(steps)])
    online_s = np.median([step(online) for _ in range(steps)])
    n_student = sum(p.numel() for p in state.encoder.parameters())
    n_pred = sum(p.numel() for p in state.predictor.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    ctx = sum(int(m.ctx_valid.sum()) for m in batch["masks"])
    pred = sum(int(m.ctx_valid.sum() + m.tgt_valid.sum()) for m in batch["masks"])
    cached_flops = train_flops(n_student, ctx) + train_flops(n_pred, pred)
    online_flops = cached_flops + forward_flops(n_teacher, batch["clips"].shape[0] * teacher.num_tokens)
    ideal = online_flops / cached_flops
    measured = float(online_s / cached_s)
    return [
        row("student_speedup_cached_vs_online", measured, "x", ideal, "bound: student_speedup_flop_ideal"),
        row("student_speedup_flop_ideal", ideal, "x", None, "6ND/2ND on this batch's real token counts"),
        row("student_step_s_cached", float(cached_s), "s", float(online_s), "bound: step with the online teacher"),
    ]


def array_bytes_per_sample(store: str | Path) -> float:
    """Bytes of the Zarr arrays alone (manifests and provenance excluded) per stored sample."""
    from pipeline.targets import TargetStore, shard_dir, store_bytes

    target_store = TargetStore(store)
    arrays = sum(store_bytes(shard_dir(store, s) / "c") for s in target_store.shards)
    rows = sum(len(target_store.manifest(s)) for s in target_store.shards)
    return arrays / rows
