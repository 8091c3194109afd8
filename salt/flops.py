"""Cost planner for SALT: training FLOPs per stage, target-store bytes, GPU-hours, break-even.

The accounting is the paper's (Appendix F, docs/method.md "Compute accounting"): training a
model of N parameters on D tokens costs 6*N*D FLOPs, a frozen forward 2*N*D, with N
counted exactly (embeddings included) from the project's own models on the meta device.
Per sample (T tokens per clip, c = context fraction per mask, m masks per sample):

- stage 1, teacher (V-Pixel):  6*Ne*(c*m*T) + 6*Np1*(m*T)
- extraction, once per view:   2*Nt*T
- stage 2, cached targets:     6*Ns*(c*m*T) + 6*Np2*(m*T)
- stage 2, online teacher:     the same + 2*Nt*T

The predictor sees m*T tokens because, per mask, context + mask tokens cover the grid.
Np1 has a pixel head (3*tubelet*patch^2 outputs), Np2 a head of the teacher's width
fed from the student's width, so the two predictors differ by a few hundred thousand
parameters.

Break-even: caching replaces the online teacher forward of every step of every run by
one forward per stored view. So (extraction + k cached runs) < (k online runs) exactly
when k * teacher_forward_per_run > extraction; in FLOPs that is
k > stored views / samples per run, whatever the model sizes.

Where this accounting differs
-----------------------------
- 6ND counts parameter matmuls only. Attention scores and values (4*n*d per token per
  layer, forward) are ignored; they grow with the sequence length n, so they matter for
  the teacher's full 1568-token forward (about +25% for ViT-L), even more for the narrow
  predictor over 1568 tokens per mask (about +65%), and little for the student's ~160
  context tokens. Caching therefore saves somewhat more than shown here.
- Norms, biases' adds, GELU, RoPE, the losses and the optimizer update are ignored.
- Token counts are nominal: the real multi-block masks leave a variable context (about
  10% per mask) and the reference loader truncates each batch to its smallest mask.
- The paper counts the teacher's forward inside stage 2 because its teacher runs
  online (table 10). With a target store that cost is paid once per stored view
  (extraction) and a student run is "cached"; both variants are reported.
- Table 10 uses rounded parameter counts (Ne = 0.3B, Ns = 0.6B for ViT-H, 1.8B for
  ViT-G, one 0.022B predictor) and prints totals to two digits; exact counts land within
  3% of them (ViT-g: 1.85e21 against table 10's 1.8, tables 1 and 11 print 1.9).
- GPU-hours are FLOPs divided by an effective throughput: no data loading, decoding,
  target reads, communication, checkpointing or evaluation. The feed rows say whether the
  input side can keep up (below).

What feeds a GPU
----------------
At the stated throughput a GPU consumes `gpu_flops_per_s / FLOPs per sample` clips per
second. The input side costs CPU cores ("decode" below) and store bandwidth per sample:
- stage 1, extraction, stage 2 online: one decode per sample, `clips/s /
  decode_clips_per_s_per_core` cores;
- stage 2 cached from video: the same decode, plus reading and checking the stored view, at
  `cached_video_samples_per_s_per_core` (make bench's stage-2 loader; unset: the decode rate);
- stage 2 cached, k views per decode (data.views_per_decode, needs views_per_clip >= k):
  `multiview_samples_per_s_per_core` (measured at this k; unset: k x the decode rate, the
  decode shared and the crops free, an upper bound);
- stage 2 cached from the pixel cache (extract.pixel_cache, data.stage2_input=pixels): no video;
  reading and decompressing the stored crop at `pixel_samples_per_s_per_core`, and
  `pixel_mb_per_view` more from the store per sample.
The loaders ship uint8 crop boxes: the resize to model input runs on the training GPU (its
cost there is make bench's resize row, not counted here), so no row pays a core for it.
Stage 2 cached reads one stored view per sample and extraction writes one. A node offers
`cpu_cores_per_node / gpus_per_node` cores and `storage_mb_per_s_per_node / gpus_per_node`
MB/s to each GPU; the GPU runs at the fraction of its rate the scarcest of the three allows,
and that resource binds. The video bytes the decoders read, augmentation beyond the crop
and host-to-device copies are not counted.
- Store bytes are the raw array bytes (TB = 1e12 B); Zarr metadata and Arrow manifests
  are ignored. For bit-rounded stores the compression ratio is an estimate.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import torch

from salt.config import Config, ConfigError, apply_overrides, from_dict
from salt.models.predictor import Predictor
from salt.models.vit import VIT_SIZES, VideoViT, token_grid, vit_size
from salt.storage import StorageFormat

# Effective training throughput per GPU when none is measured: a round dense-bf16 peak
# of 400 TFLOP/s (between A100's 312 and H100 SXM's 989) at 40% model-FLOPs
# utilisation. Replace it with a measured value: the paper's own A100 timings
# (table 11) imply only ~40-55 TFLOP/s under this same 6ND count.
DEFAULT_PEAK_FLOPS_PER_S = 400e12
DEFAULT_MFU = 0.4
DEFAULT_GPU_FLOPS_PER_S = DEFAULT_PEAK_FLOPS_PER_S * DEFAULT_MFU

_POSITIVE_INTS = (
    "num_clips",
    "views_per_clip",
    "frames",
    "crop_size",
    "patch_size",
    "tubelet",
    "masks_per_sample",
    "student_steps",
    "batch_size",
    "predictor_width",
    "predictor_depth",
    "predictor_heads",
    "student_runs",
    "gpus_per_node",
    "cpu_cores_per_node",
    "views_per_decode",
)


@dataclass(frozen=True, kw_only=True)
class PlanInputs:
    """One planned SALT pipeline. Defaults are the paper's setting (docs/method.md)."""

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
    batch_size: int = 3072
    storage: StorageFormat = field(default_factory=StorageFormat)  # as extract.dtype/keepbits/codec
    compression_ratio: float | None = None  # measured; None: StorageFormat.value_bytes' bound
    predictor_width: int = 384
    predictor_depth: int = 12
    predictor_heads: int = 12
    gpu_flops_per_s: float = DEFAULT_GPU_FLOPS_PER_S  # effective training FLOP/s per GPU
    extract_flops_per_s: float | None = None  # effective extraction FLOP/s per GPU; None: gpu_flops_per_s
    student_runs: int = 1  # student runs served by one teacher (and one store)
    # The input side (see "What feeds a GPU"). decode: clips/s one core decodes and crops
    # (make bench's decode_clips_per_s_per_core: 640x360 H.264; make plan reads benchmarks.json).
    # The node is an assumption to replace with yours: 8 GPUs, 128 cores, and a storage share of
    # 10 GB/s per node.
    decode_clips_per_s_per_core: float = 6.12
    cached_video_samples_per_s_per_core: float | None = None
    views_per_decode: int = 1  # > 1 adds the stage-2 row of that many views per decode
    multiview_samples_per_s_per_core: float | None = None
    # the pixel-cache loader (make bench's loader_pixels_samples_per_s_per_core and
    # pixel_cache_mb_per_view, on its 640x360 clip; make plan reads them from benchmarks.json)
    pixel_samples_per_s_per_core: float = 20.0
    pixel_mb_per_view: float = 5.0
    gpus_per_node: int = 8
    cpu_cores_per_node: int = 128
    storage_mb_per_s_per_node: float = 10_000.0

    def __post_init__(self) -> None:
        # Checked here so that a bad plan fails the same way from Python and from the CLI.
        for name in _POSITIVE_INTS:
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        _require(self.teacher_steps >= 0, "teacher_steps", "must be >= 0")
        _require(0 < self.context_fraction <= 1, "context_fraction", "must be in (0, 1]")
        _require(self.views_per_decode <= self.views_per_clip, "views_per_decode",
                 f"{self.views_per_decode} views per decode need at least as many stored views (views_per_clip={self.views_per_clip})")
        for name in ("gpu_flops_per_s", "extract_flops_per_s", "compression_ratio", "decode_clips_per_s_per_core",
                     "storage_mb_per_s_per_node", "cached_video_samples_per_s_per_core", "multiview_samples_per_s_per_core", "pixel_samples_per_s_per_core",
                     "pixel_mb_per_view"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, "must be > 0")
        for name in ("teacher", "student"):
            _require(getattr(self, name) in VIT_SIZES, name, f"unknown size; known: {', '.join(VIT_SIZES)}")
        try:
            token_grid(self.frames, self.crop_size, self.tubelet, self.patch_size)
        except ValueError as e:
            raise ConfigError(f"plan: {e}") from None


