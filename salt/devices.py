"""Where models run and at what precision: shared by training, extraction and the benchmark."""

from __future__ import annotations

import contextlib

import torch

from salt.config import TrainConfig


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`; asynchronous only from pinned memory (the loaders pin on CUDA), where the
    copy cannot race the host buffer being reused."""
    return t.to(device, non_blocking=t.is_pinned())


def set_torch_threads(train: TrainConfig) -> None:
    """The stage's torch.threads setting (0: leave torch's default)."""
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)


def autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU runs in fp32: bf16 matmuls there are slow and lossy
