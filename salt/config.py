"""Typed configs: keyword-only dataclasses, YAML files and dotted `key=value` overrides.

An unknown key anywhere (file or override) is an error naming the key, never a silent
default: a typo in a sweep must not quietly train the default model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from salt.storage import Codec, StorageFormat, StoredDtype

# Enum-like fields: the allowed values live in the type, and loading checks them.
Attention = Literal["auto", "sdpa", "xformers"]
RopePairing = Literal["interleaved", "vjepa2"]
PixelLoss = Literal["l1", "mse"]
Projection = Literal["none", "orthogonal", "gaussian"]
StageTwoInput = Literal["video", "pixels"]
ProbeNorm = Literal["none", "standardize", "whiten"]
ProbeProtocol = Literal["default", "vjepa2"]


@dataclass(kw_only=True)
class DataConfig:
    seed: int = 0  # dataset seed: every random choice of a sample derives from (seed, key, view)
    frames: int = 16
    frame_step: int = 4
    fps: float = 0.0  # > 0: sample at this many frames per second (step from each video's fps) instead of frame_step
    crop_size: int = 224
    crop_area: tuple[float, float] = (0.3, 1.0)
    crop_aspect: tuple[float, float] = (0.75, 1.35)
    hflip_prob: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = 1
    decode_threads: int = 1
    # Samples pass through a seeded buffer of this many before batching, so a batch mixes
    # shards; 0 or 1 keeps the shard-by-shard order. The order stays a function of (seed, epoch).
    shuffle_buffer: int = 256
    # Decode less (docs/design.md, "Feeding the GPUs"). views_per_decode: one decode serves this
    # many views of a clip, all in the same batch (repeated augmentation; stage 2 takes them from
    # the store's views_per_clip; batch_size must be a multiple). stage2_input=pixels: stage 2
    # reads the clips the teacher saw from the store's pixel cache (extract.pixel_cache=true)
    # and decodes no video.
    views_per_decode: int = 1
    stage2_input: StageTwoInput = "video"
    # Stage 2: a clip that no longer decodes or no longer hashes to what its teacher saw. 0: the
    # first one stops the run (the loader raises, naming it). > 0: each is skipped, replaced by a
    # seeded other clip of the epoch (the batch keeps its size), logged with its key and counted;
    # the run stops, naming them, once more than this fraction of the dataset's clips has failed
    # (docs/training-at-scale.md, "Bad clips").
    max_bad_fraction: float = 0.0

    def __post_init__(self):
        if self.views_per_decode < 1:
            raise ConfigError(f"data.views_per_decode={self.views_per_decode}: want at least 1")
        if not 0 <= self.max_bad_fraction < 1:
            raise ConfigError(f"data.max_bad_fraction={self.max_bad_fraction}: want a fraction in [0, 1)")


@dataclass(kw_only=True)
class ModelConfig:
    patch_size: int = 16
    tubelet: int = 2
    teacher: str = "vit_l"
    student: str = "vit_l"
    predictor_width: int = 384
    predictor_depth: int = 12
    predictor_heads: int = 12
    attention: Attention = "auto"
    # which frequency each rotated pair of dims gets (salt/models/vit.py: Rope3d); "vjepa2" makes a
    # trained encoder exportable to V-JEPA 2's and transformers' layouts (docs/export.md)
    rope_pairing: RopePairing = "interleaved"
    # stage 1 targets: per-tubelet normalised pixels (docs/method.md); false: the clip's pixels as they are
    pixel_norm: bool = True
    pixel_loss: PixelLoss = "l1"  # stage 1 distance (the paper names both; stage 2 is always L1)


@dataclass(kw_only=True)
class BlockMaskConfig:
    num_blocks: int
    spatial_scale: float
    temporal_scale: float = 1.0
    aspect_ratio: tuple[float, float] = (0.75, 1.5)


def _default_generators() -> list[BlockMaskConfig]:
    return [
        BlockMaskConfig(num_blocks=8, spatial_scale=0.15),  # short-range
        BlockMaskConfig(num_blocks=2, spatial_scale=0.7),  # long-range
    ]


@dataclass(kw_only=True)
class MaskConfig:
    generators: list[BlockMaskConfig] = field(default_factory=_default_generators)
    # stage 2 only: draw new masks each pass over a stored view (the store holds every token, so
    # they cost nothing); false reuses epoch 0's masks. Measured on the transfer control: REPLICATION.md
    fresh_per_epoch: bool = True


@dataclass(kw_only=True)
class OptimConfig:
    steps: int = 40_000
    # The global batch: samples per optimizer step over all ranks, whatever the world size
    # (docs/training-at-scale.md). Each rank takes its share in micro-batches of at most
    # micro_batch_size samples, accumulated before the step; 0: one micro-batch per rank.
    batch_size: int = 3072
    micro_batch_size: int = 0
    warmup_steps: int = 10_000
    start_lr: float = 2e-4
    lr: float = 6.25e-4
    final_lr: float = 1e-6
    weight_decay: tuple[float, float] = (0.04, 0.4)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 0.02


@dataclass(kw_only=True)
class LogConfig:
    """Where a training run's log goes besides metrics.jsonl (salt/train/runlog.py). The writers are
    off by default, need the `track` extra, and write on rank 0 only."""

    # TensorBoard event files in tensorboard_dir (relative: from the run folder)
    tensorboard: bool = False
    tensorboard_dir: str = "tensorboard"
    # Weights & Biases, offline only (never a network call): <run>/wandb/offline-run-*, uploaded
    # later, if ever, with `wandb sync`
    wandb: bool = False
    wandb_project: str = "salt"
    # the device's dense bf16 peak in TFLOP/s, the denominator of MFU. None: by device kind
    # (salt/train/runlog.py: PEAK_TFLOPS); 0: unknown, so no MFU is logged
    peak_tflops: float | None = None

    def __post_init__(self):
        if self.peak_tflops is not None and self.peak_tflops < 0:
            raise ConfigError(f"log.peak_tflops={self.peak_tflops}: want a peak in TFLOP/s, 0 for unknown")


@dataclass(kw_only=True)
class TrainConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0  # model initialisation
    log_every: int = 10
    checkpoint_every: int = 1000
    bf16: bool = True  # autocast on CUDA only; CPU runs in fp32
    torch_threads: int = 0  # 0: torch's default (all cores); measured faster here than leaving a core to the loader
    # > 0: keep the encoder every this many steps in snapshots/step-NNNNNN/ (probe-able run folders,
    # with the mean training loss of the steps before it), for choosing checkpoints by loss
    snapshot_every: int = 0
    log_samples: bool = False  # write samples.rank<r>.jsonl: the (key, view) of every sample each rank trained on
    # Memory and speed switches (salt/train/switches.py), off by default: recompute each
    # encoder and predictor block in the backward pass instead of keeping its activations;
    # torch.compile each block (inductor; the first steps pay the compile)
    activation_checkpointing: bool = False
    compile: bool = False
    log: LogConfig = field(default_factory=LogConfig)


@dataclass(kw_only=True)
class ExtractConfig:
    views_per_clip: int = 1
    dtype: StoredDtype = "float16"
    keepbits: int = 0  # > 0: numcodecs BitRound to this many mantissa bits before the codec (lossy)
    codec: Codec = "none"  # lossless, after bit-rounding
    batch_size: int = 8
    num_actors: int = 1
    actor_num_cpus: float = 1.0
    actor_torch_threads: int = 1
    decode_num_cpus: float = 1.0
    # a fixed seeded random projection of the teacher's tokens to projection_dim (for very wide
    # teachers: store and student head shrink by width / projection_dim); recorded in store.json
    projection: Projection = "none"
    projection_dim: int = 0
    projection_seed: int = 0
    # also store each view's uint8 crop box (the pixels the teacher saw, before resize and flip),
    # compressed, so stage 2 can train with data.stage2_input=pixels and decode no video
    pixel_cache: bool = False
    # shard commits running at once (each holds one shard's latents in a worker's memory);
    # 0: sized from the cluster (pipeline/extract.py: commits_in_flight)
    commits_in_flight: int = 0

    @property
    def storage(self) -> StorageFormat:
        return StorageFormat.of(self)

    def __post_init__(self):
        StorageFormat.of(self)  # a keepbits out of range for the dtype fails here, at load time
        if self.commits_in_flight < 0:
            raise ConfigError(f"extract.commits_in_flight={self.commits_in_flight}: expected 0 (sized from the cluster) or more")
        if (self.projection == "none") != (self.projection_dim == 0):
            raise ConfigError(
                f"extract.projection={self.projection!r} with extract.projection_dim={self.projection_dim}: "
                "set a positive projection_dim exactly when a projection is chosen"
            )


# probe.protocol: the value each protocol gives a ProbeConfig field left at None. "default" is the
# project's reading on the embedded data (docs/yardstick.md); "vjepa2" is V-JEPA 2's frozen evaluation
# (its configs/eval/vitl/ssv2.yaml and eval.py; every number and its source: docs/method.md).
PROBE_PROTOCOLS: dict[str, dict[str, Any]] = {
    "default": {"depth": 1, "heads": 0, "batch_size": 64, "lrs": [1e-2, 3e-3], "wds": [0.01, 0.1],
                "warmup_epochs": 1, "norm": "standardize", "eval_crops": 1, "segments": 1, "train_views": 1,
                "augment": False},
    "vjepa2": {"depth": 4, "heads": 16, "batch_size": 256, "lrs": [5e-3, 3e-3, 1e-3, 3e-4, 1e-4],
               "wds": [0.01, 0.1, 0.4, 0.8], "warmup_epochs": 0, "norm": "none", "eval_crops": 3, "segments": 2,
               # augmented views cached per train clip: chosen by measurement (docs/evaluation.md)
               "train_views": 4, "augment": True},
}


@dataclass(kw_only=True)
class ProbeConfig:
    """Frozen-encoder readouts (docs/method.md, "Evaluation"; docs/evaluation.md; the choices measured
    in docs/yardstick.md). A field left at None takes the value of `protocol` (PROBE_PROTOCOLS);
    readers take `resolved()`."""

    protocol: ProbeProtocol = "default"
    depth: int | None = None  # blocks; the last one is the cross-attention from one learned query
    heads: int | None = None  # 0: the encoder's head count
    epochs: int = 20
    batch_size: int | None = None  # the global batch of the heads (split over ranks) and of the encoder
    # heads of the grid, each its own init: every (lr, wd) pair, trained in one pass
    lrs: list[float] | None = None
    wds: list[float] | None = None
    warmup_epochs: int | None = None
    # tokens go through this map, fitted on the train split, before the attentive probe: standardize
    # (per feature, a BatchNorm without affine), whiten (ZCA: a diagnostic), none
    norm: ProbeNorm | None = None
    # this share of the train split chooses the head (and the linear readout's l2); the rest trains
    select_fraction: float = 0.2
    # the attentive probe runs for probe seeds seed .. seed + seeds - 1 (mean +- sd); 0: not at all
    # (the linear readout is the reported top-1, k-NN beside it: neither has a seed)
    seeds: int = 3
    # the cheap readouts on mean-pooled standardised tokens: cosine k-NN and logistic regression
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_l2s: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2])
    # The multi-view protocol: eval_views temporal windows (seeded per view, as in training) x
    # eval_crops spatial crops (1: centre square; 3: start, centre and end of the long side) per
    # val video, softmax averaged over all of them. 1 x 1 is the fast protocol.
    eval_views: int = 1
    eval_crops: int | None = None
    # segments > 1: that many temporal windows per sample, evenly spaced over the video, their tokens
    # concatenated into one sample (V-JEPA 2's num_segments), train and val alike; needs eval_views=1
    segments: int | None = None
    # augmented views of each train clip, encoded once and cached; epoch e trains on view e mod train_views
    train_views: int | None = None
    # train views get a random resized crop (crop_area, crop_aspect; never flipped) instead of the centre square
    augment: bool | None = None
    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_aspect: tuple[float, float] = (0.75, 4 / 3)
    # the feature cache (docs/evaluation.md): a store shard holds up to this many clips of one source
    # shard (what one commit holds in memory); cache: its folder ("": <probe output>/features)
    clips_per_shard: int = 64
    cache: str = ""
    seed: int = 0

    def __post_init__(self):
        if self.eval_views < 1:
            raise ConfigError(f"probe.eval_views={self.eval_views}: want at least 1")
        if self.eval_crops not in (None, 1, 3):
            raise ConfigError(f"probe.eval_crops={self.eval_crops}: want 1 (centre) or 3 (start, centre, end)")
        if self.seeds < 0:
            raise ConfigError(f"probe.seeds={self.seeds}: want 0 (no attentive probe) or more")
        if not 0 < self.select_fraction < 1:
            raise ConfigError(f"probe.select_fraction={self.select_fraction}: want a share strictly between 0 and 1")
        for name in ("segments", "train_views", "batch_size", "clips_per_shard"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"probe.{name}={value}: want at least 1")
        if self.segments is not None and self.segments > 1 and self.eval_views > 1:
            raise ConfigError(f"probe.segments={self.segments} with probe.eval_views={self.eval_views}: evenly spaced "
                              "segments replace seeded windows; set probe.eval_views=1")

    def resolved(self) -> ProbeConfig:
        """Every None field filled with its protocol's value (PROBE_PROTOCOLS)."""
        preset = PROBE_PROTOCOLS[self.protocol]
        filled = {k: v for k, v in preset.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **{k: list(v) if isinstance(v, list) else v for k, v in filled.items()})