def _require(ok: bool, name: str, why: str) -> None:
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
class Plan:
    inputs: PlanInputs
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
    feeds: list[Feed]  # stage 1, extraction, stage 2 cached (video, k views per decode, pixel cache), online


def tokens_per_view(inp: PlanInputs) -> int:
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


def count_params(inp: PlanInputs) -> Params:
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


def stage1_flops_per_sample(inp: PlanInputs, p: Params) -> float:
    t = tokens_per_view(inp)
    context = inp.context_fraction * inp.masks_per_sample * t
    return train_flops(p.teacher, context) + train_flops(p.predictor_stage1, inp.masks_per_sample * t)


def student_flops_per_sample(inp: PlanInputs, p: Params) -> float:
    """Stage 2 without the teacher: what a student step costs with cached targets."""
    t = tokens_per_view(inp)
    context = inp.context_fraction * inp.masks_per_sample * t
    return train_flops(p.student, context) + train_flops(p.predictor_stage2, inp.masks_per_sample * t)


def gpu_hours(flops: float, flops_per_s: float) -> float:
    return flops / flops_per_s / 3600


def break_even_runs(once: Fraction, saving_per_run: Fraction) -> int:
    """Fewest runs k >= 1 with once + k*cached < k*(cached + saving), i.e. k*saving > once.

    Fractions, so that an exact tie is not broken by float rounding either way.
    """
    return math.floor(once / saving_per_run) + 1


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
    p = count_params(inp)
    t = tokens_per_view(inp)
    train_rate = inp.gpu_flops_per_s
    extract_rate = inp.extract_flops_per_s or inp.gpu_flops_per_s
    samples_per_run = inp.student_steps * inp.batch_size
    teacher_fwd = forward_flops(p.teacher, t)
    extraction = teacher_fwd * inp.num_clips * inp.views_per_clip
    teacher_fwd_per_run = teacher_fwd * samples_per_run
    per_sample_stage1 = stage1_flops_per_sample(inp, p)
    stage1 = per_sample_stage1 * inp.teacher_steps * inp.batch_size
    per_sample_cached = student_flops_per_sample(inp, p)
    cached = per_sample_cached * samples_per_run
    online = cached + teacher_fwd_per_run
    bytes_per_view = t * vit_size(inp.teacher).width * inp.storage.value_bytes(inp.compression_ratio)

    def cost(flops: float, rate: float = train_rate) -> Cost:
        return Cost(flops=float(flops), gpu_hours=gpu_hours(flops, rate))

    runs = inp.student_runs
    k = inp.views_per_decode
    multiview = [feed(
        inp, f"stage 2: cached, {k} views/decode", per_sample_cached, train_rate, bytes_per_view,
        inp.multiview_samples_per_s_per_core or k * inp.decode_clips_per_s_per_core,
    )] if k > 1 else []
    feeds = [
        feed(inp, "stage 1: teacher", per_sample_stage1, train_rate, 0.0),
        feed(inp, "extraction", teacher_fwd, extract_rate, bytes_per_view),
        feed(inp, "stage 2: cached targets", per_sample_cached, train_rate, bytes_per_view,
             inp.cached_video_samples_per_s_per_core),
        *multiview,
        feed(inp, "stage 2: cached, pixel cache", per_sample_cached, train_rate,
             bytes_per_view + inp.pixel_mb_per_view * 1e6, inp.pixel_samples_per_s_per_core),
        feed(inp, "stage 2: online teacher", per_sample_cached + teacher_fwd, train_rate, 0.0),
    ]
    return Plan(
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
        feeds=feeds,
    )


