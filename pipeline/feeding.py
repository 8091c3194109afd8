"""What feeds a GPU: the CPU cores and store bandwidth each stage's input side needs, and the
fraction of its FLOP rate a node lets a GPU run at (docs/cost-model.md, "What feeds a GPU").

`plan` is `make plan`'s: salt.flops' costs of a pipeline plus one feed row per stage and
stage-2 input. The per-core rates are make bench's (`make plan` reads benchmarks.json).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from salt.flops import (CostInputs, Costs, costs, require, stage1_flops_per_sample, student_flops_per_sample,
                        teacher_forward_flops)


@dataclass(frozen=True, kw_only=True)
class PlanInputs(CostInputs):
    """A planned pipeline: its costs' inputs, plus the input side and the node."""

    positive_ints = (*CostInputs.positive_ints, "gpus_per_node", "cpu_cores_per_node", "views_per_decode")
    positive_or_none = (*CostInputs.positive_or_none, "decode_clips_per_s_per_core", "storage_mb_per_s_per_node",
                        "cached_video_samples_per_s_per_core", "multiview_samples_per_s_per_core",
                        "pixel_samples_per_s_per_core", "pixel_mb_per_view")

    # decode: clips/s one core decodes and crops (make bench's decode_clips_per_s_per_core:
    # 640x360 H.264). The node is an assumption to replace with yours: 8 GPUs, 128 cores, and a
    # storage share of 10 GB/s per node.
    decode_clips_per_s_per_core: float = 6.12
    cached_video_samples_per_s_per_core: float | None = None
    views_per_decode: int = 1  # > 1 adds the stage-2 row of that many views per decode
    multiview_samples_per_s_per_core: float | None = None
    # the pixel-cache loader (make bench's loader_pixels_samples_per_s_per_core and
    # pixel_cache_mb_per_view, on its 640x360 clip)
    pixel_samples_per_s_per_core: float = 20.0
    pixel_mb_per_view: float = 5.0
    gpus_per_node: int = 8
    cpu_cores_per_node: int = 128
    storage_mb_per_s_per_node: float = 10_000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.views_per_decode <= self.views_per_clip, "views_per_decode",
                f"{self.views_per_decode} views per decode need at least as many stored views (views_per_clip={self.views_per_clip})")


@dataclass(frozen=True, kw_only=True)
class Feed:
    """What one GPU of a stage consumes at full rate, and what the node lets it run at."""

    stage: str
    clips_per_s_per_gpu: float  # at gpu_flops_per_s (extract_flops_per_s for extraction)
    decode_cores_per_gpu: float  # CPU cores of input work: video decode, or the pixel cache's
    target_mb_per_s_per_gpu: float  # store bytes read (stage 2 cached: targets, and pixels) or written (extraction)
    target_mb_per_s_per_node: float
    binding: str  # "gpu", "decode" or "storage"
    gpu_utilisation: float  # the fraction of clips_per_s_per_gpu the node sustains


@dataclass(frozen=True, kw_only=True)
class Plan(Costs):
    inputs: PlanInputs
    feeds: list[Feed]  # stage 1, extraction, stage 2 cached (video, k views per decode, pixel cache), online


def feed(
    inp: PlanInputs, stage: str, flops_per_sample: float, rate: float, target_bytes_per_sample: float,
    samples_per_s_per_core: float | None = None,
) -> Feed:
    """samples_per_s_per_core: the input side's rate per core (default: one decode per sample)."""
    clips = rate / flops_per_sample
    decode_cores = clips / (samples_per_s_per_core or inp.decode_clips_per_s_per_core)
    target_mb = clips * target_bytes_per_sample / 1e6
    allowed = {  # the fraction of the GPU's rate each resource sustains
        "gpu": 1.0,
        "decode": (inp.cpu_cores_per_node / inp.gpus_per_node) / decode_cores,
        "storage": (inp.storage_mb_per_s_per_node / inp.gpus_per_node) / target_mb if target_mb else math.inf,
    }
    binding = min(allowed, key=allowed.get)  # ties go to the GPU (listed first)
    return Feed(
        stage=stage, clips_per_s_per_gpu=clips, decode_cores_per_gpu=decode_cores, target_mb_per_s_per_gpu=target_mb,
        target_mb_per_s_per_node=target_mb * inp.gpus_per_node, binding=binding, gpu_utilisation=allowed[binding],
    )


def plan(inp: PlanInputs) -> Plan:
    c = costs(inp)
    train_rate = inp.gpu_flops_per_s
    extract_rate = inp.extract_flops_per_s or inp.gpu_flops_per_s
    stage1 = stage1_flops_per_sample(inp, c.params)
    cached = student_flops_per_sample(inp, c.params)
    teacher_fwd = teacher_forward_flops(inp, c.params)
    k = inp.views_per_decode
    multiview = [feed(
        inp, f"stage 2: cached, {k} views/decode", cached, train_rate, c.bytes_per_view,
        inp.multiview_samples_per_s_per_core or k * inp.decode_clips_per_s_per_core,
    )] if k > 1 else []
    feeds = [
        feed(inp, "stage 1: teacher", stage1, train_rate, 0.0),
        feed(inp, "extraction", teacher_fwd, extract_rate, c.bytes_per_view),
        feed(inp, "stage 2: cached targets", cached, train_rate, c.bytes_per_view, inp.cached_video_samples_per_s_per_core),
        *multiview,
        feed(inp, "stage 2: cached, pixel cache", cached, train_rate,
             c.bytes_per_view + inp.pixel_mb_per_view * 1e6, inp.pixel_samples_per_s_per_core),
        feed(inp, "stage 2: online teacher", cached + teacher_fwd, train_rate, 0.0),
    ]
    return Plan(**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)}, feeds=feeds)