@dataclass(kw_only=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskConfig = field(default_factory=MaskConfig)
    teacher: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    student: TrainConfig = field(default_factory=lambda: TrainConfig(optim=OptimConfig(steps=200_000)))
    probe: ProbeConfig = field(default_factory=ProbeConfig)


class ConfigError(ValueError):
    pass


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):  # `X | None`
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is Literal:  # enum-like strings: checked here, at load time, with the allowed values
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}={value!r}: expected one of {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, str):  # "3.6e6": YAML 1.1 reads an exponent without a sign as a string
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field left out
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError:
        raise
    except ValueError as e:  # a class's own check, e.g. StorageFormat: "keepbits=12: expected ..."
        raise ConfigError(f"{where}.{e}") from None


def to_dict(cfg: Any) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def _set_dotted(tree: dict, dotted: str, value: Any, root: str = "config") -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
        elif part not in node:
            raise ConfigError(f"unknown key {root}.{'.'.join(parts[: i + 1])} in override {dotted}=...")
        else:
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif last not in node:
        raise ConfigError(f"unknown key {root}.{dotted} in override {dotted}=... (known: {', '.join(sorted(node))})")
    else:
        node[last] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `a.b=value` overrides (values parsed as YAML scalars/lists)."""
    tree = to_dict(Config())
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        _merge(tree, loaded, "config")
    apply_overrides(tree, overrides, "config")
    return from_dict(Config, tree)


def with_overrides(cfg: Config, *overrides: str) -> Config:
    """A copy of a loaded config with more `key=value` overrides (checked like a file's)."""
    tree = to_dict(cfg)
    apply_overrides(tree, overrides, "config")
    return from_dict(Config, tree)


def apply_overrides(tree: dict, overrides: list[str] | tuple[str, ...], root: str) -> None:
    """`a.b=value` strings into a plain tree (values parsed as YAML); the one override syntax of
    every job. Types are checked afterwards, by `from_dict`."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw), root)


def _merge(base: dict, update: dict, where: str) -> None:
    for k, v in update.items():
        if k not in base:
            raise ConfigError(f"unknown key {where}.{k} (known: {', '.join(sorted(base))})")
        if isinstance(base[k], dict) and isinstance(v, dict):
            _merge(base[k], v, f"{where}.{k}")
        else:
            base[k] = v
