"""Video bytes -> a clip's uint8 crop box and flip bit, through one sample spec per (seed, key, view).

The resize, flip and normalisation into model input run on the model's device, in the
training step or the teacher's actor (`salt/clips.py`); here only for the probe's clips and a reference clip.

Every stage (teacher training, extraction, student, probe) goes through `decode_views`,
so they all pick the same frames, crop and flip for a sample. The clip hash is taken
over the decoded uint8 frames before any augmentation: it changes when the decoder or
the video changes, which is exactly when stored targets stop matching the pixels.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from salt.clips import resize_flip_normalise
from salt.config import DataConfig
from salt.seeds import sample_rng

DECODER = "decord"


def decoder_version() -> str:
    import decord

    return f"{DECODER} {decord.__version__}"


@dataclass(frozen=True)
class SampleSpec:
    frame_indices: tuple[int, ...]
    crop: tuple[int, int, int, int]  # top, left, height, width in source pixels
    flip: bool


def frame_step(cfg: DataConfig, video_fps: float) -> int:
    """Source frames between sampled frames: fixed, or from the video's own rate when cfg.fps is set."""
    if cfg.fps <= 0:
        return cfg.frame_step
    return max(1, round(video_fps / cfg.fps))


def frame_indices(num_frames: int, step: int, cfg: DataConfig, rng: np.random.Generator) -> tuple[int, ...]:
    """`cfg.frames` frames `step` apart; a video shorter than that repeats its last frame."""
    span = (cfg.frames - 1) * step + 1
    start = int(rng.integers(0, num_frames - span + 1)) if num_frames >= span else 0
    return tuple(min(start + i * step, num_frames - 1) for i in range(cfg.frames))


def crop_box(height: int, width: int, cfg: DataConfig, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Random resized crop box (area fraction and aspect ranges of the config), one per clip."""
    area = height * width
    log_lo, log_hi = math.log(cfg.crop_aspect[0]), math.log(cfg.crop_aspect[1])
    for _ in range(10):
        target = area * rng.uniform(*cfg.crop_area)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)  # fallback: the largest centred square
    return (height - side) // 2, (width - side) // 2, side, side


def spatial_crops(height: int, width: int, num: int) -> list[tuple[int, int, int, int]]:
    """Evaluation crop boxes (top, left, height, width): squares of the short side, at the
    centre (num=1), or at the start, centre and end of the long side (num=3: the multi-view
    protocol's three spatial views). On a square video every box is the whole frame."""
    if num not in (1, 3):
        raise ValueError(f"{num} spatial crops: want 1 (centre) or 3 (start, centre, end of the long side)")
    side = min(height, width)
    positions = (1,) if num == 1 else (0, 1, 2)  # in halves of the slack along the long side
    return [((height - side) * k // 2, (width - side) * k // 2, side, side) for k in positions]


def sample_spec(
    cfg: DataConfig, *, key: str, view: int, num_frames: int, height: int, width: int, video_fps: float = 0.0
) -> SampleSpec:
    rng = sample_rng(cfg.seed, key, view, "clip")
    indices = frame_indices(num_frames, frame_step(cfg, video_fps), cfg, rng)
    crop = crop_box(height, width, cfg, rng)
    return SampleSpec(frame_indices=indices, crop=crop, flip=bool(rng.random() < cfg.hflip_prob))


def clip_hash(frames: np.ndarray) -> str:
    h = hashlib.sha256(repr((frames.shape, str(frames.dtype))).encode())
    h.update(np.ascontiguousarray(frames).data)
    return h.hexdigest()


class VideoDecodeError(RuntimeError):
    pass


def decode_views(video: bytes, cfg: DataConfig, *, key: str, views: Sequence[int]) -> list[tuple[np.ndarray, SampleSpec]]:
    """Decode once for several views of a clip -> one (uint8 [T, H, W, 3], spec) per view.

    The container is opened once and the union of the views' frames decoded in one call
    (stage 2's data.views_per_decode). What that saves depends on how much the views' windows
    share (make bench's loader_views2 row, BENCHMARKS.md)."""
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(video), ctx=decord.cpu(0), num_threads=cfg.decode_threads)
        num_frames = len(reader)
        if num_frames == 0:
            raise VideoDecodeError("video has no frames")
        height, width = reader[0].shape[:2]
        # the spec needs the frame size, and decord reports it only through a frame
        fps = reader.get_avg_fps()
        specs = [
            sample_spec(cfg, key=key, view=v, num_frames=num_frames, height=height, width=width, video_fps=fps)
            for v in views
        ]
        unique = sorted({i for spec in specs for i in spec.frame_indices})
        decoded = reader.get_batch(unique).asnumpy()
    except VideoDecodeError:
        raise
    except Exception as e:  # decord raises bare DECORDError/RuntimeError for every kind of bad file
        raise VideoDecodeError(f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}") from None
    if decoded.shape[1:] != (height, width, 3):  # decord mis-sizes some narrow videos instead of failing
        raise VideoDecodeError(f"decoder returned frames of shape {decoded.shape[1:]} for a {width}x{height} video")
    position = {frame: i for i, frame in enumerate(unique)}
    return [(decoded[[position[i] for i in spec.frame_indices]], spec) for spec in specs]


def decode(video: bytes, cfg: DataConfig, *, key: str, view: int) -> tuple[np.ndarray, SampleSpec]:
    """Decode the spec's frames -> (uint8 [T, H, W, 3], spec)."""
    return decode_views(video, cfg, key=key, views=[view])[0]


def crop(frames: np.ndarray, spec: SampleSpec) -> np.ndarray:
    """uint8 [T, H, W, 3] -> the spec's crop box, still uint8 [T, h, w, 3] (a view, no copy)."""
    top, left, h, w = spec.crop
    return frames[:, top : top + h, left : left + w]


def augment(frames: np.ndarray, spec: SampleSpec, cfg: DataConfig) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> normalised float32 [3, T, S, S] here: crop, resize, flip (the probe's clips)."""
    return resize_flip_normalise(torch.from_numpy(crop(frames, spec)), spec.flip, cfg)


def load_crops(video: bytes, cfg: DataConfig, *, key: str, views: Sequence[int]) -> list[tuple[torch.Tensor, bool, str]]:
    """The one path from bytes to what a loader ships: (uint8 crop box [T, h, w, 3], flip, clip hash)
    per view, one decode. `salt/clips.py: model_clips` makes the model input on the training device."""
    return [
        (torch.from_numpy(np.ascontiguousarray(crop(frames, spec))), spec.flip, clip_hash(frames))
        for frames, spec in decode_views(video, cfg, key=key, views=views)
    ]


def load_clip(video: bytes, cfg: DataConfig, *, key: str, view: int) -> tuple[torch.Tensor, str]:
    """A view's model input on the CPU, and its clip hash (a reference for tests and tools)."""
    box, flip, digest = load_crops(video, cfg, key=key, views=[view])[0]
    return resize_flip_normalise(box, flip, cfg), digest