def inputs_from_config(cfg: Config) -> PlanInputs:
    """The plan of the run a training config describes: its geometry, model sizes, steps, batch,
    views and storage format (data volume and throughput stay the paper's unless overridden)."""
    m = cfg.model
    return PlanInputs(
        teacher=m.teacher, student=m.student, frames=cfg.data.frames, crop_size=cfg.data.crop_size,
        patch_size=m.patch_size, tubelet=m.tubelet, predictor_width=m.predictor_width,
        predictor_depth=m.predictor_depth, predictor_heads=m.predictor_heads,
        teacher_steps=cfg.teacher.optim.steps, student_steps=cfg.student.optim.steps,
        batch_size=cfg.student.optim.batch_size, views_per_clip=cfg.extract.views_per_clip,
        storage=cfg.extract.storage,
    )


def inputs_from_overrides(items: list[str] | tuple[str, ...], base: PlanInputs | None = None) -> PlanInputs:
    """`key=value` strings on top of `base` (default: the paper's setting) -> PlanInputs, through
    the configs' own override parser: an unknown key or a value of the wrong type is a ConfigError naming it."""
    tree = dataclasses.asdict(base or PlanInputs())
    apply_overrides(tree, items, "plan")
    return from_dict(PlanInputs, tree, "plan")


# Table 10 of the paper: SALT totals (x1e21 FLOPs) with a ViT-L teacher.
TABLE10_TOTALS = {"vit_l": 1.2e21, "vit_h": 1.5e21, "vit_g": 1.8e21, "vit_G": 2.6e21}


def table10() -> list[dict]:
    """The paper's table 10 SALT rows: 80k teacher steps + 160k online student steps, batch 3072."""
    rows = []
    for student, paper_total in TABLE10_TOTALS.items():
        inp = PlanInputs(teacher="vit_l", student=student, teacher_steps=80_000, student_steps=160_000)
        pl = plan(inp)
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
