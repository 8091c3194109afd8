"""uint8 crop boxes -> the clips a model sees, on the device that runs the model.

Loaders and extraction's decode tasks ship each sample's crop box as uint8 [T, h, w, 3]
(sizes differ within a batch: the random resized crop) with its flip bit; the training
step's batch preparation (`salt/train/loop.py: prepare_batch`) and extraction's teacher
actor (`pipeline/extract.py`) both turn them into model input here, on their device. One
function on one kind of device is what makes the student's clips the teacher's: on CPU
bit for bit, on CUDA the same kernels (a CPU resize and a CUDA one differ in the last bits).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from salt.config import DataConfig
from salt.devices import to_device


def resize_flip_normalise(cropped: torch.Tensor, flip: bool, cfg: DataConfig) -> torch.Tensor:
    """uint8 [T, h, w, 3] on any device -> normalised float32 [3, T, S, S]: resize, flip, normalise."""
    x = cropped.permute(0, 3, 1, 2).float()  # [T, 3, h, w]
    x = F.interpolate(x, size=(cfg.crop_size, cfg.crop_size), mode="bilinear", align_corners=False, antialias=True)
    if flip:
        x = x.flip(-1)
    # built on the host and copied without blocking: torch.tensor(list, device=cuda) waits on the device
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1).mul(255).to(x.device, non_blocking=True)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1).mul(255).to(x.device, non_blocking=True)
    return ((x - mean) / std).permute(1, 0, 2, 3).contiguous()  # [3, T, S, S]


def model_clips(
    crops: Sequence[torch.Tensor], flips: Sequence[bool] | torch.Tensor, cfg: DataConfig, device: torch.device | str
) -> torch.Tensor:
    """A batch's uint8 crop boxes (any sizes) and flip bits -> clips [B, 3, T, S, S] on `device`.

    One crop at a time: they differ in size, and a list of them keeps the loaders free of padding
    (each is a few kernels; make bench's resize row measures what that costs per sample)."""
    return torch.stack([resize_flip_normalise(to_device(c, device), bool(f), cfg) for c, f in zip(crops, flips)])
