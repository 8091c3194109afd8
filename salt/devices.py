"""Where models run and at what precision: shared by training, extraction and the benchmark."""

from __future__ import annotations

import contextlib

import torch

from salt.config import TrainConfig


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_torch_threads(train: TrainConfig) -> None:
    """The stage's torch.threads setting (0: leave torch's default)."""
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)


def autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU runs in fp32: bf16 matmuls there are slow and lossy
