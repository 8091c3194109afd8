"""FLOP accounting for SALT: training FLOPs per stage, target-store bytes, GPU-hours, break-even.

6*N*D per trained token, 2*N*D per frozen forward, N counted exactly from the project's own
models. What it counts and leaves out: docs/cost-model.md. The input side (cores and store
bandwidth per GPU) is pipeline/feeding.py, which builds `make plan`'s full plan on `costs`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import ClassVar

import torch

from salt.config import Config, ConfigError, apply_overrides, from_dict
from salt.models.predictor import Predictor
from salt.models.vit import VIT_SIZES, VideoViT, token_grid, vit_size
from salt.storage import StorageFormat

# Effective training throughput per GPU when none is measured (docs/cost-model.md, "Throughput"):
# a round dense-bf16 peak at 40% model-FLOPs utilisation. Replace it with a measured value.
DEFAULT_PEAK_FLOPS_PER_S = 400e12
DEFAULT_MFU = 0.4
DEFAULT_GPU_FLOPS_PER_S = DEFAULT_PEAK_FLOPS_PER_S * DEFAULT_MFU

@dataclass(frozen=True, kw_only=True)
class CostInputs:
    """One planned SALT pipeline, as far as FLOPs and bytes go. Defaults are the paper's setting
    (docs/method.md)."""

    # checked in __post_init__; a subclass with fields of its own extends these
    positive_ints: ClassVar[tuple[str, ...]] = (
        "num_clips", "views_per_clip", "frames", "crop_size", "patch_size", "tubelet", "masks_per_sample",
        "student_steps", "batch_size", "predictor_width", "predictor_depth", "predictor_heads", "student_runs",
    )
    positive_or_none: ClassVar[tuple[str, ...]] = ("gpu_flops_per_s", "extract_flops_per_s", "compression_ratio",
                                                   "teacher_batch_size")

    num_clips: int = 3_600_000  # V-3.6M
    views_per_clip: int = 1  # stored augmented views per clip: multiplies extraction and store
    teacher: str = "vit_l"
    student: str = "vit_l"
    frames: int = 16
    crop_size: int = 224
    patch_size: int = 16
    tubelet: int = 2
    context_fraction: float = 0.1  # of the grid, per mask (masking ratio ~0.9)
    masks_per_sample: int = 2
    teacher_steps: int = 40_000  # 0: plan students of an existing teacher
    student_steps: int = 200_000
    # the global batch (optim.batch_size: samples per step over all GPUs, whatever their number)
    batch_size: int = 3072
    teacher_batch_size: int | None = None  # stage 1's global batch; None: batch_size
    storage: StorageFormat = field(default_factory=StorageFormat)  # as extract.dtype/keepbits/codec
    compression_ratio: float | None = None  # measured; None: StorageFormat.value_bytes' bound
    predictor_width: int = 384
    predictor_depth: int = 12
    predictor_heads: int = 12
    gpu_flops_per_s: float = DEFAULT_GPU_FLOPS_PER_S  # effective training FLOP/s per GPU
    extract_flops_per_s: float | None = None  # effective extraction FLOP/s per GPU; None: gpu_flops_per_s
    student_runs: int = 1  # student runs served by one teacher (and one store)

    def __post_init__(self) -> None:
        # Checked here so that a bad plan fails the same way from Python and from the CLI.
        for name in self.positive_ints:
            require(getattr(self, name) >= 1, name, "must be >= 1")
        for name in self.positive_or_none:
            value = getattr(self, name)
            require(value is None or value > 0, name, "must be > 0")
        require(self.teacher_steps >= 0, "teacher_steps", "must be >= 0")
        require(0 < self.context_fraction <= 1, "context_fraction", "must be in (0, 1]")
        for name in ("teacher", "student"):
            require(getattr(self, name) in VIT_SIZES, name, f"unknown size; known: {', '.join(VIT_SIZES)}")
        try:
            token_grid(self.frames, self.crop_size, self.tubelet, self.patch_size)
        except ValueError as e:
            raise ConfigError(f"plan: {e}") from None


def require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"plan.{name}: {why}")


@dataclass(frozen=True, kw_only=True)
class Params:
    teacher: int
    student: int
    predictor_stage1: int  # pixel head
    predictor_stage2: int  # student width in, teacher width out


@dataclass(frozen=True, kw_only=True)
class Cost:
    flops: float
    gpu_hours: float


@dataclass(frozen=True, kw_only=True)
class Costs:
    inputs: CostInputs
    tokens_per_view: int
    params: Params
    stage1: Cost
    extraction: Cost
    student_run_cached: Cost
    student_run_online: Cost
    total_cached: Cost  # stage 1 + extraction + student_runs cached runs
    total_online: Cost  # stage 1 + student_runs online runs
    bytes_per_view: float
    store_bytes: float
    break_even_runs: int  # fewest student runs for which caching costs fewer FLOPs
    break_even_runs_gpu_hours: int  # the same in GPU-hours (differs if extraction runs at another rate)


def tokens_per_view(inp: CostInputs) -> int:
    return math.prod(token_grid(inp.frames, inp.crop_size, inp.tubelet, inp.patch_size))


@lru_cache(maxsize=None)
def encoder_params(size: str, frames: int, crop_size: int, patch_size: int, tubelet: int) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = VideoViT(size, frames=frames, crop_size=crop_size, patch_size=patch_size, tubelet=tubelet)
    return sum(p.numel() for p in model.parameters())


@lru_cache(maxsize=None)
def predictor_params(
    encoder_width: int, out_dim: int, grid: tuple[int, int, int], width: int, depth: int, heads: int
) -> int:
    with torch.device("meta"):
        model = Predictor(encoder_width=encoder_width, out_dim=out_dim, grid=grid, width=width, depth=depth, heads=heads)
    return sum(p.numel() for p in model.parameters())


def count_params(inp: CostInputs) -> Params:
    geometry = (inp.frames, inp.crop_size, inp.patch_size, inp.tubelet)
    grid = token_grid(inp.frames, inp.crop_size, inp.tubelet, inp.patch_size)
    head = (inp.predictor_width, inp.predictor_depth, inp.predictor_heads)
    t_width, s_width = vit_size(inp.teacher).width, vit_size(inp.student).width
    pixels = 3 * inp.tubelet * inp.patch_size**2
    return Params(
        teacher=encoder_params(inp.teacher, *geometry),
        student=encoder_params(inp.student, *geometry),
        predictor_stage1=predictor_params(t_width, pixels, grid, *head),
        predictor_stage2=predictor_params(s_width, t_width, grid, *head),
    )


def train_flops(params: int, tokens: float) -> float:
    return 6 * params * tokens  # forward 2ND + backward 4ND


def forward_flops(params: int, tokens: int) -> int:
    return 2 * params * tokens  # int: keeps the break-even comparison exact


def stage1_flops_per_sample(inp: CostInputs, p: Params) -> float:
    t = tokens_per_view(inp)
    context = inp.context_fraction * inp.masks_per_sample * t
    return train_flops(p.teacher, context) + train_flops(p.predictor_stage1, inp.masks_per_sample * t)


def student_flops_per_sample(inp: CostInputs, p: Params) -> float:
    """Stage 2 without the teacher: what a student step costs with cached targets."""
    t = tokens_per_view(inp)
    context = inp.context_fraction * inp.masks_per_sample * t
    return train_flops(p.student, context) + train_flops(p.predictor_stage2, inp.masks_per_sample * t)


def teacher_forward_flops(inp: CostInputs, p: Params) -> int:
    """One frozen teacher forward of a view: what extraction pays per view, and online stage 2 per sample."""
    return forward_flops(p.teacher, tokens_per_view(inp))


def gpu_hours(flops: float, flops_per_s: float) -> float:
    return flops / flops_per_s / 3600


def break_even_runs(once: Fraction, saving_per_run: Fraction) -> int:
    """Fewest runs k >= 1 with once + k*cached < k*(cached + saving), i.e. k*saving > once.

    Fractions, so that an exact tie is not broken by float rounding either way.
    """
    return math.floor(once / saving_per_run) + 1


def costs(inp: CostInputs) -> Costs:
    p = count_params(inp)
    t = tokens_per_view(inp)
    train_rate = inp.gpu_flops_per_s
    extract_rate = inp.extract_flops_per_s or inp.gpu_flops_per_s
    samples_per_run = inp.student_steps * inp.batch_size
    teacher_fwd = teacher_forward_flops(inp, p)
    extraction = teacher_fwd * inp.num_clips * inp.views_per_clip
    teacher_fwd_per_run = teacher_fwd * samples_per_run
    per_sample_stage1 = stage1_flops_per_sample(inp, p)
    stage1 = per_sample_stage1 * inp.teacher_steps * (inp.teacher_batch_size or inp.batch_size)
    per_sample_cached = student_flops_per_sample(inp, p)
    cached = per_sample_cached * samples_per_run
    online = cached + teacher_fwd_per_run
    bytes_per_view = t * vit_size(inp.teacher).width * inp.storage.value_bytes(inp.compression_ratio)

    def cost(flops: float, rate: float = train_rate) -> Cost:
        return Cost(flops=float(flops), gpu_hours=gpu_hours(flops, rate))

    runs = inp.student_runs
    return Costs(
        inputs=inp,
        tokens_per_view=t,
        params=p,
        stage1=cost(stage1),
        extraction=cost(extraction, extract_rate),
        student_run_cached=cost(cached),
        student_run_online=cost(online),
        total_cached=Cost(
            flops=stage1 + extraction + runs * cached,
            gpu_hours=gpu_hours(stage1 + runs * cached, train_rate) + gpu_hours(extraction, extract_rate),
        ),
        total_online=cost(stage1 + runs * online),
        bytes_per_view=bytes_per_view,
        store_bytes=bytes_per_view * inp.num_clips * inp.views_per_clip,
        break_even_runs=break_even_runs(Fraction(extraction), Fraction(teacher_fwd_per_run)),
        break_even_runs_gpu_hours=break_even_runs(
            Fraction(extraction) / Fraction(extract_rate), Fraction(teacher_fwd_per_run) / Fraction(train_rate)
        ),
    )


def inputs_from_config(cfg: Config, kind: type[CostInputs] = CostInputs) -> CostInputs:
    """The plan of the run a training config describes: its geometry, model sizes, steps, global
    batches (each stage's optim.batch_size: a run on any number of GPUs trains on as many samples),
    views and storage format (data volume and throughput stay the paper's unless overridden), as
    `kind` (CostInputs or a subclass with more fields, at their defaults)."""
    m = cfg.model
    return kind(
        teacher=m.teacher, student=m.student, frames=cfg.data.frames, crop_size=cfg.data.crop_size,
        patch_size=m.patch_size, tubelet=m.tubelet, predictor_width=m.predictor_width,
        predictor_depth=m.predictor_depth, predictor_heads=m.predictor_heads,
        teacher_steps=cfg.teacher.optim.steps, student_steps=cfg.student.optim.steps,
        batch_size=cfg.student.optim.batch_size, teacher_batch_size=cfg.teacher.optim.batch_size,
        views_per_clip=cfg.extract.views_per_clip,
        storage=cfg.extract.storage,
    )


def inputs_from_overrides(items: list[str] | tuple[str, ...], base: CostInputs | None = None) -> CostInputs:
    """`key=value` strings on top of `base` (default: the paper's setting) -> inputs of base's class,
    through the configs' own override parser: an unknown key or a value of the wrong type is a
    ConfigError naming it."""
    base = base or CostInputs()
    tree = dataclasses.asdict(base)
    apply_overrides(tree, items, "plan")
    return from_dict(type(base), tree, "plan")


# Table 10 of the paper: SALT totals (x1e21 FLOPs) with a ViT-L teacher.
TABLE10_TOTALS = {"vit_l": 1.2e21, "vit_h": 1.5e21, "vit_g": 1.8e21, "vit_G": 2.6e21}


def table10() -> list[dict]:
    """The paper's table 10 SALT rows: 80k teacher steps + 160k online student steps, batch 3072."""
    rows = []
    for student, paper_total in TABLE10_TOTALS.items():
        inp = CostInputs(teacher="vit_l", student=student, teacher_steps=80_000, student_steps=160_000)
        pl = costs(inp)
        samples = inp.student_steps * inp.batch_size
        t = pl.tokens_per_view
        rows.append({
            "student": student,
            "teacher": inp.teacher,
            "student_params": pl.params.student,
            "teacher_params": pl.params.teacher,
            "predictor_params": pl.params.predictor_stage2,
            # the paper's D columns: stage-2 tokens seen by student encoder, predictor, teacher
            "De": inp.context_fraction * inp.masks_per_sample * t * samples,
            "Dp": inp.masks_per_sample * t * samples,
            "Dt": t * samples,
            "stage1_flops": pl.stage1.flops,
            "stage2_flops": pl.student_run_online.flops,
            "total_flops": pl.stage1.flops + pl.student_run_online.flops,
            "paper_total_flops": paper_total,
            # what the same schedule costs with a target store instead of an online teacher
            "total_flops_cached": pl.stage1.flops + pl.extraction.flops + pl.student_run_cached.flops,
        })
    return rows
